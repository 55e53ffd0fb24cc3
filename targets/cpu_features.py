"""The CPU features an artifact's code uses, recorded in its manifest (``runtime.cpu``) for runners to check.

LLVM is told a CPU (``mcpu``) and extra features (``mattr``); it may then use every
instruction those imply. TVM's LLVM lists them (``llvm_get_cpu_features``) under LLVM's
names; the manifest records them under the names Linux gives them (x86: ``/proc/cpuinfo``'s
``flags``; aarch64: the ``HWCAP`` bits behind ``Features``), so a runner checks them without
LLVM. Only instruction-set extensions that compiled numeric code can contain are recorded:
vector and matrix extensions, and the scalar bit and atomic instructions LLVM emits on its
own. LLVM's tuning flags (``fast-*``, ``macrofusion``) are not instructions; crypto and
system instructions (``aes``, ``sha``, ``rdrnd``, ``xsave``) appear only through intrinsics,
which TVM's kernels do not use, and requiring them would refuse machines that run the code.
So does AMD's SSE4A (``extrq``, ``insertq``, scalar streaming stores): ``--cpu znver3`` code
runs on an Intel CPU with AVX2, and was refused there for it.
"""
from __future__ import annotations

from typing import Any

from optc.targets.spec import TargetSpec

# LLVM feature -> the /proc/cpuinfo flags that say the CPU has it.
X86_FLAGS: dict[str, tuple[str, ...]] = {
    "sse": ("sse",), "sse2": ("sse2",), "sse3": ("pni",), "ssse3": ("ssse3",), "sse4.1": ("sse4_1",),
    "sse4.2": ("sse4_2",), "avx": ("avx",), "avx2": ("avx2",), "fma": ("fma",), "fma4": ("fma4",),
    "f16c": ("f16c",), "bmi": ("bmi1",), "bmi2": ("bmi2",), "lzcnt": ("abm",), "popcnt": ("popcnt",), "movbe": ("movbe",),
    "cx16": ("cx16",), "gfni": ("gfni",),  # LLVM lowers i8 vector shifts to GFNI's affine instructions
    "avx512f": ("avx512f",), "avx512dq": ("avx512dq",), "avx512cd": ("avx512cd",), "avx512bw": ("avx512bw",),
    "avx512vl": ("avx512vl",), "avx512ifma": ("avx512ifma",), "avx512vbmi": ("avx512vbmi",), "avx512vbmi2": ("avx512_vbmi2",),
    "avx512vnni": ("avx512_vnni",), "avx512bitalg": ("avx512_bitalg",), "avx512vpopcntdq": ("avx512_vpopcntdq",),
    "avx512bf16": ("avx512_bf16",), "avx512fp16": ("avx512_fp16",), "avx512vp2intersect": ("avx512_vp2intersect",),
    "avxvnni": ("avx_vnni",), "amx-tile": ("amx_tile",), "amx-int8": ("amx_int8",), "amx-bf16": ("amx_bf16",),
}
# LLVM feature -> Linux's aarch64 HWCAP names (the run_artifact.AARCH64_HWCAP table reads them).
AARCH64_FLAGS: dict[str, tuple[str, ...]] = {
    "fp-armv8": ("fp",), "neon": ("asimd",), "crc": ("crc32",), "lse": ("atomics",), "rdm": ("asimdrdm",),
    "fullfp16": ("fphp", "asimdhp"), "fp16fml": ("asimdfhm",), "dotprod": ("asimddp",), "rcpc": ("lrcpc",),
    "jsconv": ("jscvt",), "complxnum": ("fcma",), "sve": ("sve",), "sve2": ("sve2",), "i8mm": ("i8mm",), "bf16": ("bf16",),
}
FLAGS_BY_ARCH = {"x86_64": X86_FLAGS, "aarch64": AARCH64_FLAGS}


