"""Hostile data: calibration and evaluation archives, folders, rank-0 inputs and image folders.

Each case is one crafted data set given to ``optc compile`` of the sample model
(or of a model with a rank-0 input) as ``--calib`` or ``--eval``; see
:mod:`hostile` for the contract. Data that is odd but valid is accepted.
"""
from __future__ import annotations

import io
import os
import socket
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import SAMPLE, make_model
from hostile import (
    assert_accepted,
    assert_bad_input,
    invoke,
    npy,
    npy_header,
    run_optc,
    sample_npz_member,
    save,
    write_zip,
)
from onnx import TensorProto, helper

MODEL = SAMPLE / "mnist_cnn.onnx"
FAST = ("--pass", "eliminate-dead-code", "--no-latency")


def compile_with(tmp_path: Path, flag: str, data: Path, *extra: object, subprocess: bool = False):
    args = ("compile", MODEL, "-o", tmp_path / "out", flag, data, *FAST, *extra)
    return run_optc(*args, workdir=tmp_path) if subprocess else invoke(*args, workdir=tmp_path)


def _stored_with_header(header: bytes) -> dict[str, bytes]:
    return {"input.npy": header}


def _many_members(n: int) -> dict[str, bytes]:
    return {f"m{i}.npy": npy(np.zeros(1, np.float32)) for i in range(n)}


# --------------------------------------------------------------------------- archives

# name -> (members, compression, what the one line must say)
NPZ_CASES: dict[str, tuple[dict[str, bytes], int, str]] = {
    "nan-values": ({"input.npy": sample_npz_member(value=np.nan)}, zipfile.ZIP_DEFLATED, "non-finite"),
    "inf-values": ({"input.npy": sample_npz_member(value=np.inf)}, zipfile.ZIP_DEFLATED, "non-finite"),
    "float64": ({"input.npy": sample_npz_member(dtype=np.float64)}, zipfile.ZIP_DEFLATED, "dtype"),
    "int32": ({"input.npy": sample_npz_member(dtype=np.int32)}, zipfile.ZIP_DEFLATED, "dtype"),
    "float16": ({"input.npy": sample_npz_member(dtype=np.float16)}, zipfile.ZIP_DEFLATED, "dtype"),
    "complex64": ({"input.npy": sample_npz_member(dtype=np.complex64)}, zipfile.ZIP_DEFLATED, "dtype"),
    "bool": ({"input.npy": sample_npz_member(dtype=np.bool_)}, zipfile.ZIP_DEFLATED, "dtype"),
    "big-endian": ({"input.npy": npy(np.zeros((8, 1, 28, 28), ">f4"))}, zipfile.ZIP_DEFLATED, "dtype"),
    "wrong-axis": ({"input.npy": npy(np.zeros((8, 1, 28, 29), np.float32))}, zipfile.ZIP_DEFLATED, "axis"),
    "wrong-rank": ({"input.npy": npy(np.zeros((8, 784), np.float32))}, zipfile.ZIP_DEFLATED, "rank"),
    "zero-samples": ({"input.npy": npy(np.zeros((0, 1, 28, 28), np.float32))}, zipfile.ZIP_DEFLATED, "samples"),
    "missing-input": ({"x.npy": sample_npz_member()}, zipfile.ZIP_DEFLATED, "no array for model input"),
    "extra-array": ({"input.npy": sample_npz_member(), "extra.npy": sample_npz_member()}, zipfile.ZIP_DEFLATED, "not a model input"),
    "empty-archive": ({}, zipfile.ZIP_DEFLATED, "empty archive"),
    "member-escaping": ({"../input.npy": sample_npz_member()}, zipfile.ZIP_DEFLATED, "c.npz"),
    "member-folder": ({"input.npy/": b""}, zipfile.ZIP_STORED, "c.npz"),
    "header-negative-shape": (_stored_with_header(npy_header("<f4", (-8, 1, 28, 28))), zipfile.ZIP_STORED, "declares"),
    "header-petabytes-stored": (_stored_with_header(npy_header("<f4", (10**11, 1, 28, 28))), zipfile.ZIP_STORED, "declares"),
    "header-longer-than-member": ({"input.npy": b"\x93NUMPY\x01\x00\xff\xff{'descr'"}, zipfile.ZIP_STORED, "header"),
    "header-unicode-dtype": ({"input.npy": npy(np.array(["a"] * 8))}, zipfile.ZIP_DEFLATED, "dtype"),
    "header-void-dtype": ({"input.npy": npy(np.zeros(8, "V8"))}, zipfile.ZIP_DEFLATED, "numeric"),
    "2000-members": (_many_members(2000), zipfile.ZIP_STORED, "members"),
}


