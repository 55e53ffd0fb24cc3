"""Options whose right value depends on where the model will run, set from ``--target`` and this CPU unless given.

quantize's ``reduce_range`` (7-bit weights) exists for one case only: x86 int8
kernels without VNNI (``vpmaddubsw``) add pairs of u8·s8 products into int16,
which 8-bit weights can saturate. ARM's dot products, VNNI, CUDA and TVM's own
integer kernels accumulate in int32, and 7-bit weights only cost accuracy there.
"""
from __future__ import annotations

from optc.targets.deploy.run_artifact import cpuinfo_field

VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


def cpu_flags() -> frozenset[str]:
    return frozenset((cpuinfo_field("flags") or "").split())


def reduce_range_for(target: str | None, cpu_given: bool) -> tuple[bool, str] | None:
    """(reduce_range, why) for a compile to ``target`` (None: onnxruntime on this machine); None: keep the default.

    A ``--cpu`` named by the user is another machine, whose features are unknown here: keep the default (7-bit, safe).
    """
    if target in ("arm", "gpu"):
        return False, f"--target {target} accumulates int8 products in int32"
    if cpu_given:
        return None
    if any(flag in cpu_flags() for flag in VNNI_FLAGS):
        return False, "this CPU has VNNI (int32 accumulation)"
    return None
