"""What a compile run needs around its entry point (:func:`optc.api.compile`).

* the output folder: proof of ownership, staging, the one-step swap, clean-up
  on signals, and the sweep of temporary folders left by killed runs;
* the model: loading and freezing input shapes (and a target's batch dim);
* measuring: sample inputs, outputs, accuracy, latency, the comparison;
* provenance: file digests, versions, ``pipeline.yaml`` written and read back;
* ``optc inspect``.

The output folder
-----------------
optc replaces a folder only when it can prove the folder is its own output:
every output holds ``.optc-output.json``, the SHA-256 of each file optc wrote
there. An existing folder is replaced only when the marker is there, every
file it lists is unchanged and nothing else is in the folder; anything else is
refused with a one-line error. An absent or empty folder is fine.

A run writes into ``.OUT.<hex>.tmp/out`` beside OUT, and
``.OUT.<hex>.tmp/owner.json`` names its process (pid, host). Publishing swaps
``out`` and OUT in one step (``renameat2(RENAME_EXCHANGE)``, Linux), so OUT
always exists, holding the old output or the new one; the old one is then
deleted with the temporary folder. Where the kernel, libc or filesystem cannot
exchange, OUT is renamed to ``.OUT.<hex>.tmp/old`` and ``out`` into place
(a kill between the two leaves no OUT; the next run puts ``old`` back).
SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` during a run, so the
temporary folder is removed; after a kill -9, the next run into the same OUT
removes the temporary folders whose process is gone.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import sys
import threading
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import yaml

from optc import __version__
from optc.data import CalibrationSet, LabelledSet
from optc.data.calibration import sample_axes
from optc.data.images import ImagePreprocess
from optc.errors import ConfigError, OptcError
from optc.evaluation import accuracy, compare_outputs, latency_ms
from optc.evaluation.fidelity import Changes, joined_feeds
from optc.ir.io import load_model
from optc.ir.model import Model, TensorSpec
from optc.ir.session import make_session, run, sample_feeds as random_feeds, unrunnable_reason
from optc.ir.bind import bind_inputs, parse_value_spec, values_from_document
from optc.ir.shapes import MAX_DIM, freeze_input_shapes, parse_shape_spec
from optc.passes.framework import Pass
from optc.passes.framework.pipeline import pipeline_from_data, read_pipeline_data

__all__ = [
    "Interrupted", "PipelineFile", "Staging", "check_output_folder", "inspect_model", "parse_shape_spec", "prepare_model",
    "read_pipeline_file", "require_tvm", "sweep_stale",
]

logger = logging.getLogger(__name__)

MODEL_NAME = "model.onnx"
REPORT_NAME = "report.json"
PIPELINE_NAME = "pipeline.yaml"
MARKER_NAME = ".optc-output.json"  # the files optc wrote into an output folder, with their SHA-256
OWNER_NAME = "owner.json"  # in a temporary folder: the process writing it
MARKER_FORMAT = "optc-output/1"
TVM_INSTALL = "pip install 'optc[tvm]'"


def require_tvm(target: str) -> None:
    """Fail before any work when ``--target`` is given and TVM is not installed (found without importing it)."""
    if find_spec("tvm") is None:
        raise ConfigError(f"--target {target} needs Apache TVM, which is not installed: {TVM_INSTALL}")


# --------------------------------------------------------------------------- output folder


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived during a compile; raised so that clean-up runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def check_output_folder(outdir: Path) -> None:
    """Raise ConfigError unless ``outdir`` is absent, empty, or optc's own unchanged output."""
    if outdir.is_symlink():
        raise ConfigError(f"output {outdir} is a symbolic link; give the folder itself, or another -o")
    if not outdir.exists():
        return
    if not outdir.is_dir():
        raise ConfigError(f"output {outdir} exists and is not a folder; give another -o")
    if not any(outdir.iterdir()):
        return
    problem = _not_ours(outdir)
    if problem:
        raise ConfigError(f"output folder {outdir} {problem}; refusing to overwrite it: give another -o, or move its files away")


