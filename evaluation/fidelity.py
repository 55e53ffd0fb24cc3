"""How close one model's outputs are to another's: the one place fidelity is computed.

Four views of the same comparison, each for a different reader:

* :func:`compare_outputs`: per output, the worst absolute error, that error
  relative to the reference's range, and the cosine of the whole tensors
  (``--verify-each`` and the report's fidelity line).
* :func:`sample_cosines`: the cosine of every sample's flattened output, so a
  budget can be a *mean per-sample* cosine that one bad sample cannot hide in.
* :func:`decision_agreement`: for an output whose last axis holds class scores
  (:func:`class_scores`), the fraction of positions whose argmax is the
  reference's. Cosine alone is too loose a proxy for such outputs: confident
  positions dominate it, while the decisions that flip are the near-ties (a CTC
  OCR model kept cosine 0.992 and lost 1.5 points of character accuracy; the
  argmax of its frames agreed at 97.5 %).
* :func:`sample_agreements` and :func:`lower_bound`: the same per sample, and
  a confidence bound on their mean for budgets checked on few samples.
* :func:`fidelity_drop`: a loss for accuracy budgets, ``1 - mean per-sample
  cosine`` of the output where it is least, ``1 - top-1 agreement``, or the
  larger of the cosine's drop and the class-score outputs' disagreement with
  the reference.

Which outputs are class scores is read from the reference's values, not from
names, so that embeddings, boxes and regression heads are never judged by an
argmax that means nothing. Trailing axes of size 1 are dropped (``[N, C, 1, 1]``);
then a float output of rank >= 2 whose last axis has >= 2 entries is class
scores over that axis, every position of the leading axes one decision, when

* every position holds a probability distribution (non-negative, summing to 1:
  a softmax, decided or not), or
* the reference decides with the scores: at at least :data:`DECISIVE_SHARE` of the
  positions their softmax gives the top class a probability of at least
  :data:`DECISIVE_PROBABILITY` and the top score stands :data:`DECISIVE_GAP` standard
  deviations of the position's scores above the next (logits, log-probabilities).
  The gap is what tells logits from features of a large scale: openWakeWord's
  96-value speech embedding and its 32-bin log-mel frames passed the softmax test
  alone (their top scores stand 0.24 and 0.36 deviations above the next, at the median),
  and their argmax, which means nothing, refused an int8 embedding at cosine 0.999.
  Trained classifiers stand well clear: MNIST's digits 2.7 at the median, 97 % of
  positions above 1; ddddocr's CTC frames 8.2, Magika's 214 content types 14.

One value per sample in [0, 1] (``[N]`` or ``[N, 1]``: a sigmoid, Silero VAD's
speech probability) is a binary decision at 0.5, read as the two scores
``[1 - p, p]``. Such an output's per-sample cosine would only compare signs, so
:func:`sample_cosines` scores an output of one value per sample over the samples
instead, by their :func:`concordance`, which unlike the cosine sees a change of scale, and, where it
varies over the samples, by Lin's concordance correlation too, which sees a shift relative to that spread.

Measured on the zoo: softmax heads (the ImageNet classifiers, MTCNN's face
probability, Magika, RapidOCR's CTC recogniser) pass the first test, ddddocr's
raw CTC logits the second (top class >= 0.5 at 99.7 % of frames); MiniLM's
normalised embedding, MTCNN's boxes and landmarks, CREPE's and Basic Pitch's
sigmoid maps, the YOLO-style detection tensors (top class >= 0.5 at 2-3 % of
positions) and LSTM states fail both and are held to the cosine only.
Unnormalised values spread by several units (boxes in pixels) would pass the
second test: for them the argmax check is stricter than it needs to be, never
looser than the cosine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np


def compare_outputs(reference: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per output: max absolute error, max error relative to the reference's range, cosine, and for an
    output holding class scores the share of positions whose argmax is the reference's (``agreement``)."""
    out: dict[str, dict[str, float]] = {}
    for name, ref in reference.items():
        got = actual[name]
        if ref.shape != got.shape:
            out[name] = {"max_abs": float("inf"), "max_rel": float("inf"), "cosine": float("nan"), "shape_changed": 1.0}
            continue
        r = ref.astype(np.float64).ravel()
        g = got.astype(np.float64).ravel()
        # NaN or inf in both at the same place (sqrt or log of random inputs) is agreement, not error.
        agree = ~np.isfinite(r) & ((r == g) | (np.isnan(r) & np.isnan(g)))
        if agree.any():
            r, g = r[~agree], g[~agree]
        diff = np.abs(r - g)
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(r).max()) if r.size else 0.0
        denom = float(np.linalg.norm(r) * np.linalg.norm(g))
        if not np.isfinite(denom):  # NaN/inf outputs: say so rather than score them
            cosine = float("nan")
        else:
            cosine = float(r @ g / denom) if denom > 0 else (1.0 if max_abs == 0 else 0.0)
        out[name] = {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else max_abs, "cosine": cosine}
        agreement = decision_agreement(ref, got)
        if agreement is not None:
            out[name]["agreement"] = agreement
    return out