@pytest.mark.parametrize("case", sorted(NPZ_CASES))
def test_hostile_archive(tmp_path, case):
    members, compression, expect = NPZ_CASES[case]
    npz = write_zip(tmp_path / "c.npz", members, compression)
    assert_bad_input(compile_with(tmp_path, "--calib", npz), expect)


@pytest.mark.parametrize("compression", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA, zipfile.ZIP_STORED])
def test_other_zip_compressions_are_read(tmp_path, compression):
    npz = write_zip(tmp_path / "c.npz", {"input.npy": sample_npz_member()}, compression)
    assert_accepted(compile_with(tmp_path, "--calib", npz))


def test_fortran_order_array_is_read(tmp_path):
    member = npy(np.asfortranarray(np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)))
    assert_accepted(compile_with(tmp_path, "--calib", write_zip(tmp_path / "c.npz", {"input.npy": member})))


def test_encrypted_member_is_refused(tmp_path):
    npz = write_zip(tmp_path / "c.npz", {"input.npy": sample_npz_member()}, zipfile.ZIP_STORED)
    raw = bytearray(npz.read_bytes())
    struct.pack_into("<H", raw, 6, 1)  # local header: general purpose flag bit 0, "encrypted"
    central = raw.rfind(b"PK\x01\x02")
    struct.pack_into("<H", raw, central + 8, 1)
    npz.write_bytes(bytes(raw))
    assert_bad_input(compile_with(tmp_path, "--calib", npz), "c.npz")


def test_not_a_zip(tmp_path):
    path = tmp_path / "c.npz"
    path.write_text("input,1,2,3\n")
    assert_bad_input(compile_with(tmp_path, "--calib", path), "c.npz")


def test_zip_directory_size_lie_over_the_limit(tmp_path):
    """A real 8-sample member whose directory claims 4 GiB - 1: refused from the directory."""
    npz = write_zip(tmp_path / "c.npz", {"input.npy": sample_npz_member()}, zipfile.ZIP_STORED)
    raw = bytearray(npz.read_bytes())
    central = raw.rfind(b"PK\x01\x02")
    struct.pack_into("<I", raw, central + 24, 2**32 - 1)
    npz.write_bytes(bytes(raw))
    assert_bad_input(compile_with(tmp_path, "--calib", npz, subprocess=True), "c.npz")


# --------------------------------------------------------------------------- evaluation labels

# name -> (labels, what the one line must say; "" when accepted: labels of any storable dtype and shape
# feed a user's metric, top-1 only reads class indices)
LABEL_CASES: dict[str, tuple[np.ndarray, str]] = {
    "count-mismatch": (np.zeros(5, np.int64), "label"),
    "complex": (np.zeros(8, np.complex64), "label"),
    "two-dimensional": (np.zeros((8, 2, 3), np.int64), ""),
    "nan-float": (np.full(8, np.nan, np.float32), ""),
}


@pytest.mark.parametrize("case", sorted(LABEL_CASES))
def test_hostile_labels(tmp_path, case):
    labels, expect = LABEL_CASES[case]
    npz = write_zip(tmp_path / "e.npz", {"input.npy": sample_npz_member(), "label.npy": npy(labels)})
    result = compile_with(tmp_path, "--eval", npz)
    if expect:
        assert_bad_input(result, expect)
    else:
        assert_accepted(result)


# --------------------------------------------------------------------------- folders and special files


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "calib"
    folder.mkdir()
    write_zip(folder / "a.npz", {"input.npy": sample_npz_member()})
    return folder


def _with(add: Callable[[Path, Path], object]) -> Callable[[Path], Path]:
    def made(tmp_path: Path) -> Path:
        folder = _folder(tmp_path)
        add(folder, tmp_path)
        return folder

    return made


