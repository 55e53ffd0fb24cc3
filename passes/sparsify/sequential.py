"""Sequential sparsification (``sparsify:stages=k``): later layers are fitted on the inputs the sparser model computes.

With one stage every layer's Hessian comes from the dense model, so the error
of early layers reaches later ones uncorrected. With ``k`` stages the layers
are split by depth (the number of sparsified layers on the longest path from
the graph inputs to a layer's input), into ``k`` consecutive groups of depths.
Stage 1 is fitted on the dense model's inputs; each later stage on the inputs
``A`` of the model whose earlier stages are already sparse, against the dense
model's outputs on its own inputs ``B`` (rows aligned: same samples, same
positions). The layer objective becomes

    ||W B - W' A||^2 = ||(W* - W') A||^2 + const,   W* = W (B A^T)(A A^T)^-1,

so the OBS sweep runs unchanged on ``W*`` with the Hessian ``A A^T``: the
upstream error is corrected, not compounded (the correction SparseGPT leaves
out by targeting ``W A``). With bias correction both inputs are centred and
the bias absorbs ``W mean(b) - W' mean(a)``. ``(A A^T)^-1`` is damped like the
OBS Hessian. Each stage after the first costs two calibration passes (the
partly sparse model and the dense one).

Measured (``benchmarks/sparsify.py``): it pays where one-shot pruning breaks
down (sample CNN, 70 % unstructured: 76.2 -> 94.0 % top-1; block:4x4 at 50 %:
57.6 -> 89.9 %) but costs a little at moderate levels (CNN 50 %: 97.9 -> 97.1 %;
MiniLM 50 %, 6 stages: held-out cosine 0.940 -> 0.911), so it is off by default.
On MiniLM it is worse on the fitting sentences too (0.946 -> 0.928), so this is
not overfitting; SparseGPT's own target (``W A``, upstream error left in) is
worse still (0.872 held-out, 0.877 fitting).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from optc.ir.model import Model
from optc.ir.view import graph_nodes
from optc.passes.layers import LinearLayer, PairedGram


def layer_depths(model: Model, layers: Sequence[LinearLayer]) -> dict[str, int]:
    """Per layer node: how many of ``layers`` lie on the longest path from the graph inputs to its input."""
    chosen = {l.node for l in layers}
    depth: dict[str, int] = {}
    result: dict[str, int] = {}
    for node in graph_nodes(model):  # topologically sorted (an ONNX requirement)
        d = max((depth.get(t, 0) for t in node.input if t), default=0)
        if node.name in chosen:
            result[node.name] = d
            d += 1
        for t in node.output:
            depth[t] = d
    return result


def split_stages(depths: dict[str, int], layers: Sequence[LinearLayer], stages: int) -> list[list[LinearLayer]]:
    """``layers`` in ``stages`` groups of consecutive depths (fewer when there are fewer depths)."""
    levels = sorted(set(depths[l.node] for l in layers))
    cuts = np.array_split(np.array(levels), min(stages, len(levels)))
    index = {int(level): i for i, chunk in enumerate(cuts) for level in chunk}
    groups: list[list[LinearLayer]] = [[] for _ in cuts]
    for l in layers:
        groups[index[depths[l.node]]].append(l)
    return groups


def _sums(pg: PairedGram, group: int, centred: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Group ``group``'s ``A A^T``, ``A B^T``, ``B B^T`` (about the means when ``centred``) and the means of ``a`` and ``b``."""
    n = max(pg.rows, 1)
    mean_a, mean_b = pg.sum_a[group] / n, pg.sum_b[group] / n
    aa, ab, bb = pg.aa[group], pg.ab[group], pg.bb[group]
    if centred:
        aa = aa - n * np.outer(mean_a, mean_a)
        ab = ab - n * np.outer(mean_a, mean_b)
        bb = bb - n * np.outer(mean_b, mean_b)
    return aa, ab, bb, mean_a, mean_b


def corrected_target(w: np.ndarray, pg: PairedGram, group: int, damp: float, centred: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For group ``group``: ``W*``, the objective sums ``A A^T`` (centred or not), and the means of ``a`` and ``b``.

    ``W* = W (B A^T)(A A^T + damp)^-1`` minimises ``||W B - W* A||^2``.
    """
    n = max(pg.rows, 1)
    aa, ab, _, mean_a, mean_b = _sums(pg, group, centred)
    h = aa / n
    h = h + damp * max(float(np.mean(np.diag(h))), 1e-12) * np.eye(len(h))
    w_star = np.linalg.solve(h, (w @ ab.T / n).T).T  # W (ab)^T h^-1, h symmetric
    return w_star, aa, np.stack([mean_a, mean_b])


def paired_error(w: np.ndarray, w_new: np.ndarray, pg: PairedGram, group: int, centred: bool) -> float:
    """``||W B - W' A||^2`` (centred: with the bias correction applied)."""
    aa, ab, bb, _, _ = _sums(pg, group, centred)
    return float(np.sum((w @ bb) * w) - 2 * np.sum((w_new @ ab) * w) + np.sum((w_new @ aa) * w_new))
