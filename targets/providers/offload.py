"""Rewrite chosen op chains of a Relax module into calls of a provider's kernels.

Each chosen :class:`~optc.targets.providers.chains.Chain` becomes one
``call_dps_packed`` to the glue's function, bound to the chain's last value;
the ops it absorbed are left dead and removed. Attributes travel as a shape
(integers; clip bounds as float bits), weights as constants of the module.
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import numpy as np
from optc.targets.providers.chains import ACT_CLIP, ACT_RELU, Chain, ChainFinder
from tvm import relax


def float_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def find_chains(mod: Any) -> list[Chain]:
    chains: list[Chain] = []
    for _gvar, func in mod.functions_items():
        if isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr):
            chains.extend(ChainFinder(func).find())
    return chains


def offload(mod: Any, chains: list[Chain], chosen: Callable[[Chain], bool]) -> tuple[Any, list[Chain]]:
    """``mod`` with every chain ``chosen`` accepts sent to its glue (oneDNN's, or optc's Winograd kernels); the chains sent."""
    taken = [c for c in chains if chosen(c)]
    if not taken:
        return mod, []
    new_mod = rewrite_functions(_Offload(mod, taken), mod)
    return relax.transform.DeadCodeElimination()(new_mod), taken


def provider_call(chain: Chain, data: Any, other: Any = None, residual: Any = None) -> Any:
    """The ``call_dps_packed`` computing ``chain`` on (already rewritten) inputs."""
    if chain.given_out_shape is None:
        return _call(chain, data, other, residual)
    # a conv along H of a width-1 map runs along W (chains.columns_as_rows): the same memory, other shapes
    data = relax.op.reshape(data, chain.in_shapes[0])
    residual = None if residual is None else relax.op.reshape(residual, chain.out_shape)
    return relax.op.reshape(_call(chain, data, other, residual), chain.given_out_shape)


def _call(chain: Chain, data: Any, other: Any, residual: Any) -> Any:
    out_ty = relax.TensorType(list(chain.out_shape), chain.out_dtype)
    act = act_attrs(chain)
    if chain.scale is not None:
        return _int8_call(chain, data, residual, act, out_ty)
    if chain.kind == "conv2d":
        assert chain.weight is not None
        attrs = conv_attrs(chain, act)
        args = [data, relax.const(chain.weight)]
        if residual is not None:
            bias = chain.bias if chain.bias is not None else np.zeros(chain.weight.shape[0], np.float32)
            name, args = f"{chain.glue}_conv2d_sum", [*args, relax.const(bias), residual]
        elif chain.bias is not None:
            name, args = f"{chain.glue}_conv2d", [*args, relax.const(chain.bias)]
        else:
            name = f"{chain.glue}_conv2d_nobias"
    elif chain.kind == "conv2d_transpose":
        assert chain.weight is not None
        attrs, args = conv_attrs(chain, act), [data, relax.const(chain.weight)]
        if chain.bias is not None:
            name, args = "optc_dnnl_deconv2d", [*args, relax.const(chain.bias)]
        else:
            name = "optc_dnnl_deconv2d_nobias"
    elif chain.kind == "matmul":
        assert chain.weight is not None
        args, attrs = [data, relax.const(chain.weight)], act
        if chain.bias is not None:
            name, args = "optc_dnnl_matmul", [*args, relax.const(chain.bias)]
        else:
            name = "optc_dnnl_matmul_nobias"
    elif chain.kind == "softmax":
        name, args, attrs = "optc_dnnl_softmax", [data], [chain.axis]
    elif chain.kind == "layer_norm":
        assert chain.weight is not None and chain.bias is not None
        name, args, attrs = "optc_dnnl_layer_norm", [data, relax.const(chain.weight), relax.const(chain.bias)], [float_bits(chain.eps)]
    else:
        name, args, attrs = "optc_dnnl_batch_matmul", [data, other], []
    return relax.call_dps_packed(name, [*args, relax.ShapeExpr([int(a) for a in attrs])], out_ty)


def act_attrs(chain: Chain) -> list[int]:
    """The activation as the glue reads it: code, clip bounds as float bits."""
    lo, hi = chain.clip if chain.act == ACT_CLIP else (0.0, 0.0)
    return [chain.act, float_bits(lo), float_bits(hi)]


def conv_attrs(chain: Chain, act: list[int]) -> list[int]:
    """The glue's 14 convolution attributes (onednn_glue.cc, make_conv)."""
    c = chain.conv
    return [*c["strides"], *c["padding"], *c["dilation"], c["groups"], *act, c["nhwc"], chain.algo]  # type: ignore[misc]


