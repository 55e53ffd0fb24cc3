"""Linear layers (Conv, ConvTranspose, Gemm, MatMul with a constant weight) as matrices.

Every compression pass here works on the same view of a layer: a weight matrix
``M`` of shape ``(out, in)`` such that, for each group ``g``, the layer output
row is ``y = M_g @ x`` where ``x`` is one row of the layer input unfolded by
:func:`input_rows` (im2col for convolutions, in the same order as
``W.reshape(out, -1)``). The Gram matrix ``H = sum x x^T`` over calibration
rows is the Hessian of the layer-wise reconstruction loss ``||W X - W' X||^2``
that OBS/SparseGPT, GPTQ, least-squares refits and activation-aware SVD use.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from optc.ir.graph import consumers_by_tensor
from optc.ir.model import Model
from optc.ir.stats import shape_map
from optc.ir.view import attributes, graph_nodes, initializers

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Integer kernels of an already quantized model (onnxruntime's dynamic and static quantization): no float weight to compress.
QUANTIZED_OPS = frozenset({"ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul",
                           "QGemm", "QAttention", "MatMulIntegerToFloat"})


@dataclass(frozen=True)
class LinearLayer:
    """One linear node with a constant weight, and what is needed to unfold its input."""

    node: str
    op: str
    input: str
    output: str
    weight: str
    bias: str | None
    weight_shape: tuple[int, ...]
    group: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # begin..., end...
    dilations: tuple[int, ...] = ()
    trans_a: bool = False
    trans_b: bool = False

    @property
    def out_features(self) -> int:
        if self.op == "Conv":
            return self.weight_shape[0]
        if self.op == "ConvTranspose":
            return self.weight_shape[1] * self.group
        if self.op == "Gemm":
            return self.weight_shape[0] if self.trans_b else self.weight_shape[1]
        return self.weight_shape[-1]

    @property
    def in_features(self) -> int:
        """Columns of the weight matrix (per group for convolutions)."""
        if self.op == "Conv":
            return int(np.prod(self.weight_shape[1:]))
        if self.op == "ConvTranspose":
            return self.weight_shape[0] // self.group
        if self.op == "Gemm":
            return self.weight_shape[1] if self.trans_b else self.weight_shape[0]
        return self.weight_shape[-2]


def find_linear_layers(model: Model, exclude: Sequence[str] = ()) -> tuple[list[LinearLayer], list[str]]:
    """Linear layers of the main graph, and ``"node: reason"`` for those left out.

    ``exclude`` holds node names or op types. ConvTranspose is reported (its
    input unfolding is not implemented here) and left out.
    """
    inits = initializers(model)
    shapes = shape_map(model)
    layers: list[LinearLayer] = []
    skipped: list[str] = []
    readers = consumers_by_tensor(model)
    for node in graph_nodes(model):
        if node.op_type not in LINEAR_OPS or node.domain not in ("", "ai.onnx"):
            continue
        if node.name in exclude or node.op_type in exclude:
            skipped.append(f"{node.name}: excluded")
            continue
        if len(node.input) < 2 or node.input[1] not in inits:
            skipped.append(f"{node.name}: weight is not a constant")
            continue
        shared = len(readers.get(node.input[1], ()))
        if shared > 1:
            # A CQT's kernels reused by 30 convs, a tied embedding: each node's rewrite writes its own copy,
            # so compressing a shared weight node by node stores it many times over (142 KiB -> 391 KiB measured).
            skipped.append(f"{node.name}: weight '{node.input[1]}' is shared by {shared} nodes "
                           f"(compressing it node by node would store {shared} copies)")
            continue
        w = inits.spec(node.input[1])
        if w.dtype.kind != "f":
            skipped.append(f"{node.name}: weight is not floating point")
            continue
        attrs = attributes(node)
        wshape = w.shape
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if node.op_type == "ConvTranspose":
            skipped.append(f"{node.name}: ConvTranspose is not supported by layer-wise fitting yet")
            continue
        if node.op_type == "Conv":
            kernel = wshape[2:]
            nd = len(kernel)
            if nd not in (1, 2):
                in_shape = shapes.get(node.input[0])
                if nd == 3 and kernel[0] == 1 and in_shape is not None and len(in_shape) == 5 and in_shape[2] == 1:
                    skipped.append(f"{node.name}: a 3-D convolution over a depth of 1: run conv3d-to-2d (in canonicalize) "
                                   "before this pass to make it a 2-D one")
                else:
                    skipped.append(f"{node.name}: only 1-D and 2-D convolutions are supported")
                continue
            pads = _conv_pads(node, attrs, shapes.get(node.input[0]), kernel)
            if pads is None:
                skipped.append(f"{node.name}: auto_pad SAME needs a static input shape")
                continue
            layers.append(LinearLayer(
                node.name, node.op_type, node.input[0], node.output[0], node.input[1], bias, wshape,
                group=int(attrs.get("group", 1)),
                kernel=tuple(kernel),
                strides=tuple(attrs.get("strides", (1,) * nd)),
                pads=pads,
                dilations=tuple(attrs.get("dilations", (1,) * nd)),
            ))
        elif node.op_type == "Gemm":
            layers.append(LinearLayer(
                node.name, "Gemm", node.input[0], node.output[0], node.input[1], bias, wshape,
                trans_a=bool(attrs.get("transA", 0)),
                trans_b=bool(attrs.get("transB", 0)),
            ))
        else:
            if len(wshape) != 2:
                skipped.append(f"{node.name}: batched MatMul weight of rank {len(wshape)}")
                continue
            layers.append(LinearLayer(node.name, "MatMul", node.input[0], node.output[0], node.input[1], None, wshape))
    if not layers and not skipped:  # the pass changes nothing: say why (ddddocr's common_old.onnx is already int8)
        quantized = Counter(n.op_type for n in graph_nodes(model) if n.op_type in QUANTIZED_OPS)
        if quantized:
            found = ", ".join(f"{op} x{count}" for op, count in sorted(quantized.items()))
            skipped.append(f"no float {'/'.join(LINEAR_OPS)} layer: the model is already quantized ({found})")
        else:
            skipped.append(f"no {'/'.join(LINEAR_OPS)} layer with a constant weight in the main graph")
    return layers, skipped


def _conv_pads(node, attrs, in_shape, kernel) -> tuple[int, ...] | None:
    nd = len(kernel)
    auto = attrs["auto_pad"].decode() if "auto_pad" in attrs else "NOTSET"
    if auto in ("NOTSET", ""):
        return tuple(attrs.get("pads", (0,) * (2 * nd)))
    if auto == "VALID":
        return (0,) * (2 * nd)
    if in_shape is None or not all(isinstance(d, int) for d in in_shape[2:]):
        return None
    strides = tuple(attrs.get("strides", (1,) * nd))
    dil = tuple(attrs.get("dilations", (1,) * nd))
    begin, end = [], []
    for size, k, s, d in zip(in_shape[2:], kernel, strides, dil):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else big)
        end.append(big if auto == "SAME_UPPER" else small)
    return tuple(begin + end)


def weight_matrix(layer: LinearLayer, w: np.ndarray) -> np.ndarray:
    """``(out, in)`` view of a weight: rows are output channels/features."""
    if layer.op == "Conv":
        return w.reshape(w.shape[0], -1)
    if layer.op == "Gemm":
        return w if layer.trans_b else w.T
    return w.T  # MatMul: x @ W with W (in, out)


def matrix_to_weight(layer: LinearLayer, m: np.ndarray) -> np.ndarray:
    """Inverse of :func:`weight_matrix` (same layout and shape as the original weight)."""
    if layer.op == "Conv":
        return np.ascontiguousarray(m.reshape(layer.weight_shape))
    if layer.op == "Gemm":
        return np.ascontiguousarray(m if layer.trans_b else m.T)
    return np.ascontiguousarray(m.T)


def row_count(layer: LinearLayer, shape: Sequence[int]) -> int:
    """How many rows :func:`input_rows` unfolds from an input of ``shape``, without unfolding it."""
    if layer.op in ("Gemm", "MatMul"):
        return int(np.prod(shape[:-1])) if not (layer.op == "Gemm" and layer.trans_a) else int(shape[-1])
    return int(shape[0]) * int(np.prod(_output_size(layer, shape)))


def _unfold_params(layer: LinearLayer) -> tuple[tuple[int, ...], ...]:
    """Kernel, strides, dilations and (top, left, bottom, right) pads, a 1-D convolution as a 2-D one of height 1."""
    if len(layer.kernel) == 1:
        return (1, *layer.kernel), (1, *layer.strides), (1, *layer.dilations), (0, layer.pads[0], 0, layer.pads[1])
    return tuple(layer.kernel), tuple(layer.strides), tuple(layer.dilations), tuple(layer.pads)


def _output_size(layer: LinearLayer, shape: Sequence[int]) -> tuple[int, int]:
    kernel, strides, dil, pads = _unfold_params(layer)
    spatial = (1, shape[2]) if len(layer.kernel) == 1 else (shape[2], shape[3])
    return tuple(  # type: ignore[return-value]
        (size + pads[i] + pads[i + 2] - ((k - 1) * d + 1)) // s + 1
        for i, (size, k, s, d) in enumerate(zip(spatial, kernel, strides, dil))
    )


def input_row_sums(layer: LinearLayer, x: np.ndarray) -> tuple[np.ndarray, int]:
    """The sum of :func:`input_rows` over its rows, ``(groups, in_features)``, and how many rows, without unfolding
    them: for a convolution, one strided slice of the padded input per kernel position. DNSMOS's first
    convolution unfolded 16 clips into 14.9 GiB of rows to take their mean (quantize was killed at 20.9 GB)."""
    if layer.op in ("Gemm", "MatMul"):
        rows = input_rows(layer, x)
        return rows.sum(axis=1), rows.shape[1]
    kernel, strides, dil, pads = _unfold_params(layer)
    ho, wo = _output_size(layer, x.shape)
    if len(layer.kernel) == 1:
        x = x[:, :, None, :]
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3]))) if any(pads) else x
    n, c = x.shape[:2]
    sums = np.empty((c, kernel[0], kernel[1]))
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            top, left = i * dil[0], j * dil[1]
            window = xp[:, :, top : top + strides[0] * (ho - 1) + 1 : strides[0], left : left + strides[1] * (wo - 1) + 1 : strides[1]]
            sums[:, i, j] = window.sum(axis=(0, 2, 3), dtype=np.float64)
    g = layer.group
    return sums.reshape(g, (c // g) * kernel[0] * kernel[1]), n * ho * wo


def input_rows(layer: LinearLayer, x: np.ndarray, select: np.ndarray | None = None) -> np.ndarray:
    """Unfold a batch of layer inputs into rows: ``(groups, rows, in_features)``.

    For a convolution each row is one receptive field (im2col), ordered like
    ``W.reshape(out, -1)`` columns: input channel, then kernel positions.
    ``select``: indices of the rows wanted (of :func:`row_count`), in that order; only
    those are unfolded. A Gram subsamples a few thousand of a feature map's hundreds of
    thousands of rows, and unfolding them all first cost more than the products
    (RapidOCR's detector: 9 of 82 s of prune-channels in the reshape of the full im2col).
    """
    if layer.op in ("Gemm", "MatMul"):
        if layer.op == "Gemm" and layer.trans_a:
            x = x.T
        rows = x.reshape(1, -1, x.shape[-1])
        return rows if select is None else rows[:, select]
    kernel, strides, dil, pads = _unfold_params(layer)
    if len(layer.kernel) == 1:
        x = x[:, :, None, :]
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3]))) if any(pads) else x
    g = layer.group
    if select is not None:
        ho, wo = _output_size(layer, x.shape if len(layer.kernel) == 2 else (*x.shape[:2], x.shape[3]))
        sample, pos = np.divmod(np.asarray(select, dtype=np.int64), ho * wo)
        top = (pos // wo) * strides[0]
        left = (pos % wo) * strides[1]
        hh = top[:, None, None] + (np.arange(kernel[0]) * dil[0])[None, :, None]
        ww = left[:, None, None] + (np.arange(kernel[1]) * dil[1])[None, None, :]
        win = xp[sample[:, None, None], :, hh, ww]  # (rows, kh, kw, c): the advanced axes first
        r, kh, kw, c = win.shape
        return win.reshape(r, kh, kw, g, c // g).transpose(3, 0, 4, 1, 2).reshape(g, r, (c // g) * kh * kw)
    span = tuple((k - 1) * d + 1 for k, d in zip(kernel, dil))
    win = sliding_window_view(xp, span, axis=(2, 3))[:, :, :: strides[0], :: strides[1], :: dil[0], :: dil[1]]
    n, c, ho, wo, kh, kw = win.shape
    rows = win.reshape(n, g, c // g, ho, wo, kh, kw).transpose(1, 0, 3, 4, 2, 5, 6)
    return rows.reshape(g, n * ho * wo, (c // g) * kh * kw)
