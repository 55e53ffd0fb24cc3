"""Hostile models: malformed protobufs, graphs and tensors, through ``inspect`` and ``compile``.

Each case is one crafted ``.onnx`` (see :mod:`hostile` for the contract). A
bad model is refused by both commands, in one line, exit 2; a model that is
odd but valid (an unused initializer, a zero-sized dim) is accepted by both.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import make_model
from hostile import (
    assert_accepted,
    assert_bad_input,
    external_model,
    invoke,
    run_optc,
    save,
    set_dims,
    sparse_model,
    tiny_model,
)
from onnx import TensorProto, helper, numpy_helper


def _vi(name: str, elem: int, shape: list | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _relu(shape: list, elem: int = TensorProto.FLOAT) -> onnx.ModelProto:
    return make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [_vi("x", elem, shape)], [_vi("y", elem, shape)])


def _edit(build: Callable[[], onnx.ModelProto], edit: Callable[[onnx.ModelProto], object]) -> Callable[[], onnx.ModelProto]:
    def made() -> onnx.ModelProto:
        proto = build()
        edit(proto)
        return proto

    return made


def _weight(edit: Callable[[onnx.TensorProto], object]) -> Callable[[], onnx.ModelProto]:
    return _edit(tiny_model, lambda p: edit(p.graph.initializer[0]))


def _float_data(t: onnx.TensorProto, values: list[float]) -> None:
    t.ClearField("raw_data")
    t.float_data.extend(values)


def _chain(nodes: list[tuple[str, list[str], list[str]]], inputs=(("x", [1, 4]),), outputs=(("y", [1, 4]),), inits=()) -> Callable[[], onnx.ModelProto]:
    """A model of (op, inputs, outputs) nodes named n0, n1, ..."""
    return lambda: make_model([helper.make_node(op, i, o, name=f"n{k}") for k, (op, i, o) in enumerate(nodes)], list(inputs), list(outputs), list(inits))


def _opset(domain: str, version: int, op: str = "Relu", ir: int = 8) -> Callable[[], onnx.ModelProto]:
    def made() -> onnx.ModelProto:
        proto = make_model([helper.make_node(op, ["x"], ["y"], name="r", domain=domain)], [("x", [1, 4])], [("y", [1, 4])])
        if domain:
            proto.opset_import.append(helper.make_opsetid(domain, version))
        else:
            proto.opset_import[0].version = version
        proto.ir_version = ir
        return proto

    return made


def _attr(op: str, inputs: list[str], inits=(), out_shape=(1, 4), **attrs) -> Callable[[], onnx.ModelProto]:
    return lambda: make_model([helper.make_node(op, inputs, ["y"], name="n", **attrs)], [("x", [1, 4])], [("y", list(out_shape))], list(inits))


def _huge_constant() -> onnx.ModelProto:
    """A Constant whose tensor declares 2^40 floats and holds none."""
    t = onnx.TensorProto(name="c", data_type=TensorProto.FLOAT, dims=[1 << 20, 1 << 20])
    return make_model([helper.make_node("Constant", [], ["c"], name="k", value=t), helper.make_node("Add", ["x", "c"], ["y"], name="a")],
                      [("x", [1, 4])], [("y", [1, 4])])


def _nested_if(depth: int) -> onnx.ModelProto:
    """``depth`` Ifs, each then-branch holding the next (the innermost an Identity of the outer x), each else-branch an Identity."""

    def leaf(level: int, tag: str) -> onnx.GraphProto:
        node = helper.make_node("Identity", ["x"], [f"{tag}{level}"], name=f"{tag}{level}")
        return helper.make_graph([node], f"{tag}{level}", [], [_vi(f"{tag}{level}", TensorProto.FLOAT, [1, 4])])

    def branch(level: int) -> onnx.GraphProto:
        if level == depth:
            return leaf(level, "o")
        node = helper.make_node("If", ["c"], [f"o{level}"], name=f"if{level}", then_branch=branch(level + 1), else_branch=leaf(level, "e"))
        return helper.make_graph([node], f"g{level}", [], [_vi(f"o{level}", TensorProto.FLOAT, [1, 4])])

    return make_model([helper.make_node("If", ["c"], ["y"], name="if0", then_branch=branch(1), else_branch=leaf(0, "e"))],
                      [("x", [1, 4])], [("y", [1, 4])], [("c", np.array(True))])


def _if_wrong_outputs() -> onnx.ModelProto:
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["a"], name="t")], "t", [], [_vi("a", TensorProto.FLOAT, [1, 4])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["b"], name="e"), helper.make_node("Identity", ["x"], ["b2"], name="e2")],
                              "e", [], [_vi("b", TensorProto.FLOAT, [1, 4]), _vi("b2", TensorProto.FLOAT, [1, 4])])
    return make_model([helper.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other)],
                      [("x", [1, 4])], [("y", [1, 4])], [("c", np.array(True))])


def _subgraph_dangling() -> onnx.ModelProto:
    """A branch reading a name no scope defines."""
    branch = helper.make_graph([helper.make_node("Identity", ["nowhere"], ["a"], name="t")], "t", [], [_vi("a", TensorProto.FLOAT, [1, 4])])
    return make_model([helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch, else_branch=branch)],
                      [("x", [1, 4])], [("y", [1, 4])], [("c", np.array(True))])


def _scan_bomb() -> onnx.ModelProto:
    """A Scan over an axis of 2^40 steps (the input's declared length)."""
    body = helper.make_graph([helper.make_node("Add", ["s", "e"], ["s2"], name="add"), helper.make_node("Identity", ["s2"], ["so"], name="id")],
                             "body", [_vi("s", TensorProto.FLOAT, [4]), _vi("e", TensorProto.FLOAT, [4])],
                             [_vi("s2", TensorProto.FLOAT, [4]), _vi("so", TensorProto.FLOAT, [4])])
    return make_model([helper.make_node("Scan", ["s0", "x"], ["y", "ys"], name="scan", body=body, num_scan_inputs=1)],
                      [("s0", [4]), ("x", [1 << 40, 4])], [("y", [4]), ("ys", [1 << 40, 4])])


def _duplicate_input() -> onnx.ModelProto:
    proto = _relu([1, 4])
    proto.graph.input.append(proto.graph.input[0])
    return proto


def _duplicate_initializer() -> onnx.ModelProto:
    proto = tiny_model()
    proto.graph.initializer.append(numpy_helper.from_array(np.zeros((4, 3), np.float32), "W"))
    return proto


def _initializer_shadowing_input_with_another_shape() -> onnx.ModelProto:
    proto = tiny_model()
    proto.graph.input.append(_vi("W", TensorProto.FLOAT, [5, 7]))
    return proto


def _unused_initializer() -> onnx.ModelProto:
    proto = tiny_model()
    proto.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "spare"))
    return proto