def _not_ours(outdir: Path) -> str | None:
    """Why ``outdir`` cannot be proven to be optc's unchanged output (None: it is)."""
    marker = outdir / MARKER_NAME
    if marker.is_symlink() or not marker.is_file():
        return f"is not empty and has no {MARKER_NAME} (the list of files optc wrote there)"
    try:
        listed = json.loads(marker.read_text())["files"]
        if not isinstance(listed, dict) or not all(_inside(k) and isinstance(v, str) for k, v in listed.items()):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        return f"has an unreadable {MARKER_NAME}"
    folders = {str(p) for rel in listed for p in PurePosixPath(rel).parents if str(p) != "."}
    extra: list[str] = []
    for root, dirnames, filenames in os.walk(outdir):
        base = PurePosixPath(Path(root).relative_to(outdir).as_posix())
        kept = []
        for name in dirnames:
            rel = str(base / name)
            if rel in folders and not os.path.islink(os.path.join(root, name)):
                kept.append(name)
            else:
                extra.append(rel + "/")
        dirnames[:] = kept
        for name in filenames:
            rel = str(base / name)
            if rel != MARKER_NAME and (rel not in listed or os.path.islink(os.path.join(root, name))):
                extra.append(rel)
    if extra:
        return f"holds {_some(extra)}, which optc did not write"
    missing = [rel for rel in listed if not (outdir / rel).is_file()]
    if missing:
        return f"no longer holds {_some(missing)}, which optc wrote there"
    changed = [rel for rel, digest in listed.items() if file_digest(outdir / rel) != digest]
    if changed:
        return f"has {_some(changed)} changed since optc wrote {'it' if len(changed) == 1 else 'them'}"
    return None


def _inside(rel: Any) -> bool:
    path = PurePosixPath(rel) if isinstance(rel, str) else None
    return path is not None and not path.is_absolute() and ".." not in path.parts and rel not in ("", ".")


