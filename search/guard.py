"""The default budget: a lossy pass left at its default strength may not cost more than a point.

A user who writes ``--pass sparsify`` asked for "sparsify as much as is safe",
not for 50 % of every layer whatever it costs: the defaults were tuned on
other models, and on a model they do not suit they can lose tens of points.
So when no budget is given and some lossy pass runs with none of its
how-much options set by the user (:attr:`Pass.strength_options`), optc holds
the run to a default budget measured on held-out data no pass fits on:

* with ``--eval``: top-1 (or ``--metric``) may drop at most :data:`DEFAULT_MAX_DROP`;
  top-1 reads the first output only, so every other float output keeps the
  cosine floor below (MTCNN's boxes fell to cosine 0.970 while its face
  scores kept their top-1: :func:`~optc.evaluation.metrics.unread_outputs`);
* without: the metric ``fidelity`` to the input model on calibration samples
  split off before any pass runs (``CalibrationSet.hold_out``) stays at least
  :data:`DEFAULT_MIN_FIDELITY`: the mean cosine of each output, and on every output
  whose last axis holds class scores (classifiers, CTC and other sequence
  logits: :func:`optc.evaluation.fidelity.class_scores`) the share of positions
  whose argmax is the input model's, the same one point of decisions the
  labelled budget allows. The cosine alone let sparsify take 1.5 points of a CTC
  OCR model's character accuracy at cosine 0.992 (its frames' argmax agreed at
  97.5 % on the labelled set). Labels that are not class indices are held the same way on ``--eval``.
  Those few held-out samples are an estimate: the floor holds the 90 % lower
  confidence bound of their mean (:func:`optc.evaluation.metrics.bounded`), not the
  mean itself; with ``--eval`` the point of top-1 holds the upper bound of the paired drop.

The pipeline runs as asked first; only when it misses does optc search the
strengths (:mod:`optc.search.budget`), so a default that suits the model costs
one held-out measurement. A pass whose strength the user wrote runs as asked
(with a warning when it costs much); ``--no-default-budget`` runs everything as asked.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from optc.data.calibration import CalibrationSet
from optc.data.labelled import LabelledSet
from optc.errors import ConfigError
from optc.evaluation.fidelity import decision_agreement
from optc.evaluation.metrics import Metric, MetricRunner, bounded, decision_outputs, load_metric, model_outputs, output_cosines, unread_outputs
from optc.ir.model import Model
from optc.passes.framework import Pass

DEFAULT_MAX_DROP = 0.01
DEFAULT_MIN_FIDELITY = 0.99
# How long the search a missed default may take: the user asked for a pass, not for a search. PicoDet's quantize
# (102 layers, 800x608) ran over 1,000 s of fallback tries before its fallback was bounded; past this a pass that
# still misses is left out, saying so.
SEARCH_LIMIT_S = 600.0


def at_default_strength(p: Pass) -> bool:
    """A lossy pass configured from options (``--pass``, a pipeline file) none of which says how much it takes."""
    if p.exact or p.options_given is None:
        return False
    how_much = p.strength_options or (frozenset({p.strength}) if p.strength else frozenset())
    return not (how_much & p.options_given)


@dataclass
class Guard:
    """The default budget of one run: its metric on held-out data, measured against the input model."""

    runner: MetricRunner
    max_drop: float
    data: LabelledSet
    passes: tuple[str, ...]  # the passes it holds (names)

    def check(self, model: Model) -> tuple[float, float, bool, str]:
        """(score, drop, within) of ``model``, and its figures in words (for ``fidelity``: the cosine and each agreement)."""
        outputs = model_outputs(model, self.runner.inputs)
        score, drop = self.runner.judge(outputs)
        reference = self.runner.reference
        cosines = output_cosines(self.runner.judged(outputs), self.runner.judged_reference)
        if self.runner.metric.name == "fidelity":
            figures = ", ".join([_cosine_figure(cosines)] + [
                f"argmax agreement {decision_agreement(reference[n], outputs[n]):.4f} ({n})" for n in decision_outputs(reference)])
            if self.runner.metric.bounded:
                figures += f" (lower bound {score:.4f})"
        else:
            own = self.runner.judge_metric(outputs)[1]
            figures = f"{self.runner.metric.name} {score:.4f}"
            mean_drop = self.runner.baseline - score
            if abs(own - mean_drop) > 1e-12:
                figures += f" (drop {mean_drop:.4f}, upper bound {own:.4f})"
            if self.runner.hold:
                held = {n: c for n, c in cosines.items() if n in self.runner.hold}
                figures += ", " + _cosine_figure(held, unread_by=self.runner.metric.name, bound=self.runner.held_cosine(outputs))
        return score, drop, drop <= self.max_drop + 1e-12, figures

    def describe(self) -> str:
        name, floor = self.runner.metric.name, 1 - self.max_drop
        mean = "the 90 % lower confidence bound of the mean " if self.runner.metric.bounded else ""
        upper = "the 90 % upper confidence bound of the " if self.runner.metric.bounded and self.runner.metric.per_sample else ""
        if name == "cosine":
            what = f"{mean}cosine of each output at least {floor:g}"
        elif name == "fidelity":
            decisions = decision_outputs(self.runner.reference)
            what = f"{mean}cosine of each output at least {floor:g}" + (
                f" and argmax agreement at least {floor:g} ({', '.join(decisions)})" if decisions
                else " (no output holds class scores to hold by argmax)")
        else:
            what = f"{upper}{name} drop at most {self.max_drop:g}"
            if self.runner.hold:
                what += (f" and the 90 % lower confidence bound of the mean cosine of {', '.join(self.runner.hold)} "
                         f"(not read by {name}) at least {floor:g}")
        bases = self.runner.changes.bases
        by_change = [o for o in bases if self.runner.metric.needs_reference or o in self.runner.hold]
        if by_change:
            what += ", judging " + ", ".join(f"{o} by what it adds to {bases[o]}" for o in by_change) + ","
        return f"{what} on {self.data.inputs.num_samples} held-out {self.data.inputs.kind.removeprefix('held-out ')} samples"


def _cosine_figure(cosines: dict[str, float], unread_by: str | None = None, bound: float | None = None) -> str:
    """The cosine the budget holds (the least output's), naming that output when there are several or when they
    are the outputs ``unread_by`` (a top-k) does not read, with the ``bound`` held where one is given."""
    if not cosines:
        return "cosine 1.0000"
    worst = min(cosines, key=cosines.get)
    which = f"the least of {len(cosines)} outputs" if len(cosines) > 1 else "an output" if unread_by else None
    if which is None:
        return f"cosine {cosines[worst]:.4f}"
    which += f" {unread_by} does not read" if unread_by else ""
    which += f"; lower bound {bound:.4f}" if bound is not None else ""
    return f"cosine {cosines[worst]:.4f} ({worst}, {which})"


def held_out(calib: CalibrationSet | None, model: Model, count: int | None = None) -> tuple[CalibrationSet, LabelledSet]:
    """Calibration data split into what passes fit on and unlabelled held-out samples (``count``: how many; None, a quarter)."""
    if calib is None:
        raise ConfigError("no held-out data to measure on: give --calib or --eval")
    fit, held = calib.hold_out(model, count)
    return fit, LabelledSet(held, None, split_from_calibration=True)


def plan(passes: Sequence[Pass], model: Model, calib: CalibrationSet | None, labelled: LabelledSet | None,
         metric: Metric | None, count: int | None = None) -> tuple[Guard | None, CalibrationSet | None, str | None]:
    """The default budget for this pipeline, the calibration data passes should fit on, and a note when none applies.

    ``count``: how many calibration samples to hold out when it measures on them (None: a quarter).
    """
    guarded = tuple(p.name for p in passes if at_default_strength(p))
    if not guarded:
        return None, calib, None
    if labelled is not None:
        # top-1 reads class indices; other labels (strings, regression targets) are held to output fidelity.
        chosen = metric or load_metric("top1" if labelled.class_indices else "fidelity")
        if not chosen.needs_labels or labelled.labels is not None:
            max_drop = 1 - DEFAULT_MIN_FIDELITY if chosen.name in ("cosine", "fidelity") else DEFAULT_MAX_DROP
            runner = MetricRunner(bounded(chosen), labelled.inputs, labelled.labels, model)
            # the outputs a top-k does not read are held to the default floor of the cosine (MetricRunner's hold)
            runner.hold = unread_outputs(chosen, runner.reference)
            return Guard(runner, max_drop, labelled, guarded), calib, None
    try:
        fit, data = held_out(calib, model, count)
    except ConfigError as exc:
        return None, calib, f"default strengths of {', '.join(guarded)} not checked on held-out data: {exc}"
    return Guard(MetricRunner(bounded(load_metric("fidelity")), data.inputs, None, model), 1 - DEFAULT_MIN_FIDELITY, data, guarded), fit, None
