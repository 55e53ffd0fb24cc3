"""The canonicalisation passes, each on hand-built graphs: structure, onnxruntime
equality (1e-5), checker, honest ``modified``."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, make_model, ops, ort_run, rand, run_checked
from onnx import TensorProto, helper

from optc.ir import infer_shapes, load_model


def run_pass(name: str, proto: onnx.ModelProto, save, **options):
    model = load_model(save(proto))
    infer_shapes(model)
    return model, run_checked(name, model, **options)


# --- fold-batchnorm -------------------------------------------------------------

def _bn_inputs(c, seed=0):
    rng = np.random.default_rng(seed)
    return [
        ("gamma", rng.uniform(0.5, 2, c).astype(np.float32)),
        ("beta", rng.standard_normal(c).astype(np.float32)),
        ("mean", rng.standard_normal(c).astype(np.float32)),
        ("var", rng.uniform(0.1, 3, c).astype(np.float32)),
    ]


@pytest.mark.parametrize("group,bias", [(1, True), (1, False), (2, True)])
def test_fold_batchnorm_into_conv(save, group, bias):
    inputs = ["x", "W", "B"] if bias else ["x", "W"]
    proto = make_model(
        [
            helper.make_node("Conv", inputs, ["c"], pads=[1, 1, 1, 1], group=group, name="conv"),
            helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], epsilon=1e-3, name="bn"),
        ],
        [("x", [2, 4, 8, 8])],
        [("y", [2, 6, 8, 8])],
        [("W", rand(6, 4 // group, 3, 3)), ("B", rand(6, seed=3))] + _bn_inputs(6),
    )
    model, result = run_pass("fold-batchnorm", proto, save)
    assert result.modified and result.stats == {"folded": 1}
    assert ops(result.model) == ["Conv"]
    assert result.model.graph.node[0].output[0] == "y"
    assert_same_outputs(proto, result.model.proto, {"x": rand(2, 4, 8, 8, seed=9)})


@pytest.mark.parametrize("group", [1, 2])
def test_fold_batchnorm_into_conv_transpose(save, group):
    proto = make_model(
        [
            helper.make_node("ConvTranspose", ["x", "W"], ["c"], strides=[2, 2], group=group, name="deconv"),
            helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn"),
        ],
        [("x", [1, 4, 5, 5])],
        [("y", [1, 6, 10, 10])],
        [("W", rand(4, 6 // group, 2, 2))] + _bn_inputs(6),
    )
    _, result = run_pass("fold-batchnorm", proto, save)
    assert ops(result.model) == ["ConvTranspose"]
    assert_same_outputs(proto, result.model.proto, {"x": rand(1, 4, 5, 5, seed=4)})


@pytest.mark.parametrize("trans_b,beta", [(0, 1.0), (1, 0.5)])
def test_fold_batchnorm_into_gemm(save, trans_b, beta):
    w = rand(5, 3) if trans_b else rand(3, 5)
    proto = make_model(
        [
            helper.make_node("Gemm", ["x", "W", "C"], ["g"], transB=trans_b, alpha=2.0, beta=beta, name="gemm"),
            helper.make_node("BatchNormalization", ["g", "gamma", "beta", "mean", "var"], ["y"], name="bn"),
        ],
        [("x", [4, 3])],
        [("y", [4, 5])],
        [("W", w), ("C", rand(5, seed=5))] + _bn_inputs(5),
    )
    _, result = run_pass("fold-batchnorm", proto, save)
    assert ops(result.model) == ["Gemm"]
    assert_same_outputs(proto, result.model.proto, {"x": rand(4, 3, seed=6)})


def test_fold_batchnorm_leaves_shared_conv_output_and_reports_why(save):
    proto = make_model(
        [
            helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
            helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"], name="bn"),
            helper.make_node("Add", ["b", "c"], ["y"], name="add"),
        ],
        [("x", [1, 2, 4, 4])],
        [("y", [1, 3, 4, 4])],
        [("W", rand(3, 2, 1, 1))] + _bn_inputs(3),
    )
    model, result = run_pass("fold-batchnorm", proto, save)
    assert not result.modified
    assert result.skipped == ["bn: output of 'conv' has other uses"]


def test_fold_batchnorm_does_not_change_a_shared_weight(save):
    proto = make_model(
        [
            helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
            helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"], name="bn"),
            helper.make_node("Conv", ["x", "W"], ["d"], name="conv2"),
            helper.make_node("Add", ["b", "d"], ["y"], name="add"),
        ],
        [("x", [1, 2, 4, 4])],
        [("y", [1, 3, 4, 4])],
        [("W", rand(3, 2, 1, 1))] + _bn_inputs(3),
    )
    _, result = run_pass("fold-batchnorm", proto, save)
    assert ops(result.model) == ["Conv", "Conv", "Add"]
    assert_same_outputs(proto, result.model.proto, {"x": rand(1, 2, 4, 4, seed=7)})


# --- remove-identity ------------------------------------------------------------

def test_remove_identity_dropout_noop_reshape_transpose_cast(save):
    proto = make_model(
        [
            helper.make_node("Identity", ["x"], ["a"], name="id"),
            helper.make_node("Dropout", ["a"], ["b"], name="drop"),
            helper.make_node("Reshape", ["b", "same"], ["c"], name="reshape_noop"),
            helper.make_node("Transpose", ["c"], ["d"], perm=[0, 1, 2], name="t_noop"),
            helper.make_node("Cast", ["d"], ["e"], to=TensorProto.FLOAT, name="cast_noop"),
            helper.make_node("Reshape", ["e", "flat"], ["f"], name="reshape_real"),
            helper.make_node("Identity", ["f"], ["y"], name="id_out"),
        ],
        [("x", [2, 3, 4])],
        [("y", [2, 12])],
        [("same", np.array([0, 3, -1], np.int64)), ("flat", np.array([2, 12], np.int64))],
    )
    _, result = run_pass("remove-identity", proto, save)
    assert result.stats["removed"] == {"Identity": 2, "Dropout": 1, "Reshape": 1, "Transpose": 1, "Cast": 1}
    assert ops(result.model) == ["Reshape"]
    assert [o.name for o in result.model.graph.output] == ["y"]
    assert_same_outputs(proto, result.model.proto, {"x": rand(2, 3, 4)}, atol=0, rtol=0)


def test_remove_identity_keeps_input_to_output_identity_and_used_mask(save):
    proto = make_model(
        [
            helper.make_node("Identity", ["x"], ["y"], name="passthrough"),
            helper.make_node("Dropout", ["x"], ["d", "mask"], name="drop"),
            helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT, name="cast"),
            helper.make_node("Add", ["d", "m"], ["z"], name="add"),
        ],
        [("x", [3])],
        [("y", [3]), ("z", [3])],
    )
    _, result = run_pass("remove-identity", proto, save)
    assert not result.modified
    assert sorted(result.skipped) == [
        "drop: its mask output is used",
        "passthrough: connects a graph input or constant straight to a graph output",
    ]


# --- fold-constants -------------------------------------------------------------

def test_fold_constants_folds_shape_chain_once_shapes_are_static(save):
    # The Shape -> Gather -> Concat -> Reshape chain of a dynamic-batch export.
    proto = make_model(
        [
            helper.make_node("Shape", ["x"], ["s"], name="shape"),
            helper.make_node("Gather", ["s", "zero"], ["n"], axis=0, name="gather"),
            helper.make_node("Unsqueeze", ["n", "axes"], ["n1"], name="unsq"),
            helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0, name="concat"),
            helper.make_node("Reshape", ["x", "target"], ["r"], name="reshape"),
            helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0], name="t_w"),
            helper.make_node("MatMul", ["r", "Wt"], ["y"], name="mm"),
        ],
        [("x", [2, 3, 4])],
        [("y", [2, 5])],
        [("zero", np.array(0, np.int64)), ("axes", np.array([0], np.int64)), ("minus1", np.array([-1], np.int64)), ("W", rand(5, 12))],
    )
    _, result = run_pass("fold-constants", proto, save)
    assert result.modified
    assert ops(result.model) == ["Reshape", "MatMul"]
    assert_same_outputs(proto, result.model.proto, {"x": rand(2, 3, 4)}, atol=0, rtol=0)


def test_fold_constants_folds_chains_of_computed_reshapes_one_behind_the_other(save):
    """The second Reshape's shape is computed from the first's output, whose shape shape inference learns only
    once the first Reshape's target is a constant (paddle2onnx exports: RapidOCR's recogniser kept 4 such
    Reshapes after one round, which TVM's frontend refuses)."""
    def reshape_of(src, out, tag):
        return [helper.make_node("Shape", [src], [f"{tag}_s"], name=f"{tag}_shape"),
                helper.make_node("Slice", [f"{tag}_s", "zero1", "one1"], [f"{tag}_n"], name=f"{tag}_slice"),
                # an op onnx's shape inference carries no values through (Max): the Reshape's output shape stays unknown
                helper.make_node("Max", [f"{tag}_n", "one1"], [f"{tag}_n64"], name=f"{tag}_max"),
                helper.make_node("Concat", [f"{tag}_n64", "minus1"], [f"{tag}_t"], axis=0, name=f"{tag}_concat"),
                helper.make_node("Reshape", [src, f"{tag}_t"], [out], name=f"{tag}_reshape")]
    nodes = [*reshape_of("x", "r1", "a"), helper.make_node("Relu", ["r1"], ["h"], name="relu"), *reshape_of("h", "y", "b")]
    proto = make_model(nodes, [("x", [2, 3, 4])], [("y", [2, 12])],
                       [("zero1", np.array([0], np.int64)), ("one1", np.array([1], np.int64)), ("minus1", np.array([-1], np.int64))])
    _, result = run_pass("fold-constants", proto, save)
    assert ops(result.model) == ["Reshape", "Relu", "Reshape"]
    assert result.stats["nodes_folded"] == 8
    assert_same_outputs(proto, result.model.proto, {"x": rand(2, 3, 4)}, atol=0, rtol=0)


