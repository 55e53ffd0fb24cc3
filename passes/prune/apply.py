"""Applying a channel-pruning plan: slicing, bias folds, and the least-squares refits.

See :mod:`optc.passes.prune.prune_channels` for what is removed and why. Two refits:

* ``lstsq``: every consumer is refit to its original output from its original
  input Gram (:func:`optc.passes.numerics.refit.refit_columns`): one calibration pass.
* ``sequential``: the same, then each consumer in topological order is refit
  again on its input *as the pruned model computes it* against its original
  output (:func:`optc.passes.numerics.refit.refit_paired`), so each layer corrects the
  error of the layers before it instead of compounding it (He et al. 2017);
  one calibration pass per consumer.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np

from optc.ir.graph import GraphEditor
from optc.ir.model import Model
from optc.ir.shapes import drop_inferred_shapes, infer_shapes
from optc.ir.view import attribute
from optc.passes.layers.bias_fold import add_to_bias
from optc.passes.layers import matrix_to_weight, weight_matrix
from optc.passes.prune.criteria import feature_unit
from optc.passes.prune.groups import ChannelGraph, Layout
from optc.passes.numerics.refit import refit_columns
from optc.passes.layers.sequential_refit import RefitTarget, refit_in_graph_order

logger = logging.getLogger(__name__)


@dataclass
class PrunePlan:
    """Channels kept per group (all of them for groups left whole) and the scores behind it."""

    keep: dict[int, np.ndarray]
    scores: dict[int, np.ndarray] = field(default_factory=dict)
    criterion: dict[int, str] = field(default_factory=dict)


def layout_keep(graph: ChannelGraph, plan: PrunePlan, layout: Layout) -> np.ndarray:
    """Feature positions along a channelled axis that survive the plan, in the order the pruned model has them."""
    parts, offset = [], 0
    for seg in layout:
        kept = plan.keep[graph.space_group[seg.space]]
        if seg.shuffle > 1:
            # The pruned shuffle puts the r-th kept channel of group g at r G + g (the analysis kept as
            # many in each group): those positions, as positions of the unpruned shuffle, in that order.
            width = seg.length // seg.shuffle
            ranked = kept.reshape(seg.shuffle, -1) - (np.arange(seg.shuffle) * width)[:, None]  # (g, r) -> i
            kept = (ranked * seg.shuffle + np.arange(seg.shuffle)[:, None]).T.ravel()
        parts.append(offset + (kept[:, None] * seg.block + np.arange(seg.block)[None]).ravel())
        offset += seg.length * seg.block
    return np.concatenate(parts).astype(np.int64)


def apply_plan(model, nodes, graph, plan, layers, grams, weights, cfg) -> tuple[Model, dict[str, tuple[float, float]], dict[str, np.ndarray]]:
    """The pruned model, each refit consumer's (error, error without refit), and the bias deltas applied."""
    new_values: dict[tuple[str, int], np.ndarray] = {}
    bias_delta: dict[str, np.ndarray] = {}
    errors: dict[str, tuple[float, float]] = {}
    matrices: dict[str, np.ndarray] = {}  # consumers' refit weights, in the original layout
    for consumer in graph.consumers:
        layer = layers[consumer.node]
        unit = feature_unit(layer)
        kept_features = layout_keep(graph, plan, consumer.layout)
        total = sum(s.length * s.block for s in consumer.layout)
        if len(kept_features) == total:
            continue
        w = weight_matrix(layer, weights[consumer.node])
        gram = grams.get(consumer.node)
        # A grouped Conv's group h reads block h of the channels with its own weight rows and columns:
        # each group is refit alone, on its block's kept channels (the analysis kept as many in each).
        per_group, rows = total // consumer.group, w.shape[0] // consumer.group
        parts = []
        for h in range(consumer.group):
            mine = kept_features[(kept_features >= h * per_group) & (kept_features < (h + 1) * per_group)] - h * per_group
            cols = (mine[:, None] * unit + np.arange(unit)[None]).ravel()
            parts.append(_refit_columns(w[h * rows : (h + 1) * rows], gram, h, cols, cfg))
        new_w, delta = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        if parts[0][2] is not None:
            errors[consumer.node] = tuple(max(p[2][i] for p in parts) for i in (0, 1))
        shape = list(layer.weight_shape)
        if layer.op == "Conv":
            shape[1] = len(kept_features) // consumer.group
        sliced = dataclasses.replace(layer, weight_shape=tuple(shape))
        matrices[consumer.node] = matrix_to_weight(sliced, new_w)
        if np.any(delta):
            bias_delta[consumer.node] = delta
    for group in graph.groups:
        keep = plan.keep[group.id]
        if len(keep) == group.size:
            continue
        for source in group.sources:
            node = nodes[source.node]
            w = matrices.get(source.node)
            if w is None:
                w = model.initializer_array(node.input[1]).astype(np.float64)
            axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and attribute(node, "transB", 0)) else 1
            matrices[source.node] = np.take(w, keep, axis=axis)
            if len(node.input) > 2 and node.input[2]:
                bias = model.initializer_array(node.input[2])
                if bias.size == group.size:
                    new_values[(source.node, 2)] = np.take(bias, keep, axis=bias.ndim - 1)
            if source.node in bias_delta:
                bias_delta[source.node] = bias_delta[source.node][keep]
    for param in graph.params:
        value = model.initializer_array(nodes[param.node].input[param.input_index])
        kept = layout_keep(graph, plan, param.layout)
        if len(kept) < value.shape[param.axis]:
            new_values[(param.node, param.input_index)] = np.take(value, kept, axis=param.axis)
    for name, w in matrices.items():
        new_values[(name, 1)] = w.astype(model.initializer_array(nodes[name].input[1]).dtype)
    return _edit(model, nodes, graph, plan, new_values, bias_delta), errors, bias_delta


