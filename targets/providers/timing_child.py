"""The kernel race in a child process, for a target whose CPU has fewer instructions than this one.

oneDNN picks its kernels by the CPU it runs on, once per process (``ONEDNN_MAX_CPU_ISA`` is read at its first
kernel). For ``--cpu haswell`` on an AVX-512 machine, TVM's candidates run haswell's code while oneDNN's would run
AVX-512 kernels: the race would favour oneDNN where the deployed artifact, on an AVX2 CPU, runs its AVX2 ones. Capping
the compile's own process would also cap every later compile in it (an API user's next one, for this CPU). So the
candidates are timed here, in a fresh interpreter under the target's ISA, and only the figures come back.

    python -m optc.targets.providers.timing_child FOLDER   # FOLDER: kernels.so, plans.json, inputs.npz
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from optc.errors import TargetError

logger = logging.getLogger(__name__)
# A race is a few seconds a chain (ResNet-18's 21: 31 s on 2 busy cores); past this the child is stuck, not slow.
TIMEOUT_S = 1800


def time_in_child(library: Path, plans: list[dict[str, Any]], inputs: list[list[np.ndarray]], sweep: int, isa: str) -> dict[str, dict[str, Any]]:
    """:func:`select.time_library` on ``library`` in a child process with oneDNN held to ``isa``; each result records the
    ISA oneDNN ran (``onednn_isa``)."""
    folder = library.parent
    (folder / "plans.json").write_text(json.dumps({"plans": plans, "sweep": sweep, "arity": [len(arrays) for arrays in inputs]}))
    np.savez(folder / "inputs.npz", **{f"{i}_{j}": a for i, arrays in enumerate(inputs) for j, a in enumerate(arrays)})
    try:
        done = subprocess.run([sys.executable, "-m", __name__, str(folder)], capture_output=True, text=True, check=False,
                              env={**os.environ, "ONEDNN_MAX_CPU_ISA": isa}, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TargetError(f"timing the kernel candidates with oneDNN held to {isa} failed: {exc}") from exc
    for line in done.stderr.splitlines():  # the race's per-chain lines, and anything else it said
        logger.debug("timing child: %s", line)
    results = folder / "results.json"
    if done.returncode != 0 or not results.is_file():
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise TargetError(f"timing the kernel candidates with oneDNN held to {isa} failed: {last}")
    return json.loads(results.read_text())


def main(folder: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # to stderr, which the parent logs at debug
    from optc.targets.providers import onednn
    from optc.targets.providers.select import time_library

    spec = json.loads((folder / "plans.json").read_text())
    with np.load(folder / "inputs.npz") as data:
        inputs = [[data[f"{i}_{j}"] for j in range(arity)] for i, arity in enumerate(spec["arity"])]
    results = time_library(folder / "kernels.so", spec["plans"], inputs, spec["sweep"])
    isa = onednn.effective_isa()
    (folder / "results.json").write_text(json.dumps({w: {**r, "onednn_isa": isa} for w, r in results.items()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
