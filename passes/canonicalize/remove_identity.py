"""remove-identity: drop nodes whose output equals their first input.

Identity; Dropout at inference (no mask used, training_mode absent or a
constant false); Reshape to the shape the input already has (static shapes
only); Transpose with the identity permutation; Cast to the type the input
already has. Each is exact: the value passes through unchanged.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from optc.ir.graph import GraphEditor, Node, Tensor
from optc.ir.liveness import has_ops
from optc.ir.model import Model, numpy_dtype
from optc.passes.framework import NoOptions, Pass, PassContext, PassResult, Requirement, register_pass


def _identity(editor: GraphEditor, node: Node) -> str | None:
    return None


def _dropout(editor: GraphEditor, node: Node) -> str | None:
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        return "its mask output is used"
    if len(node.outputs) > 1 and editor.is_graph_output(node.outputs[1]):
        return "its mask output is a graph output"
    if len(node.inputs) > 2 and node.inputs[2].name:
        mode = editor.constant_value(node.inputs[2])
        if mode is None or bool(np.asarray(mode).item()):
            return "training_mode is not a constant false"
    return None


def _static_shape(t: Tensor) -> tuple[int, ...] | None:
    shape = t.shape
    if shape is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        return None
    return tuple(int(d) for d in shape)


def _reshape(editor: GraphEditor, node: Node) -> str | None:
    src = _static_shape(node.inputs[0])
    target = editor.constant_value(node.inputs[1])
    if src is None or target is None:
        return "not provably a no-op (input shape or target not static)"
    allow_zero = int(node.attrs.get("allowzero", 0))
    dims = [int(d) for d in np.asarray(target).ravel()]
    resolved = [src[i] if d == 0 and not allow_zero and i < len(src) else d for i, d in enumerate(dims)]
    if resolved.count(-1) == 1:
        known = int(np.prod([d for d in resolved if d != -1]))
        total = int(np.prod(src))
        if known == 0 or total % known:
            return "target shape cannot be resolved"
        resolved[resolved.index(-1)] = total // known
    return None if tuple(resolved) == src else "changes the shape"


def _transpose(editor: GraphEditor, node: Node) -> str | None:
    perm = node.attrs.get("perm")
    if perm is None:
        rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
        return None if rank is not None and rank <= 1 else "permutes axes"
    return None if list(perm) == list(range(len(perm))) else "permutes axes"


def _cast(editor: GraphEditor, node: Node) -> str | None:
    src = node.inputs[0].dtype
    if src is None:
        return "input type unknown"
    return None if np.dtype(src) == numpy_dtype(int(node.attrs["to"])) else "changes the type"


CHECKS: dict[str, Callable[[GraphEditor, Node], str | None]] = {
    "Identity": _identity,
    "Dropout": _dropout,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Cast": _cast,
}


@register_pass("remove-identity")
class RemoveIdentity(Pass[NoOptions]):
    """Remove Identity, inference Dropout and no-op Reshape/Transpose/Cast (exact)."""

    requires = frozenset({Requirement.SHAPES})

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if not has_ops(model, CHECKS):  # no graph import for nothing
            return PassResult(model, modified=False, stats={"removed": {}})
        editor = GraphEditor(model)
        # Analyse first, then edit: the candidate list is fixed before any removal.
        candidates = [n for n in editor.nodes if n.op in CHECKS and n.domain in ("", "ai.onnx", None)]
        removable: list[Node] = []
        skipped: list[str] = []
        for node in candidates:
            reason = CHECKS[node.op](editor, node)
            if reason is None:
                removable.append(node)
            elif node.op in ("Identity", "Dropout"):
                skipped.append(f"{node.name}: {reason}")
        removed: dict[str, int] = {}
        for node in removable:
            if editor.bypass(node):
                removed[node.op] = removed.get(node.op, 0) + 1
            else:
                skipped.append(f"{node.name}: connects a graph input or constant straight to a graph output")
        if not removed:
            return PassResult(model, modified=False, stats={"removed": {}}, skipped=skipped)
        return PassResult(editor.commit(), modified=True, stats={"removed": removed}, skipped=skipped)
