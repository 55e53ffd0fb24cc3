"""Metrics a user states a budget in: built-ins by name, or their own function.

A metric is ``f(outputs, labels) -> float``, higher is better, called once on
the whole evaluation set: ``outputs`` maps each model output's name to its
values for every sample, concatenated on axis 0; ``labels`` is the evaluation
file's ``label`` array (any dtype numpy stores without pickle), or None.

Built-ins:

* ``top1`` / ``top5``: the label is among the first output's 1 / 5 largest
  scores over its last axis (for a sequence output ``[N, T, C]``, every
  position counts; labels then have shape ``[N, T]``).
* ``cosine``: the mean per-sample cosine between this model's outputs and the
  *input* model's on the same samples (no labels needed; ``reference`` is
  filled by :class:`MetricRunner`), of the float output where it is least: a
  budget holds every output, not their average. A detector's eight heads
  averaged 0.998 while the score map a user thresholds was at 0.988.
* ``fidelity``: the lesser of ``cosine`` and, for every output whose last axis
  holds class scores (:func:`~optc.evaluation.fidelity.class_scores`), the
  fraction of positions whose argmax is the input model's: a floor on it holds
  decisions, not only the cosine (the label-free default budget, :mod:`optc.search.guard`).

Budgets judge a built-in metric by a 90 % confidence bound over the samples
(:func:`bounded`): the data a budget is checked on is a sample, not the truth.

A custom metric is ``--metric path/to/file.py:function``. One that raises or
returns something that is not a finite number is the user's error and is
reported naming the function.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from optc.data.calibration import CalibrationSet, feed_samples, samples_per_run
from optc.errors import ConfigError
from optc.evaluation.fidelity import Changes, class_scores, decision_agreement, lower_bound, sample_agreements, sample_cosines
from optc.ir.model import Model
from optc.ir.session import make_session

MetricFn = Callable[[Mapping[str, np.ndarray], Any], float]
BUILTIN = ("top1", "top5", "cosine", "fidelity")


@dataclass(frozen=True)
class Metric:
    """A named metric; ``needs_labels`` and ``needs_reference`` say what it reads."""

    name: str
    fn: MetricFn
    needs_labels: bool
    needs_reference: bool = False
    bounded: bool = False  # judged by a 90 % confidence bound over the samples (:func:`bounded`)
    per_sample: MetricFn | None = None  # a labelled built-in's value for each sample (its mean is ``fn``)

    def __call__(self, outputs: Mapping[str, np.ndarray], labels: Any, reference: Mapping[str, np.ndarray] | None = None) -> float:
        try:
            value = self.fn(outputs, reference) if self.needs_reference else self.fn(outputs, labels)
        except ConfigError:
            raise
        except Exception as exc:
            if self.name in BUILTIN or self.bounded:
                raise  # a built-in metric checks what it is given (ConfigError): anything else is optc's bug, exit 1
            raise ConfigError(f"metric {self.name} raised {type(exc).__name__}: {exc}") from exc  # the user's function, named
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"metric {self.name} returned {type(value).__name__} {value!r}, not a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"metric {self.name} returned {number}, not a finite number")
        return number


def topk_hits(k: int) -> MetricFn:
    """Per sample, the share of its positions whose label is among the ``k`` best classes of the model's prediction:
    the first output holding class scores (floats, several a label: ``[N, classes]``, ``[N, T, classes]``), else the
    first holding one integer a label (predicted class indices: scikit-learn's converters put ``label [N]`` before
    ``probabilities [N, classes]``), else the first holding one probability a label (a binary decision at 0.5)."""
    def hits(outputs: Mapping[str, np.ndarray], labels: Any) -> np.ndarray:
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu":
            raise ConfigError(f"top{k} needs integer class labels, got {labels.dtype}")
        if labels.size == 0:
            raise ConfigError(f"top{k}: no labels")
        values = list(outputs.values())
        scores = next((v for v in values if v.dtype.kind == "f" and v.size > labels.size and v.size % labels.size == 0), None)
        if scores is not None:
            scores = scores.reshape(*labels.shape, -1)
            best = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
            correct = (best == labels[..., None]).any(axis=-1)
        else:
            classes = next((v for v in values if v.dtype.kind in "iub" and v.size == labels.size), None)
            if classes is None:
                classes = next((v for v in values if v.dtype.kind == "f" and v.size == labels.size and np.isfinite(v).all()
                                and v.size and v.min() >= 0 and v.max() <= 1), None)
                classes = None if classes is None else (classes >= 0.5).astype(np.int64)
            if classes is None:
                shapes = ", ".join(f"{n} {v.dtype} {list(v.shape)}" for n, v in outputs.items())
                raise ConfigError(f"top{k}: no output holds class scores, class indices or probabilities for the {labels.size} "
                                  f"labels (one label per sample, or per position of a sequence); outputs: {shapes}")
            if k > 1:
                raise ConfigError(f"top{k} needs class scores; the model outputs only one class a sample: use top1")
            correct = classes.reshape(labels.shape) == labels
        return correct.reshape(len(labels), -1).mean(axis=1) if labels.ndim > 1 else correct.astype(np.float64)

    return hits  # type: ignore[return-value]


def topk(k: int) -> MetricFn:
    hits = topk_hits(k)
    return lambda outputs, labels: float(np.mean(hits(outputs, labels)))


def output_cosines(outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None) -> dict[str, float]:
    """Per float output, the mean per-sample cosine to the input model's."""
    if reference is None:
        raise ConfigError("metric cosine needs the input model's outputs")
    return {n: float(sample_cosines(reference[n], outputs[n]).mean()) for n in reference if reference[n].dtype.kind == "f"}


