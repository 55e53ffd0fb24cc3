"""Compile targets as frozen specs that yield TVM target dicts.

TVM 0.27 only accepts targets as JSON dicts. Specs are plain data so that the
CLI, reports and manifests can name them without importing TVM; the TVM
objects are made in :mod:`optc.targets.build`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from optc.errors import ConfigError, TargetError


HOST_COMPILERS = ("g++", "gcc", "clang++", "clang", "c++", "cc")
ARM_CROSS_COMPILER = "aarch64-linux-gnu-g++"  # links ARM artifacts and builds their glue (Debian: g++-aarch64-linux-gnu)


@dataclass(frozen=True)
class TargetSpec:
    """What to compile for.

    Attributes:
        name: ``x86``, ``arm`` or ``gpu``.
        target: the TVM target dict (``tvm.target.Target(target)``).
        host: the host target dict for device targets (GPU), else None.
        device: the TVM device kind the artifact runs on (``cpu`` or ``cuda``).
        cross_compiler: the C++ driver that links the shared library when it is
            not for this machine (``aarch64-linux-gnu-g++`` for ARM).
    """

    name: str
    target: dict[str, Any]
    host: dict[str, Any] | None = None
    device: str = "cpu"
    cross_compiler: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    cpu_from_user: bool = False  # --cpu named a CPU (x86: another machine's, whose features are unknown here)

    def check_toolchain(self) -> None:
        """Fail before any compilation when the linker ``model.so`` needs is not installed."""
        import os
        import shutil

        if self.cross_compiler:
            if shutil.which(self.cross_compiler) is None:
                raise TargetError(f"--target {self.name} needs the cross compiler '{self.cross_compiler}' (Debian: apt-get install g++-aarch64-linux-gnu)")
            return
        # TVM links model.so with $CXX, $CC or the first of these on PATH (tvm.support.cc.get_cc).
        given = os.environ.get("CXX") or os.environ.get("CC")
        if given is None and not any(shutil.which(c) for c in HOST_COMPILERS):
            raise TargetError(f"--target {self.name} needs a C++ compiler to link model.so, and none of {', '.join(HOST_COMPILERS)} "
                              "is on PATH (Debian: apt-get install g++)")

    def foreign_triple(self) -> str | None:
        """The target's triple when it is another architecture's (an aarch64 target on x86). A target of this one may
        still name a CPU this machine cannot run (:func:`optc.targets.cpu_features.missing_here`)."""
        import platform

        triple = str(self.target.get("mtriple") or "")
        if triple.startswith("aarch64") and platform.machine() not in ("aarch64", "arm64"):
            return triple
        return None

    def check_tuning(self, trials: int, rpc_tracker: str | None) -> None:
        """Fail before any work when tuning would need a board that was not given."""
        triple = self.foreign_triple()
        if trials > 0 and not rpc_tracker and triple:
            raise ConfigError(
                f"tuning for {triple} measures candidates on such a board: add --rpc-tracker HOST:PORT "
                "--rpc-key KEY, or compile with --tune-trials 0 (database records and default schedules)"
            )
        if trials > 0 and not rpc_tracker and self.device == "cpu" and not triple:
            from optc.targets.cpu_features import tuning_refusal

            refusal = tuning_refusal(self.target)
            if refusal:
                raise ConfigError(refusal)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target, "host": self.host, "device": self.device, "cross_compiler": self.cross_compiler}


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. ``znver3``), asked of TVM's LLVM."""
    from optc.targets.support import require_tvm

    require_tvm()  # the first use of TVM in an x86 compile
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def check_cpu(cpu: str, target: dict[str, Any], name: str, examples: str) -> None:
    """A ConfigError when LLVM does not know ``cpu`` for ``target`` (LLVM itself would only warn and ignore it)."""
    from optc.targets.support import require_tvm

    require_tvm()
    import tvm
    from tvm.target import codegen

    known = set(codegen.llvm_get_cpu_archlist(tvm.target.Target(target)))
    if cpu not in known:
        raise ConfigError(f"--cpu {cpu}: not a CPU LLVM knows for --target {name} (e.g. {examples})")


def make_target(name: str, *, cpu: str | None = None, arch: str | None = None, arm_dotprod: bool = False, cores: int | None = None) -> TargetSpec:
    """Build a spec. ``cpu``: the LLVM CPU name (x86: default this machine's; arm: the board's, which decides its
    instructions, e.g. ``cortex-a76`` has Armv8.2's dot products; default a generic Armv8-A with NEON).
    ``arch`` is the CUDA arch (gpu)."""
    cores = cores or _cores()
    if name == "x86":
        if cpu is not None:
            check_cpu(cpu, {"kind": "llvm"}, "x86", "skylake-avx512, znver3")
            return TargetSpec("x86", {"kind": "llvm", "mcpu": cpu, "num-cores": cores}, cpu_from_user=True)
        from optc.targets.cpu_features import host_x86_mattr  # it imports this module

        mcpu = host_cpu()
        mattr = host_x86_mattr(mcpu)
        return TargetSpec("x86", {"kind": "llvm", "mcpu": mcpu, **({"mattr": mattr} if mattr else {}), "num-cores": cores})
    if name == "arm":
        mattr = ["+neon"] + (["+v8.2a", "+dotprod"] if arm_dotprod else [])
        target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": mattr, "num-cores": cores}
        if cpu is not None:
            check_cpu(cpu, target, "arm", "cortex-a53, cortex-a76, neoverse-n1")
            target = {**target, "mcpu": cpu}
        return TargetSpec("arm", target, cross_compiler=ARM_CROSS_COMPILER, cpu_from_user=cpu is not None)
    if name == "gpu":
        arch = arch or "sm_80"
        if not arch.startswith("sm_"):
            raise ConfigError(f"--arch {arch}: expected a CUDA arch such as sm_80 or sm_90")
        return TargetSpec("gpu", {"kind": "cuda", "arch": arch}, host={"kind": "llvm", "num-cores": cores}, device="cuda")
    raise ConfigError(f"unknown target '{name}'; valid targets: none, x86, arm, gpu")