def host_x86_mattr(mcpu: str, flags: frozenset[str] | None = None) -> list[str]:
    """LLVM ``mattr`` that makes ``mcpu`` (this machine's CPU name) match what this machine's CPU has.

    LLVM names the host's CPU by its model (``emeraldrapids``), and the name implies every
    feature of that model. A virtual machine often hides some of them: clouds disable AMX or
    AVX-512 in the guest, and ``/proc/cpuinfo`` (the kernel's view) lacks them. Code compiled for
    the name alone would use instructions the CPU faults on, and the manifest check refuses it.
    As clang's ``-march=native`` does, features are turned off (``-amx-tile``) where the CPU
    lacks them and on (``+avx512fp16``) where it has ones the name does not imply (a CPU newer
    than this LLVM). Only features of :data:`X86_FLAGS` are considered: those are the ones
    compiled numeric code uses and the manifest records. ``flags``: /proc/cpuinfo's (tests pass others).
    """
    import tvm
    from tvm.target import codegen

    from optc.targets.presets import cpu_flags

    have = cpu_flags() if flags is None else flags
    if not have:
        return []  # no /proc/cpuinfo: trust LLVM's name
    implied = set(codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": mcpu})))
    mattr = []
    for feature, linux in X86_FLAGS.items():
        present = all(flag in have for flag in linux)
        if feature in implied and not present:
            mattr.append(f"-{feature}")
        elif present and feature not in implied:
            mattr.append(f"+{feature}")
    return mattr


def _as_target(llvm: Any) -> Any:
    """``llvm`` as a ``tvm.target.Target`` (from a TargetSpec's dict, or as it is)."""
    import tvm

    return llvm if isinstance(llvm, tvm.target.Target) else tvm.target.Target(llvm)


def target_flags(llvm: Any) -> tuple[str, frozenset[str]]:
    """(architecture, Linux feature names) of the code LLVM writes for ``llvm`` (a dict or ``tvm.target.Target``)."""
    from tvm.target import codegen

    target = _as_target(llvm)
    arch = str(target.attrs.get("mtriple") or codegen.llvm_get_system_triple()).split("-")[0]
    table = FLAGS_BY_ARCH.get(arch, {})
    return arch, frozenset(flag for name in codegen.llvm_get_cpu_features(target) if name in table for flag in table[name])


def missing_here(llvm: Any) -> list[str]:
    """The features (Linux names) that code for the LLVM target ``llvm`` may use and this machine's CPU lacks: code for
    ``--cpu icelake-server`` on an AVX2 machine. Such code cannot run here, not in the kernel race, the latency check or
    a tuning trial: one AVX-512 instruction is SIGILL, the compile killed with no message. Empty where this machine runs
    it; every feature for another architecture's target."""
    from optc.targets.deploy.run_artifact import host_cpu_features, machine_arch

    arch, used = target_flags(llvm)
    if arch != machine_arch():
        return sorted(used)
    have = host_cpu_features(arch)
    # no /proc/cpuinfo to read (a sandbox): nothing known missing, as host_x86_mattr then trusts LLVM's name
    return sorted(used - have) if have else []


def tuning_refusal(llvm: Any) -> str | None:
    """Why MetaSchedule's trials, which run candidates on this CPU, cannot tune for ``llvm``; None where they can."""
    missing = missing_here(llvm)
    mcpu = _as_target(llvm).attrs.get("mcpu") or "this target"
    return (f"tuning for --cpu {mcpu} runs candidates on such a CPU, and this one lacks {', '.join(missing)}: tune on such a "
            "machine (--rpc-tracker HOST:PORT --rpc-key KEY), or compile with --tune-trials 0") if missing else None


def required_cpu(spec: TargetSpec) -> dict[str, Any]:
    """The manifest's ``runtime.cpu``: architecture, the LLVM ``mcpu``/``mattr`` used, and the Linux feature names they imply."""
    import tvm
    from tvm.target import codegen

    llvm = spec.target if spec.target.get("kind") == "llvm" else spec.host
    if llvm is None:
        raise ValueError(f"target {spec.name} has no LLVM part for the CPU")
    triple = str(llvm.get("mtriple") or codegen.llvm_get_system_triple())
    arch = triple.split("-")[0]
    table = FLAGS_BY_ARCH.get(arch, {})
    llvm_features = codegen.llvm_get_cpu_features(tvm.target.Target(llvm))
    features = sorted({flag for name in llvm_features if name in table for flag in table[name]})
    return {"arch": arch, "mcpu": str(llvm.get("mcpu") or ""), "mattr": list(llvm.get("mattr") or ()), "features": features}
