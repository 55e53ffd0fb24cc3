"""MetaSchedule autotuning with a persistent tuning database.

Records live in a JSON database (``workloads.json`` + ``records.json``) in a
cache folder, shared safely by concurrent compiles and checked as it is read
(:mod:`optc.targets.tuning_db`). Records are keyed on each fused function's
structure and shapes, not on weights, so a second compile of the same model,
or of another model with the same layers, finds them and tunes nothing new:
only tasks without a record are tuned.

The builder's default build function imports ``tvm.s_tir.tensor_intrin`` in
every worker, which takes minutes here and makes every build time out (see
shared/TVM_NOTES.md); :func:`fast_build` does the same build without it. The
tuning process itself must import it (``TuneContext`` does):
:func:`import_tensor_intrinsics` does so in seconds.

With ``--rpc-tracker`` the candidates are measured on boards registered with
a TVM RPC tracker (``python -m tvm.exec.rpc_tracker`` and ``rpc_server --tracker``).
An RPC server runs arbitrary code for whoever reaches it: bind trackers and
servers to loopback or a private device network.
"""
from __future__ import annotations

import contextlib
import inspect
import linecache
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from optc.errors import TargetError, first_line
from optc.targets.tiled_kernels import recording_failures
from optc.targets.tuned_compile import compile_with_database, fused
from optc.targets.tuning_progress import ProgressTracker, TuneProgress, progress_callback
from optc.targets.untunable import UntunableTasks, task_key

if TYPE_CHECKING:
    from optc.targets.tuning_db import Snapshot

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
    prepack: bool = True  # weights stored in the layout the tuned loops read (targets/tuned_compile.py)
    kernels: str = "auto"  # which provider computes each heavy op: auto (measured), tvm, onednn (targets/providers)
    on_progress: Callable[[TuneProgress], None] | None = field(default=None, compare=False)  # after every measured batch


@dataclass
class TuneReport:
    tasks: int
    tuned: list[str]
    reused: list[str]
    trials: int
    untunable: list[str] = field(default_factory=list)  # every candidate failed (now or before): default schedules
    failed_trials: int = 0
    estimated_ms: float | None = None  # MetaSchedule's estimate for the tasks tuned in this run
    db_health: dict[str, Any] = field(default_factory=dict)  # damaged lines skipped, a database moved aside
    providers: dict[str, Any] = field(default_factory=dict)  # which kernels compute each heavy op (targets/providers)
    template_failures: list[str] = field(default_factory=list)  # heavy ops optc's tiled kernel could not schedule

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks, "tuned": self.tuned, "reused_from_db": self.reused, "trials_per_task": self.trials,
            "untunable": self.untunable, "failed_trials": self.failed_trials, "estimated_ms": self.estimated_ms,
            "db_health": self.db_health, "providers": self.providers, "template_failures": self.template_failures,
        }


def tracker_address(opts: TuneOptions) -> tuple[str, int] | None:
    """``(host, port)`` of ``--rpc-tracker``, or None to measure on this machine."""
    if not opts.rpc_tracker:
        if opts.rpc_key:
            raise TargetError("--rpc-key needs --rpc-tracker HOST:PORT")
        return None
    host, _, port = opts.rpc_tracker.rpartition(":")
    if not host or not port.isdigit() or not opts.rpc_key:
        raise TargetError("--rpc-tracker needs HOST:PORT and --rpc-key KEY")
    return host, int(port)


def _runner(opts: TuneOptions) -> Any:
    from tvm.s_tir import meta_schedule as ms

    address = tracker_address(opts)
    if address is None:
        return ms.runner.LocalRunner()
    config = ms.runner.RPCConfig(tracker_host=address[0], tracker_port=address[1], tracker_key=opts.rpc_key, session_timeout_sec=120)
    return ms.runner.RPCRunner(rpc_config=config)


def check_tracker(host: str, port: int, key: str) -> None:
    """Fail before tuning when the tracker is unreachable or has no board under ``key``
    (MetaSchedule would otherwise record every candidate as failed)."""
    import socket

    from tvm import rpc

    try:  # TVM's client retries an unreachable address for 60 s; fail in seconds instead
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        raise TargetError(f"cannot reach the RPC tracker at {host}:{port}: {exc.strerror or exc}") from exc
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


def _foreign_triple(target: Any) -> str | None:
    """The target's triple when this machine cannot run its code (an aarch64 target on x86)."""
    import platform

    triple = str(target.attrs.get("mtriple") or "")
    if triple.startswith("aarch64") and platform.machine() not in ("aarch64", "arm64"):
        return triple
    return None