RESIDUAL_SHARE = 0.5  # an output within half its own size of an input of its shape is that input plus a change


def residual_bases(inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> dict[str, str]:
    """The outputs that are an input plus a change (``y = x + f(x)``), output name -> input name.

    What such a model does is the change: a watermark encoder's mark, the noise a denoiser removes. Its whole
    output's cosine is the input's: on invisible-watermark's RivaGAN encoder, which adds 2.5 % to a frame,
    quantize read cosine 1.0000 while the mark it adds moved to 0.976. Such an output is judged by its change
    (:class:`Changes`). It is one when, at every sample, it differs from a float input of its shape by at most
    :data:`RESIDUAL_SHARE` of its own norm, and by something.
    """
    bases: dict[str, str] = {}
    for out_name, y in outputs.items():
        if y.dtype.kind != "f" or y.ndim == 0 or not len(y):
            continue
        for in_name, x in inputs.items():
            x = np.asarray(x)
            if x.dtype.kind != "f" or x.shape != y.shape:
                continue
            y64 = y.astype(np.float64).reshape(len(y), -1)
            change = np.linalg.norm(y64 - x.astype(np.float64).reshape(len(y), -1), axis=1)
            if np.all(change > 0) and np.all(change <= RESIDUAL_SHARE * np.linalg.norm(y64, axis=1)):
                bases[out_name] = in_name
                break
    return bases


def joined_feeds(feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Each input of several feeds joined on axis 0, as outputs are; an input given whole and shaped
    differently per feed (a state) is left out: no output is one of it plus a change."""
    joined: dict[str, np.ndarray] = {}
    for name in (feeds[0] if feeds else {}):
        try:
            joined[name] = np.concatenate([np.atleast_1d(np.asarray(f[name])) for f in feeds])
        except ValueError:
            continue
    return joined


@dataclass(frozen=True)
class Changes:
    """The outputs that are an input plus a change (:func:`residual_bases`) and the inputs they change: :meth:`view`
    reads such outputs as their change, for every cosine that judges them (budgets, quantize's fallback, the report)."""

    bases: Mapping[str, str]  # output name -> input name
    given: Mapping[str, np.ndarray]  # those inputs' values, joined on axis 0 as the outputs are

    @classmethod
    def find(cls, inputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> Changes:
        bases = residual_bases(inputs, reference)
        return cls(bases, {b: np.asarray(inputs[b]) for b in bases.values()})

    def view(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``outputs`` with each output of ``bases`` replaced by what it adds to its input."""
        out = dict(outputs)
        for name, base in self.bases.items():
            if name in out and out[name].shape == self.given[base].shape:
                out[name] = out[name].astype(np.float64) - self.given[base].astype(np.float64)
        return out


NO_CHANGES = Changes({}, {})


def sample_cosines(reference: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Cosine between each sample's flattened reference and actual output (1 where both are zero).

    The leading axis is the sample axis; a 0-d output counts as one sample.
    """
    n = len(reference) if reference.ndim else 1
    r = reference.astype(np.float64).reshape(n, -1)
    a = actual.astype(np.float64).reshape(n, -1)
    if r.shape[1] == 1 and n > 1:  # one value per sample: its cosine is a sign test; score the samples together
        together = _jackknife(r.ravel(), a.ravel())
        # The concordance about zero cannot see a shift that is small beside the values themselves (a quality score of
        # 3 +- 0.3 shifted by 0.2 reads 0.998); held by Lin's concordance about the mean too, where the score varies.
        if n > 2 and r.std() > SPREAD * np.sqrt(np.mean(r * r)):
            centred = _jackknife_ccc(r, a)
            if centred.mean() < together.mean():
                return centred
        return together
    denom = np.linalg.norm(r, axis=1) * np.linalg.norm(a, axis=1)
    cosines = np.where(denom > 0, np.sum(r * a, axis=1) / np.maximum(denom, 1e-300), 1.0)
    if 2 <= r.shape[1] <= FEW_VALUES and n > 2:
        # A few scores a sample (DNSMOS's three opinion scores, a box): their cosine cannot see a shift that
        # moves every score alike. Each score is also held over the samples, by its concordance correlation.
        agreement = _jackknife_ccc(r, a)
        if agreement.mean() < cosines.mean():
            return agreement
    return cosines


FEW_VALUES = 4  # outputs of at most this many values a sample are also judged score by score (sample_cosines)
# A one-value output is held by its concordance about the mean only where it varies over the samples by more than this
# share of its magnitude: about a near-constant output, rounding alone reads as disagreement.
SPREAD = 1e-3


def _jackknife_ccc(r: np.ndarray, a: np.ndarray) -> np.ndarray:
    """The least over the columns of Lin's concordance correlation ``2 cov(r, a) / (var r + var a + (mean r - mean a)^2)``,
    as jackknife pseudo-values over the samples (rows) so that a bound over them is as wide as the samples warrant.

    It sees a shift and a change of scale, relative to how much each score varies over the samples: DNSMOS's
    scores (spread 0.7-1.0 over clips) kept per-sample cosine 0.9987 under sparsify while every score fell by
    0.2 and one by 1.34; a column that does not vary at all agrees when it does not move (1), else not (0)."""
    n = len(r)

    def ccc(sr, sa, srr, saa, sra, m):
        mr, ma = sr / m, sa / m
        vr, va, cov = srr / m - mr * mr, saa / m - ma * ma, sra / m - mr * ma
        denom = vr + va + (mr - ma) ** 2
        return np.where(denom > 1e-300, 2 * cov / np.where(denom > 1e-300, denom, 1.0), 1.0)

    sums = (r.sum(0), a.sum(0), (r * r).sum(0), (a * a).sum(0), (r * a).sum(0))
    whole = ccc(*sums, n).min()
    left_out = ccc(*(s[None] - t for s, t in zip(sums, (r, a, r * r, a * a, r * a))), n - 1).min(axis=1)
    return n * whole - (n - 1) * left_out


def concordance(reference: np.ndarray, actual: np.ndarray) -> float:
    """``2 <r, a> / (|r|^2 + |a|^2)``: the cosine times ``2 |r| |a| / (|r|^2 + |a|^2)``, which sees magnitude.

    The cosine of one score per sample taken over the samples cannot see a change of scale: openWakeWord's
    detector, its scores near 0 but for the few clips that say the word, kept cosine 1.000000 while sparsify
    halved the detections at the 0.5 threshold. Halving every score reads 0.8 here; equal vectors read 1.
    """
    r, a = reference.astype(np.float64).ravel(), actual.astype(np.float64).ravel()
    energy = float(r @ r + a @ a)
    return float(2 * (r @ a) / energy) if energy > 0 else 1.0


def _jackknife(r: np.ndarray, a: np.ndarray) -> np.ndarray:
    """The :func:`concordance` of all samples as jackknife pseudo-values, one per sample: their mean is the
    (bias-corrected) concordance and their spread its standard error, so a confidence bound over them
    (:func:`lower_bound`) is as wide as the samples warrant. As one number repeated, the bound had no width:
    8 held-out clips of a wake-word detector, one of which said the word, bounded its score at its mean."""
    n = len(r)
    whole = concordance(r, a)
    if n < 3:
        return np.full(n, whole)
    cross, energy = r * a, r * r + a * a
    rest = energy.sum() - energy
    left_out = np.where(rest > 0, 2 * (cross.sum() - cross) / np.where(rest > 0, rest, 1.0), 1.0)
    return n * whole - (n - 1) * left_out


PROBABILITY_TOLERANCE = 1e-3  # how far from 1 a softmax's sum may be (float32 rounding over many classes)
DECISIVE_PROBABILITY = 0.5  # the top class is more likely than all the others together
DECISIVE_SHARE = 0.5  # at most positions: a model that decides, not one that scores features
DECISIVE_GAP = 1.0  # top score minus the next, in standard deviations of the position's scores


def class_scores(values: np.ndarray) -> np.ndarray | None:
    """``values`` as ``[positions, classes]`` (float64) when its last axis holds class scores, else None (module docstring)."""
    if values.dtype.kind != "f":
        return None
    shape = list(values.shape)
    while shape and shape[-1] == 1:
        shape.pop()
    if len(shape) == 1 and values.size and np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1:
        p = values.astype(np.float64).reshape(-1, 1)  # a binary decision at 0.5, as two scores
        return np.concatenate([1 - p, p], axis=1)
    if len(shape) < 2 or values.size == 0:
        return None
    scores = values.astype(np.float64).reshape(-1, shape[-1])
    if not np.isfinite(scores).all():
        return None
    if scores.min() >= 0 and np.abs(scores.sum(axis=1) - 1).max() <= PROBABILITY_TOLERANCE:
        return scores
    # softmax's top probability is 1 / sum(exp(s - max)).
    top = 1.0 / np.exp(scores - scores.max(axis=1, keepdims=True)).sum(axis=1)
    best_two = np.partition(scores, scores.shape[1] - 2, axis=1)[:, -2:]
    gap = best_two[:, 1] - best_two[:, 0]  # two classes: always 2 deviations, so the softmax decides alone
    decisive = (top >= DECISIVE_PROBABILITY) & (gap >= DECISIVE_GAP * scores.std(axis=1))
    return scores if np.mean(decisive) >= DECISIVE_SHARE else None


def decision_agreement(reference: np.ndarray, actual: np.ndarray) -> float | None:
    """The fraction of positions whose argmax over the class axis is the reference's; None when
    ``reference`` is not class scores (:func:`class_scores`)."""
    matches = _decision_matches(reference, actual)
    return None if matches is None else float(np.mean(matches))


def sample_agreements(reference: np.ndarray, actual: np.ndarray) -> np.ndarray | None:
    """:func:`decision_agreement` of each sample (the leading axis) on its own; None when not class scores.

    Whether an output holds class scores is read from all samples together, so one
    indecisive sample does not change how the others are judged.
    """
    matches = _decision_matches(reference, actual)
    if matches is None:
        return None
    n = len(reference) if reference.ndim else 1
    return matches.reshape(n, -1).mean(axis=1) if n and matches.size % n == 0 else np.full(max(n, 1), float(np.mean(matches)))


def _decision_matches(reference: np.ndarray, actual: np.ndarray) -> np.ndarray | None:
    """Per position, whether ``actual``'s argmax is ``reference``'s (bool); None when ``reference`` is not class scores."""
    scores = class_scores(reference)
    if scores is None:
        return None
    if actual.shape != reference.shape:
        return np.zeros(len(scores), dtype=bool)
    if reference.size == len(scores):  # one probability per position, read as [1 - p, p]
        p = actual.astype(np.float64).reshape(-1, 1)
        other = np.concatenate([1 - p, p], axis=1)
    else:
        other = actual.reshape(scores.shape)
    # NaN in the compressed model's scores is no decision: it never agrees.
    chosen = np.where(np.isnan(other).any(axis=1), -1, np.nan_to_num(other).argmax(axis=1))
    return chosen == scores.argmax(axis=1)


# One-sided 90 % quantiles of Student's t by degrees of freedom (1..30); beyond, a Cornish-Fisher
# expansion of the normal quantile is within 1e-3 of the table.
_T90 = (3.078, 1.886, 1.638, 1.533, 1.476, 1.440, 1.415, 1.397, 1.383, 1.372, 1.363, 1.356, 1.350, 1.345, 1.341,
        1.337, 1.333, 1.330, 1.328, 1.325, 1.323, 1.321, 1.319, 1.318, 1.316, 1.315, 1.314, 1.313, 1.311, 1.310)
_Z90 = 1.2816


def lower_bound(values: np.ndarray) -> float:
    """One-sided 90 % lower confidence bound of the mean of per-sample ``values`` (Student's t).

    A budget checked on a handful of held-out samples is an estimate: 8 samples
    of an OCR detector read a mean cosine of 0.9911 where 48 others read 0.9901.
    Holding the bound, not the mean, to the floor keeps what passes the check
    within the floor on data the check never saw, at the price of a little
    compression when the samples disagree among themselves.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    mean = float(values.mean())
    if values.size < 2:
        return mean
    df = values.size - 1
    t = _T90[df - 1] if df <= len(_T90) else _Z90 + (_Z90 ** 3 + _Z90) / (4 * df)
    return mean - t * float(values.std(ddof=1)) / float(np.sqrt(values.size))


def fidelity_drop(reference: Sequence[np.ndarray], actual: Sequence[np.ndarray], metric: str) -> float:
    """``1 - mean per-sample cosine`` of the output where it is least (``cosine``), ``1 - top-1 agreement`` of the first (``top1``),
    or ``fidelity``: the larger of the cosine's drop and each class-score output's disagreement
    (:func:`decision_agreement`), the budget metric ``fidelity`` without its confidence bound."""
    if metric == "top1":
        r, a = reference[0], actual[0]
        n = len(r)
        return float(np.mean(r.reshape(n, -1).argmax(-1) != a.reshape(n, -1).argmax(-1)))
    # the least output's, as the budget metric holds it: a mean over a detector's heads hides the one that moved
    cosine = min((float(sample_cosines(r, a).mean()) for r, a in zip(reference, actual) if r.dtype.kind == "f"), default=1.0)
    if metric == "fidelity":
        agreements = [decision_agreement(r, a) for r, a in zip(reference, actual)]
        return 1.0 - min([cosine, *(g for g in agreements if g is not None)])
    return 1.0 - cosine