def mean_cosine(outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None) -> float:
    """The metric ``cosine``: the least over the float outputs of their mean per-sample cosine (1 without any)."""
    return min(output_cosines(outputs, reference).values(), default=1.0)


def decision_outputs(reference: Mapping[str, np.ndarray]) -> list[str]:
    """The outputs whose last axis holds class scores: those ``fidelity`` holds by their argmax."""
    return [n for n, v in reference.items() if class_scores(v) is not None]


def mean_cosine_and_agreement(outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None) -> float:
    if reference is None:
        raise ConfigError("metric fidelity needs the input model's outputs")
    agreements = [decision_agreement(reference[n], outputs[n]) for n in reference]
    return min([mean_cosine(outputs, reference), *(a for a in agreements if a is not None)])


def _bounded_cosine(outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None) -> float:
    """The least over the float outputs of the lower bound of their per-sample cosines' mean (:func:`mean_cosine`, bounded)."""
    if reference is None:
        raise ConfigError("metric cosine needs the input model's outputs")
    return min((lower_bound(sample_cosines(reference[n], outputs[n])) for n in reference if reference[n].dtype.kind == "f"), default=1.0)


def _bounded_fidelity(outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None) -> float:
    if reference is None:
        raise ConfigError("metric fidelity needs the input model's outputs")
    agreements = [sample_agreements(reference[n], outputs[n]) for n in reference]
    return min([_bounded_cosine(outputs, reference), *(lower_bound(a) for a in agreements if a is not None)])


def bounded(metric: Metric) -> Metric:
    """``metric`` judged by a one-sided 90 % confidence bound over the samples, where it has per-sample values.

    A budget is checked on a sample of the user's data: the mean of 8 held-out
    calibration samples of an OCR detector read a cosine of 0.9911 where 48 others
    read 0.9901, and a search that measured 283 pipelines on 500 labelled digits
    chose one that lost 0.6 points there and 2.6 on the next 500. So:

    * ``cosine`` and ``fidelity`` (measured against the input model) score the lower
      bound of their per-sample mean (:func:`~optc.evaluation.fidelity.lower_bound`);
    * ``top1``/``top5`` keep their mean as the score, and the drop a budget holds is the
      upper bound of the paired per-sample drop (:meth:`MetricRunner.judge`): with 500
      samples a model that loses 4 and gains 1 is at 0.6 points, bounded at 1.17.

    A custom metric is one number for the whole set and is held as it is.
    """
    if metric.bounded:
        return metric
    if metric.name in ("cosine", "fidelity") and metric.needs_reference:
        fn = _bounded_cosine if metric.name == "cosine" else _bounded_fidelity
        return Metric(metric.name, fn, needs_labels=False, needs_reference=True, bounded=True)
    if metric.per_sample is not None:
        return dataclasses.replace(metric, bounded=True)
    return metric


