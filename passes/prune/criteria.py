"""Which channels of a group to remove: importance criteria and the ThiNet greedy choice.

Notation: a group's channel ``j`` is read by consumer ``k`` through the weight
columns ``C_k(j)`` (a block per channel: kernel positions for a Conv, the
flattened spatial positions after a Flatten). With the consumer's input Gram
``G`` (per row, from calibration) and weight matrix ``W``, removing a set ``R``
of channels without refit changes that consumer's output by

    E(R) = sum_{i,j in cols(R)} (W^T W)_{ij} G_{ij}  =  sum_{a,b in R} M_ab,

where ``M_ab`` sums ``(W^T W) * G`` over the block ``C(a) x C(b)`` (and over
consumers, each normalised by its output energy ``tr(W G W^T)``). ``M``
gives the reconstruction-aware criterion (``thinet``: grow ``R`` greedily by
the channel that raises ``E`` least, He et al. / Luo et al. 2017) and the
``activation`` criterion (RMS input at the consumers, ``diag G``).
Weight criteria (``l1``, ``l2``) use the sources' output rows, each source's
norms divided by their mean so that members of a residual group weigh alike;
``bn`` uses ``|gamma|`` of the group's BatchNorms.
"""
from __future__ import annotations

import numpy as np

from optc.ir.model import Model
from optc.ir.view import NodeProto, attribute
from optc.passes.layers import InputGram, LinearLayer, weight_matrix
from optc.passes.numerics.grams import output_energy
from optc.passes.prune.groups import ChannelGraph, ChannelGroup, Layout, position_order

NEEDS_GRAMS = frozenset({"activation", "thinet", "forward"})


def channel_columns(graph: ChannelGraph, layout: Layout, group: int, unit: int) -> list[np.ndarray]:
    """Per segment of ``group`` in ``layout``, the consumer's columns of each of its channels, in channel order
    (``width = block * unit`` columns per channel); ``unit`` = columns per feature."""
    out = []
    offset = 0
    for seg in layout:
        if graph.space_group[seg.space] == group:
            width = seg.block * unit
            position = np.argsort(position_order(seg.length, seg.shuffle))  # of each channel
            out.append(offset * unit + (position[:, None] * width + np.arange(width)[None]).ravel())
        offset += seg.length * seg.block
    return out


def feature_unit(layer: LinearLayer) -> int:
    """Weight columns per input feature: kernel positions for a Conv, else 1."""
    return int(np.prod(layer.kernel)) if layer.op == "Conv" else 1


def weight_scores(model: Model, nodes: dict[str, NodeProto], group: ChannelGroup, graph: ChannelGraph, criterion: str) -> tuple[np.ndarray, str]:
    """Per-channel importance from weights; returns the scores and the criterion actually used."""
    if criterion == "bn":
        gammas = [model.initializer_array(nodes[p.node].input[1]) for p in graph.params
                  if p.input_index == 1 and nodes[p.node].op_type == "BatchNormalization"
                  and len(p.layout) == 1 and graph.space_group[p.layout[0].space] == group.id]
        if gammas:
            return sum(np.abs(g.astype(np.float64)) / max(np.abs(g).mean(), 1e-12) for g in gammas), "bn"
        criterion = "l2"  # a group without BatchNorm: fall back to the weights (reported)
    total = np.zeros(group.size)
    order = 1 if criterion == "l1" else 2
    for source in group.sources:
        node = nodes[source.node]
        w = model.initializer_array(node.input[1]).astype(np.float64)
        rows = _output_rows(node, w)
        norms = np.linalg.norm(rows, ord=order, axis=1)
        total += norms / max(norms.mean(), 1e-12)
    return total, criterion


def _consumer_views(graph: ChannelGraph, consumer, group: int, layers: dict[str, LinearLayer], grams: dict[str, InputGram],
                    weights: dict[str, np.ndarray]) -> list[tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]]:
    """Per group of the consumer's Conv (one for any other layer): the columns of ``group``'s channels (per
    segment, see :func:`channel_columns`), its weight rows, its input second moment, and those channels."""
    if not any(graph.space_group[seg.space] == group for seg in consumer.layout):
        return []  # before anything is computed: called for every (group, consumer) pair
    layer = layers[consumer.node]
    unit = feature_unit(layer)
    w = weight_matrix(layer, weights[consumer.node])
    gram = grams[consumer.node]
    samples = max(gram.rows, 1)
    if consumer.group == 1:
        columns = channel_columns(graph, consumer.layout, group, unit)
        return [(columns, w, gram.gram[0] / samples, np.arange(graph.groups[group].size))]
    (seg,) = consumer.layout
    moments = gram.gram / samples
    # Group h reads positions [h per, (h+1) per): their channels (a shuffle interleaves them), in position order.
    rows, per = w.shape[0] // consumer.group, seg.length // consumer.group
    order = position_order(seg.length, seg.shuffle)
    local = (np.arange(per)[:, None] * unit + np.arange(unit)[None]).ravel()
    return [([local], w[h * rows : (h + 1) * rows], moments[h], order[h * per : (h + 1) * per]) for h in range(consumer.group)]