def _some(names: Sequence[str]) -> str:
    shown = ", ".join(sorted(names)[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _write_marker(folder: Path) -> None:
    files = {p.relative_to(folder).as_posix(): file_digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    text = json.dumps({"format": MARKER_FORMAT, "optc_version": __version__, "files": files}, indent=2)
    (folder / MARKER_NAME).write_text(text + "\n")


class Staging:
    """The temporary folder a run writes into (``path``), swapped into ``outdir`` by :meth:`publish`.

    A context manager: the temporary folder is removed on exit, whatever happened;
    SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` while it is open. With ``outdir``
    None it does nothing and ``path`` is None.
    """

    def __init__(self, outdir: Path | None):
        self.outdir = outdir
        self.root: Path | None = None  # .OUT.<hex>.tmp
        self.path: Path | None = None  # root/out, what becomes OUT
        self._signals = _TerminationSignals()

    def __enter__(self) -> Staging:
        if self.outdir is None:
            return self
        target = Path(os.path.abspath(self.outdir))
        self._signals.install()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            sweep_stale(target)
            root = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
            root.mkdir()
        except OSError as exc:
            self._signals.uninstall()
            raise ConfigError(f"cannot write beside {self.outdir}: {exc.strerror or exc}; give another -o") from exc
        self.root = root
        try:
            (root / OWNER_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
            (root / "out").mkdir()
        except BaseException:
            self.__exit__()
            raise
        self.path = root / "out"
        return self

    def publish(self) -> None:
        """Mark the staged files as optc's, then swap them into ``outdir`` in one step."""
        assert self.outdir is not None and self.path is not None and self.root is not None
        # The folder may have changed during a long run: prove it is ours again right before replacing it.
        check_output_folder(self.outdir)
        _write_marker(self.path)
        with self._signals.deferred():
            _swap(self.path, Path(os.path.abspath(self.outdir)), self.root)

    def __exit__(self, *exc_info: Any) -> None:
        if self.root is not None:
            try:
                _remove_temporary(self.root, Path(os.path.abspath(self.outdir)))  # type: ignore[arg-type]
            finally:
                self.root = None
                self._signals.uninstall()


class _TerminationSignals:
    """While installed, SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` (as SIGINT raises KeyboardInterrupt).

    Installed only over the default action, so that a run under nohup keeps
    ignoring SIGHUP and an application's own handlers stay in place, and only in
    the main thread (the only one where Python can install handlers). Inside
    :meth:`deferred` a signal is held until the block ends.
    """

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}
        self.deferring = False
        self.held: int | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL, signal.SIGHUP: signal.SIG_DFL}
        for signum, default in defaults.items():
            if signal.getsignal(signum) is default:
                self.previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.deferring:
            self.held = signum
            return
        self.uninstall()  # a second signal acts as it would have (a kill now is swept by the next run)
        raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
            held, self.held = self.held, None
            if held is not None:
                self.uninstall()
                raise Interrupted(held)


def _swap(staged: Path, outdir: Path, root: Path) -> None:
    if not os.path.lexists(outdir):
        os.rename(staged, outdir)
        return
    if _exchange(staged, outdir):
        return  # the old output is at `staged` now, deleted with the temporary folder
    os.rename(outdir, root / "old")
    os.rename(staged, outdir)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step; False where the kernel, libc or filesystem cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@functools.cache
def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _remove_temporary(root: Path, outdir: Path) -> None:
    """Delete a run's temporary folder; an earlier output parked there by an interrupted fallback swap goes back first."""
    old = root / "old"
    if old.is_dir() and not os.path.lexists(outdir):
        os.rename(old, outdir)
    shutil.rmtree(root, ignore_errors=True)


def sweep_stale(outdir: Path) -> list[Path]:
    """Remove the temporary folders of earlier runs into ``outdir`` whose process is gone (killed with -9)."""
    pattern = re.compile(rf"\.{re.escape(outdir.name)}\.[0-9a-f]{{8}}\.tmp")
    removed = []
    for root in sorted(outdir.parent.iterdir()) if outdir.parent.is_dir() else ():
        if not pattern.fullmatch(root.name) or not root.is_dir():
            continue
        try:
            owner = json.loads((root / OWNER_NAME).read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not one of ours, or being created right now
        if pid <= 0 or host != socket.gethostname() or _alive(pid):
            continue
        _remove_temporary(root, outdir)
        logger.info("removed %s, left by process %d", root, pid)
        removed.append(root)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


# --------------------------------------------------------------------------- the model


def prepare_model(
    model: Model | str | os.PathLike[str], shapes: Mapping[str, tuple[int, ...]], *, target: str | None = None,
    values: Mapping[str, Any] | None = None,
) -> tuple[Model, dict[str, tuple[int, ...]]]:
    """Load (or take) the model, freeze input dims and bind ``values`` (``--input-value``: those inputs become
    constants, :mod:`optc.ir.bind`); returns it and the dims frozen.

    A target needs static shapes: a dynamic leading batch dim left after ``shapes``
    is frozen to 1 (with a warning and a note in the report); any other dynamic dim
    is a ConfigError that shows the ``--input-shape`` to give. A Model passed in is
    copied before it is changed.
    """
    given = isinstance(model, Model)
    if not given:
        model = load_model(model)
    frozen = dict(shapes)
    if frozen:
        if given:
            model, given = model.copy(), False
        if freeze_input_shapes(model, frozen):
            model.notes.append("froze input shapes: " + _shapes_text(frozen))
    if values:
        if given:
            model, given = model.copy(), False
        bind_inputs(model, values)
    if target is not None:
        batch = _target_batch(model, target)
        if batch:
            if given:
                model = model.copy()
            freeze_input_shapes(model, batch)
            note = (f"--target {target} needs static input shapes: froze the leading batch dim to 1 "
                    f"({_shapes_text(batch)}); give --input-shape for another batch")
            model.notes.append(note)
            logger.warning(note)
            frozen.update(batch)
    return model, frozen


def _target_batch(model: Model, target: str) -> dict[str, tuple[int, ...]]:
    """Batch-1 shapes for inputs whose only dynamic dim is the leading one; ConfigError for other dynamic dims.

    A recurrent layer's time axis is never taken for the batch, even when it leads (``[T, batch, features]``):
    its length is the user's to give.
    """
    from optc.targets.recurrent import time_axes

    dynamic = [s for s in model.inputs if not s.is_static]
    # the batch is each input's sample axis: 0, or 1 for a recurrent state [2, batch, 128]
    axes = {name: 0 if axis is None else axis for name, axis in sample_axes(model.inputs).items()}
    sequences = {name: hit for name, hit in time_axes(model).items() if hit[0] == axes.get(name)} if dynamic else {}
    if all(s.shape and s.name not in sequences and [i for i, d in enumerate(s.shape) if not isinstance(d, int)] == [axes[s.name]]
           for s in dynamic):
        return {s.name: tuple(1 if i == axes[s.name] else d for i, d in enumerate(s.shape)) for s in dynamic}  # type: ignore[misc, union-attr]
    placeholders: list[str] = []
    hints = " ".join(f"--input-shape {s.name}={_dims_hint(s, placeholders, -1 if s.name in sequences else axes[s.name])}" for s in dynamic)
    sizes = " and ".join(placeholders)
    why = "".join(f"; dim {axis} of {name} is the sequence length of {layer}" for name, (axis, layer) in sequences.items())
    raise ConfigError(
        f"--target {target} needs static input shapes ({'; '.join(s.describe() for s in dynamic)}{why}): "
        f"give {hints}, with {sizes} the size{'s' if len(placeholders) > 1 else ''} to compile for"
    )


def _dims_hint(spec: TensorSpec, placeholders: list[str], batch: int = 0) -> str:
    """``1x3xHEIGHTxWIDTH``: known dims filled in, the batch (axis ``batch``; -1: none) as 1, the others named in
    capitals (added to ``placeholders``)."""
    if spec.shape is None:
        parts = [f"{spec.name.upper()}_DIMS"]
    else:
        parts = []
        for i, d in enumerate(spec.shape):
            if isinstance(d, int):
                parts.append(str(d))
            elif i == batch:
                parts.append("1")
            else:
                name = re.sub(r"[^A-Za-z0-9]+", "_", d or "").strip("_").upper()
                parts.append(name if name and not name[0].isdigit() else f"D{i}")
    placeholders.extend(p for p in parts if not p.isdigit() and p not in placeholders)
    return "x".join(parts)


def _shapes_text(shapes: Mapping[str, Sequence[int]]) -> str:
    return ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items())


# --------------------------------------------------------------------------- measuring


FIDELITY_SAMPLES = 8  # samples the fidelity figures are measured on (several runs when the batch is fixed)
MAX_SEED = 2**32 - 1  # numpy's legacy seeding takes 32 bits; larger or negative seeds failed deep inside a run
RANDOM_SKIPPED = "not measured: random inputs cannot be valid for this model; give --calib or --eval"


def sample_feeds(model: Model, calib: CalibrationSet | None, labelled: LabelledSet | None, seed: int,
                 held: CalibrationSet | None = None) -> tuple[list[dict], str]:
    """Inputs for verify-each, fidelity and latency, one batch per feed, and where they come from.

    Evaluation data first: the passes never saw it, so fidelity on it is not
    flattered by what they fitted. Then calibration samples held out of the
    passes' fit (``held``), then calibration data (seen by the passes), then random inputs. :data:`FIDELITY_SAMPLES` samples in all, so a model
    whose batch is fixed at 1 is measured on several runs, not one.
    """
    unrunnable = unrunnable_reason(model)
    if unrunnable is not None:  # a valid model optc will not run: its own checks are skipped, not the compile
        return [], f"not measured: {unrunnable}"
    if labelled is not None:
        return labelled.inputs.first_samples(FIDELITY_SAMPLES), "evaluation data"
    if held is not None:
        return held.first_samples(FIDELITY_SAMPLES), "held-out calibration data, which no pass fitted on"
    if calib is not None:
        return calib.first_samples(FIDELITY_SAMPLES), "calibration data, which the passes fitted on"
    try:
        first = random_feeds(model, seed=seed)
    except OptcError as exc:  # strings, sequences: no random value is meaningful
        return [], f"{RANDOM_SKIPPED}: {exc}"
    batch = _feed_samples(first)
    runs = max(1, -(-FIDELITY_SAMPLES // max(batch, 1)))  # a zero-sized batch dim: one (empty) run
    return [first] + [random_feeds(model, seed=seed + k) for k in range(1, runs)], "random inputs"


def _feed_samples(feed: Mapping[str, np.ndarray]) -> int:
    return max((v.shape[0] for v in feed.values() if v.ndim), default=1)


@dataclass
class Measurement:
    outputs: dict[str, Any]
    accuracy: float | None
    latency_ms: float | None


def measure(model: Model, feeds: Sequence[Mapping[str, Any]], labelled: LabelledSet | None, measure_latency: bool,
            session: Any = None) -> Measurement:
    """Outputs on every feed (joined on axis 0), accuracy on ``labelled``, latency on the first feed (none without feeds)."""
    if session is None and feeds:
        session = make_session(model)
    runs = [run(session, feed) for feed in feeds]
    outputs = {name: np.concatenate([np.atleast_1d(r[name]) for r in runs]) for name in runs[0]} if runs else {}
    return Measurement(
        outputs=outputs,
        accuracy=accuracy(model, labelled) if labelled is not None and labelled.class_indices else None,
        latency_ms=latency_ms(model, feeds[0]) if measure_latency and feeds else None,
    )


def measure_input(model: Model, feeds: list[Mapping[str, Any]], source: str, labelled: LabelledSet | None,
                  measure_latency: bool) -> tuple[Measurement, list[Mapping[str, Any]], str]:
    """:func:`measure` on the input model; random inputs it cannot run on (a shape tensor, a split size) are dropped.

    Returns the measurement, the feeds the rest of the run uses and where they come from
    (with the reason when they were dropped). Data the user gave must run: its errors stand.
    """
    # A model onnxruntime cannot load is bad input whatever the data: that error stands. Only
    # running it on random values may fail for want of valid ones.
    session = make_session(model) if feeds else None
    try:
        return measure(model, feeds, labelled, measure_latency, session), feeds, source
    except OptcError as exc:
        if source != "random inputs":
            raise
        return measure(model, [], labelled, False), [], f"{RANDOM_SKIPPED}: the input model does not run on them ({exc})"


def check_finite(before: Measurement, after: Measurement) -> None:
    """Refuse to write a model that turns finite outputs into NaN/inf (a pass went wrong)."""
    for name, ref in before.outputs.items():
        got = after.outputs.get(name)
        if got is None or not np.issubdtype(got.dtype, np.floating):
            continue
        if np.isfinite(ref).all() and not np.isfinite(got).all():
            raise RuntimeError(f"the compressed model computes NaN/inf on output '{name}' where the input model does not; nothing was written")


EXACT_PIPELINE_RTOL = 1e-3  # of an output's largest magnitude: float reassociation (folded batch norms) stays far below


def float_noise(model: Model, feeds: Sequence[Mapping[str, Any]], before: Measurement) -> dict[str, float]:
    """Per numeric output, how far the input model's outputs move when onnxruntime runs it without its graph
    optimisations (its fusions reassociate float sums): the model's own float noise, which an exact rewrite may also
    show. An autoregressive decoder amplifies it: RapidTable's SLANet moves by 0.019 on decoder steps past its end token."""
    unoptimised = measure(model, feeds, None, False, session=make_session(model, optimize=False)).outputs
    noise = {}
    for name, ref in before.outputs.items():
        plain = unoptimised.get(name)
        if plain is None or not np.issubdtype(ref.dtype, np.number) or plain.shape != ref.shape:
            continue
        plain, ref64 = plain.astype(np.float64), ref.astype(np.float64)
        both = np.isfinite(plain) & np.isfinite(ref64)
        if both.any():
            noise[name] = float(np.abs(plain[both] - ref64[both]).max())
    return noise


def exact_only(passes: Sequence[Any]) -> bool:
    """A pipeline of exact passes (canonicalize): :func:`check_exact` holds its output to the input model's."""
    return bool(passes) and all(getattr(p, "exact", False) for p in passes)


def check_exact(passes: Sequence[Any], before: Measurement, after: Measurement, noise: Mapping[str, float] | None = None) -> list[str]:
    """Refuse to write a model that a pipeline of exact passes (canonicalize) computes differently: an optc bug
    (onnx-graphsurgeon once folded ``Shape(x, start=1, end=2)`` of a 2x3 ``x`` to [2, 3], and the model computed 5
    where onnxruntime computes 3, with exit 0). Lossy passes are judged by their budgets instead.

    A difference within twice the input model's own float noise (``noise``: :func:`float_noise`) is float
    reassociation the model amplifies, not a bug: accepted, and said in the notes returned."""
    notes: list[str] = []
    if not exact_only(passes):
        return notes
    for name, ref in before.outputs.items():
        got = after.outputs.get(name)
        if got is None or not np.issubdtype(ref.dtype, np.number) or got.shape != ref.shape:
            continue
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        finite = np.isfinite(ref64) & np.isfinite(got64)
        if not finite.any():
            continue
        scale = float(np.abs(ref64[finite]).max())
        worst = float(np.abs(got64[finite] - ref64[finite]).max())
        if worst <= EXACT_PIPELINE_RTOL * max(scale, 1e-6):
            continue
        floor = (noise or {}).get(name)
        names = ", ".join(p.name for p in passes)
        if floor is not None and worst <= 2 * floor:
            notes.append(f"output '{name}' differs from the input model's by up to {worst:.3g} after the exact passes ({names}), "
                         f"within its own float noise: onnxruntime's graph optimisations alone move it by {floor:.3g}")
            continue
        own = f"; onnxruntime's own optimisations move it by {floor:.3g}" if floor is not None else ""
        raise RuntimeError(f"the passes ({names}) are exact, but output '{name}' differs from the input model's by up to {worst:.3g} "
                           f"(its values reach {scale:.3g}{own}): an optc bug; nothing was written (--verify-each names the pass)")
    return notes


def compare(before: Measurement, after: Measurement, samples_labelled: int, timing: str, feeds_source: str,
            feeds: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """report.json's ``evaluation`` section. An output that is an input plus a change (a watermark encoder's
    marked frame) is also compared by its change (``change_of``, ``change_cosine``), as budgets judge it."""
    samples = len(next(iter(before.outputs.values()))) if before.outputs else 0
    fidelity = compare_outputs(before.outputs, after.outputs)
    found = Changes.find(joined_feeds(feeds), before.outputs)
    if found.bases:
        changed = compare_outputs(found.view(before.outputs), found.view(after.outputs))
        for name, base in found.bases.items():
            fidelity[name].update(change_of=base, change_cosine=changed[name]["cosine"])
    out: dict[str, Any] = {"fidelity": fidelity, "fidelity_samples": samples}
    if before.accuracy is not None and after.accuracy is not None:
        out["accuracy"] = {"samples": samples_labelled, "before": before.accuracy, "after": after.accuracy, "delta": after.accuracy - before.accuracy}
    if before.latency_ms is not None and after.latency_ms is not None:
        out["latency_ms"] = {
            "before": before.latency_ms,
            "after": after.latency_ms,
            "speedup": before.latency_ms / after.latency_ms if after.latency_ms else None,
            "runtime": "onnxruntime CPU",
            "timing": timing,
        }
    out["fidelity_data"] = feeds_source
    return out


# --------------------------------------------------------------------------- provenance


def file_digest(path: Path) -> str:
    """SHA-256 of a file (the one hash optc writes in markers, reports and manifests)."""
    from optc.targets.artifact import sha256

    return sha256(path)


def versions() -> dict[str, str | None]:
    """Versions of what produced an output, read from package metadata (TVM is not imported for it)."""
    tvm = _distribution_version("apache-tvm")
    if tvm is None and "tvm" in sys.modules:  # a source build has no distribution metadata
        tvm = getattr(sys.modules["tvm"], "__version__", None)
    return {
        "optc": __version__,
        "python": platform.python_version(),
        "onnx": _distribution_version("onnx"),
        "onnxruntime": _distribution_version("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"),
        "tvm": tvm,
    }


def _distribution_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def to_json(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, default=_json_default)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def pipeline_document(passes: Sequence[Pass], seed: int, shapes: Mapping[str, Sequence[int]],
                      data: Mapping[str, Any] | None = None, values: Mapping[str, Any] | None = None) -> str:
    """``pipeline.yaml``: every option of every pass, the seed, the frozen input dims, how images were read and how many
    calibration samples were held out, for ``--pipeline``."""
    entries = []
    for p in passes:
        options = {k: list(v) if isinstance(v, tuple) else v for k, v in p.describe_config().items()}
        entries.append({"name": p.name, "options": options} if {"name", "options"} & set(options) else {"name": p.name, **options})
    document = {"seed": seed, "input_shapes": {k: list(v) for k, v in shapes.items()}, **({"input_values": dict(values)} if values else {}),
                **({"data": dict(data)} if data else {}), "passes": entries}
    header = (f"# optc {__version__}: the resolved pipeline of this output (every option of every pass, the seed, the input shapes).\n"
              "# Replay it: optc compile MODEL --pipeline pipeline.yaml [--calib DATA] [--eval DATA] -o OUTDIR\n")
    return header + yaml.dump(document, Dumper=_PlainDumper, sort_keys=False, default_flow_style=None)


class _PlainDumper(yaml.SafeDumper):
    """No anchors or aliases: pipeline files refuse them (optc.passes.framework.pipeline)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


@dataclass(frozen=True)
class PipelineFile:
    """A ``--pipeline`` file: its passes, and the seed, input dims and image preprocessing a ``pipeline.yaml`` records."""

    passes: list[Pass]
    seed: int | None
    input_shapes: dict[str, tuple[int, ...]]
    images: ImagePreprocess | None = None
    input_values: dict[str, list[str]] = field(default_factory=dict)  # inputs bound to constants (--input-value)
    held_out: int | None = None  # the last calibration samples no pass fitted on (``data.held_out``)


def read_pipeline_file(path: Path) -> PipelineFile:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) pipeline file, as written by hand or as ``pipeline.yaml``."""
    data = read_pipeline_data(path)
    seed, shapes, images, held_out, values = None, {}, None, None, {}
    if isinstance(data, dict):
        data = dict(data)
        values = values_from_document(data.pop("input_values", None), f"pipeline file {path}")
        images, held_out = _data_section(data.pop("data", None), path)
        seed = data.pop("seed", None)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
            raise ConfigError(f"pipeline file {path}: 'seed' must be an integer from 0 to {MAX_SEED}, not {seed!r}")
        raw = data.pop("input_shapes", None) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"pipeline file {path}: 'input_shapes' must map input names to dims, such as input: [1, 3, 224, 224]")
        for name, dims in raw.items():
            if isinstance(dims, str):
                shapes.update([parse_shape_spec(f"{name}={dims}")])
            elif isinstance(dims, list) and dims and all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= MAX_DIM for d in dims):
                shapes[str(name)] = tuple(dims)
            else:
                raise ConfigError(f"pipeline file {path}: input_shapes.{name} must be a list of integers from 1 to {MAX_DIM}, not {dims!r}")
    return PipelineFile(pipeline_from_data(data, source=str(path)), seed, shapes, images, held_out=held_out, input_values=values)


def _data_section(raw: Any, path: Path) -> tuple[ImagePreprocess | None, int | None]:
    """A pipeline file's ``data`` mapping: ``images`` (how image folders become inputs) and ``held_out``
    (how many of the last calibration samples no pass fitted on)."""
    if raw is None:
        return None, None
    if not isinstance(raw, dict) or set(raw) - {"images", "held_out"}:
        raise ConfigError(f"pipeline file {path}: 'data' takes 'images' (how image folders become inputs) and 'held_out' "
                          "(the last calibration samples no pass fits on)")
    held_out = raw.get("held_out")
    if held_out is not None and (isinstance(held_out, bool) or not isinstance(held_out, int) or held_out < 0):
        raise ConfigError(f"pipeline file {path}: data.held_out must be a number of samples (0: none), not {held_out!r}")
    images = ImagePreprocess.from_dict(raw["images"], f"pipeline file {path}: data.images") if raw.get("images") is not None else None
    return images, held_out


# --------------------------------------------------------------------------- inspect


def inspect_model(path: Path, shape_specs: Sequence[str] = (), *, check_frontend: bool = True,
                  value_specs: Sequence[str] = ()) -> dict[str, Any]:
    """What ``optc inspect`` shows: interface, opsets, ops, size, MACs, blockers (with ``value_specs``, of the model
    with those inputs bound, as ``optc compile --input-value`` would see it)."""
    from optc.ir.constants import count_constant_weights
    from optc.ir.shapes import infer_shapes
    from optc.ir.stats import compute_stats
    from optc.targets.support import frontend_support

    raw = load_model(path, lift_constants=False)
    constant_weights = count_constant_weights(raw)
    del raw
    model, _ = prepare_model(path, dict(parse_shape_spec(s) for s in shape_specs), values=dict(parse_value_spec(s) for s in value_specs))
    shapes = infer_shapes(model)
    stats = compute_stats(model)
    dynamic = {s.name: [d for d in (s.shape or ()) if not isinstance(d, int)] for s in model.inputs if not s.is_static}
    info: dict[str, Any] = {
        "model": str(path),
        "ir_version": model.proto.ir_version,
        "producer": f"{model.proto.producer_name} {model.proto.producer_version}".strip(),
        "opsets": model.opset_imports,
        "inputs": [s.describe() for s in model.inputs],
        "outputs": [s.describe() for s in model.outputs],
        "dynamic_dims": dynamic,
        "weights_in_constant_nodes": constant_weights,
        "notes": model.notes,
        "shape_mismatches": shapes.output_mismatches,
        "stats": stats.to_dict(),
    }
    if check_frontend:
        info["tvm_frontend"] = frontend_support(model).to_dict()
    return info
