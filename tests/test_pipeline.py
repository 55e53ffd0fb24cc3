"""Pipelines from specs and files, option conversion, the manager's contract checks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pytest
from helpers import make_model, rand
from onnx import helper

from optc.errors import ConfigError, PassCrash, PassError
from optc.ir import load_model
from optc.ir.graph import GraphEditor
from optc.ir.session import sample_feeds
from optc.passes import Pass, PassContext, PassManager, PassResult, Requirement, load_pipeline_file, option, parse_pass_specs, register_pass
from optc.passes.framework.instruments import DumpAfter, VerifyEach
from optc.passes.framework.options import build_config, option_docs


@dataclass(frozen=True, kw_only=True)
class _Cfg:
    ratio: float = option(0.5, "a ratio")
    steps: int = option(3, "steps")
    mode: Literal["a", "b"] = option("a", "mode")
    flag: bool = option(False, "flag")
    exclude: tuple[str, ...] = option((), "names")
    limit: float | None = option(None, "optional")

    def __post_init__(self):
        if not 0 <= self.ratio <= 1:
            raise ValueError(f"ratio must be in [0, 1], not {self.ratio}")


def test_build_config_converts_by_type():
    cfg = build_config("t", _Cfg, {"ratio": "0.25", "steps": "7", "mode": "b", "flag": "yes", "exclude": "c1|c2", "limit": "none"})
    assert cfg == _Cfg(ratio=0.25, steps=7, mode="b", flag=True, exclude=("c1", "c2"), limit=None)
    assert build_config("t", _Cfg, {"limit": 2}).limit == 2.0


@pytest.mark.parametrize(
    "values,msg",
    [
        ({"ratoi": "1"}, "has no option 'ratoi'; valid options: ratio, steps, mode, flag, exclude, limit"),
        ({"steps": "2.5"}, "must be an integer"),
        ({"mode": "c"}, "must be one of a, b"),
        ({"flag": "maybe"}, "true or false"),
        ({"ratio": "2"}, "ratio must be in"),
    ],
)
def test_build_config_errors_name_the_problem(values, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(")):
        build_config("t", _Cfg, values)


def test_option_docs():
    docs = {d["name"]: d for d in option_docs(_Cfg)}
    assert docs["mode"]["type"] == "a|b" and docs["ratio"]["help"] == "a ratio"


def test_parse_specs_and_named_pipeline():
    passes = parse_pass_specs(["canonicalize", "fold-constants:max_bytes=2048,fold_shapes=false"])
    assert [p.name for p in passes] == ["fold-constants", "conv3d-to-2d", "fold-batchnorm", "remove-identity", "eliminate-dead-code", "fold-constants"]
    assert passes[-1].config.max_bytes == 2048 and passes[-1].config.fold_shapes is False


@pytest.mark.parametrize(
    "spec,msg",
    [
        ("fold-constnats", "unknown pass 'fold-constnats'; valid passes: .*fold-constants"),
        ("fold-constants:bogus=1", "no option 'bogus'; valid options: max_bytes, fold_shapes"),
        ("fold-constants:max_bytes", "expected key=value"),
        ("remove-identity:x=1", "takes no options"),
    ],
)
def test_parse_spec_errors(spec, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_pass_specs([spec])


def test_pipeline_files_yaml_and_toml(tmp_path):
    y = tmp_path / "p.yaml"
    y.write_text("passes:\n  - canonicalize\n  - name: fold-constants\n    max_bytes: 4096\n")
    t = tmp_path / "p.toml"
    t.write_text('[[passes]]\nname = "fold-constants"\nmax_bytes = 4096\n\n[[passes]]\nname = "eliminate-dead-code"\n')
    assert [p.name for p in load_pipeline_file(y)][-1] == "fold-constants"
    passes = load_pipeline_file(t)
    assert [p.name for p in passes] == ["fold-constants", "eliminate-dead-code"] and passes[0].config.max_bytes == 4096


@pytest.mark.parametrize(
    "name,text,msg",
    [
        ("a.yaml", "passes: [nope]", "unknown pass 'nope'"),
        ("b.yaml", "passes:\n  - name: fold-constants\n    colour: red", "no option 'colour'"),
        ("c.yaml", "passes: [", "cannot parse"),
        ("d.toml", "passes = 3", "non-empty list"),
        ("e.json", "{}", "use .yaml"),
        ("f.yaml", "stages: []", "unknown top-level key"),
    ],
)
def test_pipeline_file_errors(tmp_path, name, text, msg):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=msg):
        load_pipeline_file(path)


# --- manager and instruments ------------------------------------------------------

@register_pass("test-liar")
class _Liar(Pass):
    """Changes the graph but says it did not (used to test the contract check)."""

    def run(self, model, ctx):
        editor = GraphEditor(model)
        editor.nodes[0].op = "Neg"
        return PassResult(editor.commit(), modified=False)


@register_pass("test-mutator")
class _Mutator(Pass):
    """Edits its input in place (forbidden)."""

    def run(self, model, ctx):
        model.graph.node[0].op_type = "Neg"
        return PassResult(model, modified=True)


@register_pass("test-inexact")
class _Inexact(Pass):
    """Claims to be exact but changes values."""

    def run(self, model, ctx):
        editor = GraphEditor(model)
        editor.nodes[0].op = "Neg"
        return PassResult(editor.commit(), modified=True)


@register_pass("test-crash")
class _Crash(Pass):
    requires = frozenset({Requirement.SHAPES})

    def run(self, model, ctx):
        raise ZeroDivisionError("boom")


@register_pass("test-needs-calib")
class _NeedsCalib(Pass):
    requires = frozenset({Requirement.CALIBRATION})

    def run(self, model, ctx):
        return PassResult(model, modified=False)


def _relu(save):
    return load_model(save(make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [("x", [2, 3])], [("y", [2, 3])])))


@pytest.mark.parametrize(
    "name,msg",
    [
        ("test-liar", "reported no change"),
        ("test-mutator", "mutated its input"),
        ("test-inexact", "declared exact but changed the outputs"),
    ],
)
def test_verify_each_enforces_the_pass_contract(save, name, msg):
    model = _relu(save)
    manager = PassManager(parse_pass_specs([name]), [VerifyEach(sample_feeds(model))])
    with pytest.raises(PassError, match=msg):
        manager.run(model)


def test_crash_names_the_pass_and_what_ran_before(save):
    model = _relu(save)
    with pytest.raises(PassCrash, match=r"pass 'test-crash': ZeroDivisionError: boom \(passes run before: fold-constants\)"):
        PassManager(parse_pass_specs(["fold-constants", "test-crash"])).run(model)


def test_requirements_checked_before_any_work(save):
    model = _relu(save)
    with pytest.raises(ConfigError, match="needs calibration data"):
        PassManager(parse_pass_specs(["test-crash", "test-needs-calib"])).run(model, PassContext())


def test_records_and_dump_after(save, tmp_path):
    proto = make_model(
        [helper.make_node("Identity", ["x"], ["a"], name="id"), helper.make_node("Relu", ["a"], ["y"], name="r")],
        [("x", [2, 3])],
        [("y", [2, 3])],
        [("unused", rand(4))],
    )
    model = load_model(save(proto))
    dumps = tmp_path / "dumps"
    result = PassManager(parse_pass_specs(["canonicalize"]), [VerifyEach(sample_feeds(model)), DumpAfter({"remove-identity"}, dumps)]).run(model)
    by_name = {r.name: r for r in result.records}
    assert by_name["remove-identity"].modified and by_name["remove-identity"].after["nodes"] == 1
    # Every committed edit ends with cleanup(), so the unused initializer is already gone.
    assert not by_name["eliminate-dead-code"].modified
    assert by_name["remove-identity"].drift["within_exact_tolerance"]
    assert [p.name for p in dumps.iterdir()] == ["04-remove-identity.onnx"]
    assert result.final.params == 0 and result.initial.params == 4
    np.testing.assert_equal(len(result.records), 5)


@register_pass("test-needs-opset-13")
class _NeedsOpset13(Pass):
    min_opset = 13

    def run(self, model, ctx):
        assert model.opset >= 13
        return PassResult(model, modified=False)


@register_pass("test-needs-opset-13-changes")
class _NeedsOpset13Changes(Pass):
    min_opset = 13

    def run(self, model, ctx):
        assert model.opset >= 13
        changed = model.copy()
        changed.proto.graph.node[0].name = "renamed"
        return PassResult(changed, modified=True)


def test_manager_upgrades_old_opsets_for_passes_that_need_it(save):
    proto = make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [("x", [2, 3])], [("y", [2, 3])], opset=11)
    model = load_model(save(proto))
    result = PassManager(parse_pass_specs(["test-needs-opset-13-changes"]), [VerifyEach(sample_feeds(model))]).run(model)
    assert result.model.opset == 13 and model.opset == 11
    assert "upgraded opset to 13" in result.model.notes


def test_a_pass_that_changes_nothing_leaves_the_opset_as_it_was(save):
    """quantize on a model with nothing to quantize said "changed nothing" and wrote it at opset 13 anyway."""
    proto = make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [("x", [2, 3])], [("y", [2, 3])], opset=11)
    model = load_model(save(proto))
    result = PassManager(parse_pass_specs(["test-needs-opset-13"]), [VerifyEach(sample_feeds(model))]).run(model)
    assert result.model is model and result.model.opset == 11
    assert not any("upgraded opset" in n for n in result.model.notes)
    assert not result.records[0].modified


def test_networkx_view(save):
    from optc.ir import to_networkx

    proto = make_model(
        [helper.make_node("Relu", ["x"], ["a"], name="r"), helper.make_node("Neg", ["a"], ["b"], name="n"), helper.make_node("Add", ["a", "b"], ["y"], name="add")],
        [("x", [2])],
        [("y", [2])],
    )
    g = to_networkx(load_model(save(proto)))
    assert sorted(g.edges(data="tensor")) == [("n", "add", "b"), ("r", "add", "a"), ("r", "n", "a")]
    assert g.nodes["add"]["op"] == "Add"


def test_non_finite_outputs_score_nan_not_zero():
    from optc.evaluation import compare_outputs

    ref = {"y": np.ones((2, 3), np.float32)}
    bad = {"y": np.array([[1, np.nan, 1], [1, 1, 1]], np.float32)}
    assert np.isnan(compare_outputs(ref, bad)["y"]["cosine"])
    assert compare_outputs(ref, ref)["y"]["cosine"] == pytest.approx(1.0)