def tune_and_compile(mod: Any, target: Any, opts: TuneOptions) -> tuple[Any, TuneReport]:
    """Tune the tasks the database lacks, then compile with every record it holds."""
    from tvm.s_tir import meta_schedule as ms

    address = tracker_address(opts)
    if opts.trials_per_task > 0 and address is None and _foreign_triple(target):
        raise TargetError(
            f"tuning for {_foreign_triple(target)} measures candidates on such a board: add --rpc-tracker HOST:PORT "
            "--rpc-key KEY, or compile with --tune-trials 0 (database records and default schedules)"
        )
    if opts.trials_per_task > 0 and address is None and str(target.kind.name) == "llvm":
        from optc.targets.cpu_features import tuning_refusal

        if refusal := tuning_refusal(target):  # a trial on this CPU would be SIGILL (api checks first; build() may not)
            raise TargetError(refusal)
    if address is not None and opts.trials_per_task > 0:
        check_tracker(*address, opts.rpc_key)  # before any work
    from optc.targets.tuning_db import TuningDatabase, locked

    shared = TuningDatabase(opts.db_dir)
    with shared.snapshot(target) as snapshot:
        database = snapshot.database
        mod, providers = _place_kernels(mod, target, opts, lambda m: compile_with_database(database, m, target, opts.prepack))
        tasks = ms.relax_integration.extract_tasks(fused(mod, target, opts.prepack), target)
        untunable = UntunableTasks(opts.db_dir)
        todo, reused, given_up = [], [], []
        for task in tasks:
            mod_task = task.dispatched[0]
            if database.has_workload(mod_task) and database.query_tuning_record(mod_task, target, task.task_name) is not None:
                reused.append(task)
            elif untunable.covers(task_key(mod_task, target), max(opts.trials_per_task, 1)):
                given_up.append(task)
            else:
                todo.append(task)
        logger.info("tuning: %d tasks, %d already in %s, %d untunable before", len(tasks), len(reused), opts.db_dir, len(given_up))
        report = TuneReport(len(tasks), [], [t.task_name for t in reused], opts.trials_per_task, [t.task_name for t in given_up])
        report.db_health = snapshot.health.to_dict()
        report.providers = providers
        if opts.trials_per_task > 0 and todo:
            with stdout_to_stderr():
                tracker = _tune(ms, todo, snapshot, opts)
            snapshot.commit()
            report.tuned = [t.task_name for t in todo]
            report.failed_trials = tracker.failed
            report.estimated_ms = tracker.estimate_ms()
            for task in todo:
                if tracker.never_ran(task.task_name):
                    untunable.add(task_key(task.dispatched[0], target), task.task_name, opts.trials_per_task)
                    report.untunable.append(task.task_name)
            with locked(opts.db_dir):
                untunable.save()
        with recording_failures() as failures:
            executable = compile_with_database(database, mod, target, opts.prepack)
        report.template_failures = failures
    return executable, report


def _own_winograd(mod: Any, target: Any, opts: TuneOptions, compile_fn: Callable[[Any], Any], report: Any, arm: bool,
                  address: tuple[str, int] | None) -> Any:
    """``mod`` with the convolutions optc's Winograd kernels take: raced on the board at ``address``, else chosen by
    the board's cost model (an ARM target)."""
    from optc.targets.providers import winograd_glue
    from optc.targets.providers.winograd_race import Board, place_measured
    from optc.targets.spec import ARM_CROSS_COMPILER

    compiler, arch = winograd_glue.toolchain(ARM_CROSS_COMPILER if arm else None)
    winograd_glue.glue_object(compiler, arch)  # built now: a failure costs the kernels, not the compile at export
    if address is None:
        return winograd_glue.place_for_board(mod, report)
    return place_measured(mod, target, opts.db_dir, compile_fn, report, Board(*address, str(opts.rpc_key), compiler, arch))


def _no_provider(target: Any, opts: TuneOptions) -> tuple[str, str] | None:
    """(kernel mode, reason) where oneDNN may take no chain of this compile whatever the library (optc's own Winograd
    kernels may still take its fp32 3x3 convolutions: _place_kernels); else None."""
    import platform

    if _foreign_triple(target) or platform.machine() not in ("x86_64", "AMD64"):
        return opts.kernels, "oneDNN serves x86 targets only"
    if opts.rpc_tracker and opts.kernels == "auto":
        # oneDNN's candidates would be timed here, not on the board, and the board may lack the library: optc's own
        # Winograd kernels race TVM's there (_place_kernels)
        return "auto", "with --rpc-tracker the candidates are timed on the board, which may lack oneDNN"
    return None


