"""Hostile pipeline files (``--pipeline``): YAML and TOML that bomb, lie about types or hide code.

Each case is one crafted file given to ``optc compile`` of the sample model;
see :mod:`hostile` for the contract. Refusals come before any pass runs.
"""
from __future__ import annotations

import pytest
from helpers import SAMPLE
from hostile import YAML_BOMB, assert_accepted, assert_bad_input, invoke, run_optc

MODEL = SAMPLE / "mnist_cnn.onnx"

# name -> (file name, content, what the one line must say)
PIPELINE_CASES: dict[str, tuple[str, str | bytes, str]] = {
    # YAML structure
    "one-anchor-and-alias": ("p.yaml", "a: &x [canonicalize]\npasses: *x\n", "anchors"),
    "merge-key": ("p.yaml", "base: &b {name: quantize}\npasses: [{<<: *b}]\n", "anchors"),
    "python-object-tag": ("p.yaml", "passes: !!python/object/apply:os.system ['touch pwned']\n", "p.yaml"),
    "python-name-tag": ("p.yaml", "passes: [!!python/name:os.system canonicalize]\n", "p.yaml"),
    "unknown-tag": ("p.yaml", "passes: !custom [canonicalize]\n", "p.yaml"),
    "nested-10000-deep": ("p.yaml", "passes: " + "[" * 10000 + "]" * 10000 + "\n", "p.yaml"),
    "binary-garbage": ("p.yaml", bytes(range(256)) * 4, "p.yaml"),
    "tab-indentation": ("p.yaml", "passes:\n\t- canonicalize\n", "p.yaml"),
    "over-1-mib": ("p.yaml", "# " + "x" * (1 << 20) + "\npasses: [canonicalize]\n", "1024 KiB"),
    "bad-toml": ("p.toml", "passes = [canonicalize\n", "p.toml"),
    "json-suffix": ("p.json", '{"passes": ["canonicalize"]}', ".yaml"),
    # wrong types at the top
    "a-list": ("p.yaml", "- canonicalize\n- quantize\n", ""),
    "a-number": ("p.yaml", "42\n", "p.yaml"),
    "a-string": ("p.yaml", "canonicalize\n", "p.yaml"),
    "empty": ("p.yaml", "", "p.yaml"),
    "passes-a-mapping": ("p.yaml", "passes: {canonicalize: 1}\n", "p.yaml"),
    "unknown-top-level-key": ("p.yaml", "passes: [canonicalize]\nturbo: true\n", "turbo"),
    # passes and options
    "unknown-pass": ("p.yaml", "passes: [make-it-faster]\n", "make-it-faster"),
    "unknown-option": ("p.yaml", "passes: [{name: fold-constants, speed: 11}]\n", "speed"),
    "option-nan": ("p.yaml", "passes: [{name: quantize, percentile: .nan}]\n", "percentile"),
    "option-inf": ("p.yaml", "passes: [{name: quantize, percentile: .inf}]\n", "percentile"),
    "option-huge": ("p.yaml", "passes: [{name: fold-constants, max_bytes: 1e300}]\n", "max_bytes"),
    "int-option-inf": ("p.yaml", "passes: [{name: quantize, bins: .inf}]\n", "bins"),
    "int-option-bool": ("p.yaml", "passes: [{name: quantize, bins: true}]\n", "bins"),
    "int-option-2-70": ("p.yaml", f"passes: [{{name: quantize, bins: {2**70}}}]\n", "bins"),
    "bool-option-string": ("p.yaml", "passes: [{name: quantize, per_channel: maybe}]\n", "per_channel"),
    "choice-option-bogus": ("p.yaml", "passes: [{name: quantize, calibrator: oracle}]\n", "calibrator"),
    "tuple-option-number": ("p.yaml", "passes: [{name: quantize, op_types: 7}]\n", "op_types"),
    "pass-name-a-number": ("p.yaml", "passes: [{name: 7}]\n", "p.yaml"),
    # seed and input_shapes
    "seed-string": ("p.yaml", "seed: abc\npasses: [canonicalize]\n", "seed"),
    "seed-float": ("p.yaml", "seed: 1.5\npasses: [canonicalize]\n", "seed"),
    "seed-2-70": ("p.yaml", f"seed: {2**70}\npasses: [canonicalize]\n", "seed"),
    "seed-negative": ("p.yaml", "seed: -1\npasses: [canonicalize]\n", "seed"),
    "input-shapes-list": ("p.yaml", "input_shapes: [1, 2]\npasses: [canonicalize]\n", "input_shapes"),
    "input-shapes-negative": ("p.yaml", "input_shapes: {input: [-1, 1, 28, 28]}\npasses: [canonicalize]\n", "input_shapes"),
    "input-shapes-huge": ("p.yaml", f"input_shapes: {{input: [{2**40}, 1, 28, 28]}}\npasses: [canonicalize]\n", "input"),
    "input-shapes-unknown-input": ("p.yaml", "input_shapes: {nope: [1, 1, 28, 28]}\npasses: [canonicalize]\n", "nope"),
    # the data.images section
    "data-a-list": ("p.yaml", "data: [images]\npasses: [canonicalize]\n", "data"),
    "data-unknown-key": ("p.yaml", "data: {audio: {}}\npasses: [canonicalize]\n", "data"),
    "images-a-string": ("p.yaml", "data: {images: yes-please}\npasses: [canonicalize]\n", "data.images"),
    "images-unknown-key": ("p.yaml", "data: {images: {gamma: 2}}\npasses: [canonicalize]\n", "gamma"),
    "images-size-zero": ("p.yaml", "data: {images: {size: [0, 0]}}\npasses: [canonicalize]\n", "size"),
    "images-size-huge": ("p.yaml", "data: {images: {size: [100000, 100000]}}\npasses: [canonicalize]\n", "size"),
    "images-size-three": ("p.yaml", "data: {images: {size: [28, 28, 28]}}\npasses: [canonicalize]\n", "size"),
    "images-resize-negative": ("p.yaml", "data: {images: {resize: -5}}\npasses: [canonicalize]\n", "resize"),
    "images-mean-nan": ("p.yaml", "data: {images: {mean: [.nan]}}\npasses: [canonicalize]\n", "mean"),
    "images-std-zero": ("p.yaml", "data: {images: {std: [0]}}\npasses: [canonicalize]\n", "std"),
    "images-std-inf": ("p.yaml", "data: {images: {std: .inf}}\npasses: [canonicalize]\n", "std"),
    "images-scale-string": ("p.yaml", "data: {images: {scale: big}}\npasses: [canonicalize]\n", "scale"),
    "images-color-bogus": ("p.yaml", "data: {images: {color: CMYK}}\npasses: [canonicalize]\n", "color"),
    "images-layout-bogus": ("p.yaml", "data: {images: {layout: NWHC}}\npasses: [canonicalize]\n", "layout"),
    "images-classes-twice": ("p.yaml", "data: {images: {classes: [a, a]}}\npasses: [canonicalize]\n", "classes"),
    "images-input-a-list": ("p.yaml", "data: {images: {input: [a]}}\npasses: [canonicalize]\n", "input"),
}


