"""The shared tuning database on disk: safe under concurrent compiles, robust to damage.

The folder keeps MetaSchedule's JSON database layout, so TVM's own tools read
it: ``workloads.json`` (one ``[structural hash, module]`` per line) and
``records.json`` (one ``[workload line number, record]`` per line), plus
``.lock`` and, after a repair, ``*.damaged`` files or a ``broken-*/`` folder.

Concurrency. MetaSchedule's ``JSONDatabase`` appends to both files as it
commits, and numbers workloads by its own in-memory count. Two compiles
appending to one folder interleave their lines and point records at each
other's workloads; from then on TVM cannot open the folder (``RuntimeError:
parallel_for_dynamic error``) and every compile with it fails. So no TVM
database ever opens the shared files:

1. under an exclusive ``flock`` on ``.lock``, both files are copied into a
   private folder (a snapshot), which TVM opens;
2. tuning commits to that private database, without the lock;
3. under the lock again, the shared files are read afresh (another compile may
   have merged meanwhile) and the records this run added are merged in, their
   workload numbers renumbered against the shared file; each file is written
   whole to a temporary file, fsynced and renamed over the old one, workloads
   first, so that records never point past the end of the workloads. This
   happens once tuning ends and, during a long tuning, between measured
   batches at most once a minute (:data:`optc.targets.tuning.COMMIT_EVERY_S`);
4. the compile applies the private database.

A process killed at any point leaves each shared file either as it was or as
merged. Holding the lock only to copy and to merge, concurrent compiles tune
in parallel; two that tune the same task both keep their records. A folder
this process cannot write (a read-only cache) is read without the lock, which
is safe because writers only ever rename whole files into place; tuning into
it fails with a TargetError.

Damage. When TVM cannot open the snapshot, every line is checked the way TVM's
loader checks it (JSON, then ``Workload.from_json``, then
``TuningRecord.from_json``, which replays the record's trace on its workload).
A damaged line is skipped with a warning, listed in the tuning report, appended
to ``<file>.damaged``, and the shared file rewritten without it (records whose
workload line was damaged go with it), so the warning is given once and the
line never poisons a later compile. A file none of whose lines can be read,
or a folder TVM still cannot open once cleaned, is moved aside to
``broken-<time>/`` with a warning, and the compile goes on with an empty
database.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tvm.s_tir import meta_schedule as ms

from optc.errors import TargetError, first_line

logger = logging.getLogger(__name__)

WORKLOADS = "workloads.json"
RECORDS = "records.json"
LOCK = ".lock"


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the folder's exclusive lock (released when the process dies, too)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise TargetError(f"tuning database {folder}: cannot write there ({exc.strerror or exc}); give a writable --tuning-db") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("tuning database %s: waiting for another compile to release it", folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@dataclass
class DatabaseHealth:
    """What reading the shared database found wrong; empty when it was whole."""

    damaged: list[str] = field(default_factory=list)  # "records.json line 20: not JSON (...)"
    moved_aside: str | None = None  # the folder the unreadable files went to

    def to_dict(self) -> dict[str, Any]:
        return {"damaged_lines": self.damaged, "moved_aside": self.moved_aside}


@dataclass
class _Lines:
    """A database's valid lines: workload lines verbatim, records as ``(workload index, record JSON)``."""

    workloads: list[str] = field(default_factory=list)
    records: list[tuple[int, Any]] = field(default_factory=list)

    def record_lines(self) -> list[str]:
        return [_record_line(index, record) for index, record in self.records]