def tvm_computes_all(target: Any, opts: TuneOptions | None) -> bool:
    """Whether TVM's kernels compute every int8 op of this compile (what the int8 lowering asks): oneDNN can take no
    chain (:func:`_no_provider`, ``--kernels tvm``, or no oneDNN here); optc's Winograd kernels take only fp32 ones."""
    from optc.targets.providers import onednn

    return opts is None or opts.kernels == "tvm" or _no_provider(target, opts) is not None or not onednn.availability().ok


def _place_kernels(mod: Any, target: Any, opts: TuneOptions, compile_fn: Callable[[Any], Any]) -> tuple[Any, dict[str, Any]]:
    """Send the heavy op chains whose provider kernel measured faster to that provider: oneDNN's (x86 hosts and
    targets), or optc's own Winograd kernels (an ARM target, a board behind --rpc-tracker)."""
    from optc.targets.cpu_features import missing_here
    from optc.targets.providers.select import ProviderReport, place, tvm_layout

    refused = _no_provider(target, opts)
    if refused is None:
        missing = missing_here(target) if opts.kernels == "auto" else []
        # Code for a CPU this one cannot run (--cpu icelake-server on an AVX2 machine) cannot race: oneDNN takes every
        # chain it computes, since it picks its kernels for the CPU it runs on, where TVM's code is fixed at compile time.
        mod, report = place(mod, target, "onednn" if missing else opts.kernels, opts.db_dir, compile_fn)
        if missing:
            report.unmeasured = f"not measured: this CPU cannot run code for {target.attrs.get('mcpu')}; oneDNN adapts to the CPU it runs on"
        return mod, report.to_dict()
    arm = str(target.attrs.get("mtriple") or "").startswith("aarch64")
    address = tracker_address(opts)
    if refused[0] == "auto" and (arm or address is not None):
        # optc's own Winograd kernels: raced against TVM's on the board behind the tracker, else (an ARM target, which
        # cannot run here) where a model of the board expects them to pay
        if address is not None:
            check_tracker(*address, str(opts.rpc_key))  # the user's tracker unreachable or lacking the key: one line, exit 2
        report = ProviderReport("auto", {"available": False, "reason": refused[1]})
        mod = tvm_layout(mod, target, report)
        try:
            return _own_winograd(mod, target, opts, compile_fn, report, arm, address), report.to_dict()
        except (TargetError, RuntimeError, OSError) as exc:  # its glue did not build, or the board failed: TVM's kernels
            logger.warning("optc's Winograd kernels not used: %s", first_line(exc))
            return mod, ProviderReport("auto", {"available": False, "reason": refused[1]}).to_dict()
    if arm and opts.kernels == "tvm":  # the user's choice, not a missing library
        report = ProviderReport("tvm")
    else:
        report = ProviderReport(refused[0], {"available": False, "reason": refused[1]})
    return tvm_layout(mod, target, report), report.to_dict()


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


