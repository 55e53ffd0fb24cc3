"""Shared views of linear layers (Conv, ConvTranspose, Gemm, MatMul with a constant weight).

* ``linear``: finding the layers and reading their weights as ``(out, in)`` matrices;
* ``grams``: streaming the Gram statistics of their inputs over calibration data;
* ``bias_fold``: adding a correction to a layer's bias (creating one when needed);
* ``sequential_refit``: the one graph-order refit of compressed layers on the compressed model's inputs.
"""
from __future__ import annotations

from optc.passes.layers.grams import input_grams, paired_grams
from optc.passes.layers.linear import LINEAR_OPS, LinearLayer, find_linear_layers, input_row_sums, input_rows, matrix_to_weight, weight_matrix
from optc.passes.numerics.grams import InputGram, PairedGram

__all__ = [
    "LINEAR_OPS", "InputGram", "LinearLayer", "PairedGram", "find_linear_layers", "input_grams", "input_row_sums", "input_rows",
    "matrix_to_weight", "paired_grams", "weight_matrix",
]