@pytest.mark.parametrize(("start", "end", "want"), [(1, 2, [3]), (-1, None, [4]), (None, -1, [2, 3]), (1, 99, [3, 4]), (-9, 1, [2])])
def test_fold_constants_folds_a_shape_slice_as_onnxruntime_computes_it(save, start, end, want):
    """Shape's start/end (opset 15): onnx-graphsurgeon's shape folding ignores them (sum(Shape(x, start=1, end=2)) of
    a 2x3 x folded to 5 where onnxruntime computes 3). Negative and outlying bounds clamp as Slice's do."""
    bounds = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    proto = make_model(
        [helper.make_node("Shape", ["x"], ["s"], name="shape", **bounds),
         helper.make_node("ReduceSum", ["s"], ["r"], keepdims=1, name="sum"),
         helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT, name="cast"),
         helper.make_node("Mul", ["x", "rf"], ["y"], name="mul")],
        [("x", [2, 3, 4])], [("y", [2, 3, 4])])
    x = rand(2, 3, 4)
    assert np.allclose(ort_run(proto, {"x": x})["y"], x * sum(want))  # what onnxruntime computes
    _, result = run_pass("fold-constants", proto, save)
    assert ops(result.model) == ["Mul"]
    assert_same_outputs(proto, result.model.proto, {"x": x}, atol=0, rtol=0)
    dynamic = make_model([helper.make_node("Shape", ["x"], ["y"], name="shape", **bounds)], [("x", ["N", 3, 4])], [("y", [len(want)])])
    _, kept = run_pass("fold-constants", dynamic, save)
    assert not kept.modified  # a shape it cannot fold: nothing split, nothing changed


