"""The hostile-input corpus's contract and builders, shared by ``tests/test_hostile_*.py``.

A crafted case runs the real CLI, in process through click's runner when the
input cannot exhaust memory or hang, else as an ``optc`` subprocess under an
address-space limit (:data:`MEMORY_LIMIT`) and a timeout (:data:`TIME_LIMIT_S`).
A refusal must be exit code 2 with exactly one line on stderr
(``optc: error: ...``), no traceback, within the time limit, and must leave no
output folder (nor optc's hidden staging folders) behind. A subprocess runs
with its working directory, ``HOME`` and ``TMPDIR`` inside the case's temp
folder, and its ``TMPDIR`` must be empty afterwards: optc cleans what it made.
"""
from __future__ import annotations

import contextlib
import io
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import make_model
from onnx import TensorProto, helper, numpy_helper
from optc.cli.main import cli

MEMORY_LIMIT = 3 << 30  # address space of one optc process; every bomb asks for more
TIME_LIMIT_S = 60  # the audit's cases ran for more than 120 s; startup alone can take 10 s on a loaded machine
OPTC = shutil.which("optc", path=os.path.dirname(sys.executable)) or os.path.join(os.path.dirname(sys.executable), "optc")


@dataclass
class Outcome:
    code: int
    stderr: str
    seconds: float
    workdir: Path | None = None  # where the command could write (its output folder, its TMPDIR)


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_optc(*args: object, workdir: Path | None = None) -> Outcome:
    """A real ``optc`` process under the limits; with ``workdir``, its cwd, HOME and TMPDIR are inside it."""
    env = None
    if workdir is not None:
        for sub in ("home", "tmp"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HOME": str(workdir / "home"), "TMPDIR": str(workdir / "tmp")}
    start = time.monotonic()
    try:
        done = subprocess.run(
            [OPTC, *map(str, args)], check=False, capture_output=True, text=True, errors="replace", timeout=TIME_LIMIT_S, preexec_fn=_limits,
            stdin=subprocess.DEVNULL, cwd=workdir, env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"optc {' '.join(map(str, args))} ran past {TIME_LIMIT_S} s")
    return Outcome(done.returncode, done.stderr, time.monotonic() - start, workdir)


class _PastTimeLimit(BaseException):  # not caught by the CLI as an internal error
    pass


@contextlib.contextmanager
def _bounded_here() -> Iterator[None]:
    """This process's address space at most :data:`MEMORY_LIMIT` more than now, and :data:`TIME_LIMIT_S`, until the block ends.

    In-process cases are meant to be harmless; a case that is not fails here
    (MemoryError, or the alarm) instead of taking the test run down with it.
    """
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[0])
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = pages * resource.getpagesize() + MEMORY_LIMIT
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))

    def alarm(signum: int, frame: object) -> None:
        raise _PastTimeLimit(f"ran past {TIME_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(TIME_LIMIT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def invoke(*args: object, workdir: Path | None = None) -> Outcome:
    """Through click's runner, bounded like a subprocess case; an exception escaping is a failed case."""
    start = time.monotonic()
    with _bounded_here():
        res = CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)
    return Outcome(res.exit_code, res.stderr, time.monotonic() - start, workdir)


def assert_bad_input(result: Outcome, expect: str) -> None:
    """Exit 2, one ``optc: error:`` line naming ``expect``, no traceback, in time, nothing left behind."""
    assert result.code == 2, f"exit {result.code}: {result.stderr}"
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("optc: error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert expect.lower() in result.stderr.lower(), result.stderr
    assert result.seconds < TIME_LIMIT_S
    assert_nothing_left(result)


def assert_accepted(result: Outcome) -> None:
    assert result.code == 0, f"exit {result.code}: {result.stderr}"
    assert "Traceback" not in result.stderr
    assert result.seconds < TIME_LIMIT_S


def assert_nothing_left(result: Outcome) -> None:
    """No output folder ``out``, no hidden staging folder beside it, an empty TMPDIR."""
    if result.workdir is None:
        return
    assert not (result.workdir / "out").exists(), "an output folder was left after a refusal"
    hidden = [p.name for p in result.workdir.iterdir() if p.name.startswith(".out")]
    assert not hidden, f"staging folders left: {hidden}"
    tmp = result.workdir / "tmp"
    if tmp.is_dir():
        # .ses: a session id this environment's Python writes at start-up (`python -c pass` does), not optc
        left = [p.name for p in tmp.iterdir() if p.name != ".ses"]
        assert not left, f"left in TMPDIR: {left}"


# --------------------------------------------------------------------------- builders


def tiny_model() -> onnx.ModelProto:
    """y = x @ W, x float32 [N, 4], W float32 [4, 3]."""
    return make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [("x", ["N", 4])], [("y", ["N", 3])],
        [("W", np.ones((4, 3), np.float32))],
    )


