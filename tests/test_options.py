"""Option bounds declared with the option: checked from strings, parsed files and Python alike.

The cases are generated from what every registered pass declares, so a new
bounded option is covered without a new test.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing

import pytest
from click.testing import CliRunner

from optc.cli.main import cli
from optc.errors import ConfigError
from optc.passes import PassConfig, load_pipeline_file, make_pass, option, registered_passes
from optc.passes.framework.options import Bounds, option_bounds

# The passes optc ships (tests elsewhere register their own).
PASSES = {name: cls for name, cls in registered_passes().items() if cls.__module__.startswith("optc.passes.")}


def _number_type(config_class: type, name: str) -> type | None:
    """int or float for a numeric option (``int | None`` counts as int), else None."""
    hint = typing.get_type_hints(config_class)[name]
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return next((t for t in (int, float) if t in args), None)


def _outside(bounds: Bounds, kind: type) -> list[float]:
    """Values just outside ``bounds`` (and off its grid), of the option's type."""
    step = 1 if kind is int else 0.5
    values = []
    if bounds.low is not None:
        values.append(bounds.low if bounds.low_open else bounds.low - step)
    if bounds.high is not None:
        values.append(bounds.high if bounds.high_open else bounds.high + step)
    if bounds.multiple_of is not None:
        first = math.ceil((bounds.low or 0) / bounds.multiple_of) * bounds.multiple_of
        values.append(first + 1)
    return [kind(v) for v in values]


def _bounded_cases() -> list:
    cases = []
    for pass_name, cls in PASSES.items():
        for name, bounds in option_bounds(cls.config_class).items():
            kind = _number_type(cls.config_class, name)
            cases += [pytest.param(pass_name, name, value, id=f"{pass_name}-{name}={value}") for value in _outside(bounds, kind)]
    return cases


def _numeric_options(kind: type) -> list:
    return [
        pytest.param(pass_name, f.name, id=f"{pass_name}-{f.name}")
        for pass_name, cls in PASSES.items()
        for f in dataclasses.fields(cls.config_class)
        if _number_type(cls.config_class, f.name) is kind
    ]


def _message(owner: str, name: str, bounds: Bounds) -> str:
    return re.escape(f"{owner} option '{name}' must be {bounds}, not ")


# --- declared bounds ----------------------------------------------------------------


def test_every_pass_config_checks_its_bounds_on_construction():
    for name, cls in PASSES.items():
        assert issubclass(cls.config_class, PassConfig), f"{name}: {cls.config_class.__name__} must derive from PassConfig"


@pytest.mark.parametrize("pass_name", list(PASSES))
def test_defaults_satisfy_their_own_bounds(pass_name):
    config_class = PASSES[pass_name].config_class
    config = config_class()
    for name, bounds in option_bounds(config_class).items():
        default = getattr(config, name)
        assert default is None or bounds.contains(default), f"{pass_name} {name}={default} outside {bounds}"


def test_bounded_options_exist():
    # The generated cases below would pass vacuously if no option declared bounds.
    assert len(_bounded_cases()) >= 40


@pytest.mark.parametrize("pass_name,name,value", _bounded_cases())
def test_out_of_range_is_refused_however_the_config_is_built(pass_name, name, value):
    config_class = PASSES[pass_name].config_class
    bounds = option_bounds(config_class)[name]
    assert not bounds.contains(value)
    with pytest.raises(ConfigError, match=_message(f"pass '{pass_name}'", name, bounds)):
        make_pass(pass_name, {name: str(value)})  # CLI: key=value strings
    with pytest.raises(ConfigError, match=_message(f"pass '{pass_name}'", name, bounds)):
        make_pass(pass_name, {name: value})  # YAML/TOML: already typed
    with pytest.raises(ConfigError, match=_message(config_class.__name__, name, bounds)):
        config_class(**{name: value})  # Python


@pytest.mark.parametrize("pass_name,name", _numeric_options(float))
def test_float_options_refuse_nan_and_infinity(pass_name, name):
    config_class = PASSES[pass_name].config_class
    for raw in ("nan", "inf", "-inf", float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=f"pass '{pass_name}' option '{name}' must be a finite number"):
            make_pass(pass_name, {name: raw})
    with pytest.raises(ConfigError, match=f"{config_class.__name__} option '{name}' must be a finite number, not nan"):
        config_class(**{name: float("nan")})


@pytest.mark.parametrize("pass_name,name", _numeric_options(int))
def test_integer_options_refuse_infinity(pass_name, name):
    config_class = PASSES[pass_name].config_class
    for raw in ("inf", float("inf"), float("-inf"), float("nan")):  # int(float('inf')) raises OverflowError
        with pytest.raises(ConfigError, match=f"pass '{pass_name}' option '{name}' must be an integer"):
            make_pass(pass_name, {name: raw})
    with pytest.raises(ConfigError, match=f"{config_class.__name__} option '{name}' must be a finite number, not inf"):
        config_class(**{name: float("inf")})


# --- messages -----------------------------------------------------------------------


