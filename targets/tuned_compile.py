"""The Relax pipeline around the tuning database: fuse, apply records, lower.

MetaSchedule's ``compile_relax`` does the same, minus weight pre-packing. With
``prepack``, the fused functions' weight buffers are marked layout-free
before tasks are extracted, so a tuned schedule may store a weight in the
layout its loops read (tiles for the vector width, the NCHWc blocking of a
convolution); the layout transform is split out of each function after the
records are applied and, the weights being constants, computed once at
compile time. The artifact's interface does not change. Functions without a
record get :mod:`optc.targets.cpu_schedule`'s default schedule.
"""
from __future__ import annotations

from typing import Any

from optc.targets.cpu_schedule import default_schedules


def _fuse_passes(target: Any, prepack: bool) -> list[Any]:
    import tvm
    from tvm import relax
    from tvm.relax import pipeline

    from optc.targets.providers.reciprocal_scale import reciprocal_quantize
    from optc.targets.providers.requant_round_trip import round_trips
    from optc.targets.tile_padding import pad_tiles
    from optc.targets.weight_bounds import mark_weight_bounds

    try:
        dispatch = pipeline.library_dispatch_passes(target)
    except (ValueError, AttributeError):
        dispatch = []
    passes = [
        *dispatch,
        # after the providers took their chains: the quantizes left to TVM multiply by 1/scale (providers/reciprocal_scale.py)
        tvm.transform.module_pass(lambda mod, _ctx: reciprocal_quantize(mod), opt_level=0, name="ReciprocalQuantize"),
        # a quantize read back at once keeps its value: no 8-bit round trip (providers/requant_round_trip.py)
        tvm.transform.module_pass(lambda mod, _ctx: round_trips(mod), opt_level=0, name="RequantRoundTrip"),
        # convolutions left to the tiled kernel get whole register tiles, rows and channels (tile_padding.py)
        *([tvm.transform.module_pass(lambda mod, _ctx: pad_tiles(mod, target), opt_level=0, name="PadTiles")]
          if str(target.kind.name) == "llvm" else []),
        # exp/erf/tanh (softmax, GELU, sigmoid) as vectorisable polynomials instead of one libm call
        # per element; onnxruntime's MLAS does the same. Within 1e-6 relative of the exact functions.
        relax.transform.FastMathTransform(),
        relax.transform.LegalizeOps(customize_legalize_map={"relax.round": _round_half_even, "relax.sigmoid": _fast_sigmoid}),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        # x86 without VNNI: the functions whose int8 weights vpmaddubsw's int16 pairs hold (weight_bounds.py)
        tvm.transform.module_pass(lambda mod, _ctx: mark_weight_bounds(mod, target), opt_level=0, name="MarkWeightBounds"),
    ]
    if prepack:
        passes.append(relax.transform.AttachAttrLayoutFreeBuffers())
    return passes


def _round_half_even(bb: Any, call: Any) -> Any:
    """``R.round`` as ``tir.round``, which TVM's LLVM backend emits as ``llvm.nearbyint``: half to even, as ONNX's
    Round and QuantizeLinear and as TVM's own ``R.quantize``, in one vector instruction. TVM's default legalisation
    writes ``tir.nearbyint``, which it emits as a call to libm per element: 9x slower on a 800 K-element
    requantisation (:mod:`optc.targets.providers.layout_ops` writes per-tensor quantize with ``R.round``)."""
    from tvm import te, tirx

    def compute(x: Any) -> Any:
        floating = str(x.dtype).startswith("float")  # an integer rounds to itself
        return te.compute(x.shape, lambda *i: tirx.round(x(*i)) if floating else x(*i), name="round_half_even")

    return bb.call_te(compute, call.args[0], primfunc_name_hint="round")


def _fast_sigmoid(bb: Any, call: Any) -> Any:
    """``R.sigmoid`` as ``1 / (1 + fast_exp(-x))``: FastMathTransform takes exp, erf and tanh but not sigmoid,
    which TVM lowers to one libm ``expf`` call per element. In an int8 SiLU network the requantisation
    around each SiLU took 2.5x its convolutions' time (64x64x32: 0.43 ms) for that reason. Within 1e-6 of
    the exact sigmoid (tests/test_providers.py); onnxruntime's MLAS also evaluates a polynomial."""
    from tvm import te, topi

    def compute(x: Any) -> Any:
        if str(x.dtype) != "float32":
            return topi.sigmoid(x)
        one = te.const(1.0, "float32")
        exp = topi.fast_exp(topi.negative(x))
        return te.compute(x.shape, lambda *i: one / (one + exp(*i)), name="fast_sigmoid")

    return bb.call_te(compute, call.args[0], primfunc_name_hint="sigmoid")


def fused(mod: Any, target: Any, prepack: bool) -> Any:
    """The module tasks are extracted from; :func:`compile_with_database` prepares it the same way, so keys match."""
    import tvm

    with target:
        return tvm.transform.Sequential(_fuse_passes(target, prepack))(mod)


def _lower_passes(target: Any) -> list[Any]:
    """The target's lowering passes; TVM 0.27 registers none for llvm, and compile_relax falls back to these."""
    from tvm import relax
    from tvm.relax import pipeline

    try:
        return pipeline.dataflow_lower_passes(target) + pipeline.finalize_passes(target)
    except (ValueError, AttributeError):
        t = relax.transform
        return [
            t.RewriteDataflowReshape(), t.ToNonDataflow(), t.RemovePurityChecking(), t.CallTIRRewrite(),
            t.StaticPlanBlockMemory(), t.LowerAllocTensor(), t.KillAfterLastUse(), t.LowerRuntimeBuiltin(),
            t.ComputePrimValue(), t.VMShapeLower(), t.AttachGlobalSymbol(),
        ]


def compile_with_database(database: Any, mod: Any, target: Any, prepack: bool) -> Any:
    """``mod`` built with every record ``database`` holds (default schedules elsewhere)."""
    import tvm
    from tvm import relax
    from tvm.relax.transform import MetaScheduleApplyDatabase

    lower = _lower_passes(target)

    @tvm.transform.module_pass(opt_level=3)
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        mod = tvm.transform.Sequential(_fuse_passes(target, prepack))(mod)
        mod = MetaScheduleApplyDatabase(enable_warning=False)(mod)
        mod, _ = default_schedules(mod)  # threads and vectors for the light functions no record covers
        if prepack:
            mod = relax.transform.SplitLayoutRewritePreproc()(mod)
            mod = relax.transform.FoldConstant()(mod)  # the weights' layout transform, at compile time
        return tvm.transform.Sequential(lower)(mod)

    with target, database, tvm.transform.PassContext(opt_level=3):
        return relax.build(mod, target=target, relax_pipeline=_pipeline)
