"""fold-constants: evaluate every subgraph whose inputs are all constant.

Values are computed by onnxruntime (through onnx-graphsurgeon's folder), so a
folded constant is bit-for-bit what the runtime would have computed. With
shapes inferred (and input shapes frozen), ``Shape`` of a static tensor folds
too, which removes the Shape -> Gather -> Concat -> Reshape chains of dynamic
exports that TVM's ONNX frontend rejects.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import onnx_graphsurgeon as gs

from optc.ir.graph import GraphEditor
from optc.ir.model import Model
from optc.passes.base import Pass, PassContext, PassResult, Requirement, option, register_pass

# Folding these would freeze one random draw into the model.
NONDETERMINISTIC_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


@dataclass(frozen=True, kw_only=True)
class FoldConstantsConfig:
    max_bytes: int = option(64 << 20, "largest folded tensor in bytes; bigger results (Tile, Expand of constants) stay computed at run time")
    fold_shapes: bool = option(True, "fold Shape of tensors whose shape is static")

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ValueError("max_bytes must be positive")


@contextlib.contextmanager
def quiet_graphsurgeon() -> Iterator[None]:
    """onnx-graphsurgeon prints its warnings itself; keep them out of our output for this call only."""
    logger = gs.logger.G_LOGGER
    saved = logger.severity
    logger.severity = logger.ERROR
    try:
        yield
    finally:
        logger.severity = saved


def node_signature(graph: gs.Graph) -> list[tuple]:
    """Nodes with their wiring, order-free: toposort may reorder without changing anything."""
    return sorted((n.name, n.op, tuple(t.name for t in n.inputs), tuple(t.name for t in n.outputs)) for n in graph.nodes)


@register_pass("fold-constants")
class FoldConstants(Pass[FoldConstantsConfig]):
    """Replace subgraphs that depend only on constants by their values (exact)."""

    config_class = FoldConstantsConfig
    requires = frozenset({Requirement.SHAPES})

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        editor = GraphEditor(model)
        graph = editor.graph
        before = node_signature(graph)
        with quiet_graphsurgeon():
            graph.toposort()
            graph.fold_constants(
                fold_shapes=self.config.fold_shapes,
                # "basic" retries a subgraph onnxruntime fails on unchanged until the
                # recursion limit (minutes, or out of memory, with large weights);
                # "recursive" drops a node per retry, so retries are bounded.
                partitioning="recursive",
                error_ok=True,
                size_threshold=self.config.max_bytes,
                should_exclude_node=lambda n: n.op in NONDETERMINISTIC_OPS,
            )
            graph.cleanup(remove_unused_graph_inputs=False)
        if node_signature(graph) == before:
            return PassResult(model, modified=False, stats={"nodes_folded": 0})
        removed = len(before) - len(graph.nodes)
        return PassResult(editor.commit(), modified=True, stats={"nodes_folded": removed})
