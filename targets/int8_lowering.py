"""Lower the int8 QDQ regions of a Relax module to integer kernels.

TVM's ONNX frontend imports ``DequantizeLinear`` as ``R.dequantize`` and the
Conv/MatMul/Gemm after it as a float ``R.nn.conv2d``/``R.matmul``: an int8 QDQ
model compiles, but computes in float. This module rewrites, after import, every

    conv2d(dequantize(x_q, s_x, z_x), dequantize(W_q, s_w[o], 0, axis=o))
    matmul(dequantize(x_q, s_x, z_x), dequantize(W_q, s_w[n], 0, axis=n))   (also W_q^T via permute_dims, Gemm transB=1)

into an integer kernel with int32 accumulation and a float epilogue. With
per-tensor activation parameters and symmetric per-output-channel weights,

    y[o] = sum_k (x_q[k] - z_x) s_x * W_q[o,k] s_w[o]
         = s_x s_w[o] * (sum_k x_q[k] W_q[o,k]  -  z_x sum_k W_q[o,k])

so ``acc = conv2d(x_q, W_q, out_dtype=int32)`` (uint8/int8 x int8) minus the
per-channel constant ``z_x * sum_k W_q[o,k]`` is the exact integer sum, and one
multiply by ``s_x s_w[o]`` turns it back into the float the rest of the graph
(bias add, ReLU, residual adds) expects. Zero padding in float is the value
``z_x`` in the quantised domain, so a padded conv with ``z_x != 0`` pads ``x_q``
explicitly with ``z_x`` first (``nn.pad``) and runs the integer conv unpadded;
the correction then holds at the borders too.

Requantisation: the next layer's ``QuantizeLinear`` stays a ``R.quantize`` on
that float epilogue, and the next integer conv reads its uint8/int8 output
directly (its ``dequantize`` is bypassed), so between quantised layers the
tensors are 8-bit; FuseOps puts scale, bias, ReLU and quantize into the integer
kernel's epilogue. Where a region ends (a float consumer), the epilogue is the
dequantisation to float.

The result equals onnxruntime's float evaluation of the QDQ graph up to float32
rounding of the sum (ours is exact before the scale); an intermediate value that
lands within rounding of a ``.5`` boundary can quantise one step apart.

A convolution with fewer than 4 input channels (an image model's first) computes in float32 on
the 8-bit input instead, ``conv2d(x_q - z_x, W_q s_x s_w)``: int8 dot products multiply channels in
groups of 4 and would mostly multiply padding, and the float kernels serve such a shape better. Its
products are those onnxruntime's QDQ evaluation forms; the report says ``computes`` for it.

Dot-product instructions take one activation type: Armv8.2's ``sdot`` multiplies
int8 by int8, x86's VNNI ``vpdpbusd`` uint8 by int8. For such targets an activation
of the other type enters the integer kernel shifted by 128 (uint8 ``x_q`` as the int8
``x_q - 128`` with zero point ``z_x - 128``, or the reverse): ``x_q - z_x`` is
unchanged, so the sum, the correction and the output are exactly those of the
unshifted kernel.

x86 CPUs without VNNI (AVX2 ones such as Zen 3) multiply 8 bits with ``vpmaddubsw``, which adds each pair of
products into int16 with saturation: oneDNN and onnxruntime do so there, and optc's kernels too, where every weight
lies within +-64 (255 x 128 fits int16). For such targets (``weight_max``) a convolution or matmul with larger
weights stays float: oneDNN's int8 convolution, held to AVX2, returned 471.8 for an exact 932.7 on a 3x3 layer of
weights +-127 fed 255s. A depthwise one is exempt: one input channel a group, no pairs (oneDNN's was exact).
The quantize pass writes 7-bit weights for these CPUs by default (``reduce_range``), which stay int8.

Regions that do not fit (per-tensor activation scale and zero point, constant
int8 weight with zero weight zero point and scales along the output channel,
NCHW/OIHW layouts, an int32 sum that cannot overflow) stay in float and are
reported with the reason.

This module holds the plain-data side (reports, weight digests) and imports
TVM only through :mod:`optc.targets.int8_relax`, which holds the Relax mutator
and is imported when a build lowers int8.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from optc.errors import TargetError, first_line
from optc.ir.model import Model

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Region:
    """One quantised conv2d/matmul of the Relax module and what became of it."""

    op: str  # "conv2d" or "matmul"
    name: str  # the ONNX node (found through its weight), else a description
    lowered: bool
    reason: str = ""  # why it stayed float
    computes: str = "int8"  # how a lowered region computes: int8 kernels, or float32 on the 8-bit input

    def to_dict(self) -> dict[str, Any]:
        out = {"op": self.op, "node": self.name}
        if not self.lowered:
            out["reason"] = self.reason
        elif self.computes != "int8":
            out["computes"] = self.computes
        return out


@dataclass
class Int8Report:
    regions: list[Region] = field(default_factory=list)
    float_ops: int = 0  # conv2d/matmul with no dequantized input at all (never quantised)

    @property
    def lowered(self) -> list[Region]:
        return [r for r in self.regions if r.lowered]

    @property
    def left_float(self) -> list[Region]:
        return [r for r in self.regions if not r.lowered]

    def to_dict(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "lowered": len(self.lowered),
            "lowered_regions": [r.to_dict() for r in self.lowered],
            "left_float": [r.to_dict() for r in self.left_float],
            "unquantized_ops": self.float_ops,
        }


def weight_digest(q: np.ndarray) -> str:
    return hashlib.sha1(str(q.shape).encode() + np.ascontiguousarray(q).tobytes()).hexdigest()


def weight_owners(model: Model) -> dict[str, str]:
    """Digest of each int8 weight initializer behind a DequantizeLinear -> the Conv/Gemm/MatMul reading it.

    The Relax module keeps the weight bytes unchanged, so the report can name
    ONNX nodes instead of Relax variables.
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    owners: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = model.initializer_array(dq.input[0])
        if q is None or q.dtype != np.int8:
            continue
        key = weight_digest(q)
        owners[key] = f"{owners[key]}+{node.name}" if key in owners else node.name or node.op_type
    return owners


def lower_int8(mod: Any, owners: Mapping[str, str] | None = None, *, activations: str | None = None,
               weight_max: int | None = None) -> tuple[Any, Int8Report]:
    """Rewrite every lowerable int8 region of ``mod`` (a Relax IRModule from the ONNX frontend).

    ``activations``: the 8-bit type the target's dot product multiplies by int8 weights (int8 for Armv8.2's ``sdot``,
    uint8 for x86's ``vpdpbusd``); activations of the other type enter the integer kernels shifted by 128.
    ``weight_max``: the largest |weight| the target's int8 kernels multiply exactly in pairs (64 on x86 without
    VNNI); regions with larger weights, depthwise ones aside, stay float.

    Returns the new module (dead float weight dequantisations removed) and a
    report of the regions lowered and those left in float, with reasons.
    """
    from optc.targets import int8_relax  # imports TVM

    try:
        new_mod, report = int8_relax.lower(mod, owners or {}, activations, weight_max)
    except Exception as exc:  # TVM raises many kinds; the float module still compiles
        first = first_line(exc)
        raise TargetError(f"int8 lowering failed ({type(exc).__name__}: {first}); compile with --no-int8-lowering to keep QDQ in float") from exc
    logger.info("int8 lowering: %d regions lowered, %d left in float", len(report.lowered), len(report.left_float))
    return new_mod, report
