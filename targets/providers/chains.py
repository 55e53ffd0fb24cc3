"""Find the heavy op chains of a Relax function that a kernel provider can take whole.

A chain is one heavy op plus the element-wise ops a library fuses into it as
post-ops (softmax and last-axis layer normalisation are chains of one op): ``conv2d → add(bias) → add(residual) → activation`` and
``matmul(x, W) → add(bias) → activation`` (GELU recognised in the erf form
ONNX exports decompose it into), and plain batched products of two
activations (attention's Q·Kᵀ and P·V). An op is absorbed only when the value
before it has no other use, so a rewrite never duplicates work and never
changes what the rest of the graph sees.

This module only reads the function; :mod:`optc.targets.providers.offload`
rewrites it. Importing it imports TVM.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant

# Activation codes shared with onednn_glue.cc (enum Act).
ACT_NONE, ACT_RELU, ACT_CLIP, ACT_SIGMOID, ACT_GELU_ERF, ACT_SWISH = 0, 1, 2, 3, 4, 5
ACT_NAMES = {ACT_NONE: "", ACT_RELU: "relu", ACT_CLIP: "clip", ACT_SIGMOID: "sigmoid", ACT_GELU_ERF: "gelu", ACT_SWISH: "swish"}
# Convolution algorithms shared with onednn_glue.cc (enum Algo): oneDNN's direct and Winograd kernels, and optc's own
# Winograd F(4x4, 3x3) and F(2x2, 3x3) (winograd.h, in the glue).
ALGO_DIRECT, ALGO_WINOGRAD, ALGO_WINOGRAD_F43, ALGO_WINOGRAD_F23 = 0, 1, 2, 3


@dataclass
class Chain:
    """A heavy op and what it absorbs; ``end`` is the call whose binding the provider's call replaces."""

    kind: str  # conv2d | matmul | batch_matmul
    end: Any  # the relax Call at the end of the chain
    data: Any  # input activation (relax Expr)
    out_shape: tuple[int, ...]
    weight: np.ndarray | None = None  # conv: OIHW; matmul: (K, N)
    other: Any = None  # batch_matmul: the second activation
    bias: np.ndarray | None = None
    residual: Any = None
    act: int = ACT_NONE
    clip: tuple[float, float] = (0.0, 0.0)
    conv: dict[str, tuple[int, ...] | int] = field(default_factory=dict)  # strides, padding (t,l,b,r), dilation, groups, nhwc
    in_shapes: tuple[tuple[int, ...], ...] = ()
    absorbed: list[Any] = field(default_factory=list)  # the calls after the heavy op, up to ``end``
    # int8 chains (``x_q ⊛ W_q`` in int32, then ``(acc - comp) · scale`` in float, as targets/int8_relax.py writes them):
    src_dtype: str = "float32"  # uint8 / int8 for an int8 chain
    scale: np.ndarray | None = None  # float32 per output channel
    comp: np.ndarray | None = None  # int32 per output channel: the input zero point's share of the accumulator
    # int8 chains whose output is requantised per tensor (the next layer's QuantizeLinear): 8-bit out, its scale and zero point
    out_dtype: str = "float32"
    out_scale: float = 0.0
    out_zero: int = 0
    axis: int = -1  # softmax: the (non-negative) axis
    eps: float = 0.0  # layer_norm
    algo: int = ALGO_DIRECT  # conv2d: which algorithm the provider runs (a choice made by measurement, not part of the workload)
    glue: str = "optc_dnnl"  # the prefix of the glue functions that compute it: oneDNN's, or optc_winograd (no oneDNN)
    # conv2d along H of a width-1 map, handed to the provider along W (see columns_as_rows), or a conv1d handed over as a
    # conv2d of height 1 (_conv1d): the output shape the graph has.
    given_out_shape: tuple[int, ...] | None = None

    def workload(self) -> str:
        """What the kernel's speed depends on: shapes, attributes and post-ops, never weight values."""
        parts = [self.kind if self.src_dtype == "float32" else f"{self.kind}_{self.src_dtype}", "x".join(map(str, self.in_shapes[0]))]
        if self.kind == "softmax":
            parts.append(f"axis{self.axis}")
        if self.kind == "layer_norm":
            parts.append(f"eps{self.eps:g}")
        if self.weight is not None:
            parts.append("w" + "x".join(map(str, self.weight.shape)))
        if self.other is not None:
            parts.append("y" + "x".join(map(str, self.in_shapes[1])))
        for key in ("strides", "padding", "dilation", "groups", "nhwc"):
            if key in self.conv:
                value = self.conv[key]
                parts.append(f"{key[0]}{'_'.join(map(str, value)) if isinstance(value, tuple) else value}")
        parts += ["b" if self.bias is not None else "", "r" if self.residual is not None else "", ACT_NAMES[self.act]]
        parts.append(f"q{self.out_dtype}" if self.out_dtype != "float32" else "")
        return "/".join(p for p in parts if p)

    def winograd_candidate(self) -> bool:
        """An fp32 3x3, stride-1, undilated, ungrouped convolution on 4 input channels or more: the shape oneDNN's
        Winograd kernels take. With fewer, the transforms outweigh the multiplies saved (the MNIST sample's 1-channel
        stem: 25 us against 4.6 in TVM's kernel)."""
        if self.kind != "conv2d" or self.src_dtype != "float32" or self.weight is None:
            return False
        c = self.conv
        return (self.weight.shape[2:] == (3, 3) and self.weight.shape[1] >= 4 and c["strides"] == (1, 1) and c["dilation"] == (1, 1)
                and c["groups"] == 1)

    def optc_winograd_candidate(self) -> bool:
        """A Winograd candidate optc's own F(4x4, 3x3) and F(2x2, 3x3) kernels take: NHWC, with no activation, ReLU, a
        clip, sigmoid or SiLU (the epilogues they apply on their output tiles; not GELU)."""
        return self.winograd_candidate() and bool(self.conv.get("nhwc")) and self.act in (ACT_NONE, ACT_RELU, ACT_CLIP, ACT_SIGMOID, ACT_SWISH)

    def workload_key(self) -> str:
        return hashlib.sha256(self.workload().encode()).hexdigest()[:16]

    def macs(self) -> int:
        out = int(np.prod(self.out_shape))
        if self.kind == "conv2d":
            assert self.weight is not None
            return out * int(np.prod(self.weight.shape[1:]))
        if self.kind == "conv2d_transpose":  # every input element meets OC x kh x kw weights
            assert self.weight is not None
            return int(np.prod(self.in_shapes[0])) * int(np.prod(self.weight.shape[1:]))
        if self.kind == "matmul":
            assert self.weight is not None
            return out * int(self.weight.shape[0])
        if self.kind in ("softmax", "layer_norm"):
            return 0
        return out * int(self.in_shapes[0][-1])