def _socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


# name -> (the path given as --calib, what the one line must say)
FOLDER_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "empty-folder": (lambda t: (t / "calib").mkdir() or t / "calib", "holds no .npz"),
    "symlink-to-a-file-inside": (_with(lambda f, t: os.symlink("a.npz", f / "b.npz")), "b.npz"),
    "symlink-to-a-file-outside": (_with(lambda f, t: (write_zip(t / "o.npz", {"input.npy": sample_npz_member()}), os.symlink(t / "o.npz", f / "b.npz"))), "b.npz"),
    "dangling-symlink": (_with(lambda f, t: os.symlink(t / "gone.npz", f / "b.npz")), "b.npz"),
    "symlink-loop": (_with(lambda f, t: os.symlink("b.npz", f / "b.npz")), "b.npz"),
    "folder-named-npz": (_with(lambda f, t: (f / "b.npz").mkdir()), "b.npz"),
    "socket-named-npz": (_with(lambda f, t: _socket(f / "b.npz")), "b.npz"),
    "dtype-disagreeing-files": (_with(lambda f, t: write_zip(f / "b.npz", {"input.npy": sample_npz_member(dtype=np.float64)})), "b.npz"),
    "dev-null": (lambda t: Path("/dev/null"), "regular file"),
    "missing": (lambda t: t / "nope.npz", "no such file"),
    "socket-given-directly": (lambda t: (_socket(t / "s.npz"), t / "s.npz")[1], "s.npz"),
}


@pytest.mark.parametrize("case", sorted(FOLDER_CASES))
def test_hostile_calibration_path(tmp_path, case):
    make, expect = FOLDER_CASES[case]
    assert_bad_input(compile_with(tmp_path, "--calib", make(tmp_path)), expect)


def test_hard_linked_file_in_a_calibration_folder_is_read(tmp_path):
    """A hard link reaches only a regular file, and data never enters the output: read (README, security notes)."""
    folder = _folder(tmp_path)
    os.link(folder / "a.npz", folder / "b.npz")
    assert_accepted(compile_with(tmp_path, "--calib", folder))


# --------------------------------------------------------------------------- rank-0 inputs and inputs given once


def _scaled_model(tmp_path: Path) -> Path:
    """y = x * s: x float32 [N, 4], s a float32 scalar (rank 0)."""
    proto = make_model([helper.make_node("Mul", ["x", "s"], ["y"], name="mul")],
                       [("x", ["N", 4]), helper.make_tensor_value_info("s", TensorProto.FLOAT, [])], [("y", ["N", 4])])
    return save(proto, tmp_path / "scaled.onnx")


X = np.ones((8, 4), np.float32)

# name -> (arrays, what the one line must say; "" when accepted)
SCALAR_CASES: dict[str, tuple[dict[str, np.ndarray], str]] = {
    "given-once": ({"x": X, "s": np.float32(2.0)}, ""),
    "one-per-sample": ({"x": X, "s": np.arange(8, dtype=np.float32)}, ""),
    "scalar-as-column": ({"x": X, "s": np.ones((8, 1), np.float32)}, "the input is a scalar"),
    "count-mismatch": ({"x": X, "s": np.ones(5, np.float32)}, "sample counts"),
    "scalar-nan": ({"x": X, "s": np.float32(np.nan)}, "non-finite"),
    "scalar-float64": ({"x": X, "s": np.float64(2.0)}, "dtype"),
    "samples-given-as-scalar": ({"x": np.float32(1.0), "s": np.float32(2.0)}, "scalar"),
    "zero-samples": ({"x": np.ones((0, 4), np.float32), "s": np.ones(0, np.float32)}, "samples"),
}


@pytest.mark.parametrize("case", sorted(SCALAR_CASES))
def test_rank0_and_given_once_inputs(tmp_path, case):
    arrays, expect = SCALAR_CASES[case]
    npz = write_zip(tmp_path / "c.npz", {f"{k}.npy": npy(np.asarray(v)) for k, v in arrays.items()})
    result = invoke("compile", _scaled_model(tmp_path), "-o", tmp_path / "out", "--calib", npz, *FAST, workdir=tmp_path)
    if expect:
        assert_bad_input(result, expect)
    else:
        assert_accepted(result)


