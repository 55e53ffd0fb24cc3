"""fold-constants: evaluate every subgraph whose inputs are all constant, and inline every If whose condition folds.

Values are computed by onnxruntime (through onnx-graphsurgeon's folder), so a
folded constant is bit-for-bit what the runtime would have computed. With
shapes inferred (and input shapes frozen), ``Shape`` of a static tensor folds
too, which removes the Shape -> Gather -> Concat -> Reshape chains of dynamic
exports that TVM's ONNX frontend rejects.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from optc.ir.branches import decided_if, inline_decided_ifs
from optc.ir.graph import GraphEditor
from optc.ir.liveness import has_ops, may_fold
from optc.ir.model import Model
from optc.ir.shapes import infer_shapes
from optc.passes.framework import Pass, PassConfig, PassContext, PassResult, Requirement, option, register_pass

# Folding may grow the stored weights by this factor (plus 16 KiB) before data movement on weights is left unfolded.
GROWTH_ALLOWED = 1.02
MAX_ROUNDS = 8
DATA_MOVEMENT_OPS = {"Slice", "Split", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Transpose", "Concat", "Gather",
                     "Expand", "Tile", "Cast", "Identity", "Pad"}
WEIGHT_ELEMENTS = 1024

# Folding these would freeze one random draw into the model.
NONDETERMINISTIC_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


@dataclass(frozen=True, kw_only=True)
class FoldConstantsConfig(PassConfig):
    max_bytes: int = option(64 << 20, "largest folded tensor in bytes; bigger results (Tile, Expand of constants) stay computed at run time", ge=1)
    fold_shapes: bool = option(True, "fold Shape of tensors whose shape is static")


@register_pass("fold-constants")
class FoldConstants(Pass[FoldConstantsConfig]):
    """Replace subgraphs that depend only on constants by their values (exact)."""

    config_class = FoldConstantsConfig
    requires = frozenset({Requirement.SHAPES})

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        result = self._round(model)
        # A folded Reshape gives shape inference the static shape it could not see (a paddle2onnx export's
        # Shape -> Slice -> Concat -> Reshape chains, one behind the other): fold again while that frees more.
        # RapidOCR's recogniser kept 4 computed Reshapes after one round, which TVM's frontend refuses.
        # An If inlined brings its body's constants into the main graph: the same.
        for _ in range(MAX_ROUNDS - 1):
            if not result.modified:
                break
            infer_shapes(result.model)
            more = self._round(result.model)
            if not more.modified:
                break
            result = PassResult(more.model, True, {k: result.stats.get(k, 0) + more.stats.get(k, 0) for k in (*result.stats, *more.stats)})
        return result if result.modified else PassResult(model, modified=False, stats={"nodes_folded": 0})

    def _round(self, model: Model) -> PassResult:
        return self._inline_decided(self._fold_round(model))

    @staticmethod
    def _inline_decided(result: PassResult) -> PassResult:
        """An If whose condition folded to a constant is replaced by the body it takes (:func:`inline_decided_ifs`:
        onnx-graphsurgeon's own flattening breaks nested bodies such as Silero VAD's)."""
        if not has_ops(result.model, {"If"}) or decided_if(result.model) is None:
            return result  # no copy of a model whose Ifs all wait on run-time values (an unbound Silero VAD, each round)
        model = result.model if result.modified else result.model.copy()  # the pass's input is never changed in place
        inlined = inline_decided_ifs(model)
        return PassResult(model, True, {**result.stats, "ifs_inlined": result.stats.get("ifs_inlined", 0) + len(inlined)})

    def _fold_round(self, model: Model) -> PassResult:
        if not may_fold(model, fold_shapes=self.config.fold_shapes, exclude_ops=NONDETERMINISTIC_OPS):  # no graph import for nothing
            return PassResult(model, modified=False, stats={"nodes_folded": 0})
        result = self._fold(model, lambda n: n.op in NONDETERMINISTIC_OPS)
        if result.modified and result.model.weight_bytes() > model.weight_bytes() * GROWTH_ALLOWED + 16384:
            # A weight read in several places (Silero's LSTM weights, sliced into gates under two Ifs) is copied
            # once per place when every Slice/Unsqueeze of it is folded: leave data movement on weights to run time,
            # and bodies to the manager, which runs this pass on each If branch that holds weights as a model of its own.
            grown = result.model.weight_bytes()
            smaller = self._fold(model, lambda n: n.op in NONDETERMINISTIC_OPS or _moves_a_weight(n), bodies=False)
            if smaller.model.weight_bytes() < grown:
                smaller.model.notes.append(f"fold-constants: folding everything would grow the weights from {model.weight_bytes()} "
                                           f"to {grown} bytes (a weight copied per use); Slice/Reshape/... of weights and If/Loop bodies are left unfolded")
                return smaller
        return result

    def _fold(self, model: Model, exclude, bodies: bool = True) -> PassResult:
        editor = GraphEditor(model)
        before = editor.signature()
        editor.fold_constants(fold_shapes=self.config.fold_shapes, max_bytes=self.config.max_bytes, exclude=exclude, bodies=bodies)
        if editor.signature() == before:
            return PassResult(model, modified=False, stats={"nodes_folded": 0})
        removed = len(before) - len(editor.nodes)
        return PassResult(editor.commit(), modified=True, stats={"nodes_folded": removed})


def _moves_a_weight(node) -> bool:
    """Control flow, or a data-movement node reading a tensor of at least :data:`WEIGHT_ELEMENTS` elements or of
    unknown size (a value computed from weights, whose shape onnx-graphsurgeon has not worked out)."""
    if node.op in ("If", "Loop", "Scan"):  # a body reading weights: folded whole, it stores what it computes from them
        return True
    if node.op not in DATA_MOVEMENT_OPS:
        return False
    for t in node.inputs:
        if t.is_empty():
            continue
        if t.shape is None or not all(isinstance(d, int) for d in t.shape) or int(np.prod(t.shape)) >= WEIGHT_ELEMENTS:
            return True
    return False
