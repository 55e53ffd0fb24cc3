"""sparsify: zero weights of linear layers (unstructured, N:M or blocks), optionally with OBS reconstruction.

Each Conv/Gemm/MatMul with a constant weight is seen as its ``(out, in)``
matrix ``W`` (per group for grouped convolutions) with calibration Gram
``G = X X^T`` of its unfolded input (:mod:`optc.passes.layers`). The layer
objective is ``||W X - W' X||^2 = tr((W - W') G (W - W')^T)``.

* ``method=magnitude`` zeros the entries (or tiles) with the smallest ``|w|``.
* ``method=obs`` runs SparseGPT (see :mod:`optc.passes.sparsity_patterns`): it
  prunes column blocks left to right, choosing entries by the OBS saliency
  ``w^2 / [H^-1]_jj^2`` and updating the remaining weights so the objective
  stays small, on the damped Hessian ``H = G / rows + damp * mean(diag) * I``.

The level is uniform per layer: exactly ``round(sparsity * units)`` entries or
tiles are zeroed in every layer (N:M imposes ``1 - N/M`` instead).

The gain is size only: the weights are stored dense (onnxruntime has no kernels
that skip zeros for these ops), so latency is unchanged and the file shrinks
only under a generic compressor. The stats give the uncompressed and
zlib-compressed weight bytes before and after, and estimates of two sparse
encodings (ONNX COO sparse initializers with int64 indices; bitmap + values).
"""
from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from typing import Literal, Mapping

import numpy as np

from optc.ir.graph import GraphEditor
from optc.ir.model import Model
from optc.passes.base import Pass, PassContext, PassResult, Requirement, option, register_pass
from optc.passes.layers import InputGram, LinearLayer, find_linear_layers, input_grams, matrix_to_weight, weight_matrix
from optc.passes.sparsity_patterns import (
    SparsityPattern,
    magnitude_prune,
    obs_prune,
    output_energy,
    parse_pattern,
    split_count,
    units,
)

log = logging.getLogger(__name__)

COO_INDEX_BYTES = 8  # ONNX SparseTensorProto indices are int64


@dataclass(frozen=True, kw_only=True)
class SparsifyConfig:
    sparsity: float = option(0.5, "fraction of each layer's weights set to zero (ignored by N:M patterns, which fix 1-N/M)")
    pattern: str = option("unstructured", "unstructured, N:M along the input dimension (2:4, 4:8) or block:RxC (block:4x4, block:1x4)")
    method: Literal["magnitude", "obs"] = option("obs", "magnitude: drop the smallest |w|; obs: SparseGPT selection and inverse-Hessian update")
    damp: float = option(0.01, "OBS damping added to the Hessian diagonal, as a fraction of its mean")
    block_size: int = option(128, "columns per OBS block (rounded to a multiple of M or the tile width)")
    exclude: tuple[str, ...] = option((), "node names or op types left dense")
    min_params: int = option(0, "layers with fewer weights than this are left dense")
    max_batches: int = option(32, "calibration batches (of 16) used for the Hessians")
    measure_bytes: bool = option(True, "report zlib-compressed weight bytes (costs a compression of every weight)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), not {self.sparsity}")
        parse_pattern(self.pattern)
        if self.damp < 0:
            raise ValueError(f"damp must be >= 0, not {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, not {self.block_size}")
        if self.min_params < 0:
            raise ValueError(f"min_params must be >= 0, not {self.min_params}")
        if self.max_batches < 1:
            raise ValueError(f"max_batches must be >= 1, not {self.max_batches}")


@dataclass(frozen=True)
class SparseWeight:
    """The plan for one layer: its new weight and what it cost."""

    layer: LinearLayer
    weight: np.ndarray
    zeros: int
    rel_error: float