def _absorb_quantize(chain: Chain, steps: list[Any], dtype: str, scale: float | None, zero: float | None) -> None:
    """Make ``steps`` (ending in the quantize's cast) the end of ``chain``, whose output becomes ``dtype`` with that
    scale and zero point; nothing when the parameters are not a finite positive scale and a zero point of uint8/int8."""
    if scale is None or zero is None or not (np.isfinite(scale) and scale > 0) or dtype not in ("uint8", "int8"):
        return
    chain.out_dtype, chain.out_scale, chain.out_zero = dtype, float(scale), int(zero)
    chain.end = steps[-1]
    chain.absorbed.extend(steps)


def columns_as_rows(chain: Chain) -> None:
    """A convolution along H of a width-1 map (a 1-D conv exported as [N, C, L, 1]) described along W instead.

    oneDNN's kernels block the output's width: with W = 1 they ran at a fraction of their speed (Magika's
    256->512 k=5 conv over 512 steps: 14.2 ms; CREPE's 1->128 k=512 conv: 1.53 ms, 0.90 along W). A width-1 map
    is the same memory as its height-1 transpose (NCHW [N, C, L, 1] = [N, C, 1, L]; NHWC [N, L, 1, C] = [N, 1, L, C];
    OIHW [O, I, K, 1] = [O, I, 1, K]), so only the shapes and the H/W attributes change; the provider call
    reshapes its operands (views) and its result back to ``given_out_shape``.
    """
    c = chain.conv
    assert chain.weight is not None
    w_axis = 2 if c["nhwc"] else 3
    x_shape, out = chain.in_shapes[0], chain.out_shape
    t, l, b, r = c["padding"]  # type: ignore[misc]
    if x_shape[w_axis] != 1 or out[w_axis] != 1 or chain.weight.shape[3] != 1 or chain.weight.shape[2] == 1 \
            or c["strides"][1] != 1 or c["dilation"][1] != 1 or l or r:  # type: ignore[index]
        return
    h_axis = w_axis - 1

    def swapped(shape: tuple[int, ...]) -> tuple[int, ...]:
        dims = list(shape)
        dims[h_axis], dims[w_axis] = dims[w_axis], dims[h_axis]
        return tuple(dims)

    chain.given_out_shape = out
    chain.out_shape = swapped(out)
    chain.in_shapes = (swapped(x_shape), *chain.in_shapes[1:])
    o, i, k, _ = chain.weight.shape
    chain.weight = chain.weight.reshape(o, i, 1, k)
    chain.conv = {**c, "strides": c["strides"][::-1], "dilation": c["dilation"][::-1], "padding": (l, t, r, b)}  # type: ignore[index]