def _no_opset() -> onnx.ModelProto:
    proto = _relu([1, 4])
    del proto.opset_import[:]
    return proto


def _output_twice() -> onnx.ModelProto:
    proto = _relu([1, 4])
    proto.graph.output.append(proto.graph.output[0])
    return proto


def _no_outputs() -> onnx.ModelProto:
    proto = _relu([1, 4])
    del proto.graph.output[:]
    return proto


def _input_without_type() -> onnx.ModelProto:
    proto = _relu([1, 4])
    proto.graph.input[0].ClearField("type")
    return proto


def _sequence_input() -> onnx.ModelProto:
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [4])
    return make_model([helper.make_node("SequenceLength", ["s"], ["y"], name="n")], [seq], [_vi("y", TensorProto.INT64, [])])


def _model_function_recursive() -> onnx.ModelProto:
    """A model-local function calling itself."""
    fn = helper.make_function("local", "F", ["a"], ["b"], [helper.make_node("F", ["a"], ["b"], domain="local")],
                              [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    proto = make_model([helper.make_node("F", ["x"], ["y"], name="f", domain="local")], [("x", [1, 4])], [("y", [1, 4])])
    proto.opset_import.append(helper.make_opsetid("local", 1))
    proto.functions.append(fn)
    return proto


def _string_initializer_to_matmul() -> onnx.ModelProto:
    w = helper.make_tensor("W", TensorProto.STRING, [4, 3], [b"a"] * 12)
    return make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [("x", ["N", 4])], [("y", ["N", 3])], [w])


# name -> (model, what the one line must say); both inspect and compile refuse.
MODEL_CASES: dict[str, tuple[Callable[[], onnx.ModelProto], str]] = {
    # data types
    "weight-type-0": (_weight(lambda t: setattr(t, "data_type", 0)), "data type"),
    "weight-type-negative": (_weight(lambda t: setattr(t, "data_type", -3)), "data type"),
    "input-type-0": (lambda: _relu([1, 4], 0), "type"),
    "output-type-99": (_edit(lambda: _relu([1, 4]), lambda p: setattr(p.graph.output[0].type.tensor_type, "elem_type", 99)), "99"),
    "input-without-type": (_input_without_type, "type"),
    # dims and tensor contents
    "weight-dims-2-63": (_weight(lambda t: set_dims(t, [2**62, 2])), "need"),
    "weight-dims-zero-with-data": (_weight(lambda t: set_dims(t, [0, 3])), "need"),
    "weight-raw-too-long": (_weight(lambda t: setattr(t, "raw_data", t.raw_data + b"\0" * 8)), "need"),
    "weight-raw-too-short": (_weight(lambda t: setattr(t, "raw_data", t.raw_data[:20])), "need"),
    "weight-float-data-short": (_weight(lambda t: _float_data(t, [1.0] * 5)), "W"),
    "weight-raw-and-float-data": (_weight(lambda t: t.float_data.extend([1.0] * 12)), "W"),
    "weight-no-data": (_weight(lambda t: t.ClearField("raw_data")), "W"),
    "weight-rank-9-of-ones": (_weight(lambda t: set_dims(t, [4, 3, 1, 1, 1, 1, 1, 1, 1])), ""),
    "input-dim-negative-large": (lambda: _relu([-(2**62), 4]), "negative"),
    "huge-constant-attribute": (_huge_constant, "c"),
    # sparse initializers
    "sparse-negative-index": (lambda: sparse_model(np.ones(2, np.float32), np.array([0, -1], np.int64), [4, 3]), "outside"),
    "sparse-float-indices": (lambda: sparse_model(np.ones(2, np.float32), np.array([0, 1], np.float32), [4, 3]), "W"),
    "sparse-2d-indices-wrong-rank": (lambda: sparse_model(np.ones(2, np.float32), np.zeros((2, 3), np.int64), [4, 3]), "W"),
    "sparse-negative-dims": (lambda: sparse_model(np.ones(2, np.float32), np.array([0, 1], np.int64), [-4, 3]), "W"),
    "sparse-name-clash": (_edit(lambda: sparse_model(np.ones(2, np.float32), np.array([0, 1], np.int64), [4, 3]),
                                lambda p: p.graph.initializer.append(numpy_helper.from_array(np.ones((4, 3), np.float32), "W"))), "W"),
    # graph structure
    "cycle-of-two": (_chain([("Relu", ["b"], ["a"]), ("Relu", ["a"], ["b"]), ("Add", ["x", "b"], ["y"])]), ""),
    "self-loop": (_chain([("Add", ["x", "a"], ["a"]), ("Relu", ["a"], ["y"])]), ""),
    "dangling-node-input": (_chain([("Add", ["x", "ghost"], ["y"])]), "ghost"),
    "output-never-produced": (_chain([("Relu", ["x"], ["z"])], outputs=(("y", [1, 4]),)), "y"),
    "no-outputs": (_no_outputs, "output"),
    "duplicate-input": (_duplicate_input, "x"),
    "duplicate-initializer": (_duplicate_initializer, "W"),
    "node-overwrites-input": (_chain([("Relu", ["x"], ["x"]), ("Relu", ["x"], ["y"])]), "x"),
    "empty-output-name-consumed": (_chain([("Relu", ["x"], [""]), ("Relu", [""], ["y"])]), ""),
    # ops, domains, versions
    "unknown-op": (_opset("", 17, op="NoSuchOp"), "NoSuchOp"),
    "unknown-domain-unimported": (lambda: make_model([helper.make_node("Relu", ["x"], ["y"], name="r", domain="com.evil")], [("x", [1, 4])], [("y", [1, 4])]), "com.evil"),
    "opset-10000": (_opset("", 10000), "10000"),
    "opset-0": (_opset("", 0), ""),
    "ir-version-99": (_opset("", 17, ir=99), ""),
    "no-opset-import": (_no_opset, ""),
    "recursive-local-function": (_model_function_recursive, ""),
    # attributes
    "attribute-wrong-type": (_attr("Transpose", ["x"], perm=[1.5, 0.5]), "perm"),
    "attribute-out-of-range": (_attr("Transpose", ["x"], perm=[7, 0], out_shape=(4, 1)), ""),
    "attribute-million-ints": (_attr("Transpose", ["x"], perm=list(range(1_000_000)), out_shape=(4, 1)), ""),
    "attribute-string-8mb": (_attr("Relu", ["x"], note="z" * (8 << 20)), ""),
    "reshape-to-minus-two": (_attr("Reshape", ["x", "s"], inits=[("s", np.array([-2, 2], np.int64))], out_shape=(2, 2)), ""),
    "reshape-to-huge": (_attr("Reshape", ["x", "s"], inits=[("s", np.array([2**40, 2**40], np.int64))], out_shape=(1, 4)), ""),
    # control flow
    "if-branch-output-count": (_if_wrong_outputs, ""),
    "subgraph-dangling-name": (_subgraph_dangling, "nowhere"),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_hostile_model_refused_by_inspect_and_compile(tmp_path, case):
    build, expect = MODEL_CASES[case]
    path = save(build(), tmp_path / "m.onnx")
    assert_bad_input(invoke("inspect", "--no-tvm", path, workdir=tmp_path), expect)
    assert_bad_input(invoke("compile", path, "-o", tmp_path / "out", "--no-latency", workdir=tmp_path), expect)


# Valid as far as optc can tell, but optc cannot run them on random inputs (strings, a sequence, a custom
# domain, an input too large to make up, a type onnxruntime has no kernel for): both commands accept
# them, and compile writes the model with fidelity and latency skipped, saying why.
UNRUNNABLE_CASES: dict[str, Callable[[], onnx.ModelProto]] = {
    "input-type-string": lambda: _relu([1, 4], TensorProto.STRING),
    "sequence-input": _sequence_input,
    "input-dim-2-62": lambda: _relu([2**62, 4]),
    "duplicate-output": _output_twice,
    "scan-over-2-40-steps": _scan_bomb,
}

# onnxruntime refuses to load these whatever the inputs: compile says so (inspect reads the file alone).
LOAD_REFUSED_CASES: dict[str, Callable[[], onnx.ModelProto]] = {
    "weight-type-string": _string_initializer_to_matmul,
    "initializer-shadowing-input-other-shape": _initializer_shadowing_input_with_another_shape,
    "unknown-domain-imported": _opset("com.evil", 1),
}


@pytest.mark.parametrize("case", sorted(LOAD_REFUSED_CASES))
def test_model_onnxruntime_cannot_load_is_refused_by_compile(tmp_path, case):
    path = save(LOAD_REFUSED_CASES[case](), tmp_path / "m.onnx")
    assert_accepted(invoke("inspect", "--no-tvm", path, workdir=tmp_path))
    assert_bad_input(invoke("compile", path, "-o", tmp_path / "out", "--no-latency", workdir=tmp_path), "onnxruntime cannot load the model")


@pytest.mark.parametrize("case", sorted(UNRUNNABLE_CASES))
def test_model_optc_cannot_run_is_written_with_fidelity_skipped(tmp_path, case):
    path = save(UNRUNNABLE_CASES[case](), tmp_path / "m.onnx")
    assert_accepted(invoke("inspect", "--no-tvm", path, workdir=tmp_path))
    result = invoke("compile", path, "-o", tmp_path / "out", "--no-latency", workdir=tmp_path)
    assert_accepted(result)
    assert (tmp_path / "out" / "model.onnx").is_file() and (tmp_path / "out" / "report.json").is_file()


# Odd but valid: both commands accept them.
VALID_CASES: dict[str, Callable[[], onnx.ModelProto]] = {
    "unused-initializer": _unused_initializer,
    "zero-sized-dim": lambda: _relu([0, 4]),
    "duplicate-node-names": _chain([("Relu", ["x"], ["a"]), ("Relu", ["a"], ["y"])]),
    "symbolic-dim-with-markup": lambda: _relu(["[red]n", 4]),
}


@pytest.mark.parametrize("case", sorted(VALID_CASES))
def test_odd_but_valid_model_is_accepted(tmp_path, case):
    path = save(VALID_CASES[case](), tmp_path / "m.onnx")
    assert_accepted(invoke("inspect", "--no-tvm", path, workdir=tmp_path))
    assert_accepted(invoke("compile", path, "-o", tmp_path / "out", "--no-latency", workdir=tmp_path))
    assert (tmp_path / "out" / "model.onnx").is_file()


# --------------------------------------------------------------------------- the file itself

FILE_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "empty-file": (lambda d: _write(d / "m.onnx", b""), "m.onnx"),
    "random-bytes": (lambda d: _write(d / "m.onnx", np.random.default_rng(0).bytes(4096)), "m.onnx"),
    "truncated": (lambda d: _write(d / "m.onnx", tiny_model().SerializeToString()[:-7]), "m.onnx"),
    "text-file": (lambda d: _write(d / "m.onnx", b"ir_version: 8\ngraph { }\n"), "m.onnx"),
    "gzip": (lambda d: _write(d / "m.onnx", b"\x1f\x8b\x08\x00" + b"\0" * 64), "m.onnx"),
    "a-folder": (lambda d: _mkdir(d / "m.onnx"), "m.onnx"),
    "missing": (lambda d: d / "nope.onnx", "nope.onnx"),
    "symlink-to-etc-passwd": (lambda d: _symlink("/etc/passwd", d / "m.onnx"), "m.onnx"),
    "dangling-symlink": (lambda d: _symlink(d / "gone", d / "m.onnx"), "m.onnx"),
    "not-readable-name": (lambda d: d / "m\udcff.onnx", ""),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _symlink(target: object, path: Path) -> Path:
    path.symlink_to(target)
    return path


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_hostile_model_file(tmp_path, case):
    make, expect = FILE_CASES[case]
    path = make(tmp_path)
    assert_bad_input(invoke("inspect", "--no-tvm", path, workdir=tmp_path), expect)
    assert_bad_input(invoke("compile", path, "-o", tmp_path / "out", workdir=tmp_path), expect)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _if_nest_bytes(depth: int) -> bytes:
    """A ModelProto of ``depth`` Ifs each in the last one's then_branch, written by hand: protobuf's own
    serialiser refuses to build messages nested this deep (GraphProto.node=1, NodeProto.attribute=5,
    AttributeProto.g=6 and type=20, ModelProto.graph=7)."""
    graph = _field(2, b"leaf")
    for _ in range(depth):
        attribute = _field(1, b"then_branch") + _varint(20 << 3) + _varint(onnx.AttributeProto.GRAPH) + _field(6, graph)
        node = _field(1, b"c") + _field(2, b"y") + _field(4, b"If") + _field(5, attribute)
        graph = _field(1, node) + _field(2, b"g")
    return _varint(1 << 3) + _varint(8) + _field(8, _varint(2 << 3) + _varint(17)) + _field(7, graph)


def test_if_nested_past_protobufs_depth_limit(tmp_path):
    """2,000 nested branches (6,000 messages deep): the parser's recursion limit, refused in one line."""
    path = tmp_path / "m.onnx"
    path.write_bytes(_if_nest_bytes(2000))
    assert_bad_input(run_optc("inspect", "--no-tvm", path, workdir=tmp_path), "m.onnx")


def test_if_nested_30_deep_is_accepted(tmp_path):
    path = save(_nested_if(30), tmp_path / "m.onnx")
    assert_accepted(invoke("inspect", "--no-tvm", path, workdir=tmp_path))
    assert_accepted(invoke("compile", path, "-o", tmp_path / "out", "--no-latency", workdir=tmp_path))


# --------------------------------------------------------------------------- external data


def _external(location: str, entries: dict[str, str] | None = None, prepare: Callable[[Path], object] | None = None) -> Callable[[Path], Path]:
    def made(tmp_path: Path) -> Path:
        path = external_model(tmp_path / "m", location, entries=entries)
        if prepare is not None:
            prepare(tmp_path / "m")
        return path

    return made


def _weights(folder: Path, name: str = "w.bin", size: int = 48) -> None:
    (folder / name).write_bytes(np.ones(size // 4, np.float32).tobytes())


# name -> (the model folder, what the one line must say)
EXTERNAL_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "absolute-path": (_external("/etc/passwd"), "/etc/passwd"),
    "dot-dot": (_external("../w.bin", prepare=lambda f: _weights(f.parent)), "w.bin"),
    "dot-dot-inside-a-subfolder": (_external("sub/../../w.bin", prepare=lambda f: ((f / "sub").mkdir(), _weights(f.parent))), "w.bin"),
    "symlink-to-a-device": (_external("w.bin", prepare=lambda f: os.symlink("/dev/zero", f / "w.bin")), "w.bin"),
    "empty-location": (_external(""), "location"),
    "a-folder": (_external("w.bin", prepare=lambda f: (f / "w.bin").mkdir()), "w.bin"),
    "missing-file": (_external("w.bin"), "w.bin"),
    "negative-offset": (_external("w.bin", {"offset": "-8"}, prepare=_weights), "w.bin"),
    "offset-past-the-end": (_external("w.bin", {"offset": "4096"}, prepare=_weights), "w.bin"),
    "offset-not-a-number": (_external("w.bin", {"offset": "zero"}, prepare=_weights), "offset"),
    "length-of-an-exabyte": (_external("w.bin", {"length": str(2**60)}, prepare=_weights), "w.bin"),
    "file-shorter-than-the-tensor": (_external("w.bin", prepare=lambda f: _weights(f, size=20)), "w.bin"),
}


@pytest.mark.parametrize("case", sorted(EXTERNAL_CASES))
def test_hostile_external_data(tmp_path, case):
    make, expect = EXTERNAL_CASES[case]
    path = make(tmp_path)
    assert_bad_input(invoke("inspect", "--no-tvm", path, workdir=tmp_path), expect)
    assert_bad_input(invoke("compile", path, "-o", tmp_path / "out", "--no-latency", workdir=tmp_path), expect)


def test_loop_bodies_keep_their_outer_weights_through_an_edit(tmp_path):
    """GraphEditor.commit once exported the trip count each Loop body reads from outside as an empty stub
    inside the body (compute_stats then crashed, exit 1): the written model runs and matches."""
    from helpers import ort_run
    from hostile import loop_model

    proto = loop_model(3, 3)
    proto.graph.node.append(helper.make_node("Identity", ["y"], ["z"], name="tail"))  # remove-identity edits the graph
    proto.graph.output[0].name = "z"
    path = save(proto, tmp_path / "m.onnx")
    assert_accepted(invoke("compile", path, "-o", tmp_path / "out", "--no-latency", workdir=tmp_path))
    written = onnx.load(str(tmp_path / "out" / "model.onnx"))
    onnx.checker.check_model(written, full_check=True)
    x = {"x": np.zeros(1, np.float32)}
    assert ort_run(written, x)["z"].tolist() == ort_run(proto, x)["z"].tolist() == [27.0]
    # One copy of each weight in all (gs may move one into the body that reads it; never duplicate it)
    from optc.ir.model import iter_graphs

    def weight_bytes(m: onnx.ModelProto) -> int:
        return sum(len(t.raw_data) for g in iter_graphs(m.graph) for t in g.initializer)

    assert weight_bytes(written) == weight_bytes(proto)