class TuningDatabase:
    """The shared folder; :meth:`snapshot` gives a private database to tune into and compile with."""

    def __init__(self, folder: Path):
        self.folder = folder

    @contextlib.contextmanager
    def snapshot(self, target: Any = None) -> Iterator[Snapshot]:
        """A validated private copy of the shared database, removed on exit; with ``target``, of its records for that
        target only (:func:`tuned_for`)."""
        private = Path(tempfile.mkdtemp(prefix="optc-tuning-"))
        try:
            yield self._open_snapshot(private, target)
        finally:
            shutil.rmtree(private, ignore_errors=True)

    def _open_snapshot(self, private: Path, target: Any = None) -> Snapshot:
        health = DatabaseHealth()
        with self._reading():
            for name in (WORKLOADS, RECORDS):
                _copy_or_empty(self.folder / name, private / name)
        records = _raw_lines(private / RECORDS)
        if target is not None:
            key = _target_key(target.export())
            _write_lines(private / RECORDS, [line.decode(errors="replace") for line in records if tuned_for(line, key)])
        if any(b"optc_" in line for line in records):
            # a trace that tensorizes with optc's dot products replays only once they are registered: else TVM
            # rejects the record, and the repair below moved tuned records out of the shared database as damaged
            from optc.targets.dot_intrinsics import register_all

            register_all()
        try:
            database = _open(private)
        except Exception as exc:  # TVM raises several kinds (RuntimeError, InternalError, ...)
            logger.info("tuning database %s: TVM cannot open it (%s); checking it line by line", self.folder, _first_line(exc))
            with self._reading():
                lines = self._read_repairing(health)
                _write_lines(private / WORKLOADS, lines.workloads)
                _write_lines(private / RECORDS, lines.record_lines())
            try:
                database = _open(private)
            except Exception as again:  # not a damage that line checks find: start afresh
                with self._reading():
                    health.moved_aside = self._move_aside(f"TVM cannot open it even after repair ({_first_line(again)})")
                _write_lines(private / WORKLOADS, [])
                _write_lines(private / RECORDS, [])
                database = _open(private)
        return Snapshot(self, private, database, health, _count_lines(private / RECORDS))

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """The lock, or none in a folder this process cannot write (a read-only cache):
        merges replace files by renaming, so an unlocked reader sees each file whole."""
        if self.folder.is_dir() and not os.access(self.folder, os.W_OK):
            yield
            return
        with locked(self.folder):
            yield

    def _read_repairing(self, health: DatabaseHealth) -> _Lines:
        """The shared database's valid lines; damaged ones are reported and moved out. Call under the lock."""
        raw_workloads = _raw_lines(self.folder / WORKLOADS)
        raw_records = _raw_lines(self.folder / RECORDS)
        lines, damaged = _validate(raw_workloads, raw_records)
        unreadable = [name for name, raw, kept in ((WORKLOADS, raw_workloads, lines.workloads), (RECORDS, raw_records, lines.records)) if raw and not kept]
        if unreadable:
            health.moved_aside = self._move_aside(f"no line of {' or '.join(unreadable)} can be read")
            return _Lines()
        for name, number, text, reason in damaged:
            message = f"{name} line {number}: {reason}"
            health.damaged.append(message)
            logger.warning("tuning database %s: skipped %s", self.folder, message)
        if damaged:
            try:
                for name, _, text, _ in damaged:
                    with open(self.folder / f"{name}.damaged", "ab") as sink:
                        sink.write(text.rstrip(b"\n") + b"\n")
                self._write(lines)
            except OSError as exc:  # a read-only folder: skip the lines in every compile instead
                logger.warning("tuning database %s: cannot repair it (%s)", self.folder, exc.strerror or exc)
            else:
                logger.warning("tuning database %s: the damaged lines are now in *.damaged beside it", self.folder)
        return lines

    def _move_aside(self, why: str) -> str:
        try:
            aside = Path(tempfile.mkdtemp(prefix=f"broken-{time.strftime('%Y%m%d-%H%M%S')}-", dir=self.folder))
            for name in (WORKLOADS, RECORDS):
                if (self.folder / name).exists():
                    os.replace(self.folder / name, aside / name)
        except OSError as exc:  # a read-only folder: compile without it
            logger.warning("tuning database %s: %s; compiling without it (cannot move it aside: %s)", self.folder, why, exc.strerror or exc)
            return f"(not moved: {exc.strerror or exc})"
        logger.warning("tuning database %s: %s; moved it to %s and starting with an empty database", self.folder, why, aside)
        return str(aside)

    def _write(self, lines: _Lines) -> None:
        """Replace both shared files, workloads first. Call under the lock."""
        _write_lines(self.folder / WORKLOADS, lines.workloads, durable=True)
        _write_lines(self.folder / RECORDS, lines.record_lines(), durable=True)
        _fsync_dir(self.folder)

    def merge(self, added_workloads: list[str], added_records: list[tuple[int, Any]]) -> int:
        """Add records (workload indices into ``added_workloads``) to the shared files; returns how many were new."""
        if not added_records:
            return 0
        with locked(self.folder):
            shared = self._read_current()
            index = {line: i for i, line in enumerate(shared.workloads)}
            present = set(shared.record_lines())
            new = 0
            for workload_index, record in added_records:
                workload = added_workloads[workload_index]
                if workload not in index:
                    index[workload] = len(shared.workloads)
                    shared.workloads.append(workload)
                line = _record_line(index[workload], record)
                if line not in present:
                    present.add(line)
                    shared.records.append((index[workload], record))
                    new += 1
            if new:
                self._write(shared)
        return new

    def _read_current(self) -> _Lines:
        """The shared files as they are now. Call under the lock.

        Written by :meth:`merge` from checked lines, they get a quick check
        (JSON of the right shape, indices in range); a file damaged since the
        snapshot gets the full check and repair, with the same warnings.
        """
        try:
            workloads = [line.decode() for line in _raw_lines(self.folder / WORKLOADS)]
            for text in workloads:
                value = _loads(text)
                if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
                    raise ValueError("not a [hash, module] pair")
            records = [_parse_record_line(line) for line in _raw_lines(self.folder / RECORDS)]
            if all(0 <= i < len(workloads) for i, _ in records):
                return _Lines(workloads, records)
        except ValueError:  # UnicodeDecodeError is one
            pass
        return self._read_repairing(DatabaseHealth())


