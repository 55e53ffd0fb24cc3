#!/usr/bin/env python3
"""Mutation fuzzer for optc's input handling: models and calibration archives.

Each mutant is the sample model (``tests/models/sample/mnist_cnn.onnx``) or a
small calibration archive cut from ``tests/models/sample/calib.npz``, changed
by one to three mutations (mostly one):

* model: bit flips and truncation of the serialised protobuf; deletion of a
  random field or list element anywhere in the message tree; a random
  integer field (dims, data types, attribute values, opset and IR versions)
  set to an edge value; a random string field (names, op types) set to an
  edge string (empty, markup, escape sequences, another tensor's name, 5,000
  characters).
* archive (stored and deflated): bit flips and truncation of the zip; the
  ``.npy`` header's dtype, shape or order rewritten; the zip directory's
  sizes changed; a member renamed, duplicated or dropped.

Every mutant runs through the real CLI in a subprocess under an address-space
limit and a timeout: a model through ``optc inspect --no-tvm`` (and, when that
succeeds, ``optc compile --no-latency``), an archive as ``--calib`` of
``optc compile``. Outcomes are counted: 0 (accepted), 2 (refused as bad
input, one line), 1 (internal error: a bug), signal (a crash), timeout, and
"not one line" (exit 2 with a traceback or several lines). The goal is no 1,
no signal, no timeout. Reproducible: mutant ``i`` of ``--seed s`` is always the same.

Usage::

    .venv/bin/python tools/fuzz_inputs.py --mutants 300 [--seed 0] [--jobs 2] [--keep out/fuzz] [--only model|archive]

``--only model`` is the audit's protobuf mode (320 mutants of the sample model).

``--keep`` saves every mutant with a bad outcome, with the command and its stderr.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import io
import json
import random
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "models" / "sample"
OPTC = Path(sys.executable).with_name("optc")

INTERESTING_INTS = [0, 1, -1, 2, 3, 7, 255, 256, 65535, 2**31 - 1, 2**31, -(2**31), 2**32, 2**62, 2**63 - 1, -(2**63), 99, 1000]
INTERESTING_STRINGS = ["", "[/x]", "[bold]", "\x1b[31mred\x1b[0m", "\u202etxt", "a" * 5000, "../x", "/etc/passwd", "x\ny", "input", "logits"]


# --------------------------------------------------------------------------- protobuf mutations


@dataclass
class Slot:
    """One field of one message (``index`` for an element of a repeated field)."""

    message: Message
    field: FieldDescriptor
    index: int | None


def slots(message: Message) -> list[Slot]:
    """Every set field and every repeated element in the message tree."""
    found: list[Slot] = []
    for field, value in message.ListFields():
        if field.is_repeated:
            for i, item in enumerate(value):
                found.append(Slot(message, field, i))
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    found.extend(slots(item))
        else:
            found.append(Slot(message, field, None))
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                found.extend(slots(value))
    return found


_INT_TYPES = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_UINT32}


def _set(slot: Slot, value: Any) -> None:
    if slot.index is None:
        setattr(slot.message, slot.field.name, value)
    else:
        getattr(slot.message, slot.field.name)[slot.index] = value


def _fits(field: FieldDescriptor, value: int) -> bool:
    bits = 64 if field.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64) else 32
    if field.type in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_UINT32):
        return 0 <= value < 2**bits
    return -(2 ** (bits - 1)) <= value < 2 ** (bits - 1)


def delete_field(model: onnx.ModelProto, rng: random.Random) -> str:
    slot = rng.choice(slots(model))
    if slot.index is None:
        slot.message.ClearField(slot.field.name)
        return f"clear {slot.message.DESCRIPTOR.name}.{slot.field.name}"
    del getattr(slot.message, slot.field.name)[slot.index]
    return f"delete {slot.message.DESCRIPTOR.name}.{slot.field.name}[{slot.index}]"


def change_int(model: onnx.ModelProto, rng: random.Random, *, dims_only: bool = False) -> str:
    candidates = [s for s in slots(model) if s.field.type in _INT_TYPES or s.field.type == FieldDescriptor.TYPE_ENUM]
    if dims_only:
        candidates = [s for s in candidates if s.field.name in ("dims", "dim_value")]
    if not candidates:
        return "no int field"
    slot = rng.choice(candidates)
    if slot.field.type == FieldDescriptor.TYPE_ENUM:
        value = rng.choice([v.number for v in slot.field.enum_type.values] + [99])
    else:
        value = rng.choice(INTERESTING_INTS + [rng.randint(-4, 4096)])
        while not _fits(slot.field, value):
            value = rng.choice(INTERESTING_INTS)
    try:
        _set(slot, value)
    except ValueError:  # a closed enum refusing an unknown number
        return "enum kept"
    return f"{slot.message.DESCRIPTOR.name}.{slot.field.name} = {value}"


def change_string(model: onnx.ModelProto, rng: random.Random) -> str:
    candidates = [s for s in slots(model) if s.field.type == FieldDescriptor.TYPE_STRING]
    if not candidates:
        return "no string field"
    names = [n.output[0] for n in model.graph.node if n.output] + [t.name for t in model.graph.initializer]
    slot = rng.choice(candidates)
    value = rng.choice(INTERESTING_STRINGS + names[:20])
    _set(slot, value)
    return f"{slot.message.DESCRIPTOR.name}.{slot.field.name} = {value[:20]!r}"


def flip_bits(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(1, len(data))]


def mutate_model(base: bytes, rng: random.Random) -> tuple[bytes, list[str]]:
    data, done = base, []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        kind = rng.choice(["bits", "bits", "truncate", "delete", "delete", "int", "int", "dims", "dims", "string"])
        if kind == "bits":
            data, what = flip_bits(data, rng), "bit flips"
        elif kind == "truncate":
            data, what = truncate(data, rng), "truncated"
        else:
            model = onnx.ModelProto()
            try:
                model.ParseFromString(data)
            except DecodeError:
                continue
            if kind == "delete":
                what = delete_field(model, rng)
            elif kind == "string":
                what = change_string(model, rng)
            else:
                what = change_int(model, rng, dims_only=kind == "dims")
            data = model.SerializeToString()
        done.append(what)
    return data, done


# --------------------------------------------------------------------------- archive mutations


def base_archives() -> dict[str, bytes]:
    """16 samples of the sample calibration set, stored and deflated."""
    with np.load(SAMPLE / "calib.npz") as data:
        x = data["input"][:16]
    out = {}
    for name, compression in (("stored", zipfile.ZIP_STORED), ("deflated", zipfile.ZIP_DEFLATED)):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression) as z:
            member = io.BytesIO()
            np.save(member, x)
            z.writestr("input.npy", member.getvalue())
        out[name] = buf.getvalue()
    return out


def _members(data: bytes) -> list[tuple[str, bytes]] | None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return [(i.filename, z.read(i)) for i in z.infolist()]
    except Exception:  # a mutant that no longer parses: raw mutations only
        return None


def _rezip(members: list[tuple[str, bytes]], rng: random.Random) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", rng.choice([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])) as z:
        warnings.simplefilter("ignore")  # "Duplicate name": on purpose
        for name, payload in members:
            z.writestr(name, payload)
    return buf.getvalue()


def rewrite_header(payload: bytes, rng: random.Random) -> tuple[bytes, str]:
    if not payload.startswith(b"\x93NUMPY") or len(payload) < 10:
        return payload, "no header"
    hlen = struct.unpack("<H", payload[8:10])[0]
    body = payload[10 + hlen :]
    dtype = rng.choice(["<f4", "<f8", ">f4", "|u1", "<i8", "|O", "<U3", "V8", "<f2", "zz"])
    shape = rng.choice([(16, 1, 28, 28), (16, 784), (0, 1, 28, 28), (10**12, 1, 28, 28), (), (16, 1, 28, 29), (-1, 1, 28, 28), (2**62, 2**62)])
    order = rng.choice(["False", "True", "1", "None"])
    text = f"{{'descr': '{dtype}', 'fortran_order': {order}, 'shape': {shape}, }}"
    text += " " * (-(len(text) + 11) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode() + body, f"header {dtype} {shape} {order}"


def change_zip_sizes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Set the uncompressed size in the central directory (and the local header) of the first member."""
    out = bytearray(data)
    central = out.rfind(b"PK\x01\x02")
    if central < 0:
        return data, "no directory"
    value = rng.choice([0, 1, 100, 2**31, 2**32 - 1, len(data) * 1000])
    struct.pack_into("<I", out, central + 24, value)
    if rng.random() < 0.5 and out.startswith(b"PK\x03\x04"):
        struct.pack_into("<I", out, 22, value)
    return bytes(out), f"zip size = {value}"


