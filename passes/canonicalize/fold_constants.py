"""fold-constants: evaluate every subgraph whose inputs are all constant.

Values are computed by onnxruntime (through onnx-graphsurgeon's folder), so a
folded constant is bit-for-bit what the runtime would have computed. With
shapes inferred (and input shapes frozen), ``Shape`` of a static tensor folds
too, which removes the Shape -> Gather -> Concat -> Reshape chains of dynamic
exports that TVM's ONNX frontend rejects.
"""
from __future__ import annotations

from dataclasses import dataclass

from optc.ir.graph import GraphEditor
from optc.ir.liveness import may_fold
from optc.ir.model import Model
from optc.passes.framework import Pass, PassConfig, PassContext, PassResult, Requirement, option, register_pass

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
        if not may_fold(model, fold_shapes=self.config.fold_shapes, exclude_ops=NONDETERMINISTIC_OPS):  # no graph import for nothing
            return PassResult(model, modified=False, stats={"nodes_folded": 0})
        editor = GraphEditor(model)
        before = editor.signature()
        editor.fold_constants(fold_shapes=self.config.fold_shapes, max_bytes=self.config.max_bytes, exclude=lambda n: n.op in NONDETERMINISTIC_OPS)
        if editor.signature() == before:
            return PassResult(model, modified=False, stats={"nodes_folded": 0})
        removed = len(before) - len(editor.nodes)
        return PassResult(editor.commit(), modified=True, stats={"nodes_folded": removed})