@dataclass
class Snapshot:
    """The private database of one compile: the shared records when it was taken, plus what this run tunes."""

    shared: TuningDatabase
    folder: Path
    database: Any  # ms.database.JSONDatabase on ``folder``
    health: DatabaseHealth
    committed: int  # lines of the private records file already in the shared one (or there when it was taken)

    def commit(self) -> int:
        """Merge the records tuned since the last commit into the shared database; returns how many were new.

        Called after tuning, and between measured batches so that a long run
        stopped midway keeps what it measured.
        """
        lines = _raw_lines(self.folder / RECORDS)
        if len(lines) <= self.committed:
            return 0
        workloads = [line.decode(errors="replace") for line in _raw_lines(self.folder / WORKLOADS)]
        added = []
        for number, line in enumerate(lines[self.committed :], self.committed + 1):
            try:
                index, record = _parse_record_line(line)
                if not 0 <= index < len(workloads):
                    raise ValueError(f"workload {index} out of range")
            except ValueError as exc:  # not expected of TVM's own writes; never worth failing a tuned compile
                logger.warning("tuning database %s: not merging new record %d: %s", self.shared.folder, number, exc)
                continue
            added.append((index, record))
        merged = self.shared.merge(workloads, added)
        self.committed = len(lines)
        logger.info("tuning database %s: %d new records merged", self.shared.folder, merged)
        return merged


def tuned_for(line: bytes, key: tuple[str, str, str, tuple[str, ...]]) -> bool:
    """Whether a records.json line was tuned for the target of ``key`` (:func:`_target_key`): the same kind, triple, CPU
    and features, the core count aside. MetaSchedule looks records up by workload alone; from a database shared by
    several targets it replayed one CPU's trace in another's build. A line that does not parse is kept: the
    validation reports it."""
    try:
        tuned = json.loads(line)[1][2]
    except (ValueError, IndexError, KeyError, TypeError):
        return True
    return isinstance(tuned, dict) and _target_key(tuned) == key


def _target_key(target: Any) -> tuple[str, str, str, tuple[str, ...]]:
    """A target's identity for its records, from its exported dict (or a record's)."""
    return (str(target.get("kind", "")), str(target.get("mtriple", "")), str(target.get("mcpu", "")),
            tuple(sorted(str(a) for a in target.get("mattr", []) or [])))


def _open(folder: Path) -> Any:
    return ms.database.JSONDatabase(path_workload=str(folder / WORKLOADS), path_tuning_record=str(folder / RECORDS), allow_missing=True)


def _validate(raw_workloads: list[bytes], raw_records: list[bytes]) -> tuple[_Lines, list[tuple[str, int, bytes, str]]]:
    """Keep the lines TVM's loader accepts; damaged: ``(file, line number, text, reason)``."""
    lines, damaged = _Lines(), []
    workloads: dict[int, tuple[int, Any]] = {}  # line index in the file -> (index among the kept, Workload)
    for i, raw in enumerate(raw_workloads):
        try:
            text = raw.decode()
            workload = ms.database.Workload.from_json(_loads(text))
        except Exception as exc:  # JSON errors, or whatever TVM raises on a malformed module
            damaged.append((WORKLOADS, i + 1, raw, _first_line(exc)))
            continue
        workloads[i] = (len(lines.workloads), workload)
        lines.workloads.append(text)
    for i, raw in enumerate(raw_records):
        try:
            index, record = _parse_record_line(raw)
            if index not in workloads:
                raise ValueError(f"its workload (line {index + 1} of {WORKLOADS}) is missing or damaged")
            kept_index, workload = workloads[index]
            ms.database.TuningRecord.from_json(record, workload)  # replays the trace on the workload
        except Exception as exc:  # as above
            damaged.append((RECORDS, i + 1, raw, _first_line(exc)))
            continue
        lines.records.append((kept_index, record))
    return lines, damaged


def _loads(text: str) -> Any:
    """JSON without NaN/Infinity, which TVM's parser does not take."""

    def reject(constant: str) -> None:
        raise ValueError(f"not JSON ({constant})")

    try:
        return json.loads(text, parse_constant=reject)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from exc


def _parse_record_line(raw: bytes) -> tuple[int, Any]:
    value = _loads(raw.decode())
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], int) and not isinstance(value[0], bool)):
        raise ValueError("not a [workload index, record] pair")
    return value[0], value[1]


def _record_line(index: int, record: Any) -> str:
    return json.dumps([index, record], separators=(",", ":"))


def _raw_lines(path: Path) -> list[bytes]:
    """The file's non-blank lines (a missing file has none)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return [line for line in data.split(b"\n") if line.strip()]


def _count_lines(path: Path) -> int:
    return len(_raw_lines(path))


def _copy_or_empty(source: Path, target: Path) -> None:
    try:
        shutil.copyfile(source, target)
    except FileNotFoundError:
        target.write_bytes(b"")


def _write_lines(path: Path, lines: list[str], *, durable: bool = False) -> None:
    """Write the file whole beside ``path``, then rename it over ``path`` (readers see old or new)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_line(exc: BaseException) -> str:
    return first_line(exc)[:200]
