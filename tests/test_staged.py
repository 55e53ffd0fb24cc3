"""ir.staged: a model run in stages gives what whole runs give, and runs each node about once."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import make_model, ort_run, rand
from onnx import helper

from optc.errors import OptcError
from optc.ir.graph import GraphEditor
from optc.ir.model import Model
from optc.ir.staged import StagedRun


def _chain(depth: int = 4, width: int = 6) -> Model:
    """x -> (MatMul -> Relu) x depth, with a residual Add from the first hidden layer into the last."""
    nodes, inits, prev = [], [], "x"
    for i in range(depth):
        inits.append((f"w{i}", rand(width, width, seed=i)))
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Relu", [f"m{i}"], [f"h{i}"], name=f"relu{i}")]
        prev = f"h{i}"
    nodes.append(helper.make_node("Add", [prev, "h0"], ["y"], name="res"))
    return Model(make_model(nodes, [("x", [None, width])], [("y", [None, width])], inits))


def _full(model: Model, feed, names):
    proto = model.proto.__class__()
    proto.CopyFrom(model.proto)
    for n in names:
        proto.graph.output.add().name = n
    return ort_run(proto, feed)


FEEDS = [{"x": rand(3, 6, seed=10 + i)} for i in range(3)]


def test_stages_give_whole_run_values_and_run_each_node_once():
    model = _chain()
    run = StagedRun(model)
    for names in (["m0"], ["m1"], ["m2"], ["m3", "h0"], ["y"]):
        with run.stage(names) as stage:
            for feed in FEEDS:
                got = stage.run(feed)
                want = _full(model, feed, names)
                for n in names:
                    np.testing.assert_allclose(got[n], want[n], rtol=1e-6, err_msg=n)
    assert run.nodes_run == len(model.graph.node)  # each node once, though five stages asked


def _edit_weight(model: Model, node_name: str) -> Model:
    editor = GraphEditor(model)
    node = next(n for n in editor.nodes if n.name == node_name)
    node.inputs[1] = editor.add_constant(node.inputs[1].name, 2 * np.asarray(editor.constant_value(node.inputs[1])))
    return editor.commit()


def test_an_edit_in_graph_order_costs_only_the_nodes_after_it():
    """The sequential refit's pattern: ask a layer's input, edit the layer, ask the next layer's input."""
    model = _chain()
    run = StagedRun(model)
    with run.stage(["h1"]) as stage:
        for feed in FEEDS:
            stage.run(feed)
    before = run.nodes_run  # mm0, relu0, mm1, relu1
    edited = _edit_weight(model, "mm2")
    run.update(edited, ["mm2"])
    with run.stage(["h2"]) as stage:
        for feed in FEEDS:
            np.testing.assert_allclose(stage.run(feed)["h2"], _full(edited, feed, ["h2"])["h2"], rtol=1e-6)
    assert run.nodes_run - before == 2  # mm2 (edited) and relu2: nothing upstream again


def test_values_downstream_of_an_edit_are_computed_again():
    model = _chain()
    run = StagedRun(model)
    with run.stage(["y"]) as stage:
        for feed in FEEDS:
            stage.run(feed)
    edited = _edit_weight(model, "mm1")
    run.update(edited, ["mm1"])
    with run.stage(["h3", "y"]) as stage:
        for feed in FEEDS:
            got, want = stage.run(feed), _full(edited, feed, ["h3", "y"])
            for n in ("h3", "y"):
                np.testing.assert_allclose(got[n], want[n], rtol=1e-6, err_msg=n)


def test_values_over_the_memory_bound_are_computed_again():
    model = _chain()
    run = StagedRun(model, max_bytes=0)
    for names in (["m1"], ["m2"]):
        with run.stage(names) as stage:
            for feed in FEEDS:
                np.testing.assert_allclose(stage.run(feed)[names[0]], _full(model, feed, names)[names[0]], rtol=1e-6)
    assert run.nodes_run == 3 + 5  # nothing held: the second stage starts from the input


def test_a_stage_seeing_other_feeds_is_refused():
    run = StagedRun(_chain())
    with run.stage(["m1"]) as stage:
        stage.run(FEEDS[0])
    with pytest.raises(OptcError, match="same feeds"):
        with run.stage(["m2"]) as stage:
            stage.run({"y": FEEDS[0]["x"]})
            stage.run({"y": FEEDS[0]["x"]})
