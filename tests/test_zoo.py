"""The real-model zoo (issue 13, section 3): every model, every pass at its defaults.

The zoo is built outside the repository by ``python tools/zoo fetch && python tools/zoo build``
(``~/.cache/optc/zoo``, or ``$OPTC_ZOO_CACHE``); these tests read only that cache and
skip, saying so, when it is absent. Each test runs the real CLI
(``optc compile ... --pass canonicalize [--pass P] --calib calib.npz``) and scores the
written model against the original on the held-out ``eval.npz`` with
tools/zoo/scoring.py.

* canonicalisation keeps the outputs: cosine >= 0.99999 and max |delta| within 1e-4 of
  the output scale;
* each lossy pass at its defaults changes the model and meets the issue's goal (at most
  1 point lost on labelled models, held-out cosine >= 0.99 otherwise), or is listed in
  ``KNOWN`` with the figure ``python benchmarks/zoo.py`` measured, as a strict xfail:
  a fix that makes it pass turns the xfail into a failure, so the entry gets removed.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT / "tools"))
from zoo import scoring  # noqa: E402
from zoo.sources import cache_root  # noqa: E402

CACHE = cache_root()
ENTRIES = {e.name: e for e in scoring.entries(CACHE)}
LOSSY = ("prune-channels", "sparsify", "quantize", "distill")
OPTC = str(Path(sys.executable).with_name("optc"))
TIMEOUT_S = 900

# (model, pass) -> what `python benchmarks/zoo.py` measured on this machine (2 shared cores), session 12, load 2-4: the whole
# table regenerated (19 models x 5 pipelines, 600 s per row), budgets held with their 90 % confidence bound (labelled models
# with --eval: the upper bound of the paired drop; label-free: the lower bound of the held-out cosine and argmax agreement).
# Regenerate with `python benchmarks/zoo.py --results FILE --known`. Earlier sessions' history is in the closing notes.
KNOWN: dict[tuple[str, str], str] = {
    # session 16, this machine (Intel, VNNI): 4 of its 352 held-out frames flip with every layer int8, 3 with the
    # fallback judged by the budget's own measure; the budget allows one. Its character accuracy moves by +0.25 points.
    # At the budget's edge: session 17's zoo, built again on a fresh machine of the same kind, passed (BORDERLINE).
    ('ddddocr_ocr', 'quantize'): 'quantize left out: argmax agreement 0.9892 (lower bound) after its fallback, 0.9814 without',
    ('ddddocr_ocr', 'distill'): 'nothing changed: distill at default strength: cosine 0.9428, argmax agreement 0.8580 (387) (lower bound 0.8340) on held-out data (drop 0.1660) misses the default budget (the 90 % lower confidence bound of the mean cosine of each output at least 0.99 and argmax agreement at least 0.99 (387) on 16 held-out ca',
    ('ddddocr_det', 'distill'): 'cos 0.9883',
    ('rapidocr_det', 'distill'): 'nothing changed: distill at default strength: cosine 0.9512 (lower bound 0.9456) on held-out data (drop 0.0544) misses the default budget (the 90 % lower confidence bound of the mean cosine of each output at least 0.99 (no output holds class scores to hold by argmax) on 8 held-out calibration samples); took',
    ('rapidocr_rec', 'prune-channels'): 'nothing changed: prune-channels at default strength: cosine 0.9772, argmax agreement 0.9672 (softmax_11.tmp_0) (lower bound 0.9599) on held-out data (drop 0.0401) misses the default budget (the 90 % lower confidence bound of the mean cosine of each output at least 0.99 and argmax agreement at least 0.99 (so',
    ('rapidocr_rec', 'distill'): 'nothing changed: distill at default strength: cosine 0.6967, argmax agreement 0.6875 (softmax_11.tmp_0) (lower bound 0.6504) on held-out data (drop 0.3496) misses the default budget (the 90 % lower confidence bound of the mean cosine of each output at least 0.99 and argmax agreement at least 0.99 (softmax_1',
    ('silero_vad', 'quantize'): 'nothing changed: quantize at default strength: cosine 0.9771, argmax agreement 0.9688 (output) (lower bound 0.9278) on held-out data (drop 0.0722) misses the default budget (the 90 % lower confidence bound of the mean cosine of each output at least 0.99 and argmax agreement at least 0.99 (output) on 32 held',
    ('silero_vad', 'distill'): 'nothing changed: If_0/else_branch: no calibration sample takes this branch (Equal_0_C is never false); its weights are kept; If_0/then_branch: If_0_then_branch__Inline_0__/stft/Conv: only 2-D convolutions',
    ('silero_vad_seq', 'distill'): 'nothing changed: /stft/Conv: only 2-D convolutions; /encoder.0/Conv: only 2-D convolutions',
    ('crepe_tiny', 'prune-channels'): "nothing changed: /conv6/Conv: reshaped by Reshape '/Reshape_12' (only a flatten of [N, C, ...] into [N, features] is followed); /classifier/Gemm: reaches graph output 'pitch_activation'",
    ('crepe_tiny', 'quantize'): 'nothing changed: quantize at default strength: top1 0.6800 (drop 0.0033, upper bound 0.0108) on held-out data misses the default budget (the 90 % upper confidence bound of the top1 drop at most 0.01 on 300 held-out evaluation samples); took the strongest setting within it (set the strength to run as',
    ('crepe_tiny', 'distill'): 'nothing changed: distill at default strength: top1 0.0300 (drop 0.6533, upper bound 0.6912) on held-out data misses the default budget (the 90 % upper confidence bound of the top1 drop at most 0.01 on 300 held-out evaluation samples); took the strongest setting within it (set the strength to run as ',
    ('magika', 'prune-channels'): "nothing changed: jax2tf_get_logits_/pjit_get_logits_/MagikaV2/Dense_0/einsum/Einsum: reshaped by Reshape 'jax2tf_get_logits_/pjit_get_logits_/MagikaV2/Reshape' (only a flatten of [N, C, ...] into [N, features] is followed); jax2tf_get_logits_/pjit_get_logits_/MagikaV2/Conv_0/Conv2D: ReduceSum 'jax2t",
    ('magika', 'quantize'): 'nothing changed: quantize at default strength: top1 0.8953 (drop 0.0055, upper bound 0.0105) on held-out data misses the default budget (the 90 % upper confidence bound of the top1 drop at most 0.01 on 363 held-out evaluation samples); took the strongest setting within it (set the strength to run as',
    ('minilm', 'distill'): 'nothing changed: distill at default strength: cosine 0.7135 (lower bound 0.6879) on held-out data (drop 0.3121) misses the default budget (the 90 % lower confidence bound of the mean cosine of each output at least 0.99 (no output holds class scores to hold by argmax) on 32 held-out calibration samples); too',
    # session 24: boxes held score by score (concordance over the samples): at the default strength distill's R-net boxes
    # kept per-sample cosine 0.911 while their x offsets fell to correlation 0.56 / 0.41; no strength holds them at 0.99
    ('mtcnn_rnet', 'distill'): 'distill left out: box concordance 0.3426 (lower bound 0.2509) at default strength',
    ('mtcnn_onet', 'distill'): 'distill left out: box concordance 0.6479 (lower bound 0.5422) at default strength',
    # session 25: held-out calibration samples spread over the set instead of its last quarter (a set in class order held
    # out its last classes). Three rows that missed now pass (MiniLM's sparsify, ResNet-50's prune-channels and distill,
    # which held out 4 samples) and three that passed now miss on the other samples:
    ('ddddocr_ocr', 'prune-channels'): 'prune-channels left out: argmax agreement 0.9489 (lower bound 0.9338) on 16 held-out samples at default strength',
    ('silero_vad_seq', 'quantize'): 'quantize left out: speech_probs argmax agreement 0.9062 (lower bound 0.8377) on 32 held-out samples (with its last quarter held out, it passed)',
    ('light_shufflenet', 'distill'): 'distill left out: argmax agreement 0.5000 (lower bound 0.0272) on 4 held-out calibration samples at default strength',
    ('light_squeezenet', 'distill'): 'nothing changed: distill at default strength: cosine 0.9990, argmax agreement 0.7500 (softmaxout_1) (lower bound 0.3405) on held-out data (drop 0.6595) misses the default budget (the 90 % lower confidence bound of the mean cosine of each output at least 0.99 and argmax agreement at least 0.99 (softmaxout_1)',
}

# Entries at the budget's edge, which one zoo build passes and another misses: non-strict xfails. ddddocr's
# prune-channels has crossed that edge four times: missing in session 12, passing in 17, missing in 25 (16 held-out
# samples, lower bound 0.9338), passing in 27 on a fresh zoo build.
BORDERLINE = {('ddddocr_ocr', 'quantize'), ('ddddocr_ocr', 'prune-channels')}

pytestmark = pytest.mark.slow


def _cases(passes):
    if not ENTRIES:
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=f"no zoo in {CACHE}: run python tools/zoo fetch && python tools/zoo build"))]
    out = []
    for name in ENTRIES:
        for p in passes:
            known = (name, p) in KNOWN
            marks = [pytest.mark.xfail(strict=(name, p) not in BORDERLINE, reason=KNOWN[(name, p)])] if known else []
            out.append(pytest.param(name, p, marks=marks, id=f"{name}-{p}"))
    return out


def compile_with(entry: scoring.Entry, pass_name: str, outdir: Path) -> dict:
    # the command benchmarks/zoo.py runs, whose figures KNOWN quotes (labelled models get --eval)
    proc = subprocess.run(scoring.optc_command([OPTC], entry, pass_name, outdir), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr.strip()[-600:]}"
    return json.loads((outdir / "report.json").read_text())


@pytest.mark.parametrize(("name", "pass_name"), _cases(("canonicalize",)))
def test_canonicalize_keeps_outputs(name, pass_name, tmp_path):
    entry = ENTRIES[name]
    compile_with(entry, pass_name, tmp_path / "out")
    result = scoring.compare(entry, tmp_path / "out" / "model.onnx", limit=32)
    assert result["cosine"] >= 0.99999, result
    assert result["max_abs"] <= 1e-4 * (1 + result["ref_max_abs"]), result


@pytest.mark.parametrize(("name", "pass_name"), _cases(LOSSY))
def test_lossy_pass_defaults_meet_goal(name, pass_name, tmp_path):
    entry = ENTRIES[name]
    report = compile_with(entry, pass_name, tmp_path / "out")
    records = [r for r in report["passes"] if r["pass"] == pass_name]
    assert records, f"{pass_name} left out: {[n for n in report.get('notes', []) if pass_name in n][:2]}"
    record = records[-1]
    assert record["modified"], f"{pass_name} changed nothing: {record.get('skipped', [])[:3]}"
    result = scoring.compare(entry, tmp_path / "out" / "model.onnx")
    assert scoring.meets_goal(result), result