def int8_bias(chain: Chain) -> np.ndarray:
    """The bias oneDNN adds before its output scale: ``(bias - scale·comp) / scale`` per output channel."""
    assert chain.scale is not None
    scale = chain.scale.astype(np.float64)
    bias = np.zeros_like(scale) if chain.bias is None else chain.bias.astype(np.float64)
    if chain.comp is not None:
        bias = bias - scale * chain.comp.astype(np.float64)
    return (bias / scale).astype(np.float32)


def requantised(chain: Chain) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(bias, scales, activation attributes) of an int8 chain whose output is quantised to 8 bits (``out_scale`` s,
    ``out_zero`` z): oneDNN computes ``v = scales' · (acc + bias')`` then the clip, and rounds and saturates to the
    output type. With ``scales' = scale / s`` and ``bias' = bias + z / scales'``, ``v = y / s + z``: ReLU becomes a clip
    from z, and a clip's bounds map to ``bound / s + z``; ``round(v)`` is the quantize (half to even, like ``R.round``)."""
    s, z = np.float64(chain.out_scale), np.float64(chain.out_zero)
    assert chain.scale is not None
    scales = chain.scale.astype(np.float64) / s
    bias = int8_bias(chain).astype(np.float64) + z / scales
    if chain.act == ACT_RELU:
        act = [ACT_CLIP, float_bits(float(z)), float_bits(float(np.finfo(np.float32).max))]
    elif chain.act == ACT_CLIP:
        act = [ACT_CLIP, float_bits(float(chain.clip[0] / s + z)), float_bits(float(chain.clip[1] / s + z))]
    else:
        act = act_attrs(chain)
    return bias.astype(np.float32), scales.astype(np.float32), act


def _int8_call(chain: Chain, data: Any, residual: Any, act: list[int], out_ty: Any) -> Any:
    assert chain.weight is not None and chain.scale is not None
    bias, scales = int8_bias(chain), chain.scale
    if chain.out_dtype != "float32":
        bias, scales, act = requantised(chain)
    args = [data, relax.const(chain.weight, "int8"), relax.const(bias), relax.const(scales)]
    if chain.kind == "conv2d":
        attrs = conv_attrs(chain, act)
        name = "optc_dnnl_conv2d_q"
        if residual is not None:
            name, args = "optc_dnnl_conv2d_q_sum", [*args, residual]
    else:
        name, attrs = "optc_dnnl_matmul_q", act
    return relax.call_dps_packed(name, [*args, relax.ShapeExpr([int(a) for a in attrs])], out_ty)


def rewrite_functions(mutator: Any, mod: Any) -> Any:
    """Every Relax function of ``mod`` through ``mutator`` (a PyExprMutator made on ``mod``): the new module."""
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    return mutator.builder_.get()


@relax.expr_functor.mutator
class _Offload(relax.PyExprMutator):
    def __init__(self, mod: Any, chains: list[Chain]) -> None:
        super().__init__(mod)
        self.by_end = {c.end: c for c in chains}

    def visit_call_(self, call: Any) -> Any:
        chain = self.by_end.get(call)
        if chain is None:
            return super().visit_call_(call)
        visit = self.visit_expr
        return provider_call(
            chain, visit(chain.data),
            other=None if chain.other is None else visit(chain.other),
            residual=None if chain.residual is None else visit(chain.residual),
        )