def mutate_archive(base: bytes, rng: random.Random) -> tuple[bytes, list[str]]:
    data, done = base, []
    for _ in range(rng.randint(1, 2)):
        kind = rng.choice(["bits", "bits", "truncate", "header", "header", "sizes", "members"])
        members = _members(data) if kind in ("header", "members") else None
        if kind == "bits":
            data, what = flip_bits(data, rng), "bit flips"
        elif kind == "truncate":
            data, what = truncate(data, rng), "truncated"
        elif kind == "sizes":
            data, what = change_zip_sizes(data, rng)
        elif not members:
            continue
        elif kind == "header":
            payload, what = rewrite_header(members[0][1], rng)
            data = _rezip([(members[0][0], payload), *members[1:]], rng)
        else:
            op = rng.choice(["rename", "duplicate", "drop", "extra"])
            if op == "rename":
                members[0] = (rng.choice(["x.npy", "input", "input.npy/", "../input.npy", "label.npy"]), members[0][1])
            elif op == "duplicate":
                members.append(members[0])
            elif op == "drop":
                members = members[1:]
            else:
                members.append(("notes.txt", b"hello"))
            data, what = _rezip(members, rng), f"member {op}"
        done.append(what)
    return data, done


# --------------------------------------------------------------------------- running


@dataclass
class Outcome:
    mutant: int
    kind: str
    mutations: list[str]
    command: list[str]
    result: str  # "0", "2", "1", "signal N", "timeout", "not one line", "exit N"
    stderr: str
    seconds: float


