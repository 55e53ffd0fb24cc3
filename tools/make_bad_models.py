#!/usr/bin/env python3
"""Generate the corpus of *bad* inputs that optc must reject with a clear error.

Usage::

    python tools/make_bad_models.py            # (re)write tests/models/bad/
    python tools/make_bad_models.py --out DIR  # write the corpus somewhere else
    python tools/make_bad_models.py --probe    # also print what onnx / onnxruntime
                                               # themselves do with every file

The script depends on ``onnx`` and ``numpy`` only (``--probe`` additionally
imports ``onnxruntime``).  Output is byte-for-byte deterministic: models are
built from fixed values, and the ``.npz`` files are written through ``zipfile``
with a fixed timestamp instead of ``numpy.savez`` (which stamps the current
time into the archive).

Every file is tiny (well under 10 KB).  ``cases.json`` in the output folder
lists every bad case as ``{"file", "kind", "problem", "expect"}`` where
``file`` is relative to the corpus folder, ``kind`` is ``"model"`` or
``"calib"`` (calibration files belong to ``good_tiny.onnx``, named in the extra
``"model"`` key), and ``expect`` is a short lowercase substring that a good
one-line error message for that case should contain.  Match it against the
message lower-cased and with the offending file's path/name removed first:
several substrings ("empty", "opset", "graph", "duplicate", "npz") also occur
in the file names, so an unstripped message would match trivially.

Two files in the folder are deliberately *good*: ``good_tiny.onnx`` (input
``x`` float32 [N,4], output ``y = Relu(MatMul(x, W))``, W float32 [4,3]) and
``bad_calib/good.npz`` (key ``x``, float32 [16,4]).  They are not in
``cases.json``.

Symlink escape
--------------
A symlink cannot be stored portably in git, so this case is built on demand::

    from tools.make_bad_models import make_symlink_escape   # or importlib
    model_path = make_symlink_escape(tmp_path / "m")

It writes ``<dir>/ext_data_symlink.onnx`` (``good_tiny`` with W stored as
external data at location ``weights.bin``), the real weight bytes to a file
*outside* ``<dir>`` (default ``<dir>/../ext_data_symlink_target.bin``), and a
symlink ``<dir>/weights.bin`` -> that outside file.  The weights are correct,
so only a loader that resolves the link and notices it leaves the model folder
will reject it.  Use a fresh temporary directory: it refuses to write into the
committed corpus folder (a ``weights.bin`` there would "fix"
``ext_data_missing.onnx``).  ``SYMLINK_CASE`` holds the matching cases.json-style
entry.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
BAD_DIR = REPO / "tests" / "models" / "bad"

OPSET = 17
IR_VERSION = 8  # old enough for any onnxruntime we care about
PRODUCER = "optc-make_bad_models"

# Fixed weights for every model built from good_tiny.
W_VALUES = (np.arange(12, dtype=np.float32).reshape(4, 3) - 5.5) / 4.0

SYMLINK_CASE = {
    "file": "ext_data_symlink.onnx",
    "kind": "model",
    "problem": "external data location weights.bin is a symlink that points outside the model folder",
    "expect": "outside",
}


# --------------------------------------------------------------------------
# Model builders
# --------------------------------------------------------------------------


def _model(graph: onnx.GraphProto, opset: int = OPSET, ir_version: int = IR_VERSION) -> onnx.ModelProto:
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name=PRODUCER,
    )
    m.ir_version = ir_version
    return m


def _xy(out_cols: int = 3):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_cols])
    return x, y


def good_tiny() -> onnx.ModelProto:
    """x float32 [N,4] -> y = Relu(MatMul(x, W)), W float32 [4,3]."""
    x, y = _xy()
    w = numpy_helper.from_array(W_VALUES, name="W")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"], name="matmul"),
        helper.make_node("Relu", ["xw"], ["y"], name="relu"),
    ]
    return _model(helper.make_graph(nodes, "good_tiny", [x], [y], initializer=[w]))


def _external_w_model(location: str, offset: int | None = None, length: int | None = None,
                      name: str = "ext") -> onnx.ModelProto:
    """good_tiny with W stored as external data at *location* (no raw_data)."""
    m = good_tiny()
    m.graph.name = name
    w = m.graph.initializer[0]
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    del w.external_data[:]
    entries = [("location", location)]
    if offset is not None:
        entries.append(("offset", str(offset)))
    if length is not None:
        entries.append(("length", str(length)))
    for k, v in entries:
        e = w.external_data.add()
        e.key = k
        e.value = v
    return m


def cyclic() -> onnx.ModelProto:
    """A = Add(x, b_out) -> a_out ; B = Relu(a_out) -> b_out ; y = Identity(a_out)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    nodes = [
        helper.make_node("Add", ["x", "b_out"], ["a_out"], name="A"),
        helper.make_node("Relu", ["a_out"], ["b_out"], name="B"),
        helper.make_node("Identity", ["a_out"], ["y"], name="out"),
    ]
    return _model(helper.make_graph(nodes, "cyclic", [x], [y]))