@pytest.mark.parametrize("case", sorted(PIPELINE_CASES))
def test_hostile_pipeline_file(tmp_path, case):
    name, content, expect = PIPELINE_CASES[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert_bad_input(invoke("compile", MODEL, "-o", tmp_path / "out", "--pipeline", path, "--no-latency", workdir=tmp_path), expect)
    assert not (tmp_path / "pwned").exists()


def test_yaml_bomb_in_data_images(tmp_path):
    """The alias bomb, under data.images: refused on its first anchor, within the limits."""
    path = tmp_path / "bomb.yaml"
    path.write_text(YAML_BOMB.replace("passes: [*i]", "data: {images: {mean: *i}}\npasses: [canonicalize]"))
    assert_bad_input(run_optc("compile", MODEL, "-o", tmp_path / "out", "--pipeline", path, workdir=tmp_path), "anchors")


def test_pipeline_yaml_written_by_optc_replays(tmp_path):
    """The control: optc's own pipeline.yaml (every option spelled out) is accepted as --pipeline."""
    first = invoke("compile", MODEL, "-o", tmp_path / "first", "--no-latency", workdir=tmp_path)
    assert_accepted(first)
    assert_accepted(invoke("compile", MODEL, "-o", tmp_path / "out", "--pipeline", tmp_path / "first" / "pipeline.yaml", "--no-latency"))