def test_message_names_the_pass_option_value_and_range():
    from optc.passes.prune.prune_channels import PruneChannelsConfig
    from optc.passes.sparsify.sparsify import SparsifyConfig

    with pytest.raises(ConfigError) as err:
        make_pass("sparsify", {"sparsity": "1.5"})
    assert str(err.value) == "pass 'sparsify' option 'sparsity' must be in [0, 1), not 1.5"
    with pytest.raises(ConfigError) as err:
        SparsifyConfig(sparsity=2.0)
    assert str(err.value) == "SparsifyConfig option 'sparsity' must be in [0, 1), not 2.0"
    with pytest.raises(ConfigError) as err:
        make_pass("quantize", {"time_budget_s": -1})
    assert str(err.value) == "pass 'quantize' option 'time_budget_s' must be >= 0, not -1.0"
    with pytest.raises(ConfigError) as err:
        make_pass("quantize", {"bins": "4098"})
    assert str(err.value) == "pass 'quantize' option 'bins' must be in [256, 65536] and a multiple of 4, not 4098"
    with pytest.raises(ConfigError) as err:
        make_pass("prune-channels", {"round_to": 1e300})  # a whole float from YAML passes int conversion
    assert str(err.value) == "pass 'prune-channels' option 'round_to' must be in [1, 4096], not 1e+300"
    with pytest.raises(ConfigError) as err:
        make_pass("distill", {"ridge": "nan"})
    assert str(err.value) == "pass 'distill' option 'ridge' must be a finite number, not nan"
    with pytest.raises(ConfigError, match=r"PruneChannelsConfig option 'ratio' must be a number in \[0, 1\), not '0.5'"):
        PruneChannelsConfig(ratio="0.5")


def test_bounds_text_and_declaration():
    assert str(Bounds.declared(ge=0, gt=None, le=None, lt=1, multiple_of=None)) == "in [0, 1)"
    assert str(Bounds.declared(ge=None, gt=50, le=100, lt=None, multiple_of=None)) == "in (50, 100]"
    assert str(Bounds.declared(ge=1, gt=None, le=None, lt=None, multiple_of=None)) == ">= 1"
    assert str(Bounds.declared(ge=None, gt=0, le=None, lt=None, multiple_of=None)) == "> 0"
    assert str(Bounds.declared(ge=None, gt=None, le=None, lt=None, multiple_of=8)) == "a multiple of 8"
    assert Bounds.declared(ge=None, gt=None, le=None, lt=None, multiple_of=None) is None
    with pytest.raises(TypeError, match="at most one lower bound"):
        option(0.5, "both", ge=0, gt=0)


def test_unbounded_options_and_none_pass():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Cfg(PassConfig):
        scale: float = option(1.0, "no bounds")
        limit: float | None = option(None, "optional", gt=0)

    assert Cfg(scale=-1e9).scale == -1e9 and Cfg(limit=None).limit is None
    with pytest.raises(ConfigError, match="Cfg option 'scale' must be a finite number, not inf"):
        Cfg(scale=float("inf"))


def test_cross_field_checks_still_run_after_the_bounds():
    with pytest.raises(ConfigError, match="stages > 1 needs method=obs"):
        make_pass("sparsify", {"stages": "2", "method": "magnitude"})
    with pytest.raises(ConfigError, match="option 'stages' must be >= 1"):
        make_pass("sparsify", {"stages": "0", "method": "magnitude"})


# --- files and the CLI --------------------------------------------------------------


@pytest.mark.parametrize(
    "name,text,msg",
    [
        ("a.yaml", "passes:\n  - name: sparsify\n    sparsity: 1.5\n", r"option 'sparsity' must be in \[0, 1\), not 1.5"),
        ("b.yaml", "passes:\n  - name: distill\n    damp: .nan\n", "option 'damp' must be a finite number, not nan"),
        ("c.yaml", "passes:\n  - name: sparsify\n    max_batches: .inf\n", "option 'max_batches' must be an integer, not inf"),
        ("d.yaml", "passes:\n  - name: prune-channels\n    round_to: 1.0e+300\n", r"option 'round_to' must be in \[1, 4096\]"),
        ("e.toml", '[[passes]]\nname = "quantize"\ntime_budget_s = -1\n', "option 'time_budget_s' must be >= 0, not -1"),
        ("f.toml", '[[passes]]\nname = "prune-channels"\nridge = nan\n', "option 'ridge' must be a finite number, not nan"),
        ("g.toml", '[[passes]]\nname = "quantize"\neval_samples = inf\n', "option 'eval_samples' must be an integer, not inf"),
    ],
)
def test_pipeline_files_are_checked(tmp_path, name, text, msg):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=msg):
        load_pipeline_file(path)


def test_cli_refuses_out_of_range_and_infinite_options_with_exit_2(tmp_path):
    from helpers import SAMPLE

    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("passes:\n  - name: sparsify\n    block_size: .inf\n")
    cases = [
        (["--pass", "sparsify:sparsity=1.5"], "pass 'sparsify' option 'sparsity' must be in [0, 1), not 1.5"),
        (["--pass", "quantize:time_budget_s=-1"], "pass 'quantize' option 'time_budget_s' must be >= 0, not -1.0"),
        (["--pipeline", pipeline], "pass 'sparsify' option 'block_size' must be an integer, not inf"),  # was an internal error (exit 1)
    ]
    for args, msg in cases:
        res = CliRunner().invoke(cli, ["compile", str(SAMPLE / "mnist_cnn.onnx"), "-o", str(tmp_path / "out"), *map(str, args)], terminal_width=400)
        assert res.exit_code == 2, res.output
        assert msg in res.output


def test_describe_shows_the_range():
    res = CliRunner().invoke(cli, ["passes", "--describe", "sparsify"], catch_exceptions=False, terminal_width=400)
    assert res.exit_code == 0, res.output
    assert "sparsity (float in [0, 1), default 0.5)" in res.output
    assert "max_batches (int >= 1, default 32)" in res.output
    options = json.loads(CliRunner().invoke(cli, ["passes", "--describe", "sparsify", "--json"]).output)["passes"][0]["options"]
    ranges = {o["name"]: o["range"] for o in options}
    assert ranges["sparsity"] == "in [0, 1)" and ranges["owl_m"] == "> 0" and ranges["pattern"] == ""