def prim_number(expr: Any) -> float | None:
    """A clip bound as TVM writes it: a PrimValue holding an IntImm/FloatImm, or the bare IntImm/FloatImm."""
    value = getattr(expr, "value", None)
    value = getattr(value, "value", value)
    return float(value) if isinstance(value, (int, float)) else None


def scalar_number(expr: Any) -> float | None:
    """A scalar constant's value: a tensor constant of one element, or a clip's bound (:func:`prim_number`); else None."""
    if isinstance(expr, Constant) and hasattr(expr.value, "numpy"):  # a tensor constant (a FloatImm is a Constant too)
        value = expr.value.numpy()
        return float(value.reshape(())) if value.size == 1 else None
    return prim_number(expr)


# What may lie between a quantize's rounding and its 8-bit cast: the zero point's add and the type's bounds (a ReLU's
# maximum at the zero point, or relu itself where the frontend kept it).
QUANTIZE_BETWEEN = ("relax.add", "relax.subtract", "relax.minimum", "relax.maximum", "relax.clip", "relax.nn.relu")


def walk_to_round(expr: Any, values: dict[Any, Any], limit: int = 8) -> list[Any] | None:
    """The calls from ``expr`` (what a quantize's 8-bit cast reads) back to its ``relax.round``, the round last: the ops
    of :data:`QUANTIZE_BETWEEN`, each with one tensor operand, in between. None where anything else comes first."""
    chain = []
    for _ in range(limit):
        call = values.get(expr, expr)
        chain.append(call)
        name = op_name(call)
        if name == "relax.round":
            return chain
        tensors = [a for a in getattr(call, "args", ()) if isinstance(a, relax.Var)]
        if name not in QUANTIZE_BETWEEN or len(tensors) != 1:
            return None
        expr = tensors[0]
    return None


def op_name(value: Any) -> str:
    return str(value.op.name) if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) else ""


def static_shape(expr: Any) -> tuple[int, ...] | None:
    ty = getattr(expr, "ty", None)
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    dims = []
    for d in shape.values:
        if not isinstance(d, tvm.tirx.IntImm):
            return None
        dims.append(int(d.value))
    return tuple(dims)


def same(a: Any, b: Any) -> bool:
    return a is not None and b is not None and a.same_as(b)


def dtype_of(expr: Any) -> str:
    return str(getattr(getattr(expr, "ty", None), "dtype", ""))


def module_bindings(mod: Any) -> dict[Any, Any]:
    """Every Relax function's bindings in ``mod``: var -> the value bound to it."""
    return {k: v for func in mod.functions.values() if isinstance(func, relax.Function) for k, v in relax.analysis.get_var2val(func).items()}


def constant_value(expr: Any, values: dict[Any, Any]) -> np.ndarray | None:
    """The value of a constant, through ``values`` (var -> bound value) and reshapes, permutations and
    dequantizes of constants; None for anything computed at run time."""
    if isinstance(expr, relax.Var):
        expr = values.get(expr, expr)
    if isinstance(expr, Constant):
        return expr.value.numpy()
    name = op_name(expr)
    if name == "relax.reshape":
        inner = constant_value(expr.args[0], values)
        shape = static_shape(expr)
        return None if inner is None or shape is None else inner.reshape(shape)
    if name == "relax.dequantize":  # an int8 model's bias: int32 values, their scale and zero point
        q, scale, zero = (constant_value(a, values) for a in expr.args[:3])
        if q is None or scale is None or zero is None:
            return None
        shape = [1] * q.ndim
        if q.ndim and scale.size > 1:
            shape[int(expr.attrs.axis) % q.ndim] = -1
        value = (q.astype(np.float64) - zero.astype(np.float64).reshape(shape)) * scale.astype(np.float64).reshape(shape)
        return value.astype(np.float32)
    if name == "relax.permute_dims":
        inner = constant_value(expr.args[0], values)
        if inner is None:
            return None
        axes = expr.attrs.axes
        return np.transpose(inner, None if axes is None else [int(a) for a in axes])
    return None


