"""Streaming the Gram statistics of linear layers' inputs over a calibration set.

The Gram matrix ``H = sum x x^T`` over calibration rows (``x`` one row of the
layer input unfolded by :func:`~optc.passes.layers.linear.input_rows`) is the
Hessian of the layer-wise reconstruction loss ``||W X - W' X||^2`` that
OBS/SparseGPT, GPTQ, least-squares refits and activation-aware SVD use.

:func:`input_grams` remembers its last results (bounded by bytes), keyed by the
model's content, the calibration set's content (:attr:`CalibrationSet.digest`) and every setting: the default
budget's search runs a pass at several strengths on the same input model, and
each run's captures were the same (the subsample is seeded). The remembered
arrays are read-only.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from optc.data.calibration import CalibrationSet, capture_activations, real_tokens
from optc.ir.model import Model
from optc.ir.session import make_session
from optc.passes.layers.linear import LinearLayer, input_rows, row_count
from optc.passes.numerics.grams import InputGram, PairedGram


@dataclass
class _Accumulator:
    layers: dict[str, list[LinearLayer]]
    max_rows: int
    rng: np.random.Generator
    grams: dict[str, InputGram] = field(default_factory=dict)

    def __call__(self, tensor: str, value: np.ndarray) -> None:
        for layer in self.layers[tensor]:
            count = row_count(layer, value.shape)
            # The same subsample as unfolding every row and choosing among them, unfolding only the chosen.
            keep = self.rng.choice(count, self.max_rows, replace=False) if count > self.max_rows else None
            rows = input_rows(layer, value.astype(np.float32, copy=False), keep)
            acc = self.grams.get(layer.node)
            if acc is None:
                g, _, d = rows.shape
                acc = self.grams[layer.node] = InputGram(np.zeros((g, d, d)), np.zeros((g, d)))
            acc.gram += _gram(rows, rows)
            acc.total += rows.sum(axis=1, dtype=np.float64)
            acc.rows += rows.shape[1]


def _gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a^T b`` per group, for one batch of rows, to add to the running float64 sums.

    The product is taken in float32 (sgemm: twice dgemm's speed, and the rows are the
    model's float32 activations anyway) and only the sums over batches are float64:
    one batch's rounding (about 1e-6 relative for 4,096 rows) is far below the ridge
    every solve adds. This product is most of a pass's time on wide convolutions
    (crepe's 8,192-wide unfolded inputs: 207 of 356 s of prune-channels). It is returned
    in float32: ``sums += product`` widens it element by element, where a float64 copy
    first cost a pass over ``d^2`` more memory per batch (light_resnet50's 4,608-wide
    inputs, batch 1: 43 of 85 s of the Grams).
    """
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught below, not warned about
        product = np.matmul(a.transpose(0, 2, 1), b)
    if not np.isfinite(product).all():  # activations near 1e19 overflow a float32 product: float64 holds them
        return np.matmul(a.astype(np.float64).transpose(0, 2, 1), b.astype(np.float64))
    return product