def dangling_input() -> onnx.ModelProto:
    """MatMul consumes 'W_missing', which nothing defines."""
    x, y = _xy()
    nodes = [
        helper.make_node("MatMul", ["x", "W_missing"], ["xw"], name="matmul"),
        helper.make_node("Relu", ["xw"], ["y"], name="relu"),
    ]
    return _model(helper.make_graph(nodes, "dangling_input", [x], [y]))


def duplicate_output_names() -> onnx.ModelProto:
    """Two nodes both produce tensor 't' (SSA violation)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    nodes = [
        helper.make_node("Relu", ["x"], ["t"], name="first"),
        helper.make_node("Neg", ["x"], ["t"], name="second"),
        helper.make_node("Identity", ["t"], ["y"], name="out"),
    ]
    return _model(helper.make_graph(nodes, "duplicate_output_names", [x], [y]))


def unknown_op() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    nodes = [helper.make_node("FooBar", ["x"], ["y"], name="foo")]
    return _model(helper.make_graph(nodes, "unknown_op", [x], [y]))


def unsupported_opset() -> onnx.ModelProto:
    m = good_tiny()
    m.graph.name = "unsupported_opset"
    m.opset_import[0].version = 99
    return m


def ancient_opset() -> onnx.ModelProto:
    """good_tiny followed by a Pad, stamped with default-domain opset 1 / IR 3.

    y = Pad-1(Relu(MatMul(x, W)), paddings=[0, 0, 0, 1]) -> float32 [N, 4].
    All three ops exist in opset 1 and the ONNX checker accepts the model (W is
    also listed as a graph input, as IR 3 requires), but onnxruntime has no
    kernels below opset 6/7, and onnx's version converter cannot upgrade it:
    there is no adapter for Pad 1 -> 2.
    """
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    w_in = helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    w = numpy_helper.from_array(W_VALUES, name="W")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"], name="matmul"),
        helper.make_node("Relu", ["xw"], ["r"], name="relu"),
        helper.make_node("Pad", ["r"], ["y"], name="pad", paddings=[0, 0, 0, 1]),
    ]
    return _model(helper.make_graph(nodes, "ancient_opset", [x, w_in], [y], initializer=[w]),
                  opset=1, ir_version=3)


def no_graph() -> onnx.ModelProto:
    """ModelProto with ir_version and opset_import but no graph field at all."""
    m = onnx.ModelProto()
    m.ir_version = IR_VERSION
    m.producer_name = PRODUCER
    op = m.opset_import.add()
    op.domain = ""
    op.version = OPSET
    return m


def empty_graph() -> onnx.ModelProto:
    """A graph that is present but has no inputs, nodes, initializers or outputs."""
    return _model(helper.make_graph([], "empty_graph", [], []))


# --------------------------------------------------------------------------
# Calibration files
# --------------------------------------------------------------------------

_ZIP_DATE = (2020, 1, 1, 0, 0, 0)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Deterministic equivalent of numpy.savez (fixed zip timestamps)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def _calib_data(shape, dtype=np.float32) -> np.ndarray:
    n = int(np.prod(shape))
    return ((np.arange(n) % 7) - 3).reshape(shape).astype(dtype)


# --------------------------------------------------------------------------
# Case table
# --------------------------------------------------------------------------

CASES = [
    # (file, kind, problem, expect)
    ("not_onnx.onnx", "model", "file is plain text, not an ONNX protobuf", "not a valid onnx"),
    ("truncated.onnx", "model", "serialized good_tiny cut in half (protobuf ends mid-message)", "not a valid onnx"),
    ("empty.onnx", "model", "zero-byte file", "empty"),
    ("no_graph.onnx", "model", "ModelProto with ir_version and opset_import but no graph field", "graph"),
    ("empty_graph.onnx", "model", "graph present but has no inputs, nodes or outputs", "empty"),
    ("cyclic.onnx", "model", "node A consumes B's output and B consumes A's (cycle A -> B -> A)", "cycle"),
    ("dangling_input.onnx", "model",
     "MatMul consumes tensor W_missing, which is not a graph input, an initializer or any node's output", "w_missing"),
    ("duplicate_output_names.onnx", "model",
     "nodes 'first' and 'second' both produce tensor 't' (not single static assignment)", "duplicate"),
    ("unknown_op.onnx", "model", "node of op type FooBar in the default ONNX domain", "foobar"),
    ("unsupported_opset.onnx", "model", "default-domain opset 99, newer than any onnx release supports", "opset"),
    ("ancient_opset.onnx", "model",
     "default-domain opset 1 (IR 3) with Pad-1: no runtime kernels and no version-converter adapter", "opset"),
    ("ext_data_absolute.onnx", "model",
     "initializer W's external data location is the absolute path /etc/passwd", "absolute"),
    ("ext_data_dotdot.onnx", "model",
     "initializer W's external data location ../secret.bin points outside the model folder", "outside"),
    ("ext_data_missing.onnx", "model",
     "initializer W's external data file weights.bin does not exist next to the model", "weights.bin"),
    ("ext_data_out_of_range.onnx", "model",
     "initializer W reads offset 16 length 48 from ext_data_out_of_range.bin, which is only 32 bytes",
     "external data"),
    ("bad_calib/wrong_name.npz", "calib", "calibration array is keyed 'z' but the model input is 'x'", "'x'"),
    ("bad_calib/wrong_dtype.npz", "calib", "calibration data for x is int64, model expects float32", "int64"),
    ("bad_calib/wrong_shape.npz", "calib", "calibration data for x has shape [8,5], model expects [N,4]", "shape"),
    ("bad_calib/wrong_rank.npz", "calib",
     "calibration data for x has shape [8] (rank 1), model expects rank 2 [N,4]", "rank"),
    ("bad_calib/empty.npz", "calib", "valid npz archive that contains no arrays", "empty"),
    ("bad_calib/non_finite.npz", "calib", "calibration data for x holds a NaN at [3, 1]", "non-finite value nan at [3, 1]"),
    ("bad_calib/not_npz.npz", "calib", "64 garbage bytes, not a zip/npz archive", "npz"),
]


def _save(model: onnx.ModelProto, path: Path) -> None:
    path.write_bytes(model.SerializeToString(deterministic=True))


def make_corpus(out: Path = BAD_DIR) -> list[dict]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bad_calib").mkdir(exist_ok=True)

    good = good_tiny()
    good_bytes = good.SerializeToString(deterministic=True)
    (out / "good_tiny.onnx").write_bytes(good_bytes)

    (out / "not_onnx.onnx").write_text(
        "This is not an ONNX model.\nIt is a plain text file pretending to be one.\n"
    )
    (out / "truncated.onnx").write_bytes(good_bytes[: len(good_bytes) // 2])
    (out / "empty.onnx").write_bytes(b"")

    _save(no_graph(), out / "no_graph.onnx")
    _save(empty_graph(), out / "empty_graph.onnx")
    _save(cyclic(), out / "cyclic.onnx")
    _save(dangling_input(), out / "dangling_input.onnx")
    _save(duplicate_output_names(), out / "duplicate_output_names.onnx")
    _save(unknown_op(), out / "unknown_op.onnx")
    _save(unsupported_opset(), out / "unsupported_opset.onnx")
    _save(ancient_opset(), out / "ancient_opset.onnx")

    w_bytes = W_VALUES.tobytes()  # 48 bytes, little-endian float32
    _save(_external_w_model("/etc/passwd", name="ext_data_absolute"), out / "ext_data_absolute.onnx")
    _save(_external_w_model("../secret.bin", name="ext_data_dotdot"), out / "ext_data_dotdot.onnx")
    stray = out / "weights.bin"
    if stray.exists() or stray.is_symlink():
        stray.unlink()  # must NOT exist: ext_data_missing relies on it
    _save(_external_w_model("weights.bin", name="ext_data_missing"), out / "ext_data_missing.onnx")
    (out / "ext_data_out_of_range.bin").write_bytes(w_bytes[:32])
    _save(_external_w_model("ext_data_out_of_range.bin", offset=16, length=48, name="ext_data_out_of_range"),
          out / "ext_data_out_of_range.onnx")

    calib = out / "bad_calib"
    _write_npz(calib / "good.npz", {"x": _calib_data((16, 4))})
    _write_npz(calib / "wrong_name.npz", {"z": _calib_data((16, 4))})
    _write_npz(calib / "wrong_dtype.npz", {"x": _calib_data((16, 4), np.int64)})
    _write_npz(calib / "wrong_shape.npz", {"x": _calib_data((8, 5))})
    _write_npz(calib / "wrong_rank.npz", {"x": _calib_data((8,))})
    _write_npz(calib / "empty.npz", {})
    nan = _calib_data((16, 4))
    nan[3, 1] = np.nan
    _write_npz(calib / "non_finite.npz", {"x": nan})
    (calib / "not_npz.npz").write_bytes(bytes((i * 37 + 11) % 256 for i in range(64)))

    cases = []
    for file, kind, problem, expect in CASES:
        entry = {"file": file, "kind": kind, "problem": problem, "expect": expect}
        if kind == "calib":
            entry["model"] = "good_tiny.onnx"
        cases.append(entry)
    (out / "cases.json").write_text(json.dumps(cases, indent=2) + "\n")
    return cases


def make_symlink_escape(dir, target=None) -> Path:
    """Build the symlink-escape case in *dir* (a fresh temporary folder).

    Writes ``<dir>/ext_data_symlink.onnx`` whose initializer W is external data
    at location ``weights.bin``; ``<dir>/weights.bin`` is a symlink to *target*
    (default ``<dir>/../ext_data_symlink_target.bin``), a file outside *dir*
    holding W's correct 48 bytes.  Returns the model path.  The matching
    expectation is in ``SYMLINK_CASE``.
    """
    d = Path(dir)
    if d.resolve() == BAD_DIR.resolve():
        raise ValueError("make_symlink_escape: use a temporary folder, not the committed corpus")
    d.mkdir(parents=True, exist_ok=True)
    target = Path(target) if target is not None else d.parent / "ext_data_symlink_target.bin"
    target = target.resolve()
    target.write_bytes(W_VALUES.tobytes())
    link = d / "weights.bin"
    if link.exists() or link.is_symlink():
        link.unlink()
    os.symlink(target, link)
    model_path = d / "ext_data_symlink.onnx"
    _save(_external_w_model("weights.bin", name="ext_data_symlink"), model_path)
    return model_path


# --------------------------------------------------------------------------
# Probe: what do the raw libraries do with each file?
# --------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:220]


def probe(paths) -> None:
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    for p in paths:
        p = Path(p)
        print(f"== {p.name}")
        try:
            m = onnx.load(str(p))
            r = "accepted!"
        except Exception as e:  # noqa: BLE001
            m, r = None, _first_line(e)
        print(f"  onnx.load          : {r}")
        try:
            onnx.checker.check_model(str(p), full_check=True)
            r = "accepted!"
        except Exception as e:  # noqa: BLE001
            r = _first_line(e)
        print(f"  check_model(path)  : {r}")
        if m is not None:
            try:
                onnx.checker.check_model(m, full_check=True)
                r = "accepted!"
            except Exception as e:  # noqa: BLE001
                r = _first_line(e)
            print(f"  check_model(proto) : {r}")
        try:
            ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
            r = "accepted!"
        except Exception as e:  # noqa: BLE001
            r = _first_line(e)
        print(f"  ort.InferenceSession: {r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=BAD_DIR)
    ap.add_argument("--probe", action="store_true", help="print onnx/onnxruntime behaviour per model")
    args = ap.parse_args(argv)
    cases = make_corpus(args.out)
    print(f"wrote {len(cases)} bad cases + good_tiny.onnx + bad_calib/good.npz to {args.out}")
    if args.probe:
        files = [args.out / "good_tiny.onnx"] + [args.out / c["file"] for c in cases if c["kind"] == "model"]
        import tempfile

        with tempfile.TemporaryDirectory() as td:
            files.append(make_symlink_escape(Path(td) / "m"))
            probe(files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