# --------------------------------------------------------------------------- image folders


def _png(width: int = 28, height: int = 28, mode: str = "L") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (width, height), 128).save(buf, format="PNG")
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels and whose data holds one row: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b"")


def _jpeg_cmyk() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("CMYK", (32, 32), (0, 50, 100, 0)).save(buf, format="JPEG")
    return buf.getvalue()


def _images(tmp_path: Path, extra: Callable[[Path, Path], object] | None = None, *, labelled: bool = False) -> Path:
    folder = tmp_path / "images"
    where = folder / "3" if labelled else folder
    where.mkdir(parents=True)
    for i in range(4):
        (where / f"{i}.png").write_bytes(_png())
    if extra is not None:
        extra(where, tmp_path)
    return folder


def _pipeline(tmp_path: Path) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text("data:\n  images: {mean: [0.13], std: [0.31]}\npasses: [eliminate-dead-code]\n")
    return path


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


# name -> (what to add to a folder of four good images, what the one line must say; "" when accepted)
IMAGE_CASES: dict[str, tuple[Callable[[Path, Path], object], str]] = {
    "truncated-png": (lambda f, t: _write(f / "bad.png", _png()[:40]), "bad.png"),
    "empty-png": (lambda f, t: _write(f / "bad.png", b""), "bad.png"),
    "text-named-png": (lambda f, t: _write(f / "bad.png", b"not an image\n"), "bad.png"),
    "decompression-bomb-header": (lambda f, t: _write(f / "bad.png", _png_declaring(100_000, 100_000)), "pixels"),
    "over-64-mib": (lambda f, t: _sparse_file(f / "bad.png", 65 << 20), "64 MiB"),
    "symlinked-image": (lambda f, t: os.symlink("0.png", f / "bad.png"), "bad.png"),
    "symlink-to-dev-zero": (lambda f, t: os.symlink("/dev/zero", f / "bad.png"), "bad.png"),
    "hard-linked-image": (lambda f, t: os.link(f / "0.png", f / "ok.png"), ""),
    "folder-named-png": (lambda f, t: (f / "bad.png").mkdir(), "bad.png"),
    "cmyk-jpeg": (lambda f, t: _write(f / "ok.jpg", _jpeg_cmyk()), ""),
    "16-bit-png": (lambda f, t: _write(f / "ok.png", _png(mode="I;16")), ""),
    "non-image-file-beside": (lambda f, t: _write(f / "notes.txt", b"hello"), ""),
}


def _sparse_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.write(_png())
        f.truncate(size)


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_hostile_image_folder(tmp_path, case):
    add, expect = IMAGE_CASES[case]
    result = compile_with(tmp_path, "--calib", _images(tmp_path, add), "--pipeline", _pipeline(tmp_path))
    if expect:
        assert_bad_input(result, expect)
    else:
        assert_accepted(result)


def test_fifo_image_does_not_hang(tmp_path):
    folder = _images(tmp_path, lambda f, t: os.mkfifo(f / "bad.png"))
    assert_bad_input(compile_with(tmp_path, "--calib", folder, "--pipeline", _pipeline(tmp_path), subprocess=True), "bad.png")


def test_folder_without_images(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("hello")
    assert_bad_input(compile_with(tmp_path, "--calib", tmp_path / "images", "--pipeline", _pipeline(tmp_path)), "images")


def test_images_without_a_declared_preprocessing(tmp_path):
    assert_bad_input(compile_with(tmp_path, "--calib", _images(tmp_path)), "data.images")


def test_labelled_images_outside_class_folders(tmp_path):
    folder = _images(tmp_path)
    assert_bad_input(compile_with(tmp_path, "--eval", folder, "--pipeline", _pipeline(tmp_path)), "class subfolder")


def test_class_folder_that_is_a_symlink(tmp_path):
    folder = _images(tmp_path, labelled=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "0.png").write_bytes(_png())
    os.symlink(tmp_path / "elsewhere", folder / "4")
    assert_bad_input(compile_with(tmp_path, "--eval", folder, "--pipeline", _pipeline(tmp_path)), "4")