def test_fold_constants_leaves_dynamic_shapes_and_random_ops(save):
    proto = make_model(
        [
            helper.make_node("Shape", ["x"], ["s"], name="shape"),
            helper.make_node("ConstantOfShape", ["s"], ["z"], name="zeros"),
            helper.make_node("RandomUniform", [], ["r"], shape=[3], name="rand"),
            helper.make_node("Add", ["x", "z"], ["y0"], name="add"),
            helper.make_node("Add", ["y0", "r"], ["y"], name="add2"),
        ],
        [("x", ["N", 3])],
        [("y", ["N", 3])],
    )
    _, result = run_pass("fold-constants", proto, save)
    assert not result.modified


def test_fold_constants_respects_max_bytes(save):
    proto = make_model(
        [helper.make_node("Tile", ["W", "reps"], ["big"], name="tile"), helper.make_node("Add", ["x", "big"], ["y"], name="add")],
        [("x", [64, 64])],
        [("y", [64, 64])],
        [("W", rand(1, 64)), ("reps", np.array([64, 1], np.int64))],
    )
    _, small = run_pass("fold-constants", proto, save, max_bytes=1024)
    assert not small.modified
    _, big = run_pass("fold-constants", proto, save)
    assert ops(big.model) == ["Add"]


# --- eliminate-dead-code --------------------------------------------------------

