"""MetaSchedule autotuning with a persistent tuning database.

Records live in a JSON database (``workloads.json`` + ``records.json``) in a
cache folder. Records are keyed on each fused function's structure and shapes,
not on weights, so a second compile of the same model, or of another model
with the same layers, finds them and tunes nothing new: only tasks without a
record are tuned.

The builder's default build function imports ``tvm.s_tir.tensor_intrin`` in
every worker, which takes minutes here and makes every build time out (see
shared/TVM_NOTES.md); :func:`fast_build` does the same build without it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from optc.errors import TargetError

logger = logging.getLogger(__name__)


def default_tuning_db() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "optc" / "tuning"


def fast_build(mod: Any, target: Any, _params: Any) -> Any:
    """MetaSchedule's default build minus the tensor-intrinsic import (fp32, no tensorisation)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


@dataclass(frozen=True)
class TuneOptions:
    trials_per_task: int = 0
    db_dir: Path = field(default_factory=default_tuning_db)
    rpc_tracker: str | None = None  # HOST:PORT
    rpc_key: str | None = None
    seed: int = 0


@dataclass
class TuneReport:
    tasks: int
    tuned: list[str]
    reused: list[str]
    trials: int

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "tuned": self.tuned, "reused_from_db": self.reused, "trials_per_task": self.trials}


def _runner(opts: TuneOptions) -> Any:
    from tvm.s_tir import meta_schedule as ms

    if not opts.rpc_tracker:
        return ms.runner.LocalRunner()
    host, _, port = opts.rpc_tracker.rpartition(":")
    if not host or not port.isdigit() or not opts.rpc_key:
        raise TargetError("--rpc-tracker needs HOST:PORT and --rpc-key KEY")
    check_tracker(host, int(port), opts.rpc_key)
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=opts.rpc_key, session_timeout_sec=120)
    return ms.runner.RPCRunner(rpc_config=config)


def check_tracker(host: str, port: int, key: str) -> None:
    """Fail before tuning when the tracker is unreachable or has no board under ``key``
    (MetaSchedule would otherwise record every candidate as failed)."""
    from tvm import rpc

    try:
        summary = rpc.connect_tracker(host, port).summary()
    except (RuntimeError, OSError) as exc:
        raise TargetError(f"cannot reach the RPC tracker at {host}:{port}: {exc}") from exc
    keys = {k for k in summary.get("queue_info", {})}
    if key not in keys:
        raise TargetError(f"the RPC tracker at {host}:{port} has no board with key '{key}' (keys: {', '.join(sorted(keys)) or 'none'})")


def _cost_model() -> str:
    try:
        import xgboost  # noqa: F401
    except ImportError:
        return "random"
    return "xgb"


def _fused(mod: Any, target: Any) -> Any:
    """The preparation compile_relax applies before looking records up, so task keys match."""
    import tvm
    from tvm import relax
    from tvm.relax import pipeline

    try:
        dispatch = pipeline.library_dispatch_passes(target)
    except (ValueError, AttributeError):
        dispatch = []
    seq = [
        *dispatch,
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    with target:
        return tvm.transform.Sequential(seq)(mod)


def tune_and_compile(mod: Any, target: Any, opts: TuneOptions) -> tuple[Any, TuneReport]:
    """Tune the tasks the database lacks, then compile with every record it holds."""
    from tvm.s_tir import meta_schedule as ms

    opts.db_dir.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(
        path_workload=str(opts.db_dir / "workloads.json"),
        path_tuning_record=str(opts.db_dir / "records.json"),
        allow_missing=True,
    )
    tasks = ms.relax_integration.extract_tasks(_fused(mod, target), target)
    todo, reused = [], []
    for task in tasks:
        mod_task = task.dispatched[0]
        known = database.has_workload(mod_task) and database.query_tuning_record(mod_task, target, task.task_name) is not None
        (reused if known else todo).append(task)
    logger.info("tuning: %d tasks, %d already in %s", len(tasks), len(reused), opts.db_dir)
    if opts.trials_per_task > 0 and todo:
        with stdout_to_stderr():
            _tune(ms, todo, database, opts)
    executable = ms.relax_integration.compile_relax(database, mod, target, params=None)
    tuned = [t.task_name for t in todo] if opts.trials_per_task > 0 else []
    return executable, TuneReport(len(tasks), tuned, [t.task_name for t in reused], opts.trials_per_task)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """MetaSchedule prints its progress tables on stdout; stdout belongs to --json output."""
    sys.stdout.flush()
    saved_fd, saved_stream = os.dup(1), sys.stdout
    os.dup2(2, 1)  # native code and handlers bound to fd 1
    sys.stdout = sys.stderr  # Python handlers created while tuning
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = saved_stream
        os.dup2(saved_fd, 1)
        os.close(saved_fd)


def _tune(ms: Any, todo: list[Any], database: Any, opts: TuneOptions) -> None:
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        extracted_tasks=todo, work_dir=str(opts.db_dir / "logs"), seed=opts.seed
    )
    ms.tune.tune_tasks(
        tasks=contexts,
        task_weights=weights,
        work_dir=str(opts.db_dir / "logs"),
        max_trials_global=opts.trials_per_task * len(todo),
        max_trials_per_task=opts.trials_per_task,
        num_trials_per_iter=min(64, opts.trials_per_task),
        builder=ms.builder.LocalBuilder(f_build=fast_build, timeout_sec=60),
        runner=_runner(opts),
        database=database,
        cost_model=_cost_model(),
    )