def _target_rows(rows: np.ndarray, wt: np.ndarray) -> np.ndarray:
    """``x W^T`` for ``rows`` (``wt`` is ``W^T``, float32), as float32 unless that overflows, as :func:`_gram` does."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = rows @ wt
    if not np.isfinite(out).all() or not np.isfinite(np.einsum("ij,ij->", out, out, dtype=np.float64)):
        return rows.astype(np.float64) @ wt.astype(np.float64)
    return out


def input_grams(
    model: Model,
    calibration: CalibrationSet,
    layers: Sequence[LinearLayer],
    *,
    batch_size: int = 16,
    max_batches: int | None = None,
    max_rows_per_batch: int = 4096,
    seed: int = 0,
) -> dict[str, InputGram]:
    """Gram matrices of every layer's unfolded input, streamed over the calibration set.

    Rows beyond ``max_rows_per_batch`` per batch are subsampled (seeded) so large
    feature maps cost bounded memory and time.
    """
    key = (model.fingerprint(), calibration.digest, tuple(layers), batch_size, max_batches, max_rows_per_batch, seed)
    held = _GRAMS.get(key)
    if held is not None:
        _GRAMS.move_to_end(key)
        return dict(held)
    by_tensor: dict[str, list[LinearLayer]] = {}
    for layer in layers:
        by_tensor.setdefault(layer.input, []).append(layer)
    acc = _Accumulator(by_tensor, max_rows_per_batch, np.random.default_rng(seed))
    capture_activations(model, calibration, list(by_tensor), acc, batch_size=batch_size, max_batches=max_batches)
    _remember(key, acc.grams)
    return dict(acc.grams)


# input_grams' results: key -> grams.
_GRAMS: OrderedDict[tuple, dict[str, InputGram]] = OrderedDict()
GRAMS_MAX_BYTES = 512 << 20


def _remember(key: tuple, grams: dict[str, InputGram]) -> None:
    size = sum(g.gram.nbytes + g.total.nbytes for g in grams.values())
    if size > GRAMS_MAX_BYTES:
        return
    for g in grams.values():
        g.gram.flags.writeable = False
        g.total.flags.writeable = False
    _GRAMS[key] = grams
    while sum(g.gram.nbytes + g.total.nbytes for held in _GRAMS.values() for g in held.values()) > GRAMS_MAX_BYTES:
        _GRAMS.popitem(last=False)


def paired_grams(
    model: Model,
    layers: Sequence[LinearLayer],
    reference: Model,
    reference_layers: Sequence[LinearLayer],
    calibration: CalibrationSet,
    *,
    batch_size: int = 16,
    max_batches: int | None = None,
    max_rows_per_batch: int = 4096,
    seed: int = 0,
) -> dict[str, PairedGram]:
    """:class:`PairedGram` of every layer (by node), from one run of each model per batch.

    ``layers[i]`` in ``model`` and ``reference_layers[i]`` in ``reference`` are
    the same layer (their input tensors may be named differently). This is
    what a sequential fit needs: the target is the reference layer's output on
    *its* input, the fit sees the input as the (already compressed) model
    computes it, so upstream error is corrected instead of compounded. Rows are
    aligned: same samples, same positions, same subsample.
    """
    names_a = sorted({l.input for l in layers})
    names_b = sorted({l.input for l in reference_layers})
    # Not spinning: Gram products run between the runs, on the cores spinning workers would hold.
    session_a = make_session(model, extra_outputs=names_a, spinning=False)
    session_b = make_session(reference, extra_outputs=names_b, spinning=False)
    acc = PairedAccumulator(layers, reference_layers, max_rows_per_batch, seed)
    mask_name = calibration.token_mask
    for i, feed in enumerate(calibration.batches(batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        values_a = dict(zip(names_a, session_a.run(names_a, feed)))
        values_b = dict(zip(names_b, session_b.run(names_b, feed)))
        acc.add(values_a, values_b, feed[mask_name] if mask_name else None)
    return acc.grams


class PairedAccumulator:
    """:class:`PairedGram` of layers (by node) summed batch by batch: see :func:`paired_grams`.

    ``targets`` (node -> ``W``, ``out x d_ref``): for those layers the reference
    Grams ``B B^T`` and ``A B^T`` are not summed, only what a refit to ``W`` reads of
    them (:func:`~optc.passes.numerics.refit.refit_paired`): the energy ``sum ||x_b W^T||^2``
    and the cross moment ``sum x_a (x_b W^T)^T``.
    """

    def __init__(self, layers: Sequence[LinearLayer], reference_layers: Sequence[LinearLayer], max_rows_per_batch: int, seed: int,
                 targets: Mapping[str, np.ndarray] | None = None):
        self.pairs = list(zip(layers, reference_layers))
        self.max_rows = max_rows_per_batch
        self.rng = np.random.default_rng(seed)
        self.targets = {k: np.ascontiguousarray(w.T, dtype=np.float32) for k, w in (targets or {}).items()}
        self.grams: dict[str, PairedGram] = {}

    def add(self, values_a: Mapping[str, np.ndarray], values_b: Mapping[str, np.ndarray], mask: np.ndarray | None) -> None:
        """One batch: ``values_a`` holds the layers' inputs in the model, ``values_b`` the reference layers'."""
        keep: dict[int, np.ndarray] = {}  # one subsample per row count, shared by the layers that have it
        for la, lb in self.pairs:
            xa = real_tokens(values_a[la.input], mask).astype(np.float32, copy=False)
            xb = real_tokens(values_b[lb.input], mask).astype(np.float32, copy=False)
            rows = row_count(la, xa.shape)
            if rows > self.max_rows and rows not in keep:
                keep[rows] = self.rng.choice(rows, self.max_rows, replace=False)
            chosen = keep.get(rows) if rows > self.max_rows else None
            ra, rb = input_rows(la, xa, chosen), input_rows(lb, xb, chosen)
            g = self.grams.get(la.node)
            wt = self.targets.get(la.node)
            if g is None:
                # The two inputs may differ in width (a pruned layer reads fewer columns).
                groups, da, db = ra.shape[0], ra.shape[2], rb.shape[2]
                full = wt is None
                g = self.grams[la.node] = PairedGram(
                    np.zeros((groups, da, da)), np.zeros((groups, da, db)) if full else None, np.zeros((groups, db, db)) if full else None,
                    np.zeros((groups, da)), np.zeros((groups, db)), energy=None if full else 0.0,
                    ay=None if full else np.zeros((da, wt.shape[1])),
                )
            g.aa += _gram(ra, ra)
            if wt is None:
                g.ab += _gram(ra, rb)
                g.bb += _gram(rb, rb)
            else:
                y = _target_rows(rb[0], wt)
                g.energy += float(np.einsum("ij,ij->", y, y, dtype=np.float64))
                g.ay += _gram(ra[:1], y[None])[0]
            g.sum_a += ra.sum(axis=1, dtype=np.float64)
            g.sum_b += rb.sum(axis=1, dtype=np.float64)
            g.rows += ra.shape[1]