def test_eliminate_dead_code(save):
    proto = make_model(
        [
            helper.make_node("Relu", ["x"], ["y"], name="live"),
            helper.make_node("MatMul", ["x", "W"], ["dead"], name="dead"),
        ],
        [("x", [2, 2])],
        [("y", [2, 2])],
        [("W", rand(2, 2)), ("unused", rand(3))],
    )
    _, result = run_pass("eliminate-dead-code", proto, save)
    assert result.stats == {"nodes_removed": 1, "initializers_removed": 2}
    assert ops(result.model) == ["Relu"] and len(result.model.graph.initializer) == 0
    assert [i.name for i in result.model.graph.input] == ["x"]
    assert_same_outputs(proto, result.model.proto, {"x": rand(2, 2)}, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["fold-constants", "conv3d-to-2d", "fold-batchnorm", "remove-identity", "eliminate-dead-code"])
def test_no_change_means_byte_identical(save, name):
    proto = make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [("x", [2])], [("y", [2])])
    model, result = run_pass(name, proto, save)
    assert not result.modified and result.model is model


def test_fold_constants_gives_up_on_a_failing_constant_subgraph(save):
    """A constant Reshape to the wrong element count: onnxruntime fails on it, and
    the folder must give up on that node (not retry the same subgraph forever)."""
    nodes = [
        helper.make_node("Relu", ["c"], ["cr"], name="relu_c"),
        helper.make_node("Reshape", ["cr", "bad_shape"], ["r"], name="bad_reshape"),
        helper.make_node("Add", ["x", "r"], ["y"], name="add"),
    ]
    inits = [("c", rand(1 << 20)), ("bad_shape", np.array([3, 5], np.int64))]
    model = load_model(save(make_model(nodes, [("x", [3, 5])], [("y", [3, 5])], inits)), check=False)
    infer_shapes(model)
    result = run_checked("fold-constants", model)
    # The Relu is foldable on its own; the Reshape that onnxruntime refuses stays.
    assert "Reshape" in ops(result.model)


def test_ir3_model_keeps_its_shapes_and_macs_through_canonicalize():
    """IR < 4 lists initializers as inputs; after folding they must stay visible to shape inference."""
    from pathlib import Path

    import onnx as onnx_pkg

    from optc.ir import load_model
    from optc.ir.stats import compute_stats
    from optc.passes import PassManager, parse_pass_specs

    path = Path(onnx_pkg.__file__).parent / "backend/test/data/light/light_squeezenet.onnx"
    if not path.is_file():
        pytest.skip(f"onnx wheel without {path.name}")
    model = load_model(path)
    assert model.proto.ir_version == 3
    result = PassManager(parse_pass_specs(["canonicalize"])).run(model)
    assert result.model.proto.ir_version == 4 and any("IR version raised from 3 to 4" in n for n in result.model.notes)
    assert compute_stats(result.model).macs == result.initial.macs > 300_000_000
    onnx_pkg.checker.check_model(result.model.proto, full_check=True)
    feeds = {"data_0": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    want, got = ort_run(model.proto, feeds), ort_run(result.model.proto, feeds)
    np.testing.assert_allclose(got["softmaxout_1"], want["softmaxout_1"], atol=1e-6)


def test_fold_constants_runs_every_constant_subgraph_at_once_and_partitions_only_on_failure(save, monkeypatch):
    """Partitioning copies the graph per part: DenseNet-121's computed weights took 618 s that way, under 1 s at once."""
    import onnx_graphsurgeon as gs

    calls = []
    original = gs.Graph.fold_constants

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("partitioning"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(gs.Graph, "fold_constants", spy)
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["w"], name="fill", value=helper.make_tensor("v", 1, [1], [0.5])),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = load_model(save(make_model(nodes, [("x", [2, 4])], [("y", [2, 4])], [("shape", np.array([4, 4], np.int64))])))
    infer_shapes(model)
    result = run_checked("fold-constants", model)
    assert "ConstantOfShape" not in ops(result.model) and calls[0] is None and "recursive" not in calls
    calls.clear()
    test_fold_constants_gives_up_on_a_failing_constant_subgraph(save)
    assert calls[:2] == [None, "recursive"]