def _linecache_stack(context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.stack()`` without its per-frame module scan (one source line per frame).

    ``inspect.getframeinfo`` calls ``inspect.getmodule``, which walks every module
    in ``sys.modules`` for every frame; TVMScript calls ``inspect.stack()`` once per
    decorated function, and ``tvm.s_tir.tensor_intrin`` decorates hundreds.
    """
    frames = []
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        line = linecache.getline(code.co_filename, frame.f_lineno, frame.f_globals)
        frames.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, [line] if line else None, 0 if line else None))
        frame = frame.f_back
    return frames


def import_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (which ``TuneContext`` imports) in seconds, not minutes.

    Measured here: 142 s on a loaded machine (57 s of CPU), 12 s with
    :func:`_linecache_stack` standing in for ``inspect.stack`` during the import
    only. TVMScript uses the stack for the source line above a decorator and
    the frames' locals, which this keeps.
    """
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    saved = inspect.stack
    inspect.stack = _linecache_stack
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = saved


def _search_strategy(ms: Any, trials_per_task: int) -> Any:
    """MetaSchedule's evolutionary search, sized for the budget.

    Its defaults (population 512, 4 genetic rounds, 50 fresh samples) cost the
    same search time whether a task gets 4 trials or 64. With small budgets
    that search was half the tuning time: the sample CNN at 8 trials per task
    tuned in 84 s instead of 161 s with population 64, 2 rounds, 16 samples,
    and its tuned latency was no worse (0.37 vs 0.49 ms, one run each).
    """
    if trials_per_task > 32:
        return "evolutionary"
    return ms.search_strategy.EvolutionarySearch(population_size=64, init_min_unmeasured=16, genetic_num_iters=2)


def _tune_contexts(ms: Any, todo: list[Any], seed: int, trials_per_task: int) -> tuple[list[Any], list[float]]:
    """What ``relax_integration.extracted_tasks_to_tune_contexts`` does, with optc's loggers.

    TVM's version configures logging globally (``logging.config.dictConfig``) on
    every call and crashes with "'NoneType' object has no attribute 'format'"
    once its logger holds a handler without a name, as pytest's capture
    handlers are: a second tuning run in one process failed. Per-task logs go
    to ``optc.targets.tuning.task.<name>`` instead; the application decides
    where they end up.
    """
    contexts, weights = [], []
    for task, rand_state in zip(todo, ms.utils.fork_seed(seed, n=len(todo))):
        attrs = task.mod.attrs
        if attrs is not None and attrs.get("tirx.is_scheduled", False):
            logger.info("tuning: %s is already scheduled; not tuned", task.task_name)
            continue
        tiled = _tiled_space(ms, task)
        contexts.append(
            ms.TuneContext(
                mod=task.dispatched[0],
                target=task.target,
                space_generator=tiled or "post-order-apply",
                search_strategy="replay-trace" if tiled else _search_strategy(ms, trials_per_task),
                task_name=task.task_name,
                logger=logging.getLogger(f"{__name__}.task.{task.task_name[:100]}"),
                rand_state=rand_state,
                num_threads="physical",
            ).clone()
        )
        weights.append(float(task.weight))
    return contexts, weights


def _tiled_space(ms: Any, task: Any) -> Any | None:
    """For a task optc's tiled kernel takes (targets.tiled_kernels), that kernel as the task's only design space.

    MetaSchedule's own space, searched for a few trials, lands far from it (the sample CNN at 4 trials per task:
    0.467 ms against 0.099 with the tiled kernels): its records would replace a better default. Tuned this way,
    the record is the tiled kernel measured on the target (on the board, with --rpc-tracker)."""
    from tvm import s_tir

    from optc.targets.tiled_kernels import tile

    if not tile(s_tir.Schedule(task.dispatched[0]), task.target):
        return None
    return ms.space_generator.ScheduleFn(lambda sch: tile(sch, task.target) and None, sch_rules=[], postprocs=[], mutator_probs={})


COMMIT_EVERY_S = 60.0  # merge measured records into the shared database at most this often while tuning


def _tune(ms: Any, todo: list[Any], snapshot: Snapshot, opts: TuneOptions) -> ProgressTracker:
    import_tensor_intrinsics()
    contexts, weights = _tune_contexts(ms, todo, opts.seed, opts.trials_per_task)
    callbacks = list(ms.measure_callback.MeasureCallback.create("default"))
    tracker = ProgressTracker([c.task_name for c in contexts], weights, opts.trials_per_task)
    show = opts.on_progress or _log_progress
    last_commit = [time.monotonic()]

    def on_progress(progress: TuneProgress) -> None:
        show(progress)
        if time.monotonic() - last_commit[0] > COMMIT_EVERY_S:  # runs after MetaSchedule's own commit of the batch
            last_commit[0] = time.monotonic()
            try:
                snapshot.commit()
            except TargetError as exc:  # keep tuning; the commit after tuning says it again
                logger.warning("tuning: cannot save the records measured so far: %s", exc)

    callbacks.append(progress_callback(tracker, on_progress))
    on_progress(tracker.progress())
    ms.tune.tune_tasks(
        tasks=contexts,
        task_weights=weights,
        work_dir=str(snapshot.folder),  # unused with a database object and no post-optimisation
        max_trials_global=opts.trials_per_task * len(todo),
        max_trials_per_task=opts.trials_per_task,
        num_trials_per_iter=min(64, opts.trials_per_task),
        builder=ms.builder.LocalBuilder(f_build=fast_build, timeout_sec=60),
        runner=_runner(opts),
        database=snapshot.database,
        cost_model=_cost_model(),
        measure_callbacks=callbacks,
    )
    on_progress(tracker.finish())
    return tracker


def _log_progress(progress: TuneProgress) -> None:
    logger.info("tuning: %s", progress.describe())