@register_pass("sparsify")
class Sparsify(Pass[SparsifyConfig]):
    """Zero weights in an unstructured, N:M or block pattern, with optional OBS reconstruction (lossy)."""

    config_class = SparsifyConfig
    requires = frozenset({Requirement.CALIBRATION, Requirement.SHAPES})
    exact = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        layers, _ = self.select_layers(model)
        if not layers or self._is_noop():
            return self.run_with_grams(model, {})
        grams = input_grams(model, ctx.calibration, layers, max_batches=self.config.max_batches, seed=ctx.seed)
        return self.run_with_grams(model, grams)

    def select_layers(self, model: Model) -> tuple[list[LinearLayer], list[str]]:
        """The layers this config sparsifies, and ``"node: reason"`` for the others."""
        layers, skipped = find_linear_layers(model, exclude=self.config.exclude)
        chosen: list[LinearLayer] = []
        for layer in layers:
            size = int(np.prod(layer.weight_shape))
            if size < self.config.min_params:
                skipped.append(f"{layer.node}: {size} weights < min_params={self.config.min_params}")
            else:
                chosen.append(layer)
        return chosen, skipped

    def run_with_grams(self, model: Model, grams: Mapping[str, InputGram]) -> PassResult:
        """:meth:`run` with the layers' input Grams already computed (e.g. shared by several configs).

        ``grams`` must hold every layer :meth:`select_layers` returns; it is only
        read, so one calibration pass can serve a sweep of configurations.
        """
        pattern = parse_pattern(self.config.pattern)
        layers, skipped = self.select_layers(model)
        unchanged = PassResult(model, modified=False, stats={"layers": [], "pattern": str(pattern)}, skipped=skipped)
        if not layers or self._is_noop():
            return unchanged
        plans = [self._plan(model, layer, grams[layer.node], pattern) for layer in layers]
        plans = [p for p in plans if p.zeros > 0]
        if not plans:
            return unchanged
        editor = GraphEditor(model)
        nodes = {n.name: n for n in editor.nodes}
        for plan in plans:
            nodes[plan.layer.node].inputs[1] = editor.add_constant(f"{plan.layer.weight}_sparse", plan.weight)
        new_model = editor.commit()
        return PassResult(new_model, modified=True, stats=self._stats(model, new_model, plans, pattern), skipped=skipped)

    def _is_noop(self) -> bool:
        return parse_pattern(self.config.pattern).kind != "nm" and self.config.sparsity == 0

    def _plan(self, model: Model, layer: LinearLayer, gram: InputGram, pattern: SparsityPattern) -> SparseWeight:
        cfg = self.config
        w = model.initializer_array(layer.weight)
        matrix = weight_matrix(layer, w.astype(np.float64))
        groups = gram.gram.shape[0]
        per_group = matrix.shape[0] // groups
        parts = [matrix[g * per_group : (g + 1) * per_group] for g in range(groups)]
        shape = (per_group, matrix.shape[1])
        total = 0 if pattern.kind == "nm" else int(round(cfg.sparsity * units(shape, pattern) * groups))
        counts = split_count(total, [units(shape, pattern)] * groups)
        hessians = gram.hessian(0.0) if cfg.method == "obs" else None  # damped inside obs_prune
        new_parts = []
        for g, (part, count) in enumerate(zip(parts, counts)):
            if cfg.method == "obs":
                new_parts.append(obs_prune(part, hessians[g], pattern, count, damp=cfg.damp, block_size=cfg.block_size))
            else:
                new_parts.append(magnitude_prune(part, pattern, count))
        new_matrix = np.concatenate(new_parts, axis=0)
        error = sum(output_energy(p - q, gram.gram[g]) for g, (p, q) in enumerate(zip(parts, new_parts)))
        energy = sum(output_energy(p, gram.gram[g]) for g, p in enumerate(parts))
        new_w = matrix_to_weight(layer, new_matrix).astype(w.dtype)
        zeros = int(np.count_nonzero(new_w == 0) - np.count_nonzero(w == 0))
        rel = error / energy if energy > 0 else 0.0
        log.debug("%s: %d zeros, relative error %.3g", layer.node, zeros, rel)
        return SparseWeight(layer, new_w, zeros, rel)

    def _stats(self, before: Model, after: Model, plans: list[SparseWeight], pattern: SparsityPattern) -> dict:
        per_layer = []
        params = nonzero = coo = bitmap = 0
        for p in plans:
            size = p.weight.size
            nz = int(np.count_nonzero(p.weight))
            params += size
            nonzero += nz
            coo += nz * (p.weight.itemsize + COO_INDEX_BYTES)
            bitmap += nz * p.weight.itemsize + math.ceil(size / 8)
            per_layer.append({
                "node": p.layer.node,
                "op": p.layer.op,
                "pattern": str(pattern),
                "params": size,
                "nonzero": nz,
                "sparsity": round(1 - nz / size, 6),
                "rel_error": float(p.rel_error),
            })
        dense_pruned = sum(p.weight.nbytes for p in plans)
        stats: dict = {
            "pattern": str(pattern),
            "method": self.config.method,
            "layers": per_layer,
            "params_sparsified": params,
            "nonzero_params": nonzero,
            "sparsity": round(1 - nonzero / params, 6) if params else 0.0,
            "bytes_dense": after.weight_bytes(),
            # What two sparse encodings of the sparsified weights would weigh (not written).
            "bytes_coo_estimate": after.weight_bytes() - dense_pruned + coo,
            "bytes_bitmap_estimate": after.weight_bytes() - dense_pruned + bitmap,
            "speedup": "none: weights are stored dense and onnxruntime runs dense kernels; the gain is size only",
        }
        if self.config.measure_bytes:
            stats["bytes_compressed_before"] = _compressed_weight_bytes(before)
            stats["bytes_compressed"] = _compressed_weight_bytes(after)
        return stats


def _compressed_weight_bytes(model: Model) -> int:
    """Sum over initializers of the zlib (level 6) size of their raw little-endian bytes."""
    total = 0
    for t in model.graph.initializer:
        total += len(zlib.compress(model.initializer_array(t.name).tobytes(), 6))
    return total
