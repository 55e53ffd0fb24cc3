"""Which ops TVM's ONNX frontend can import, asked of TVM itself.

TVM is imported lazily (it takes seconds): ``optc --help`` and the passes never
load it. Without TVM installed the answer is "unknown", said as such.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from optc.errors import TargetError
from optc.ir.model import Model, iter_all_nodes

logger = logging.getLogger(__name__)

INSTALL = "pip install 'optc[tvm]'"
# Ops the frontend lacks that optc writes out in plain ops before importing (targets.recurrent).
LOWERED_BY_OPTC = frozenset({"LSTM", "GRU", "RNN"})


def require_tvm() -> None:
    """Fail with the install command when TVM cannot be imported (called before a target's first use of TVM)."""
    from optc.targets.artifact import apply_runtime_env

    # first: importing TVM can load libgomp (tvm_ffi imports torch where it is installed, and torch's libgomp.so.1 is
    # then the one oneDNN uses), and libgomp reads the artifacts' OpenMP settings once, when it loads
    apply_runtime_env()
    try:
        import tvm  # noqa: F401
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name in ("tvm", "tvm_ffi"):
            raise TargetError(f"compiling or running for a TVM target needs apache-tvm, which is not installed: {INSTALL}") from exc
        raise TargetError(f"apache-tvm is installed but cannot be imported ({exc}); reinstall it: {INSTALL}") from exc


@dataclass
class FrontendSupport:
    available: bool
    reason: str = ""
    unsupported: dict[str, list[str]] = field(default_factory=dict)  # op -> node names

    @property
    def ok(self) -> bool:
        return self.available and not self.unsupported

    def to_dict(self) -> dict[str, Any]:
        return {"checked": self.available, "reason": self.reason, "unsupported_ops": self.unsupported}

    def message(self) -> str:
        parts = [f"{op} ({', '.join(nodes[:3])}{', ...' if len(nodes) > 3 else ''})" for op, nodes in self.unsupported.items()]
        return "TVM's ONNX frontend cannot import: " + "; ".join(parts)


def tvm_convert_map() -> set[str] | None:
    try:
        from tvm.relax.frontend.onnx import onnx_frontend
    except Exception as exc:  # ImportError, or a broken TVM install
        logger.info("TVM not importable: %s", exc)
        return None
    return set(onnx_frontend._get_convert_map()) | LOWERED_BY_OPTC


def frontend_support(model: Model) -> FrontendSupport:
    ops = tvm_convert_map()
    if ops is None:
        return FrontendSupport(False, f"apache-tvm is not installed ({INSTALL})")
    unsupported: dict[str, list[str]] = {}
    for node in iter_all_nodes(model.graph):
        if node.domain not in ("", "ai.onnx", "com.microsoft") or node.op_type not in ops:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            unsupported.setdefault(key, []).append(node.name or node.op_type)
    return FrontendSupport(True, "", unsupported)