def _limited(memory: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run(command: list[str], timeout: float, memory: int) -> tuple[str, str, float]:
    start = time.monotonic()
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, errors="replace", timeout=timeout,
                              preexec_fn=_limited(memory), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return "timeout", stderr, time.monotonic() - start
    seconds = time.monotonic() - start
    code, stderr = done.returncode, done.stderr
    if code < 0:
        return f"signal {-code}", stderr, seconds
    if code == 2 and (stderr.count("\n") != 1 or "Traceback" in stderr or not stderr.startswith("optc: error: ")):
        return "not one line", stderr, seconds
    return (str(code) if code in (0, 1, 2) else f"exit {code}"), stderr, seconds


def fuzz_one(index: int, seed: int, model: bytes, archives: dict[str, bytes], workdir: Path, timeout: float, memory: int,
             only: str | None = None) -> Outcome:
    rng = random.Random(seed * 1_000_003 + index)
    folder = workdir / f"m{index}"
    folder.mkdir()
    pick = rng.random()  # drawn in every mode, so that mutant i of a seed is the same mutant whatever --only says
    if only == "model" or (only is None and pick < 0.6):
        data, mutations = mutate_model(model, rng)
        path = folder / "model.onnx"
        path.write_bytes(data)
        command = [str(OPTC), "inspect", "--no-tvm", str(path)]
        result, stderr, seconds = run(command, timeout, memory)
        if result == "0":
            command = [str(OPTC), "compile", str(path), "-o", str(folder / "out"), "--no-latency"]
            result, stderr, more = run(command, timeout, memory)
            seconds += more
        kind = "model"
    else:
        name = rng.choice(sorted(archives))
        data, mutations = mutate_archive(archives[name], rng)
        path = folder / "calib.npz"
        path.write_bytes(data)
        command = [str(OPTC), "compile", str(SAMPLE / "mnist_cnn.onnx"), "-o", str(folder / "out"), "--calib", str(path),
                   "--pass", "eliminate-dead-code", "--no-latency"]
        result, stderr, seconds = run(command, timeout, memory)
        kind = f"archive ({name})"
    return Outcome(index, kind, mutations, command, result, stderr.strip()[-2000:], seconds)


def reason(stderr: str) -> str:
    """The gist of a one-line refusal: paths, quoted names and numbers left out."""
    line = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    line = line.removeprefix("optc: error: ")
    line = re.sub(r"/\S+?(\.onnx|\.npz)?:", "FILE:", line)
    line = re.sub(r"'[^']*'", "'…'", line)
    line = re.sub(r"\d+", "N", line)
    return line[:110]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutants", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per optc command")
    parser.add_argument("--memory-gib", type=float, default=3.0, help="address-space limit per optc process")
    parser.add_argument("--keep", type=Path, help="save mutants with a bad outcome (1, signal, timeout, not one line) here")
    parser.add_argument("--only", choices=["model", "archive"], help="mutate only the sample model (the audit's protobuf mutants) or only archives")
    args = parser.parse_args()

    model = (SAMPLE / "mnist_cnn.onnx").read_bytes()
    archives = base_archives()
    memory = int(args.memory_gib * (1 << 30))
    counts: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    bad: list[Outcome] = []
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="optc-fuzz-") as tmp, concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(fuzz_one, i, args.seed, model, archives, Path(tmp), args.timeout, memory, args.only) for i in range(args.mutants)]
        for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
            outcome = future.result()
            counts[outcome.result] += 1
            if outcome.result == "2":
                reasons[reason(outcome.stderr)] += 1
            if outcome.result not in ("0", "2"):
                bad.append(outcome)
                print(f"[{outcome.mutant}] {outcome.kind} {outcome.mutations}: {outcome.result}: "
                      f"{outcome.stderr.splitlines()[-1] if outcome.stderr else ''}", file=sys.stderr)
                if args.keep:
                    dest = args.keep / f"mutant-{args.seed}-{outcome.mutant}"
                    shutil.copytree(Path(tmp) / f"m{outcome.mutant}", dest, dirs_exist_ok=True)
                    (dest / "outcome.json").write_text(json.dumps(outcome.__dict__, indent=2) + "\n")
            shutil.rmtree(Path(tmp) / f"m{outcome.mutant}", ignore_errors=True)
            if done % 25 == 0:
                print(f"{done}/{args.mutants} {dict(counts)}", file=sys.stderr)
    labels = {"0": "accepted (0)", "2": "refused as bad input (2)", "1": "internal error (1)", "timeout": "timeout", "not one line": "exit 2, not one line"}
    print(f"{args.mutants} mutants{f' ({args.only} only)' if args.only else ''}, seed {args.seed}, {time.monotonic() - start:.0f} s")
    for key in ("0", "2", "1", "timeout", "not one line"):
        print(f"  {labels[key]:<28} {counts.get(key, 0)}")
    for key in sorted(k for k in counts if k.startswith(("signal", "exit "))):
        print(f"  {key:<28} {counts[key]}")
    print("most common refusals:")
    for text, n in reasons.most_common(15):
        print(f"  {n:>4}  {text}")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
