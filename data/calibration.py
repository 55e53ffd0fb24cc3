"""Calibration data: one abstraction for every data-driven pass.

A :class:`CalibrationSet` is an ``.npz`` file (arrays keyed by input name,
leading axis = samples) or a folder of such files. It is validated against the
model's inputs up front (names, dtypes, ranks, fixed dims) and read one file at
a time, so a large set never sits in memory at once. Archives are read by
:class:`~optc.data.npz.NpzArchive` (sizes checked before decompression, at
most 2 GiB of arrays per file); only regular files are read from a folder
(symbolic links, FIFOs and devices in it are refused), and a file that
changes between validation and use is refused.

:func:`capture_activations` runs the model in onnxruntime with intermediate
tensors exposed and hands each batch's values to a reducer, a few tensors at a
time, so statistics are streamed rather than every activation kept.

Inputs that hold their samples on another axis: a recurrent state ``[2, batch, 128]``
(Silero VAD's) has a fixed first dim, not 1, that no other input shares; its samples
are on its first dim that is dynamic or 1, so a set gives it as ``[2, N, 128]``. Such
an input with no dim left for samples is given whole, once, for every run.

Inputs that are the same for every sample: a rank-0 input (a sample rate, a
threshold) is given as a 0-d array (one value for all samples) or as ``[N]`` (one
value per sample; batches then never mix two values, since the model takes one
scalar per run). Any other input given with one sample while the rest have N is
used for every sample (a zero recurrent state, a fixed prompt).

Padded token batches: when the model has a token mask input (``attention_mask``
by default, 0 marking padding), activations shaped ``[batch, seq, features]``
are reduced over the real tokens only. Padding rows are computed but thrown
away by the model itself (masked attention, masked pooling); fitting weights or
ranges to them spends the calibration budget on values that never matter.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from optc.data.npz import FileIdentity, NpzArchive
from optc.errors import ConfigError
from optc.ir.bind import check_bound_arrays
from optc.ir.model import Model, TensorSpec
from optc.ir.session import make_session
from optc.ir.stats import shape_map
from optc import progress


# Held-out samples split from calibration data (CalibrationSet.hold_out): a quarter, within these bounds.
HOLD_OUT_MIN, HOLD_OUT_MAX = 4, 64
HOLD_OUT_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class CalibrationSet:
    """Validated calibration inputs for one model."""

    files: tuple[Path, ...]
    inputs: tuple[TensorSpec, ...]
    num_samples: int
    token_mask: str | None = None
    # What each file was when it was validated; None skips the check (a set built by hand).
    identities: tuple[FileIdentity, ...] | None = None
    # False when the files were found in a folder: symbolic links among them are refused.
    follow_symlinks: bool = True
    kind: str = "calibration"  # how messages name the files
    # Samples held in memory (from_arrays, from_chunks) instead of files: groups of arrays with samples on axis 0.
    chunks: tuple[Mapping[str, np.ndarray], ...] | None = field(default=None, compare=False, repr=False)
    # Files the in-memory samples were read from (an image folder): for the report's digests only.
    sources: tuple[Path, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        model: Model,
        *,
        extra_keys: frozenset[str] = frozenset(),
        kind: str = "calibration",
        token_mask: str | None = "auto",
    ) -> "CalibrationSet":
        """Open ``path`` (an ``.npz`` or a folder of them) and validate it against ``model``.

        ``token_mask`` names the model input whose zeros mark padded tokens;
        ``"auto"`` picks an integer or bool rank-2 input named ``attention_mask``
        (the name every transformer exporter uses), ``None`` turns masking off.

        Raises:
            ConfigError: naming the file, the input and what is wrong.
        """
        path = Path(path)
        if path.is_dir():
            files = tuple(sorted(path.glob("*.npz")))
            if not files:
                raise ConfigError(f"{kind} folder {path} holds no .npz files")
        elif path.exists():
            files = (path,)
        else:
            raise ConfigError(f"{kind} data {path}: no such file or folder")
        follow = not path.is_dir()
        specs = tuple(model.inputs)
        checked = [_validate_file(f, specs, extra_keys, kind, follow, model.bound) for f in files]
        counts = [n for n, _ in checked]
        batch = _fixed_batch(specs)
        short = [(f, n) for f, n in zip(files, counts) if batch and n < batch]
        if short:
            f, n = short[0]
            raise ConfigError(f"{kind} file {f.name}: {n} samples, fewer than the model's fixed batch of {batch}; "
                              f"give at least {batch} per file or freeze a smaller batch with --input-shape")
        identities = tuple(identity for _, identity in checked)
        return cls(files, specs, sum(counts), _token_mask(specs, token_mask), identities, follow, kind)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], model: Model, *, kind: str = "calibration",
                    token_mask: str | None = "auto") -> "CalibrationSet":
        """A set held in memory: one array per model input, samples on axis 0, checked as files are.

        For Python users whose data is already loaded (any framework's loader, a list of
        feeds stacked with ``np.stack``); the arrays are not copied, so do not change them
        while the set is in use. Feeds of varying shapes: :func:`optc.data.feeds.from_feeds`.
        """
        return cls.from_chunks([arrays], model, kind=kind, token_mask=token_mask)

    @classmethod
    def from_chunks(cls, chunks: Sequence[Mapping[str, np.ndarray]], model: Model, *, kind: str = "calibration",
                    token_mask: str | None = "auto") -> "CalibrationSet":
        """A set held in memory as several groups of samples, each as :meth:`from_arrays` takes them.

        Samples of one group share their shape; groups may differ in dynamic dims
        (token batches of different lengths), as the files of a folder may.
        """
        specs = tuple(model.inputs)
        label = f"{kind} arrays"
        names = [s.name for s in specs]
        if not chunks:
            raise ConfigError(f"{label}: no samples")
        held, total = [], 0
        for arrays in chunks:
            check_bound_arrays(model.bound, arrays, label)
            arrays = {k: v for k, v in arrays.items() if k not in model.bound}
            missing = [n for n in names if n not in arrays]
            extra = sorted(set(arrays) - set(names))
            if missing or extra:
                raise ConfigError(f"{label}: {'no array for model input ' + repr(missing[0]) if missing else 'array ' + repr(extra[0]) + ' is not a model input'}; "
                                  f"inputs are {', '.join(names)}")
            counts = {}
            for spec in specs:
                value = np.asarray(arrays[spec.name])
                _check_declared(label, spec, value.dtype, value.shape, sample_axes(specs)[spec.name])
                _check_finite(label, spec, value)
                counts[spec.name] = _sample_count(spec, value.shape, specs)
            total += _common_count(label, counts)
            held.append({s.name: np.asarray(arrays[s.name]) for s in specs})
        batch = _fixed_batch(specs)
        if batch and total < batch:
            raise ConfigError(f"{label}: {total} samples, fewer than the model's fixed batch of {batch}")
        return cls((), specs, total, _token_mask(specs, token_mask), None, True, kind, tuple(held))

    @cached_property
    def digest(self) -> str:
        """Equal for two sets that give the same feeds: what caches of calibration statistics are keyed by.

        A run that misses the default budget compiles again with a budget, on a set
        opened (and split) again: keyed by object identity, every statistic a pass
        had captured would be captured again. Files are read by their bytes (a path and
        its ``fstat`` times would not tell apart two sets written to one file within the
        clock's tick), samples held in memory by theirs; either is small next to the
        activations computed from them.
        """
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((self.inputs, self.token_mask, self.num_samples)).encode())
        if self.chunks is None:
            for index in range(len(self.files)):
                with self.open(index) as archive:
                    h.update(archive.digest())
            return h.hexdigest()
        for chunk in self._chunks():
            for name in sorted(chunk):
                value = np.ascontiguousarray(chunk[name])
                h.update(repr((name, value.dtype.str, value.shape)).encode())
                h.update(value.data if value.dtype.kind != "O" else repr(value.tolist()).encode())
        return h.hexdigest()

    def open(self, index: int) -> NpzArchive:
        """The ``index``-th file, opened again; refused when it is not the file that was validated."""
        f = self.files[index]
        archive = NpzArchive(f, f"{self.kind} file {f.name}", follow_symlinks=self.follow_symlinks)
        if self.identities is not None and archive.identity != self.identities[index]:
            archive.close()
            raise ConfigError(f"{self.kind} file {f.name} changed after it was checked; run again")
        return archive

    def batches(self, batch_size: int = 16) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of at most ``batch_size`` samples (exactly the model's batch when it is fixed: the samples
        left over after the last full feed are not fed)."""
        for feed, _ in self._feeds(batch_size, pad=False):
            yield feed

    def padded_batches(self, batch_size: int = 16) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """Every sample, in feeds as :meth:`batches` makes them, each with how many of its samples are real.

        A model whose batch is fixed takes no partial feed, so the samples left over
        (the last 52 of 500 at a frozen batch of 64) come in one feed padded with
        copies of the last sample; the caller keeps the first ``real`` outputs. An
        evaluation must see every sample: its labels count them.
        """
        return self._feeds(batch_size, pad=True)

    def _feeds(self, batch_size: int, pad: bool) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        scalars = {s.name for s in self.inputs if s.shape == ()}
        whole, moved = _whole_inputs(self.inputs), _moved_axes(self.inputs)
        size = self._batch_size(batch_size)
        fixed = _fixed_batch(self.inputs) is not None
        for arrays in self._chunks():
            n = _samples_in(arrays, whole)
            for first, last in _runs_of_equal_scalars(arrays, scalars, n):
                stop = last - (last - first) % size if fixed and not pad else last
                for start in range(first, stop, size):
                    end = min(start + size, last)
                    missing = size - (end - start) if fixed else 0  # only a padded feed is short of a fixed batch
                    feed = {}
                    for k, v in arrays.items():
                        if k in scalars or k in whole:
                            feed[k] = np.asarray(v[start]) if k in scalars else v
                            continue
                        part = v[start:end]
                        if missing:
                            part = np.concatenate([part, np.repeat(part[-1:], missing, axis=0)])
                        feed[k] = np.ascontiguousarray(np.moveaxis(part, 0, moved[k]) if k in moved else part)
                    yield feed, end - start

    def _chunks(self) -> Iterator[dict[str, np.ndarray]]:
        """Every input's samples, one file (or the in-memory arrays) at a time."""
        if self.chunks is not None:
            for chunk in self.chunks:
                yield _per_sample(self.inputs, chunk)
            return
        for index in range(len(self.files)):
            with self.open(index) as data:
                yield _per_sample(self.inputs, {s.name: data.read(s.name) for s in self.inputs})

    def first_samples(self, count: int, batch_size: int | None = None) -> list[dict[str, np.ndarray]]:
        """Feeds holding the first ``count`` samples (all when the set is smaller), one batch each (of at most
        ``batch_size``: :func:`samples_per_run`).

        A model whose batch is fixed at 1 gets ``count`` feeds: figures measured on a
        single sample mean little.
        """
        feeds, seen = [], 0
        for feed in self.batches(min(count, batch_size or count)):
            feeds.append(feed)
            seen += feed_samples(feed, self.inputs)
            if seen >= count:
                break
        return feeds

    def take(self, count: int) -> dict[str, np.ndarray]:
        """The first ``count`` samples as one feed (or the fixed batch size when the model has one)."""
        size = self._batch_size(count)
        return next(self.batches(size))

    def _batch_size(self, wanted: int) -> int:
        if _whole_inputs(self.inputs):
            return 1  # an input given whole (a state) is shaped for one run, not for a batch of several
        return _fixed_batch(self.inputs) or max(1, min(wanted, self.num_samples))

    def hold_out(self, model: Model, count: int | None = None) -> tuple["CalibrationSet", "CalibrationSet"]:
        """Split off samples spread evenly over the set as held-out data no pass fits on: ``(fit, held_out)``.

        A quarter of the samples (at least :data:`HOLD_OUT_MIN`, at most
        :data:`HOLD_OUT_MAX`) are held out, or ``count`` of them (a replayed
        ``pipeline.yaml`` fits on what its run fitted on); both parts are held in memory.
        Spread, not the last ones: a set in the order its files were listed (an image folder sorted
        by class) held out its last classes and fitted on the others (:func:`spread`).

        Raises:
            ConfigError: too few samples to split, or more bytes than a split should hold in memory.
        """
        fixed = _fixed_batch(self.inputs)
        if fixed is not None and fixed > 1:
            raise ConfigError(f"the model's batch is fixed at {fixed}: held-out samples cannot be split from {self.kind} data; give --eval")
        if count is not None and not 0 < count < self.num_samples:
            raise ConfigError(f"{self.kind} data has {self.num_samples} samples: cannot hold the last {count} out "
                              "(the pipeline file's data.held_out) and fit on the rest")
        if count is None and self.num_samples < HOLD_OUT_MIN * 2:
            raise ConfigError(f"{self.kind} data has {self.num_samples} samples, too few to hold {HOLD_OUT_MIN} out for measuring; "
                              f"give at least {HOLD_OUT_MIN * 2}, or --eval")
        chunks: list[dict[str, np.ndarray]] = []
        held_bytes = 0
        for chunk in self._chunks():
            chunks.append(chunk)
            held_bytes += sum(value.nbytes for value in chunk.values())
            if held_bytes > HOLD_OUT_MAX_BYTES:
                raise ConfigError(f"{self.kind} data is over {HOLD_OUT_MAX_BYTES >> 20} MiB: give held-out data with --eval "
                                  "instead of splitting it off in memory")
        if count is None:
            count = min(HOLD_OUT_MAX, max(HOLD_OUT_MIN, self.num_samples // 4))
        fit_chunks, held_chunks = [], []
        whole = _whole_inputs(self.inputs)
        held_at = spread(self.num_samples, count)
        start = 0
        for chunk in chunks:  # each chunk split in two (chunks may differ in dynamic dims, so they stay apart)
            n = _samples_in(chunk, whole)
            mine = held_at[(held_at >= start) & (held_at < start + n)] - start
            keep = np.setdiff1d(np.arange(n), mine)
            for rows, into in ((keep, fit_chunks), (mine, held_chunks)):
                if len(rows):
                    into.append({k: v if k in whole else v[rows] for k, v in chunk.items()})
            start += n
        mask = self.token_mask
        fit = CalibrationSet.from_chunks([self._as_given(c) for c in fit_chunks], model, kind=self.kind, token_mask=mask)
        held = CalibrationSet.from_chunks([self._as_given(c) for c in held_chunks], model, kind=f"held-out {self.kind}", token_mask=mask)
        return fit, held

    def _as_given(self, chunk: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A chunk as :meth:`_chunks` gives it (samples on axis 0) back in the layout the model takes."""
        moved = _moved_axes(self.inputs)
        return {k: np.moveaxis(v, 0, moved[k]) if k in moved else v for k, v in chunk.items()}


def spread(total: int, count: int) -> np.ndarray:
    """``count`` sample indices spread evenly over ``total`` (the middle of each of ``count`` equal stretches):
    every fourth of a set held out by a quarter, whatever order its samples came in. Deterministic, so a replay
    that holds out as many holds out the same samples."""
    return np.floor((np.arange(count) + 0.5) * total / count).astype(np.int64)


def _fixed_batch(specs: Sequence[TensorSpec]) -> int | None:
    axes = sample_axes(specs)
    dims = {s.shape[axes[s.name]] for s in specs if s.shape and axes[s.name] is not None and isinstance(s.shape[axes[s.name]], int)}
    return dims.pop() if len(dims) == 1 else None


def _sample_count(spec: TensorSpec, shape: tuple[int, ...], specs: Sequence[TensorSpec]) -> int | None:
    """Samples an array holds for ``spec``; None: one value for every sample.

    That is a 0-d array for a rank-0 input, or the whole array of one run for an input
    with no dim for samples (see :func:`sample_axes`). Such an input is fed whole to
    every run, so those runs take one sample each (the batch it was given for).
    """
    if spec.shape == ():
        return None if shape == () else shape[0]
    axis = sample_axes(specs)[spec.name]
    if axis != 0 and (not shape or shape[0] != spec.shape[0]):
        dims = [str(d) if isinstance(d, int) else "?" for d in spec.shape]
        if axis is None:
            raise ConfigError(f"input '{spec.name}' [{'x'.join(dims)}] has no sample axis (its first dim is fixed and differs "
                              f"from the other inputs'): give it once, as one run takes it, not {list(shape)}")
        wanted = [*dims[:axis], "N", *dims[axis + 1:]]
        raise ConfigError(f"input '{spec.name}' [{'x'.join(dims)}] holds its samples on axis {axis} (its first dim is fixed and "
                          f"differs from the other inputs'): give [{', '.join(wanted)}] for N samples, not {list(shape)}")
    return None if axis is None else shape[axis]


def sample_axes(specs: Sequence[TensorSpec]) -> dict[str, int | None]:
    """The axis each input holds its samples on: 0, another axis, or None (given whole to every run).

    An input whose first dim is fixed, not 1, and differs from every other input's
    first dim (a recurrent state ``[2, batch, 128]``) holds them on its first dim that
    is dynamic or 1; with none, it has no sample axis. A rank-0 input counts as axis 0
    (one value per sample).
    """
    axes: dict[str, int | None] = {}
    for spec in specs:
        axes[spec.name] = 0
        if spec.shape and _first_dim_not_samples(spec, specs):
            axes[spec.name] = next((k for k, d in enumerate(spec.shape[1:], 1) if not isinstance(d, int) or d == 1), None)
    return axes


def feed_samples(feed: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> int:
    """Samples one feed holds (1 when every input is given once)."""
    axes = sample_axes(specs)
    counts = [feed[s.name].shape[axes[s.name]] for s in specs
              if s.shape and axes[s.name] is not None and s.name in feed and np.ndim(feed[s.name]) > axes[s.name]]
    return counts[0] if counts else 1


def _moved_axes(specs: Sequence[TensorSpec]) -> dict[str, int]:
    return {name: axis for name, axis in sample_axes(specs).items() if axis}


def _whole_inputs(specs: Sequence[TensorSpec]) -> set[str]:
    return {name for name, axis in sample_axes(specs).items() if axis is None}


def _samples_in(chunk: Mapping[str, np.ndarray], whole: set[str]) -> int:
    """Samples in a chunk as :func:`_per_sample` gives it (1 when every input is given once)."""
    return next((len(v) for k, v in chunk.items() if k not in whole), 1)


def _first_dim_not_samples(spec: TensorSpec, specs: Sequence[TensorSpec]) -> bool:
    # A leading 1 is read as a (frozen) batch: that is what optc and exporters freeze batches to.
    others = [s.shape[0] for s in specs if s.name != spec.name and s.shape]
    first = spec.shape[0] if spec.shape else None
    return bool(others) and isinstance(first, int) and first != 1 and first not in others


def _common_count(label: str, counts: Mapping[str, int | None]) -> int:
    """The set's sample count; inputs given once (0-d, or one sample while others have N) are used for all."""
    many = {n for n in counts.values() if n is not None and n != 1}
    if 0 in counts.values():
        raise ConfigError(f"{label}: zero samples")
    if len(many) > 1:
        raise ConfigError(f"{label}: inputs have different sample counts "
                          f"({', '.join(f'{k}: {v}' for k, v in counts.items() if v is not None)})")
    return many.pop() if many else 1


def _per_sample(specs: Sequence[TensorSpec], arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every input with samples on axis 0 (views, nothing copied; an input that holds them on another axis has
    it moved first); an input without a sample axis stays whole."""
    counts = {s.name: _sample_count(s, arrays[s.name].shape, specs) for s in specs}
    n = _common_count("data", counts)
    moved = _moved_axes(specs)
    out = {}
    for spec in specs:
        value = arrays[spec.name]
        if spec.name in moved:
            value = np.moveaxis(value, moved[spec.name], 0)
        if counts[spec.name] is None and spec.shape == ():
            value = np.broadcast_to(value, (n,))
        elif counts[spec.name] == 1 and n > 1:
            value = np.broadcast_to(value, (n, *value.shape[1:]))
        out[spec.name] = value
    return out


def _runs_of_equal_scalars(arrays: Mapping[str, np.ndarray], scalars: set[str], n: int) -> list[tuple[int, int]]:
    """``[first, last)`` sample ranges over which every rank-0 input keeps one value (one run per batch)."""
    if not scalars:
        return [(0, n)]
    changes = np.zeros(n, dtype=bool)
    for name in scalars:
        values = arrays[name]
        changes[1:] |= values[1:] != values[:-1]
    starts = [0, *np.flatnonzero(changes).tolist(), n]
    return list(zip(starts[:-1], starts[1:]))


def _token_mask(specs: Sequence[TensorSpec], wanted: str | None) -> str | None:
    if wanted is None:
        return None
    by_name = {s.name: s for s in specs}
    if wanted == "auto":
        spec = by_name.get("attention_mask")
        ok = spec is not None and spec.shape is not None and len(spec.shape) == 2
        ok = ok and spec.dtype is not None and (np.issubdtype(spec.dtype, np.integer) or spec.dtype == np.bool_)
        return spec.name if ok else None
    spec = by_name.get(wanted)
    if spec is None:
        raise ConfigError(f"token mask '{wanted}' is not a model input; inputs are {', '.join(by_name)}")
    if spec.shape is not None and len(spec.shape) != 2:
        raise ConfigError(f"token mask '{wanted}' has rank {len(spec.shape)}; a token mask is [batch, seq]")
    return wanted


def real_tokens(value: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """``value`` without its padded token rows when it is ``[batch, seq, features]`` under ``mask``.

    Anything else (convolution maps, attention scores, tensors of another
    batch/seq layout) is returned unchanged: only a tensor whose two leading
    dims are exactly the mask's is known to be per-token.
    """
    if mask is None or value.ndim != 3 or value.shape[:2] != mask.shape:
        return value
    return value[mask.astype(bool)][None]


def _validate_file(
    path: Path, specs: Sequence[TensorSpec], extra_keys: frozenset[str], kind: str, follow_symlinks: bool,
    bound: Mapping[str, np.ndarray],
) -> tuple[int, FileIdentity]:
    """Check one archive against the model; returns its sample count and identity. Arrays for inputs bound to
    constants (``bound``) must hold those values and are otherwise not read."""
    label = f"{kind} file {path.name}"
    with NpzArchive(path, label, follow_symlinks=follow_symlinks) as data:
        keys = set(data.arrays)
        names = [s.name for s in specs]
        if not keys:
            raise ConfigError(f"{label}: empty archive; expected arrays named {', '.join(names)}")
        check_bound_arrays(bound, {k: data.read(k) for k in bound if k in keys}, label)
        missing = [n for n in names if n not in keys]
        extra = sorted(keys - set(names) - extra_keys - set(bound))
        if missing:
            hint = f" (it has {', '.join(sorted(keys)[:10])}{', ...' if len(keys) > 10 else ''})"
            raise ConfigError(f"{label}: no array for model input '{missing[0]}'{hint}; expected {', '.join(names)}")
        if extra:
            raise ConfigError(f"{label}: array '{extra[0]}' is not a model input; inputs are {', '.join(names)}")
        counts = {}
        for spec in specs:
            declared = data.arrays[spec.name]
            _check_declared(label, spec, declared.dtype, declared.shape, sample_axes(specs)[spec.name])
            _check_finite(label, spec, data.read(spec.name))
            counts[spec.name] = _sample_count(spec, declared.shape, specs)
        return _common_count(label, counts), data.identity


def _check_declared(file: str, spec: TensorSpec, dtype: np.dtype, shape: tuple[int, ...], samples: int | None = 0) -> None:
    """dtype, rank and fixed dims, from the array's header (before it is decompressed)."""
    where = f"{file}, input '{spec.name}'"
    if spec.dtype is not None and dtype != spec.dtype:
        raise ConfigError(f"{where}: dtype {dtype}, the model expects {spec.dtype}")
    if spec.shape is None:
        if not shape:
            raise ConfigError(f"{where}: a scalar; expected samples along the first axis")
        return
    if spec.shape == ():
        if len(shape) > 1:
            raise ConfigError(f"{where}: shape {list(shape)}; the input is a scalar: give one value (a 0-d array) "
                              "or one value per sample ([samples])")
        return
    if not shape:
        raise ConfigError(f"{where}: a scalar; expected samples along the first axis")
    expected = [str(d) for d in spec.shape]
    if samples is not None:
        expected[samples] = "samples"
    if len(shape) != len(spec.shape):
        raise ConfigError(
            f"{where}: rank {len(shape)} (shape {list(shape)}), the model expects rank {len(spec.shape)} [{', '.join(expected)}]"
        )
    # Axis 0 is checked with the sample count (an input that holds its samples elsewhere, or none, is given by its first dim).
    for axis, (want, have) in enumerate(zip(spec.shape, shape)):
        if axis not in (0, samples) and isinstance(want, int) and want != have:
            raise ConfigError(f"{where}: shape {list(shape)} has {have} on axis {axis}, the model expects {want}")


def _check_finite(file: str, spec: TensorSpec, arr: np.ndarray) -> None:
    if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        # NaN/inf would flow into every statistic and refit, and into the written weights.
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        raise ConfigError(
            f"{file}, input '{spec.name}': non-finite value {arr[bad]} at {list(bad)} (of {int((~np.isfinite(arr)).sum())})"
        )


Reducer = Callable[[str, np.ndarray], None]


def capture_activations(
    model: Model,
    calibration: CalibrationSet,
    tensors: Sequence[str],
    reduce: Reducer,
    *,
    batch_size: int = 16,
    max_batches: int | None = None,
    max_bytes_per_run: int = 256 << 20,
    tensor_bytes: dict[str, int] | None = None,
    drop_padding: bool = True,
) -> None:
    """Stream the values of ``tensors`` over the calibration set into ``reduce``.

    Tensors are captured in groups whose estimated size per batch stays under
    ``max_bytes_per_run`` (``tensor_bytes`` gives per-sample sizes; by default they are
    read from the inferred shapes); each group re-runs the model, trading time for
    bounded memory, and a tensor too large for ``batch_size`` samples a run is captured
    in smaller batches (``max_batches`` then counts batches of the size asked). DNSMOS's
    first convolutions read 74 MB a clip: 16 clips of a dozen such tensors a run took
    quantize past 20 GB. With a token mask, per-token tensors reach ``reduce`` as
    ``[1, real_tokens, features]`` (see :func:`real_tokens`) unless ``drop_padding`` is off.
    """
    mask_name = calibration.token_mask if drop_padding else None
    every = _sample_bytes(model)
    sizes = tensor_bytes if tensor_bytes is not None else {t: every[t] for t in tensors if t in every}
    largest = max(sizes.values(), default=0)
    fits = min(_runs_fit(every, batch_size, RUN_BYTES), max(1, max_bytes_per_run // largest) if largest else batch_size)
    if fits < batch_size:
        asked, batch_size = batch_size, fits
        if max_batches is not None:
            max_batches = -(-max_batches * asked // batch_size)
    groups = _group_by_size(list(tensors), sizes, max_bytes_per_run // max(batch_size, 1))
    # An estimate for the progress line (batches never span files or scalar runs, so there may be a few more).
    per_group = -(-calibration.num_samples // calibration._batch_size(batch_size))
    per_group = min(per_group, max_batches) if max_batches is not None else per_group
    done = 0
    for group in groups:
        # no spinning workers between runs: the reducer's numpy work (Gram products) runs on the same cores
        # (distill on YOLOv8n: 81 -> 18 s; prune-channels 43 -> 30 s)
        session = make_session(model, extra_outputs=group, spinning=False)
        for i, feed in enumerate(calibration.batches(batch_size)):
            if max_batches is not None and i >= max_batches:
                break
            mask = feed[mask_name] if mask_name else None
            for name, value in zip(group, session.run(group, feed)):
                reduce(name, real_tokens(value, mask))
            done += 1
            progress.step(done, max(done, per_group * len(groups)), "calibration runs")
        del session


RUN_BYTES = 1 << 30  # about what one run of a model may hold in activations (samples_per_run)


def samples_per_run(model: Model, wanted: int, max_bytes: int = RUN_BYTES) -> int:
    """How many samples one run of ``model`` should take, at most ``wanted``: onnxruntime's arena keeps a run's
    peak, taken as three of its largest activations (an input, an output, a workspace). DNSMOS (74 MB a clip in
    its largest activations) run on 48 clips at once held 20.5 GB."""
    return _runs_fit(_sample_bytes(model), wanted, max_bytes)


def _runs_fit(sizes: Mapping[str, int], wanted: int, max_bytes: int) -> int:
    largest = max(sizes.values(), default=0)
    return wanted if not largest else int(np.clip(max_bytes // (3 * largest), 1, max(wanted, 1)))


def _sample_bytes(model: Model) -> dict[str, int]:
    """Bytes of each of the model's activations per sample (4 a value, the leading axis the batch), where its inferred
    shape is known (a weight has no batch axis: it is left out)."""
    sizes = {}
    weights = model.initializer_names
    for name, dims in shape_map(model).items():
        if name not in weights and dims and all(isinstance(d, int) and d >= 0 for d in dims[1:]):
            sizes[name] = 4 * int(np.prod(dims[1:], dtype=np.int64))
    return sizes


def _group_by_size(names: list[str], sizes: dict[str, int], budget: int) -> list[list[str]]:
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name in names:
        size = sizes.get(name, 0)
        if current and used + size > budget:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        groups.append(current)
    return groups
