"""Compressed layers refit, in graph order, on their own inputs to the original layers' outputs.

Shared by prune-channels (``reconstruct=sequential``) and distill
(``reconstruct=sequential``): layers are refit in graph order, each on its
input *as the compressed model computes it* (so upstream error is corrected,
not compounded), against what the original layer produced on the original
input (:func:`optc.passes.layers.paired_grams`, :func:`optc.passes.numerics.refit.refit_paired`).
Both models run in stages (:mod:`optc.ir.staged`), so that refitting n layers costs
about one run of each model per batch rather than n.
A layer refit to rows ``R`` of the original weight matrix ``W`` gets the weights
``W'`` and bias shift ``b`` minimising ``E||x W[R]^T - (x' W'^T + b)||^2 + lam ||W' - W_c||^2``
over the calibration rows, ``x`` being the original layer's input, ``x'`` the
compressed layer's and ``W_c`` its weights before the refit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from optc.ir.graph import GraphEditor
from optc import progress
from optc.ir.model import Model
from optc.passes.layers.bias_fold import add_to_bias
from optc.data.calibration import CalibrationSet
from optc.ir.staged import StagedRun
from optc.ir.view import attribute, graph_nodes, output_names
from optc.passes.layers import LinearLayer, PairedGram, find_linear_layers, matrix_to_weight, weight_matrix
from optc.passes.layers.grams import PairedAccumulator
from optc.passes.numerics.refit import Refit, refit_paired


@dataclass(frozen=True)
class RefitTarget:
    """A compressed layer to refit, by node name (the same in both models)."""

    node: str
    rows: np.ndarray | None = None  # rows of the original weight matrix it reproduces; None: all of them
    bias_already: np.ndarray | None = None  # a bias delta its bias already holds (a previous fit)


def refit_in_graph_order(
    model: Model, reference: Model, targets: Iterable[RefitTarget], calibration: CalibrationSet, *,
    ridge: float, max_batches: int | None, seed: int = 0,
) -> tuple[Model, dict[str, Refit]]:
    """``model`` with each target refit by :func:`refit_layer`, in the order given (graph order), and the fits.

    Targets that are not a linear layer of ``model``, or are grouped convolutions,
    are left as they are (and have no fit). Both models run in stages
    (:class:`~optc.ir.staged.StagedRun`): each target's input is computed from the
    values the previous targets' stages left, so in graph order every node runs
    about once per batch, not once per target.
    """
    targets = list(targets)
    reference_layers = {layer.node: layer for layer in find_linear_layers(reference)[0]}
    # Each layer is edited once, in graph order: the layers not yet refit keep the
    # input tensors and weight names they have in the model compressed so far.
    current_layers = {layer.node: layer for layer in find_linear_layers(model)[0]}
    # A private copy, its weights rewritten in place layer by layer (a new model per layer copied every
    # weight per layer); the staged run reads the current weights from it.
    model = model.copy()
    runs = StagedRun(model), StagedRun(reference)
    feeds = _HeldFeeds(calibration, max_batches)
    fits: dict[str, Refit] = {}
    for index, target in enumerate(targets, start=1):
        progress.step(index - 1, len(targets), "layers refit")
        layer = current_layers.get(target.node)
        if layer is None or layer.group != 1:
            continue
        ref = reference_layers[target.node]
        w = weight_matrix(ref, reference.initializer_array(ref.weight).astype(np.float64))
        target_w = w if target.rows is None else w[target.rows]
        pg = _paired_gram(runs, layer, ref, target_w, feeds, calibration.token_mask, seed=seed)
        fit, values, new_w, delta = _refit_values(model, layer, pg, target_w, ridge=ridge, bias_already=target.bias_already)
        if values is not None:
            model.set_initializers(values)
        else:
            model = _with_bias_node(model, layer, new_w, delta)
        fits[target.node] = fit
        runs[0].update(model, [target.node])
    return model, fits


class _HeldFeeds:
    """The calibration feeds every layer's refit reads, read from the set once while they fit in ``max_bytes``.

    Each refit passes over the same feeds; reading them from the set per layer decompressed
    the calibration file once per layer (ddddocr's detector, 82 layers: 8.4 of 68 s).
    """

    def __init__(self, calibration: CalibrationSet, max_batches: int | None, max_bytes: int = 256 << 20):
        self.calibration, self.max_batches = calibration, max_batches
        self.held: list[dict[str, np.ndarray]] | None = []
        for feed in self._read():
            self.held.append(feed)
            if sum(v.nbytes for f in self.held for v in f.values()) > max_bytes:
                self.held = None
                break

    def _read(self) -> Iterator[dict[str, np.ndarray]]:
        for i, feed in enumerate(self.calibration.batches(16)):
            if self.max_batches is not None and i >= self.max_batches:
                return
            yield feed

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.held) if self.held is not None else self._read()


def _paired_gram(runs: tuple[StagedRun, StagedRun], layer: LinearLayer, reference_layer: LinearLayer, target_w: np.ndarray,
                 feeds: Iterable[dict[str, np.ndarray]], mask_name: str | None, *, seed: int) -> PairedGram:
    """What :func:`~optc.passes.layers.paired_grams` gives for one layer, from the two staged runs, with the
    energy of ``target_w`` on the reference input in place of the reference Gram (all the refit reads of it)."""
    # 1024 rows a batch: the fit has at most a few thousand columns, and each layer costs a pass.
    acc = PairedAccumulator([layer], [reference_layer], 1024, seed, targets={layer.node: target_w})
    with runs[0].stage([layer.input]) as stage_a, runs[1].stage([reference_layer.input]) as stage_b:
        for feed in feeds:
            acc.add(stage_a.run(feed), stage_b.run(feed), feed[mask_name] if mask_name else None)
    return acc.grams[layer.node]


def refit_layer(
    model: Model, layer: LinearLayer, pg: PairedGram, target_w: np.ndarray, *, ridge: float, bias_already: np.ndarray | None = None,
) -> tuple[Model, Refit]:
    """``model`` with ``layer``'s weight and bias refit so that, on the inputs ``pg`` pairs, it reproduces
    ``target_w`` (``out x d_ref``, rows of the reference layer's weight matrix) applied to the reference input.

    ``bias_already``: a bias delta the layer's bias already holds (a previous fit); only the
    difference is added.
    """
    fit, values, new_w, delta = _refit_values(model, layer, pg, target_w, ridge=ridge, bias_already=bias_already)
    if values is not None:
        return model.with_initializers(values), fit
    return _with_bias_node(model, layer, new_w, delta), fit


def _refit_values(model: Model, layer: LinearLayer, pg: PairedGram, target_w: np.ndarray, *, ridge: float,
                  bias_already: np.ndarray | None) -> tuple[Refit, dict[str, np.ndarray] | None, np.ndarray, np.ndarray]:
    """The fit, the new initializer values when only values change (else None), the new weight and the bias delta."""
    old_w = model.initializer_array(layer.weight)
    fit = refit_paired(pg, target_w, weight_matrix(layer, old_w.astype(np.float64)), ridge=ridge)
    new_w = matrix_to_weight(layer, fit.weight).astype(old_w.dtype)
    delta = fit.bias_delta - (bias_already if bias_already is not None else 0.0)
    bias = _own_bias(model, layer, len(delta)) if np.any(delta) else None
    if np.any(delta) and bias is None:
        return fit, None, new_w, delta
    # Only values change: no graph round trip (one per layer made the refit quadratic in the model).
    values = {layer.weight: new_w}
    if bias is not None:
        name, scale, value = bias
        values[name] = (value.astype(np.float64) + scale * delta.reshape(value.shape)).astype(value.dtype)
    return fit, values, new_w, delta


def _with_bias_node(model: Model, layer: LinearLayer, new_w: np.ndarray, delta: np.ndarray) -> Model:
    """``model`` with the layer's new weight and the bias delta added where it needs the graph edited."""
    editor = GraphEditor(model)
    node = next(n for n in editor.nodes if n.name == layer.node)
    node.inputs[1] = editor.add_constant(node.inputs[1].name, new_w)
    add_to_bias(editor, node, delta)
    return editor.commit()


def _own_bias(model: Model, layer: LinearLayer, size: int) -> tuple[str, float, np.ndarray] | None:
    """The bias initializer of a Conv/Gemm read by this layer alone (name, delta scale, value), as
    :func:`~optc.passes.layers.bias_fold.add_to_bias` would update it; None where it would edit the graph."""
    if layer.op not in ("Conv", "Gemm") or layer.bias is None:
        return None
    value = model.initializer_array(layer.bias)
    if value is None or value.size != size or layer.bias in output_names(model):
        return None
    nodes = graph_nodes(model)
    if sum(name == layer.bias for n in nodes for name in n.input) != 1:
        return None
    scale = 1.0
    if layer.op == "Gemm":
        node = next(n for n in nodes if n.name == layer.node)
        scale = float(attribute(node, "alpha", 1.0)) / float(attribute(node, "beta", 1.0))
    return layer.bias, scale, value