def _refit_columns(w: np.ndarray, gram, group: int, cols: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray, tuple[float, float] | None]:
    """Weights on columns ``cols`` of ``w`` (one group's rows), the bias delta, and (error, error without refit) if refit."""
    if cfg.reconstruct in ("lstsq", "sequential"):
        fit = refit_columns(gram, w, cols, group=group, ridge=cfg.ridge)
        return fit.weight, fit.bias_delta, (fit.rel_error, fit.rel_error_plain)
    removed = np.setdiff1d(np.arange(w.shape[1]), cols)
    delta = w[:, removed] @ gram.mean[group][removed] if cfg.reconstruct == "mean" else np.zeros(w.shape[0])
    return w[:, cols], delta, None


def _edit(model, nodes, graph, plan, new_values, bias_delta) -> Model:
    editor = GraphEditor(model)
    gs_nodes = {n.name: n for n in editor.nodes}
    for (name, index), value in new_values.items():
        node = gs_nodes[name]
        old_shape = np.shape(editor.constant_value(node.inputs[index]))
        node.inputs[index] = editor.add_constant(node.inputs[index].name, value)
        if node.op == "Conv" and index == 1 and node.attrs.get("group", 1) == old_shape[0] > 1 and old_shape[1] == 1:
            node.attrs["group"] = int(value.shape[0])  # a depthwise conv keeps one group per channel; a grouped one its groups
    for fix in graph.reshapes:
        node = gs_nodes[fix.node]
        target = np.array(editor.constant_value(node.inputs[1]), dtype=np.int64).copy()
        target[fix.axis] = len(layout_keep(graph, plan, fix.layout)) // fix.divide
        node.inputs[1] = editor.add_constant(node.inputs[1].name, target)
    for name, delta in bias_delta.items():
        add_to_bias(editor, gs_nodes[name], delta)
    new_model = editor.commit()
    # Shapes of every tensor on a pruned path changed: infer them afresh.
    drop_inferred_shapes(new_model)
    infer_shapes(new_model)
    return new_model


def refit_sequentially(original, pruned, graph, plan, layers, ctx_calibration, errors, bias_delta, cfg, seed: int = 0) -> Model:
    """Refit each changed consumer, in graph order, on the pruned model's own input (see module docs)."""
    sources = {s.node: s for g in graph.groups for s in g.sources}
    targets = []
    for consumer in graph.consumers:
        if consumer.node not in errors:
            continue  # its input lost nothing
        source = sources.get(consumer.node)
        rows = plan.keep[graph.space_group[source.space]] if source is not None else np.arange(layers[consumer.node].out_features)
        # The bias already holds the first refit's delta: only the difference is added.
        targets.append(RefitTarget(consumer.node, rows, bias_delta.get(consumer.node, np.zeros(len(rows)))))
    pruned, fits = refit_in_graph_order(
        pruned, original, targets, ctx_calibration, ridge=cfg.ridge, max_batches=cfg.max_batches, seed=seed
    )
    for node, fit in fits.items():
        errors[node] = (fit.rel_error, errors[node][1])
    infer_shapes(pruned)
    return pruned