def removal_matrix(group: ChannelGroup, graph: ChannelGraph, layers: dict[str, LinearLayer], grams: dict[str, InputGram], weights: dict[str, np.ndarray]) -> np.ndarray:
    """``M`` (channels x channels): output error of removing channel pairs, summed over consumers.

    A grouped consumer's group ``h`` reads only its block of channels: its terms fill that block's
    rows and columns of ``M``, normalised by the whole consumer's output energy.
    """
    n = group.size
    m = np.zeros((n, n))
    for consumer in graph.consumers:
        views = _consumer_views(graph, consumer, group.id, layers, grams, weights)
        if not views:
            continue
        energy = max(sum(output_energy(w, g) for _, w, g, _ in views), 1e-30)
        for columns, w, g, channels in views:
            k = len(channels)
            for cols_a in columns:
                width = len(cols_a) // k
                for cols_b in columns:
                    q = (w[:, cols_a].T @ w[:, cols_b]) * g[np.ix_(cols_a, cols_b)]
                    m[np.ix_(channels, channels)] += q.reshape(k, width, k, width).sum(axis=(1, 3)) / energy
    return m


def activation_scores(group: ChannelGroup, graph: ChannelGraph, layers: dict[str, LinearLayer], grams: dict[str, InputGram],
                      weights: dict[str, np.ndarray]) -> np.ndarray:
    """RMS of each channel at the consumers' inputs (calibration data)."""
    total = np.zeros(group.size)
    count = np.zeros(group.size)
    for consumer in graph.consumers:
        for columns, _, g, channels in _consumer_views(graph, consumer, group.id, layers, grams, weights):
            diag = np.diag(g)
            for cols in columns:
                total[channels] += np.sqrt(np.maximum(diag[cols].reshape(len(channels), -1).mean(axis=1), 0.0))
                count[channels] += 1
    return total / np.maximum(count, 1)


def per_block(size: int, blocks: int, choose, count: int) -> np.ndarray:
    """The channels ``choose(block, how_many)`` removes (indices within the ``block`` slice) in each of ``blocks``
    equal contiguous blocks, ``count / blocks`` each:
    a grouped convolution stays one when each of its groups loses as many channels as the others."""
    width = size // blocks
    out = [h * width + np.asarray(choose(slice(h * width, (h + 1) * width), count // blocks), dtype=np.int64) for h in range(blocks)]
    return np.sort(np.concatenate(out))


def greedy_removal(m: np.ndarray, count: int) -> np.ndarray:
    """ThiNet: the ``count`` channels whose joint removal raises ``E(R) = 1^T M_RR 1`` least, greedily."""
    n = len(m)
    removed: list[int] = []
    cross = np.zeros(n)  # sum_{r in R} (M_rc + M_cr)
    alive = np.ones(n, dtype=bool)
    diag = np.diag(m).copy()
    for _ in range(count):
        cost = np.where(alive, cross + diag, np.inf)
        c = int(np.argmin(cost))
        removed.append(c)
        alive[c] = False
        cross += m[c] + m[:, c]
    return np.array(sorted(removed), dtype=np.int64)


def kept_count(size: int, ratio: float, round_to: int) -> int:
    """Channels kept when ``ratio`` of ``size`` go, rounded to a multiple of ``round_to`` (never 0)."""
    keep = size - int(np.floor(ratio * size + 1e-9))
    if round_to > 1 and size >= round_to:
        keep = max(round_to, int(round(keep / round_to)) * round_to)
    return int(min(size, max(1, keep)))


def _output_rows(node, w: np.ndarray) -> np.ndarray:
    """Weight rows that produce each output channel, flattened."""
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1)
    trans_b = bool(attribute(node, "transB", 0))
    if node.op_type == "Gemm" and trans_b:
        return w
    return w.T
