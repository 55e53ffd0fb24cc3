"""prune-channels: remove whole channels of Conv/Gemm/MatMul layers, physically, without retraining.

1. Groups (:mod:`optc.passes.prune_groups`): channels that must go together
   (residual adds, depthwise convs, BatchNorm, concat index maps, flatten into
   a Gemm, transformer MLP widths). Groups that cannot be pruned safely are
   reported with the reason and left whole.
2. Choice (:mod:`optc.passes.prune_criteria`): per group, ``ratio`` of the
   channels (channel counts rounded to ``round_to``) by a criterion; or, with
   ``allocation=global``, the channels whose removal costs least relative
   output error anywhere in the model, so sensitive groups lose fewer.
3. Removal: source weight rows and biases, per-channel parameters on the way
   (BatchNorm, depthwise weights, bias adds), the consumers' weight columns and
   flatten targets are sliced; the model is smaller in every tensor it touches.
4. Reconstruction (:mod:`optc.passes.refit`): each consumer is refit by ridge
   least squares on calibration activations to reproduce its original output
   from the kept channels, with the removed channels' mean contribution folded
   into its bias (``reconstruct=lstsq``, He et al. 2017). ``mean`` only folds
   the means; ``none`` only slices. A channel that is constant on the
   calibration data (for instance an all-zero filter, whatever BatchNorm and
   activation follow) is removed exactly by either of the first two, unless
   the consumer zero-pads it (at the borders it is then not constant).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from optc.ir.graph import GraphEditor
from optc.ir.model import Model
from optc.ir.shapes import infer_shapes
from optc.passes.base import Pass, PassContext, PassResult, Requirement, option, register_pass
from optc.errors import ConfigError
from optc.passes.layers import InputGram, find_linear_layers, input_grams, matrix_to_weight, weight_matrix
from optc.passes.prune_criteria import (
    CRITERIA,
    NEEDS_GRAMS,
    activation_scores,
    channel_blocks,
    column_index,
    feature_unit,
    greedy_removal,
    kept_count,
    removal_matrix,
    weight_scores,
)
from optc.passes.prune_groups import ChannelGraph, ChannelGroup, Layout, analyse_channels
from optc.passes.refit import refit_columns

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PruneChannelsConfig:
    ratio: float = option(0.3, "fraction of each group's channels removed (or of all prunable channels with allocation=global)")
    criterion: Literal["l1", "l2", "bn", "activation", "thinet"] = option(
        "thinet", "l1/l2: source weight norms; bn: BatchNorm |gamma|; activation: RMS input at the consumers; thinet: greedy least output change"
    )
    allocation: Literal["uniform", "global"] = option("uniform", "uniform: ratio per group; global: rank channels across groups by relative output error")
    max_group_ratio: float = option(0.8, "with allocation=global, no group loses more than this fraction")
    reconstruct: Literal["lstsq", "mean", "none"] = option("lstsq", "consumer refit: least squares + bias, bias fold of removed means only, or nothing")
    ridge: float = option(1e-3, "ridge of the least-squares refit, relative to the mean input second moment")
    round_to: int = option(1, "kept channel counts are multiples of this (e.g. 8 for SIMD-friendly widths)")
    exclude: tuple[str, ...] = option((), "node names or op types whose channels are kept")
    max_batches: int = option(32, "calibration batches (of 16) used for the consumers' Grams")

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), not {self.ratio}")
        if not 0.0 < self.max_group_ratio < 1.0:
            raise ValueError(f"max_group_ratio must be in (0, 1), not {self.max_group_ratio}")
        if self.round_to < 1:
            raise ValueError(f"round_to must be >= 1, not {self.round_to}")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, not {self.ridge}")
        if self.max_batches < 1:
            raise ValueError(f"max_batches must be >= 1, not {self.max_batches}")

    @property
    def needs_calibration(self) -> bool:
        return self.reconstruct != "none" or self.criterion in NEEDS_GRAMS or self.allocation == "global"


@dataclass
class PrunePlan:
    """Channels kept per group (all of them for groups left whole) and the scores behind it."""

    keep: dict[int, np.ndarray]
    scores: dict[int, np.ndarray] = field(default_factory=dict)
    criterion: dict[int, str] = field(default_factory=dict)


@register_pass("prune-channels")
class PruneChannels(Pass[PruneChannelsConfig]):
    """Remove whole channels, refitting consumers by least squares on calibration data (lossy)."""

    config_class = PruneChannelsConfig
    # Calibration is needed unless reconstruct=none with a weight criterion (l1, l2, bn).
    requires = frozenset({Requirement.CALIBRATION, Requirement.SHAPES})
    exact = False

    def requirements(self) -> frozenset[Requirement]:
        return self.requires if self.config.needs_calibration else frozenset({Requirement.SHAPES})

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        graph = analyse_channels(model, protect=frozenset(cfg.exclude))
        skipped = [f"{g.name}: {g.frozen[0]}" for g in graph.groups if g.frozen and g.sources and not _placeholder(g)]
        candidates = [g for g in graph.groups if g.prunable and g.size > 1]
        unchanged = PassResult(model, modified=False, stats={"groups": [], "prunable_groups": len(candidates)}, skipped=skipped)
        if not candidates or cfg.ratio == 0:
            return unchanged
        nodes = {n.name: n for n in model.graph.node}
        layers, refused = find_linear_layers(model)
        layers_by_node = {layer.node: layer for layer in layers}
        consumers = {c.node for c in graph.consumers}
        missing = sorted(consumers - layers_by_node.keys())
        if missing:
            reasons = dict(r.split(": ", 1) for r in refused if ": " in r)
            unsupported = {m: reasons.get(m, "not a supported linear layer") for m in missing}
            candidates = [g for g in candidates if not _touches(graph, g, unsupported, skipped)]
        weights = {name: model.initializer_array(nodes[name].input[1]).astype(np.float64) for name in consumers if name in layers_by_node}
        grams: dict[str, InputGram] = {}
        if cfg.needs_calibration:
            if ctx.calibration is None:
                raise ConfigError(f"pass '{self.name}' needs calibration data with reconstruct={self.config.reconstruct}, criterion={self.config.criterion}: give --calib FILE.npz")
            wanted = [layers_by_node[c] for c in sorted(consumers) if c in layers_by_node]
            grams = input_grams(model, ctx.calibration, wanted, max_batches=cfg.max_batches, seed=ctx.seed)
        plan = self._plan(model, nodes, graph, candidates, layers_by_node, grams, weights)
        pruned = [g for g in candidates if len(plan.keep[g.id]) < g.size]
        if not pruned:
            return unchanged
        new_model, errors = _apply(model, nodes, graph, plan, layers_by_node, grams, weights, cfg)
        return PassResult(new_model, modified=True, stats=self._stats(graph, pruned, plan, errors), skipped=skipped)

    # --- choosing ---------------------------------------------------------------
    def _plan(self, model, nodes, graph, candidates, layers, grams, weights) -> PrunePlan:
        cfg = self.config
        plan = PrunePlan({g.id: np.arange(g.size) for g in graph.groups})
        costs: dict[int, np.ndarray] = {}
        for group in candidates:
            if cfg.criterion == "thinet" or cfg.allocation == "global":
                costs[group.id] = removal_matrix(group, graph, layers, grams, weights)
            if cfg.criterion == "activation":
                scores, used = activation_scores(group, graph, layers, grams), "activation"
            elif cfg.criterion == "thinet":
                scores, used = np.diag(costs[group.id]).copy(), "thinet"
            else:
                scores, used = weight_scores(model, nodes, group, graph, cfg.criterion)
            plan.scores[group.id], plan.criterion[group.id] = scores, used
        counts = self._removal_counts(candidates, plan, costs)
        for group in candidates:
            count = counts[group.id]
            if count == 0:
                continue
            if plan.criterion[group.id] == "thinet":
                removed = greedy_removal(costs[group.id], count)
            else:
                removed = np.sort(np.argsort(plan.scores[group.id], kind="stable")[:count])
            plan.keep[group.id] = np.setdiff1d(np.arange(group.size), removed)
        return plan

    def _removal_counts(self, candidates: list[ChannelGroup], plan: PrunePlan, costs: dict[int, np.ndarray]) -> dict[int, int]:
        cfg = self.config
        if cfg.allocation == "uniform":
            return {g.id: g.size - kept_count(g.size, cfg.ratio, cfg.round_to) for g in candidates}
        # Global: each channel's own relative output error (diag M), comparable across groups.
        entries = [(float(c), g.id) for g in candidates for c in np.diag(costs[g.id])]
        entries.sort()
        budget = int(np.floor(cfg.ratio * sum(g.size for g in candidates)))
        counts = {g.id: 0 for g in candidates}
        caps = {g.id: g.size - kept_count(g.size, cfg.max_group_ratio, 1) for g in candidates}
        for _, gid in entries:
            if budget == 0:
                break
            if counts[gid] < caps[gid]:
                counts[gid] += 1
                budget -= 1
        sizes = {g.id: g.size for g in candidates}
        # Round each kept width to round_to, as the uniform allocation does.
        return {gid: sizes[gid] - kept_count(sizes[gid], n / sizes[gid], cfg.round_to) for gid, n in counts.items()}

    def _stats(self, graph: ChannelGraph, pruned: list[ChannelGroup], plan: PrunePlan, errors: dict[str, tuple[float, float]]) -> dict:
        groups = []
        for g in pruned:
            keep = plan.keep[g.id]
            removed = np.setdiff1d(np.arange(g.size), keep)
            scores = plan.scores.get(g.id)
            readers = [c.node for c in graph.consumers if any(graph.space_group[s.space] == g.id for s in c.layout)]
            entry = {
                "group": g.name,
                "channels_before": g.size,
                "channels_after": int(len(keep)),
                "criterion": plan.criterion.get(g.id),
                "consumers": readers,
            }
            if scores is not None and len(removed):
                entry["score_removed_max"] = float(scores[removed].max())
                entry["score_kept_median"] = float(np.median(scores[keep]))
            errs = [errors[r] for r in readers if r in errors]
            if errs:
                entry["consumer_rel_error"] = float(max(e[0] for e in errs))
                entry["consumer_rel_error_without_refit"] = float(max(e[1] for e in errs))
            groups.append(entry)
        before = sum(g["channels_before"] for g in groups)
        after = sum(g["channels_after"] for g in groups)
        return {
            "groups": groups,
            "prunable_groups": sum(1 for g in graph.groups if g.prunable and g.size > 1),
            "channels_removed": before - after,
            "reconstruct": self.config.reconstruct,
        }


def _placeholder(group: ChannelGroup) -> bool:
    return not group.sources


def _touches(graph: ChannelGraph, group: ChannelGroup, bad: dict[str, str], skipped: list[str]) -> bool:
    for consumer in graph.consumers:
        if consumer.node in bad and any(graph.space_group[s.space] == group.id for s in consumer.layout):
            skipped.append(f"{group.name}: feeds '{consumer.node}' ({bad[consumer.node]})")
            return True
    return False


# --- applying -------------------------------------------------------------------
def layout_keep(graph: ChannelGraph, plan: PrunePlan, layout: Layout) -> np.ndarray:
    """Feature positions along a channelled axis that survive the plan."""
    parts, offset = [], 0
    for seg in layout:
        kept = plan.keep[graph.space_group[seg.space]]
        parts.append(offset + (kept[:, None] * seg.block + np.arange(seg.block)[None]).ravel())
        offset += seg.length * seg.block
    return np.concatenate(parts).astype(np.int64)


def _apply(model, nodes, graph, plan, layers, grams, weights, cfg) -> tuple[Model, dict[str, tuple[float, float]]]:
    new_values: dict[tuple[str, int], np.ndarray] = {}
    bias_delta: dict[str, np.ndarray] = {}
    errors: dict[str, tuple[float, float]] = {}
    matrices: dict[str, np.ndarray] = {}  # consumers' refit weights, in the original layout
    for consumer in graph.consumers:
        layer = layers[consumer.node]
        unit = feature_unit(layer)
        kept_features = layout_keep(graph, plan, consumer.layout)
        total = sum(s.length * s.block for s in consumer.layout)
        if len(kept_features) == total:
            continue
        cols = (kept_features[:, None] * unit + np.arange(unit)[None]).ravel()
        w = weight_matrix(layer, weights[consumer.node])
        if cfg.reconstruct == "lstsq":
            fit = refit_columns(grams[consumer.node], w, cols, ridge=cfg.ridge)
            new_w, delta = fit.weight, fit.bias_delta
            errors[consumer.node] = (fit.rel_error, fit.rel_error_plain)
        else:
            new_w = w[:, cols]
            removed = np.setdiff1d(np.arange(w.shape[1]), cols)
            delta = w[:, removed] @ grams[consumer.node].mean[0][removed] if cfg.reconstruct == "mean" else np.zeros(w.shape[0])
        shape = list(layer.weight_shape)
        if layer.op == "Conv":
            shape[1] = len(kept_features)
        sliced = dataclasses.replace(layer, weight_shape=tuple(shape))
        matrices[consumer.node] = matrix_to_weight(sliced, new_w)
        if np.any(delta):
            bias_delta[consumer.node] = delta
    for group in graph.groups:
        keep = plan.keep[group.id]
        if len(keep) == group.size:
            continue
        for source in group.sources:
            node = nodes[source.node]
            w = matrices.get(source.node)
            if w is None:
                w = model.initializer_array(node.input[1]).astype(np.float64)
            axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and _attr(node, "transB")) else 1
            matrices[source.node] = np.take(w, keep, axis=axis)
            if len(node.input) > 2 and node.input[2]:
                bias = model.initializer_array(node.input[2])
                if bias.size == group.size:
                    new_values[(source.node, 2)] = np.take(bias, keep, axis=bias.ndim - 1)
            if source.node in bias_delta:
                bias_delta[source.node] = bias_delta[source.node][keep]
    for param in graph.params:
        value = model.initializer_array(nodes[param.node].input[param.input_index])
        kept = layout_keep(graph, plan, param.layout)
        if len(kept) < value.shape[param.axis]:
            new_values[(param.node, param.input_index)] = np.take(value, kept, axis=param.axis)
    for name, w in matrices.items():
        new_values[(name, 1)] = w.astype(model.initializer_array(nodes[name].input[1]).dtype)
    return _edit(model, nodes, graph, plan, new_values, bias_delta), errors


def _edit(model, nodes, graph, plan, new_values, bias_delta) -> Model:
    editor = GraphEditor(model)
    gs_nodes = {n.name: n for n in editor.nodes}
    for (name, index), value in new_values.items():
        node = gs_nodes[name]
        node.inputs[index] = editor.add_constant(node.inputs[index].name, value)
        if node.op == "Conv" and index == 1 and node.attrs.get("group", 1) > 1:
            node.attrs["group"] = int(value.shape[0])  # a depthwise conv keeps one group per channel
    for fix in graph.reshapes:
        node = gs_nodes[fix.node]
        target = np.array(editor.constant_value(node.inputs[1]), dtype=np.int64).copy()
        target[1] = len(layout_keep(graph, plan, fix.layout))
        node.inputs[1] = editor.add_constant(node.inputs[1].name, target)
    for name, delta in bias_delta.items():
        _add_bias(editor, gs_nodes[name], delta)
    new_model = editor.commit()
    # Shapes of every tensor on a pruned path changed: infer them afresh.
    del new_model.graph.value_info[:]
    infer_shapes(new_model)
    return new_model


def _add_bias(editor: GraphEditor, node, delta: np.ndarray) -> None:
    """Add ``delta`` (one per output channel) to a layer's bias, creating one where needed."""
    dtype = np.asarray(editor.constant_value(node.inputs[1])).dtype
    if node.op in ("Conv", "Gemm"):
        if len(node.inputs) > 2 and node.inputs[2] is not None and editor.constant_value(node.inputs[2]) is not None:
            bias = editor.constant_value(node.inputs[2]).astype(np.float64)
            beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
            alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
            new = (bias + (alpha / beta) * delta.reshape(bias.shape if bias.size == delta.size else -1)).astype(dtype)
            node.inputs[2] = editor.add_constant(node.inputs[2].name, new)
        else:
            alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
            if node.op == "Gemm":
                node.attrs["beta"] = 1.0
            while len(node.inputs) < 2:
                node.inputs.append(None)
            node.inputs.append(editor.add_constant(f"{node.name}_bias", (alpha * delta).astype(dtype)))
        return
    # MatMul: fold into the bias Add that follows (a per-feature constant), else add one.
    out = node.outputs[0]
    users = editor.consumers(out)
    if len(users) == 1 and users[0].op == "Add" and not editor.is_graph_output(out):
        add = users[0]
        other = 1 if add.inputs[0] is out else 0
        value = editor.constant_value(add.inputs[other])
        if value is not None and value.shape[-1:] == delta.shape and value.size == delta.size:
            add.inputs[other] = editor.add_constant(add.inputs[other].name, (value + delta.reshape(value.shape)).astype(value.dtype))
            return
    if editor.is_graph_output(out):
        logger.warning("%s: bias correction of %d features not applied (its output is a graph output)", node.name, delta.size)
        return
    fresh = editor.add_node("Add", [out, editor.add_constant(f"{node.name}_bias", delta.astype(dtype))], name=editor.fresh_name(f"{node.name}_bias_add")).outputs[0]
    fresh.dtype = out.dtype
    for user in users:
        for i, t in enumerate(user.inputs):
            if t is out:
                user.inputs[i] = fresh


def _attr(node, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), 0)
