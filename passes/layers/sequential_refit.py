"""One layer of a compressed model refit on its own input to the original layer's output.

Shared by prune-channels (``reconstruct=sequential``) and distill
(``reconstruct=sequential``): layers are refit in graph order, each on its
input *as the compressed model computes it* (so upstream error is corrected,
not compounded), against what the original layer produced on the original
input (:func:`optc.passes.layers.paired_grams`, :func:`optc.passes.numerics.refit.refit_paired`).
"""
from __future__ import annotations

import numpy as np

from optc.ir.graph import GraphEditor
from optc.ir.model import Model
from optc.passes.layers.bias_fold import add_to_bias
from optc.data.calibration import CalibrationSet
from optc.passes.layers import LinearLayer, matrix_to_weight, paired_grams, weight_matrix
from optc.passes.numerics.refit import Refit, refit_paired


def refit_layer(
    model: Model, layer: LinearLayer, reference: Model, reference_layer: LinearLayer, target_w: np.ndarray,
    calibration: CalibrationSet, *, ridge: float, max_batches: int | None, seed: int = 0,
    bias_already: np.ndarray | None = None,
) -> tuple[Model, Refit]:
    """``model`` with ``layer``'s weight and bias refit so that it reproduces ``target_w`` (``out x d_ref``,
    rows of the reference layer's weight matrix) applied to ``reference_layer``'s input.

    ``bias_already``: a bias delta the layer's bias already holds (a previous fit); only the
    difference is added.
    """
    # 1024 rows a batch: the fit has at most a few thousand columns, and each layer costs a pass.
    pg = paired_grams(model, [layer], reference, [reference_layer], calibration, max_batches=max_batches, max_rows_per_batch=1024, seed=seed)[layer.node]
    prior = weight_matrix(layer, model.initializer_array(layer.weight).astype(np.float64))
    fit = refit_paired(pg, target_w, prior, ridge=ridge)
    editor = GraphEditor(model)
    node = next(n for n in editor.nodes if n.name == layer.node)
    dtype = np.asarray(editor.constant_value(node.inputs[1])).dtype
    node.inputs[1] = editor.add_constant(node.inputs[1].name, matrix_to_weight(layer, fit.weight).astype(dtype))
    delta = fit.bias_delta - (bias_already if bias_already is not None else 0.0)
    if np.any(delta):
        add_to_bias(editor, node, delta)
    return editor.commit(), fit
