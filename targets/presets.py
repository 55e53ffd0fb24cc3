"""Options whose right value depends on where the model will run, set from ``--target`` and this CPU unless given.

quantize's ``reduce_range`` (7-bit weights) exists for one case only: x86 int8
kernels without VNNI (``vpmaddubsw``) add pairs of u8·s8 products into int16,
which 8-bit weights can saturate (oneDNN's and optc's own kernels alike: on such a
target the int8 lowering keeps layers with wider weights float). ARM's dot products,
VNNI and CUDA accumulate in int32, and 7-bit weights only cost accuracy there.
"""
from __future__ import annotations

from optc.targets.deploy.run_artifact import cpuinfo_field

VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


def cpu_flags() -> frozenset[str]:
    return frozenset((cpuinfo_field("flags") or "").split())


def reduce_range_for(target: str | None, cpu: str | None) -> tuple[bool, str] | None:
    """(reduce_range, why) for a compile to ``target`` (None: onnxruntime on this machine); None: keep the default.

    ``cpu``: an x86 CPU named by ``--cpu`` (another machine): LLVM's features for that name decide, not this CPU's.
    """
    if target in ("arm", "gpu"):
        return False, f"--target {target} accumulates int8 products in int32"
    if cpu is not None:
        import tvm

        from optc.targets.tiled_kernels import pair_weight_max  # the same predicate the int8 lowering holds weights to

        named = tvm.target.Target({"kind": "llvm", "mcpu": cpu})
        return (False, f"--cpu {cpu} has VNNI (int32 accumulation)") if pair_weight_max(named) is None else None
    if any(flag in cpu_flags() for flag in VNNI_FLAGS):
        return False, "this CPU has VNNI (int32 accumulation)"
    return None