class ChainFinder:
    """Chains of one Relax function, found by walking forward from each heavy op."""

    def __init__(self, func: Any) -> None:
        self.var2val = relax.analysis.get_var2val(func)
        self.users: dict[Any, list[Any]] = {}
        self.binding_of: dict[Any, Any] = {}  # call -> the var it is bound to
        self.pinned: set[Any] = set()  # vars visible outside their dataflow block
        for block in func.body.blocks:
            for binding in block.bindings:
                if not isinstance(binding, relax.VarBinding):
                    continue
                self.binding_of[binding.value] = binding.var
                if not isinstance(binding.var, relax.DataflowVar):
                    self.pinned.add(binding.var)
                for used in relax.analysis.free_vars(binding.value):
                    self.users.setdefault(used, []).append(binding.value)
        for used in relax.analysis.free_vars(func.body.body):
            self.pinned.add(used)
            self.users.setdefault(used, []).append(None)  # used by the function's result
        self.bindings = [b for block in func.body.blocks for b in block.bindings if isinstance(b, relax.VarBinding)]
        # Calls already inside a chain: a residual add joining two convolutions belongs to one of them only.
        self.claimed: set[Any] = set()

    def find(self) -> list[Chain]:
        chains: list[Chain] = []
        for binding in self.bindings:
            value = binding.value
            name = op_name(value)
            chain = None
            if name == "relax.nn.conv2d":
                chain = self._conv(value)
                if chain is not None:
                    columns_as_rows(chain)
            elif name == "relax.nn.conv1d":
                chain = self._conv1d(value)
            elif name == "relax.nn.conv2d_transpose":
                chain = self._deconv(value)
            elif name == "relax.matmul":
                chain = self._matmul(value)
            elif name == "relax.nn.softmax":
                chain = self._softmax(value)
            elif name == "relax.nn.layer_norm":
                chain = self._layer_norm(value)
            if chain is not None:
                if chain.scale is not None and chain.residual is None and chain.act in (ACT_NONE, ACT_RELU, ACT_CLIP):
                    self._quantised_output(chain)
                chains.append(chain)
                self.claimed.update(chain.absorbed)
        return chains

    # --- helpers ---------------------------------------------------------------

    def _const(self, expr: Any) -> np.ndarray | None:
        return constant_value(expr, self.var2val)

    def _swish(self, call: Any) -> list[Any]:
        """``[sigmoid(v), v * sigmoid(v)]`` when those two calls are all that use ``call``'s value ``v``; else []."""
        var = self.binding_of.get(call)
        if var is None or var in self.pinned:
            return []
        users = self.users.get(var, [])
        if len(users) != 2 or None in users or any(u in self.claimed for u in users):
            return []
        sig = next((u for u in users if op_name(u) == "relax.sigmoid"), None)
        mul = next((u for u in users if op_name(u) == "relax.multiply"), None)
        after = None if sig is None or mul is None else self._sole_user(sig)
        if after is None or not after.same_as(mul):
            return []
        other = self._other_arg(mul, var)
        return [sig, mul] if other is not None and other.same_as(self.binding_of[sig]) else []

    def _sole_user(self, call: Any) -> Any:
        """The one call that uses ``call``'s value; None when it has several, is pinned or is unbound."""
        var = self.binding_of.get(call)
        if var is None or var in self.pinned:
            return None
        users = self.users.get(var, [])
        if len(users) != 1 or users[0] is None or users[0] in self.claimed:
            return None
        return users[0]

    def _other_arg(self, call: Any, var: Any) -> Any:
        a, b = call.args[0], call.args[1]
        if a.same_as(var) and not b.same_as(var):
            return b
        if b.same_as(var) and not a.same_as(var):
            return a
        return None

    def _scalar(self, expr: Any) -> float | None:
        value = self._const(expr)
        return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None

    # --- conv2d ----------------------------------------------------------------

    def _conv(self, call: Any) -> Chain | None:
        attrs = call.attrs
        layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
        if layouts not in (("NCHW", "OIHW", "NCHW"), ("NHWC", "OHWI", "NHWC")):
            return None
        nhwc = layouts[0] == "NHWC"
        src, out = dtype_of(call.args[0]), dtype_of(call)
        int8 = src in ("uint8", "int8") and out == "int32"
        if not int8 and (src, out) != ("float32", "float32"):
            return None
        weight = self._const(call.args[1])
        x_shape, out_shape = static_shape(call.args[0]), static_shape(call)
        if weight is None or weight.ndim != 4 or x_shape is None or out_shape is None or len(x_shape) != 4:
            return None
        if int8 and weight.dtype != np.int8:
            return None
        if nhwc:
            weight = weight.transpose(0, 3, 1, 2)  # OHWI -> OIHW, the glue's one weight layout
        pad = [int(p) for p in attrs.padding]
        padding = (pad[0], pad[1], pad[0], pad[1]) if len(pad) == 2 else tuple(pad)
        chain = Chain(
            "conv2d", call, call.args[0], out_shape, weight=np.ascontiguousarray(weight, dtype=np.int8 if int8 else np.float32),
            in_shapes=(x_shape,), src_dtype=src,
            conv={"strides": tuple(int(s) for s in attrs.strides), "padding": padding,
                  "dilation": tuple(int(d) for d in attrs.dilation), "groups": int(attrs.groups), "nhwc": int(nhwc)},
        )
        channels = out_shape[3] if nhwc else out_shape[1]
        bias_shapes = ((channels,), (1, 1, 1, channels)) if nhwc else ((channels,), (channels, 1, 1), (1, channels, 1, 1))
        if int8 and not self._requantised(chain, channels, bias_shapes):
            return None
        return self._post_ops(chain, channels, bias_shapes)

    def _conv1d(self, call: Any) -> Chain | None:
        """A 1-D convolution as the 2-D one of height 1 it is: NCW [N, C, W] is the memory of NCHW [N, C, 1, W], NWC of
        NHWC [N, 1, W, C], so the provider reads the graph's tensors as they are (views); ``given_out_shape`` keeps the
        graph's 3-D shape. Audio and text CNNs (Silero VAD's encoder) otherwise ran TVM's untuned conv1d kernels."""
        attrs = call.attrs
        layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
        if layouts not in (("NCW", "OIW", "NCW"), ("NWC", "OWI", "NWC")) or (dtype_of(call.args[0]), dtype_of(call)) != ("float32", "float32"):
            return None
        nwc = layouts[0] == "NWC"
        weight = self._const(call.args[1])
        x_shape, out_shape = static_shape(call.args[0]), static_shape(call)
        if weight is None or weight.ndim != 3 or x_shape is None or out_shape is None or len(x_shape) != 3:
            return None
        if nwc:
            weight = weight.transpose(0, 2, 1)  # OWI -> OIW
        o, i, k = weight.shape
        lift = (lambda s: (s[0], 1, s[1], s[2])) if nwc else (lambda s: (s[0], s[1], 1, s[2]))
        left, right = (int(p) for p in attrs.padding)
        chain = Chain(
            "conv2d", call, call.args[0], lift(out_shape), weight=np.ascontiguousarray(weight.reshape(o, i, 1, k), dtype=np.float32),
            in_shapes=(lift(x_shape),), given_out_shape=out_shape,
            conv={"strides": (1, int(attrs.strides[0])), "padding": (0, left, 0, right), "dilation": (1, int(attrs.dilation[0])),
                  "groups": int(attrs.groups), "nhwc": int(nwc)},
        )
        bias_shapes = ((o,), (1, 1, o)) if nwc else ((o,), (o, 1), (1, o, 1))
        return self._post_ops(chain, o, bias_shapes)

    def _deconv(self, call: Any) -> Chain | None:
        """ConvTranspose (NCHW, IOHW weights, one group: as select.NHWC_LAYOUTS leaves it), float32."""
        attrs = call.attrs
        if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != ("NCHW", "IOHW", "NCHW") or int(attrs.groups) != 1:
            return None
        if dtype_of(call.args[0]) != "float32" or dtype_of(call) != "float32":
            return None
        weight = self._const(call.args[1])
        x_shape, out_shape = static_shape(call.args[0]), static_shape(call)
        if weight is None or weight.ndim != 4 or x_shape is None or out_shape is None or len(x_shape) != 4:
            return None
        pad = [int(p) for p in attrs.padding]
        padding = (pad[0], pad[1], pad[0], pad[1]) if len(pad) == 2 else tuple(pad)
        chain = Chain("conv2d_transpose", call, call.args[0], out_shape, weight=np.ascontiguousarray(weight, dtype=np.float32),
                      in_shapes=(x_shape,),
                      conv={"strides": tuple(int(v) for v in attrs.strides), "padding": padding,
                            "dilation": tuple(int(d) for d in attrs.dilation), "groups": 1, "nhwc": 0})
        channels = out_shape[1]
        return self._post_ops(chain, channels, ((channels,), (channels, 1, 1), (1, channels, 1, 1)), residual=False)

    def _post_ops(self, chain: Chain, channels: int, bias_shapes: tuple[tuple[int, ...], ...], residual: bool = True) -> Chain:
        """Absorb the bias, residual add and activation after a convolution."""
        out_shape = chain.given_out_shape or chain.out_shape  # the graph's shape, which a residual has
        while True:
            user = self._sole_user(chain.end)
            if user is None and chain.act == ACT_NONE:
                swish = self._swish(chain.end)
                if swish:  # x * sigmoid(x): SiLU, the activation of YOLOv5/v8 and EfficientNet
                    chain.act, chain.end = ACT_SWISH, swish[-1]
                    chain.absorbed.extend(swish)
            if user is None or chain.act != ACT_NONE:
                return chain
            var = self.binding_of[chain.end]
            name = op_name(user)
            if name == "relax.add":
                other = self._other_arg(user, var)
                if other is None:
                    return chain
                const = self._const(other)
                if const is not None and chain.bias is None and chain.residual is None and const.size == channels \
                        and const.shape in bias_shapes:
                    chain.bias = const.reshape(channels).astype(np.float32)
                elif residual and const is None and chain.residual is None and static_shape(other) == out_shape \
                        and dtype_of(other) == "float32":
                    chain.residual = other
                else:
                    return chain
            else:
                steps = self._activation(chain, user)
                if not steps:
                    return chain
                chain.end = steps[-1]
                chain.absorbed.extend(steps)
                continue
            chain.end = user
            chain.absorbed.append(user)

    def _quantised_output(self, chain: Chain) -> None:
        """Absorb the per-tensor quantize after an int8 chain, as layout_ops writes it:
        ``astype(maximum(minimum(round(y / s) + z, hi), lo), uint8|int8)`` with (lo, hi) the type's range.

        The provider then writes the 8-bit tensor the next layer reads, instead of a float one that a kernel of
        its own reads again to quantise (two passes over the map, four bytes an element written and read)."""
        steps = []
        user = self._sole_user(chain.end)
        if op_name(user) == "relax.quantize" and user.args[0].same_as(self.binding_of[chain.end]):
            # as the frontend writes it (a model without convolutions never goes through layout_ops)
            _absorb_quantize(chain, [user], str(user.attrs.out_dtype), self._scalar(user.args[1]), self._scalar(user.args[2]))
            return
        if op_name(user) != "relax.divide" or not user.args[0].same_as(self.binding_of[chain.end]):
            return
        scale = self._scalar(user.args[1])
        steps.append(user)
        user = self._sole_user(user)
        if op_name(user) != "relax.round":
            return
        steps.append(user)
        bounds = []
        for name in ("relax.add", "relax.minimum", "relax.maximum"):
            user = self._sole_user(steps[-1])
            if op_name(user) != name:
                return
            bounds.append(self._scalar(self._other_arg(user, self.binding_of[steps[-1]])))
            steps.append(user)
        user = self._sole_user(steps[-1])
        if op_name(user) != "relax.astype" or str(user.attrs.dtype) not in ("uint8", "int8"):
            return
        zero, hi, lo = bounds
        info = np.iinfo(str(user.attrs.dtype))
        if zero is None or zero != round(zero) or not info.min <= zero <= info.max or (lo, hi) != (float(info.min), float(info.max)):
            return
        _absorb_quantize(chain, [*steps, user], str(user.attrs.dtype), scale, zero)

    def _requantised(self, chain: Chain, channels: int, shapes: tuple[tuple[int, ...], ...]) -> bool:
        """Absorb ``astype(acc - comp, float32) · scale`` after an int32 accumulator; False when it is not there."""
        steps = []
        user = self._sole_user(chain.end)
        if op_name(user) == "relax.subtract" and user.args[0].same_as(self.binding_of[chain.end]):
            comp = self._const(user.args[1])
            if comp is None or comp.dtype != np.int32 or comp.size != channels or comp.shape not in shapes:
                return False
            chain.comp = comp.reshape(channels)
            steps.append(user)
            user = self._sole_user(user)
        if op_name(user) != "relax.astype" or str(user.attrs.dtype) != "float32":
            return False
        steps.append(user)
        user = self._sole_user(user)
        if op_name(user) != "relax.multiply":
            return False
        scale = self._const(self._other_arg(user, self.binding_of[steps[-1]]))
        if scale is None or scale.size not in (1, channels) or (scale.size > 1 and scale.shape not in shapes):
            return False
        scale = np.broadcast_to(scale.astype(np.float32).reshape(-1), (channels,)).copy()
        if not np.all(np.isfinite(scale)) or np.any(scale == 0):
            return False  # the glue folds the bias as bias / scale
        chain.scale = scale
        steps.append(user)
        chain.end = user
        chain.absorbed.extend(steps)
        return True

    def _activation(self, chain: Chain, user: Any) -> list[Any]:
        """The calls of the activation starting at ``user`` (set on ``chain``); [] when there is none."""
        name = op_name(user)
        if name == "relax.nn.relu":
            chain.act = ACT_RELU
        elif name == "relax.sigmoid":
            chain.act = ACT_SIGMOID
        elif name == "relax.clip":
            lo, hi = (prim_number(a) for a in user.args[1:3])
            if lo is None or hi is None:
                return []
            chain.act, chain.clip = ACT_CLIP, (lo, hi)
        elif name == "relax.maximum":  # a clip as layout_ops writes it: maximum(x, lo) then minimum(., hi)
            lo = self._scalar_bound(user)
            after = self._sole_user(user)
            hi = self._scalar_bound(after) if op_name(after) == "relax.minimum" and after.args[0].same_as(self.binding_of[user]) else None
            if lo is None or hi is None or not lo <= hi:
                return []
            chain.act, chain.clip = ACT_CLIP, (lo, hi)
            return [user, after]
        else:
            return []
        return [user]

    def _scalar_bound(self, call: Any) -> float | None:
        """``b`` of ``op(x, b)`` when ``b`` is a finite scalar constant."""
        const = self._const(call.args[1])
        if const is None or const.size != 1 or not np.isfinite(const).all():
            return None
        return float(const.reshape(()))

    # --- matmul ----------------------------------------------------------------

    def _matmul(self, call: Any) -> Chain | None:
        x, y = call.args
        int8 = dtype_of(x) in ("uint8", "int8") and dtype_of(call) == "int32"
        if not int8 and (dtype_of(call) != "float32" or dtype_of(x) != "float32" or dtype_of(y) != "float32"):
            return None
        x_shape, y_shape, out_shape = static_shape(x), static_shape(y), static_shape(call)
        if x_shape is None or y_shape is None or out_shape is None or len(x_shape) < 2:
            return None
        weight = self._const(y)
        if int8 and (weight is None or weight.dtype != np.int8):
            return None
        if weight is None:
            if self._const(x) is not None or len(x_shape) < 3 or len(y_shape) != len(x_shape) or x_shape[:-2] != y_shape[:-2]:
                return None
            return Chain("batch_matmul", call, x, out_shape, other=y, in_shapes=(x_shape, y_shape))
        if weight.ndim != 2:
            return None
        chain = Chain("matmul", call, x, out_shape, weight=np.ascontiguousarray(weight, dtype=np.int8 if int8 else np.float32),
                      in_shapes=(x_shape,), src_dtype=dtype_of(x))
        n = weight.shape[1]
        if int8 and not self._requantised(chain, n, ((n,), (1, n), (1, 1, n))):
            return None
        call = chain.end
        user = self._sole_user(call)
        if user is not None and op_name(user) == "relax.add":
            other = self._other_arg(user, self.binding_of[call])
            const = None if other is None else self._const(other)
            if const is not None and const.size == n and const.shape[-1:] == (n,):
                chain.bias, chain.end = const.reshape(n).astype(np.float32), user
                chain.absorbed.append(user)
        gelu_end = self._gelu(chain.end)
        if gelu_end is not None:
            chain.act, chain.end = ACT_GELU_ERF, gelu_end
            chain.absorbed.append(gelu_end)
        else:
            user = self._sole_user(chain.end)
            steps = self._activation(chain, user) if user is not None else []
            if steps and chain.act != ACT_CLIP:
                chain.end = steps[-1]
                chain.absorbed.extend(steps)
            else:
                chain.act = ACT_NONE
        return chain

    # --- normalisations ---------------------------------------------------------

    def _softmax(self, call: Any) -> Chain | None:
        shape = static_shape(call)
        if shape is None or not shape or dtype_of(call) != "float32" or dtype_of(call.args[0]) != "float32" or len(shape) > 6:
            return None
        axis = int(call.attrs.axis) % len(shape)
        return Chain("softmax", call, call.args[0], shape, in_shapes=(shape,), axis=axis)

    def _layer_norm(self, call: Any) -> Chain | None:
        """Over the last axis, with constant scale and shift: what oneDNN's layer normalisation computes."""
        shape = static_shape(call)
        attrs = call.attrs
        if shape is None or not shape or len(shape) > 6 or dtype_of(call) != "float32" or dtype_of(call.args[0]) != "float32":
            return None
        axes = [int(a) % len(shape) for a in attrs.axes]
        if axes != [len(shape) - 1] or not bool(attrs.center) or not bool(attrs.scale):
            return None
        gamma, beta = self._const(call.args[1]), self._const(call.args[2])
        if gamma is None or beta is None or gamma.size != shape[-1] or beta.size != shape[-1]:
            return None
        return Chain("layer_norm", call, call.args[0], shape, weight=np.ascontiguousarray(gamma.reshape(-1), dtype=np.float32),
                     bias=np.ascontiguousarray(beta.reshape(-1), dtype=np.float32), in_shapes=(shape,), eps=float(attrs.epsilon))

    def _gelu(self, call: Any) -> Any:
        """The end of ``0.5·h·(1 + erf(h/√2))`` over ``call``'s value ``h``, in the orders exporters write it; else None."""
        var = self.binding_of.get(call)
        if var is None or var in self.pinned:
            return None
        users = self.users.get(var, [])
        if len(users) != 2 or None in users:
            return None
        scaled = next((u for u in users if self._is_inv_sqrt2(u, var)), None)
        if scaled is None:
            return None
        erf = self._sole_user(scaled)
        if op_name(erf) != "relax.erf":
            return None
        one_plus = self._sole_user(erf)
        if op_name(one_plus) != "relax.add" or self._scalar(self._other_arg(one_plus, self.binding_of[erf])) != 1.0:
            return None
        other = next(u for u in users if not u.same_as(scaled))
        if op_name(other) != "relax.multiply":
            return None
        partner = self._other_arg(other, var)
        if partner is not None and partner.same_as(self.binding_of[one_plus]):
            if not same(self._sole_user(one_plus), other):
                return None
            end = self._sole_user(other)  # h·(1+erf) then ×0.5
            half = self._scalar(self._other_arg(end, self.binding_of[other])) if op_name(end) == "relax.multiply" else None
            return end if half == 0.5 else None
        if self._scalar(partner) == 0.5:  # 0.5·h then ×(1+erf)
            end = self._sole_user(other)
            partner = self._other_arg(end, self.binding_of[other]) if op_name(end) == "relax.multiply" else None
            if partner is not None and partner.same_as(self.binding_of[one_plus]) and same(self._sole_user(one_plus), end):
                return end
        return None

    def _is_inv_sqrt2(self, user: Any, var: Any) -> bool:
        name = op_name(user)
        if name not in ("relax.divide", "relax.multiply") or not user.args[0].same_as(var):
            return False
        value = self._scalar(user.args[1])
        if value is None:
            return False
        target = np.sqrt(2.0) if name == "relax.divide" else 1 / np.sqrt(2.0)
        return abs(value - target) < 1e-4