def sparse_model(values: np.ndarray, indices: np.ndarray, dims: list[int]) -> onnx.ModelProto:
    """y = x @ W with W a sparse initializer of ``dims`` holding ``values`` at ``indices``."""
    proto = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [("x", ["N", 4])], [("y", ["N", 3])])
    proto.graph.sparse_initializer.append(
        helper.make_sparse_tensor(numpy_helper.from_array(values, "W"), numpy_helper.from_array(indices, "W_idx"), dims)
    )
    return proto


def set_dims(t: onnx.TensorProto, dims: list[int]) -> None:
    del t.dims[:]
    t.dims.extend(dims)


def save(proto: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(proto.SerializeToString())
    return path


def external_model(folder: Path, location: str, *, write_data: bool = False, entries: dict[str, str] | None = None) -> Path:
    """tiny_model with W stored at ``location`` (offset 0, 48 bytes) in ``folder``; ``entries`` replace those keys."""
    folder.mkdir(parents=True, exist_ok=True)
    proto = tiny_model()
    w = proto.graph.initializer[0]
    payload = w.raw_data
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in ({"location": location, "offset": "0", "length": "48"} | (entries or {})).items():
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    path = folder / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    if write_data:
        (folder / location).write_bytes(payload)
    return path


def npy_header(dtype: str, shape: tuple[int, ...], order: str = "False") -> bytes:
    text = f"{{'descr': '{dtype}', 'fortran_order': {order}, 'shape': {shape}, }}"
    text += " " * (-(len(text) + 11) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode()


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def write_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def deflate_bomb(path: Path, name: str, header: bytes, zeros: int, *, declared: int | None = None) -> Path:
    """A one-member zip whose deflate stream inflates to ``header`` + ``zeros`` zero bytes.

    The stream repeats one self-contained block (16 MiB of zeros in 16 KB), so a
    3.5 GB member costs 3.5 MB on disk and no time to build. ``declared`` sets the
    directory's uncompressed size (default: the true one). The CRC is left 0:
    optc must refuse on sizes before it decompresses, so it never gets that far.
    """
    chunk = 1 << 24

    def block(data: bytes) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        return c.compress(data) + c.flush(zlib.Z_FULL_FLUSH)

    full, rest = divmod(zeros, chunk)
    stream = block(header) + block(b"\0" * chunk) * full + block(b"\0" * rest) + zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    size = len(header) + zeros if declared is None else declared
    assert size < 1 << 32  # no zip64 records needed
    fname = name.encode()
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, 0, len(stream), size, len(fname), 0) + fname
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, 0, len(stream), size, len(fname), 0, 0, 0, 0, 0, 0) + fname
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local) + len(stream), 0)
    path.write_bytes(local + stream + central + end)
    return path


def sample_npz_member(n: int = 8, dtype: type = np.float32, value: float = 0.0) -> bytes:
    """The sample model's input: ``n`` samples of [1, 28, 28]."""
    return npy(np.full((n, 1, 28, 28), value, dtype))


def loop_model(trips: int, depth: int) -> onnx.ModelProto:
    """``depth`` nested Loops of ``trips`` constant iterations each around y += 1."""

    def body(level: int) -> onnx.GraphProto:
        inner = (
            helper.make_node("Add", [f"v{level}", "one"], [f"vo{level}"], name=f"add{level}")
            if level == depth - 1
            else helper.make_node("Loop", ["M", "T", f"v{level}"], [f"vo{level}"], name=f"loop{level + 1}", body=body(level + 1))
        )
        return helper.make_graph(
            [helper.make_node("Identity", [f"c{level}"], [f"co{level}"], name=f"id{level}"), inner],
            f"body{level}",
            [helper.make_tensor_value_info(f"i{level}", TensorProto.INT64, []), helper.make_tensor_value_info(f"c{level}", TensorProto.BOOL, []),
             helper.make_tensor_value_info(f"v{level}", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info(f"co{level}", TensorProto.BOOL, []), helper.make_tensor_value_info(f"vo{level}", TensorProto.FLOAT, [1])],
        )

    inits = [("M", np.array(trips, np.int64)), ("T", np.array(True)), ("one", np.ones(1, np.float32))]
    return make_model([helper.make_node("Loop", ["M", "T", "x"], ["y"], name="loop0", body=body(0))], [("x", [1])], [("y", [1])], inits)


YAML_BOMB = "\n".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *[f"{c}: &{c} [{','.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")],
        "passes: [*i]",
    ]
)