def load_metric(spec: str) -> Metric:
    """``top1``, ``top5``, ``cosine``, ``fidelity``, or ``path/to/file.py:function``."""
    if spec in ("top1", "top5"):
        return Metric(spec, topk(int(spec[3:])), needs_labels=True, per_sample=topk_hits(int(spec[3:])))
    if spec == "cosine":
        return Metric(spec, mean_cosine, needs_labels=False, needs_reference=True)
    if spec == "fidelity":
        return Metric(spec, mean_cosine_and_agreement, needs_labels=False, needs_reference=True)
    path, colon, func = spec.rpartition(":")
    if not colon or not path.endswith(".py"):
        raise ConfigError(f"--metric {spec}: expected one of {', '.join(BUILTIN)} or path/to/file.py:function")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--metric {spec}: no such file {file}")
    module_spec = importlib.util.spec_from_file_location(f"optc_user_metric_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's file failed to import
        raise ConfigError(f"--metric {spec}: importing {file} raised {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ConfigError(f"--metric {spec}: {file} has no function '{func}'")
    return Metric(f"{file.name}:{func}", fn, needs_labels=True)


def model_outputs(model: Model, inputs: CalibrationSet, batch_size: int = 64, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Every output of ``model`` (or those ``names``) on every sample of ``inputs``, concatenated on axis 0, one batch at a time."""
    session = make_session(model)
    names = names or [o.name for o in session.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed, real in inputs.padded_batches(samples_per_run(model, batch_size)):
        fed = feed_samples(feed, inputs.inputs)
        for name, value in zip(names, session.run(names, feed)):
            value = value if value.ndim else value[None]
            # a padded last feed: the real samples of outputs that lead with the batch (a time-major [T, N, C] does not)
            parts[name].append(value[:real] if real < fed and len(value) == fed else value)
    return {n: np.concatenate(v) if len(v) > 1 else v[0] for n, v in parts.items() if v}


def model_inputs(inputs: CalibrationSet, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Every sample of ``inputs`` as :func:`model_outputs` feeds them, concatenated on axis 0 (inputs given
    whole, a state shaped for one run, are left out: no output is one of them plus a change)."""
    parts: dict[str, list[np.ndarray]] = {}
    for feed, real in inputs.padded_batches(batch_size):
        fed = feed_samples(feed, inputs.inputs)
        for name, value in feed.items():
            if value.ndim and len(value) == fed:
                parts.setdefault(name, []).append(value[:real])
    return {n: np.concatenate(v) if len(v) > 1 else v[0] for n, v in parts.items()}


def unread_outputs(metric: Metric, reference: Mapping[str, np.ndarray]) -> tuple[str, ...]:
    """The float outputs ``metric`` does not read: all but the first for ``top1``/``top5`` (a face detector's
    boxes and landmarks beside its face score), none for the others (``cosine`` and ``fidelity`` read every
    output; a custom metric is given every output and decides)."""
    if metric.name not in ("top1", "top5"):
        return ()
    return tuple(n for n in list(reference)[1:] if reference[n].dtype.kind == "f")


class MetricRunner:
    """Scores models with one metric on one evaluation set, against the input model's outputs.

    ``hold``: outputs the metric does not read (:func:`unread_outputs`) that a budget holds too, by the 90 %
    lower bound of their per-sample cosine to the input model's: the drop :meth:`judge` returns is then the
    larger of the metric's and ``1 -`` the least such cosine. The default budget holds them (MTCNN's boxes
    reached cosine 0.970 while the top-1 of its face scores stayed within a point).

    Cosines (``cosine``, ``fidelity``, the held outputs) read an output that is an input plus a change by
    its change (``changes``, :class:`~optc.evaluation.fidelity.Changes`); a custom metric gets the outputs.
    """

    def __init__(self, metric: Metric, inputs: CalibrationSet, labels: np.ndarray | None, reference_model: Model, hold: tuple[str, ...] = ()):
        if metric.needs_labels and labels is None:
            raise ConfigError(f"metric {metric.name} needs labelled data: give --eval with a 'label' array, or --metric cosine")
        self.metric, self.inputs, self.labels, self.hold = metric, inputs, labels, tuple(hold)
        self.reference = model_outputs(reference_model, inputs)
        self.changes = Changes.find(model_inputs(inputs), self.reference)
        self.judged_reference = self.judged(self.reference)
        self.baseline = self._score(self.reference)
        paired = metric.bounded and metric.per_sample is not None
        self._baseline_hits = metric.per_sample(self.reference, labels) if paired else None  # type: ignore[misc]

    def measure(self, model: Model) -> tuple[float, float]:
        """``model``'s score and the drop a budget holds it to (:meth:`judge`)."""
        return self.judge(model_outputs(model, self.inputs))

    def judge(self, outputs: Mapping[str, np.ndarray]) -> tuple[float, float]:
        """The score of ``outputs`` and how much it fell from the input model's (positive: worse): for a
        bounded labelled metric, the upper 90 % confidence bound of the mean paired per-sample drop."""
        score, drop = self.judge_metric(outputs)
        return score, max(drop, 1.0 - self.held_cosine(outputs)) if self.hold else drop

    def judged(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``outputs`` as cosines read them: an output that is an input plus a change (``changes``) as its change."""
        return self.changes.view(outputs)

    def _score(self, outputs: Mapping[str, np.ndarray]) -> float:
        if self.metric.needs_reference:
            return self.metric(self.judged(outputs), self.labels, self.judged_reference)
        return self.metric(outputs, self.labels, self.reference)

    def judge_metric(self, outputs: Mapping[str, np.ndarray]) -> tuple[float, float]:
        """:meth:`judge` of the metric alone, without the ``hold`` outputs."""
        score = self._score(outputs)
        if self._baseline_hits is None:
            return score, self.baseline - score
        drops = self._baseline_hits - self.metric.per_sample(outputs, self.labels)  # type: ignore[misc]
        return score, -lower_bound(-drops)

    def held_cosine(self, outputs: Mapping[str, np.ndarray]) -> float:
        """The least 90 % lower bound of the per-sample cosine over the ``hold`` outputs (1 without any)."""
        judged = self.judged(outputs)
        return _bounded_cosine({n: judged[n] for n in self.hold}, {n: self.judged_reference[n] for n in self.hold})

    def drop(self, model: Model) -> float:
        """How much the metric fell from the input model's (positive: worse)."""
        return self.measure(model)[1]
