"""Options that follow --target and this CPU unless the user set them (optc.targets.presets)."""
from __future__ import annotations

from optc import api
from optc.passes import make_pass, parse_pass_spec
from optc.targets import presets
from optc.targets.spec import TargetSpec


def test_reduce_range_follows_the_target_and_the_cpu(monkeypatch):
    monkeypatch.setattr(presets, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert presets.reduce_range_for(None, None) is None  # onnxruntime on avx2 without VNNI: keep 7-bit weights
    assert presets.reduce_range_for("arm", None)[0] is False
    assert presets.reduce_range_for("gpu", None)[0] is False
    monkeypatch.setattr(presets, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    assert presets.reduce_range_for("x86", None)[0] is False
    # --cpu names another machine: its features, as LLVM knows them, decide; this CPU's VNNI does not
    assert presets.reduce_range_for("x86", "znver3") is None and presets.reduce_range_for("x86", "haswell") is None
    assert presets.reduce_range_for("x86", "icelake-server") == (False, "--cpu icelake-server has VNNI (int32 accumulation)")
    assert presets.reduce_range_for("x86", "alderlake")[0] is False  # AVX-VNNI


def test_a_written_option_is_never_preset():
    arm = TargetSpec("arm", {"kind": "llvm"})
    notes: list[str] = []
    default, written = make_pass("quantize"), parse_pass_spec("quantize:reduce_range=true")[0]
    out = api._target_presets([default, written], arm, notes)
    assert out[0].config.reduce_range is False and out[0].options_given == frozenset()
    assert out[1] is written and out[1].config.reduce_range is True
    assert notes == ["quantize: reduce_range=false (--target arm accumulates int8 products in int32; set reduce_range= to choose)"]
