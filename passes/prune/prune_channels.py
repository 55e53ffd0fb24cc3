"""prune-channels: remove whole channels of Conv/Gemm/MatMul layers, physically, without retraining.

1. Groups (:mod:`optc.passes.prune.groups`): channels that must go together
   (residual adds, depthwise convs, BatchNorm, concat index maps, flatten into
   a Gemm, transformer MLP widths). Groups that cannot be pruned safely are
   reported with the reason and left whole.
2. Choice (:mod:`optc.passes.prune.criteria`): per group, ``ratio`` of the
   channels (channel counts rounded to ``round_to``) by a criterion; or, with
   ``allocation=global``, the channels whose removal costs least relative
   output error anywhere in the model, so sensitive groups lose fewer.
3. Removal: source weight rows and biases, per-channel parameters on the way
   (BatchNorm, depthwise weights, bias adds), the consumers' weight columns and
   flatten targets are sliced; the model is smaller in every tensor it touches.
4. Reconstruction (:mod:`optc.passes.numerics.refit`): each consumer is refit by ridge
   least squares on calibration activations to reproduce its original output
   from the kept channels, with the removed channels' mean contribution folded
   into its bias (``reconstruct=lstsq``, He et al. 2017). ``mean`` only folds
   the means; ``none`` only slices. A channel that is constant on the
   calibration data (for instance an all-zero filter, whatever BatchNorm and
   activation follow) is removed exactly by either of the first two, unless
   the consumer zero-pads it (at the borders it is then not constant).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np

from optc.ir.model import Model
from optc.ir.view import graph_nodes
from optc.errors import ConfigError
from optc.passes.framework import Pass, PassConfig, PassContext, PassResult, Requirement, option, register_pass
from optc.passes.framework.analyses import AnalysisCache, array_bytes
from optc.passes.numerics.unit_selection import unit_order
from optc.passes.layers import InputGram, find_linear_layers, input_grams, weight_matrix
from optc.passes.prune.criteria import (
    NEEDS_GRAMS,
    activation_scores,
    feature_unit,
    greedy_removal,
    kept_count,
    per_block,
    removal_matrix,
    weight_scores,
)
from optc.passes.prune.apply import PrunePlan, apply_plan, refit_sequentially
from optc.passes.prune.groups import ChannelGraph, ChannelGroup, analyse_channels

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PruneChannelsConfig(PassConfig):
    ratio: float = option(0.3, "fraction of each group's channels removed (or of all prunable channels with allocation=global)", ge=0, lt=1)
    criterion: Literal["l1", "l2", "bn", "activation", "thinet", "forward"] = option(
        "forward",
        "l1/l2: source weight norms; bn: BatchNorm |gamma|; activation: RMS input at the consumers; thinet: greedy least output change "
        "without refit; forward: forward selection of the channels whose least-squares refit best reproduces the consumer "
        "(groups read by one MatMul/Gemm/1x1 Conv; others use thinet)"
    )
    allocation: Literal["uniform", "global"] = option("uniform", "uniform: ratio per group; global: rank channels across groups by relative output error")
    max_group_ratio: float = option(0.8, "with allocation=global, no group loses more than this fraction", gt=0, lt=1)
    reconstruct: Literal["sequential", "lstsq", "mean", "none"] = option(
        "sequential",
        "consumer refit: least squares on the pruned model's own inputs in graph order (sequential) or on the original inputs (lstsq), "
        "bias fold of removed means only (mean), or nothing (none)",
    )
    ridge: float = option(1e-3, "ridge of the least-squares refit, relative to the mean input second moment", ge=0)
    round_to: int = option(
        8, "kept channel counts are multiples of this where a group has at least that many (odd widths run slower in onnxruntime)", ge=1, le=4096
    )
    exclude: tuple[str, ...] = option((), "node names or op types whose channels are kept")
    max_batches: int = option(32, "calibration batches (of 16) used for the consumers' Grams", ge=1)

    @property
    def needs_calibration(self) -> bool:
        return self.reconstruct != "none" or self.criterion in NEEDS_GRAMS or self.allocation == "global"


@register_pass("prune-channels")
class PruneChannels(Pass[PruneChannelsConfig]):
    """Remove whole channels, refitting consumers by least squares on calibration data (lossy)."""

    config_class = PruneChannelsConfig
    # Calibration is needed unless reconstruct=none with a weight criterion (l1, l2, bn).
    requires = frozenset({Requirement.CALIBRATION, Requirement.SHAPES})
    exact = False
    strength = "ratio"
    strength_options = frozenset({"ratio"})

    def requirements(self) -> frozenset[Requirement]:
        return self.requires if self.config.needs_calibration else frozenset({Requirement.SHAPES})

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if not self.config.needs_calibration or ctx.calibration is None:
            return self._run(model, ctx)
        # The default budget's search runs this pass again with the very settings it ran with before
        # (the run that missed the budget, then the point it chose): a deterministic function of the
        # model, the data, the seed and the options, remembered under all four (see AnalysisCache).
        data = (model.fingerprint(), ctx.calibration.digest, ctx.seed)
        key = (*data, repr(self.config))
        fresh: list[PassResult] = []

        def compute() -> PassResult:
            fresh.append(self._run(model, ctx, data))
            return _private(fresh[0], model)

        held = _RESULTS.get_or_compute(key, compute, lambda r: r.model.weight_bytes())
        return fresh[0] if fresh else _private(held, model)

    def _run(self, model: Model, ctx: PassContext, data: tuple | None = None) -> PassResult:
        """The pass; ``data`` names the model, calibration data and seed when analyses may be remembered."""
        cfg = self.config
        graph = analyse_channels(model, protect=frozenset(cfg.exclude))
        skipped = [f"{g.name}: {g.frozen[0]}" for g in graph.groups if g.frozen and g.sources and not _placeholder(g)]
        candidates = [g for g in graph.groups if g.prunable and g.size > 1]
        if not candidates and not skipped:  # nothing to prune: say why (an already quantized model has no float layer)
            skipped = find_linear_layers(model)[1][:1] or ["no channel group with a producer optc can prune (Conv, Gemm, MatMul)"]
        unchanged = PassResult(model, modified=False, stats={"groups": [], "prunable_groups": len(candidates)}, skipped=skipped)
        if not candidates or cfg.ratio == 0:
            return unchanged
        nodes = {n.name: n for n in graph_nodes(model)}
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
        costs: dict[int, np.ndarray] = {}
        if cfg.criterion in ("thinet", "forward") or cfg.allocation == "global":
            def compute() -> dict[int, np.ndarray]:
                return {g.id: removal_matrix(g, graph, layers_by_node, grams, weights) for g in candidates}

            # The removal costs depend on the model, the data and the groups, not on how much is taken: the
            # default budget's search asks for them at every strength it tries (light_resnet50: 38 s a run).
            key = (*data, cfg.max_batches, cfg.exclude, tuple(g.id for g in candidates)) if data is not None else None
            costs = _COSTS.get_or_compute(key, compute, array_bytes) if key is not None else compute()
        plan = self._plan(model, nodes, graph, candidates, layers_by_node, grams, weights, costs)
        pruned = [g for g in candidates if len(plan.keep[g.id]) < g.size]
        if not pruned:
            return unchanged
        new_model, errors, deltas = apply_plan(model, nodes, graph, plan, layers_by_node, grams, weights, cfg)
        if cfg.reconstruct == "sequential":
            new_model = refit_sequentially(model, new_model, graph, plan, layers_by_node, ctx.calibration, errors, deltas, cfg, seed=ctx.seed)
        return PassResult(new_model, modified=True, stats=self._stats(graph, pruned, plan, errors), skipped=skipped)

    # --- choosing ---------------------------------------------------------------
    def _plan(self, model, nodes, graph, candidates, layers, grams, weights, costs: dict[int, np.ndarray]) -> PrunePlan:
        cfg = self.config
        plan = PrunePlan({g.id: np.arange(g.size) for g in graph.groups})
        for group in candidates:
            if cfg.criterion == "activation":
                scores, used = activation_scores(group, graph, layers, grams, weights), "activation"
            elif cfg.criterion in ("thinet", "forward"):
                # Forward selection picks across the whole group; blocks of grouped convolutions choose each alone.
                forward = cfg.criterion == "forward" and group.blocks == 1 and _single_reader(graph, group, layers)
                used = "forward" if forward else "thinet"
                scores = np.diag(costs[group.id]).copy()
            else:
                scores, used = weight_scores(model, nodes, group, graph, cfg.criterion)
            plan.scores[group.id], plan.criterion[group.id] = scores, used
        counts = self._removal_counts(candidates, plan, costs)
        for group in candidates:
            count = counts[group.id]
            if count == 0:
                continue
            if plan.criterion[group.id] == "forward":
                consumer = _single_reader(graph, group, layers)
                w = weight_matrix(layers[consumer], weights[consumer])
                order = unit_order(grams[consumer], w, group.size - count, select="greedy")
                removed = np.setdiff1d(np.arange(group.size), order)
            elif plan.criterion[group.id] == "thinet":
                cost = costs[group.id]
                removed = per_block(group.size, group.blocks, lambda b, c: greedy_removal(cost[b, b], c), count)
            else:
                scores = plan.scores[group.id]
                removed = per_block(group.size, group.blocks, lambda b, c: np.argsort(scores[b], kind="stable")[:c], count)
            plan.keep[group.id] = np.setdiff1d(np.arange(group.size), removed)
        return plan

    def _removal_counts(self, candidates: list[ChannelGroup], plan: PrunePlan, costs: dict[int, np.ndarray]) -> dict[int, int]:
        cfg = self.config
        if cfg.allocation == "uniform":
            return {g.id: g.size - _whole_blocks(kept_count(g.size, cfg.ratio, cfg.round_to), g.blocks) for g in candidates}
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
        sizes, blocks = {g.id: g.size for g in candidates}, {g.id: g.blocks for g in candidates}
        # Round each kept width to round_to, as the uniform allocation does.
        return {gid: sizes[gid] - _whole_blocks(kept_count(sizes[gid], n / sizes[gid], cfg.round_to), blocks[gid]) for gid, n in counts.items()}

    def _stats(self, graph: ChannelGraph, pruned: list[ChannelGroup], plan: PrunePlan, errors: dict[str, tuple[float, float]]) -> dict:
        groups = []
        for g in pruned:
            keep = plan.keep[g.id]
            removed = np.setdiff1d(np.arange(g.size), keep)
            scores = plan.scores.get(g.id)
            readers = [c.node for c in graph.readers(g.id)]
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


# Whole results by (model, data, seed, options): at most a few models' weights.
_RESULTS: AnalysisCache[PassResult] = AnalysisCache("prune-channels results", 512 << 20)
# Every candidate group's removal cost matrix, by (model, data, seed, the options the groups and Grams read).
_COSTS: AnalysisCache[dict[int, np.ndarray]] = AnalysisCache("prune-channels removal costs", 512 << 20)


def _private(result: PassResult, model: Model) -> PassResult:
    """``result`` with a model of its own (the caller's input when nothing changed): a remembered
    result is handed out as a copy, since later passes may edit the model they are given."""
    return dataclasses.replace(
        result, model=result.model.copy() if result.modified else model, stats=copy.deepcopy(result.stats), skipped=list(result.skipped)
    )


def _whole_blocks(kept: int, blocks: int) -> int:
    """``kept`` rounded down to a multiple of ``blocks`` (at least one channel per block)."""
    return max(blocks, kept // blocks * blocks)


def _single_reader(graph: ChannelGraph, group: ChannelGroup, layers) -> str | None:
    """The one consumer reading ``group`` as its whole input, one column per channel, if that is the case."""
    readers = graph.readers(group.id)
    if len(readers) != 1 or len(readers[0].layout) != 1 or readers[0].layout[0].block != 1 or readers[0].layout[0].shuffle != 1:
        return None
    layer = layers[readers[0].node]
    return layer.node if feature_unit(layer) == 1 and layer.group == 1 else None


def _placeholder(group: ChannelGroup) -> bool:
    return not group.sources


def _touches(graph: ChannelGraph, group: ChannelGroup, bad: dict[str, str], skipped: list[str]) -> bool:
    for consumer in graph.readers(group.id):
        if consumer.node in bad:
            skipped.append(f"{group.name}: feeds '{consumer.node}' ({bad[consumer.node]})")
            return True
    return False
