"""Least-squares refit of a layer that loses input columns."""
from __future__ import annotations

import numpy as np

from optc.passes.layers import InputGram
from optc.passes.numerics.refit import refit_columns


def _gram(x: np.ndarray) -> InputGram:
    return InputGram(x.T @ x[None], x.sum(axis=0)[None], len(x))


def test_dependent_and_constant_columns_are_recovered_exactly():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(500, 4))
    # Column 4 is a mix of 0 and 2; column 5 is constant: both can go without loss.
    x = np.column_stack([base, base[:, 0] - 3 * base[:, 2], np.full(500, 0.7)])
    w = rng.normal(size=(3, 6))
    keep = np.arange(4)
    fit = refit_columns(_gram(x), w, keep, ridge=1e-10)
    y = x @ w.T
    y_fit = x[:, keep] @ fit.weight.T + fit.bias_delta
    np.testing.assert_allclose(y_fit, y, atol=1e-6)
    assert fit.rel_error < 1e-10 < fit.rel_error_plain
    # The closed-form error matches the error measured on the rows.
    plain = x[:, keep] @ w[:, keep].T
    np.testing.assert_allclose(fit.rel_error_plain, ((y - plain) ** 2).sum() / (y**2).sum(), rtol=1e-6)


def test_refit_beats_dropping_on_correlated_inputs():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(2000, 3))
    x = z @ rng.normal(size=(3, 8)) + 0.1 * rng.normal(size=(2000, 8))
    w = rng.normal(size=(5, 8))
    fit = refit_columns(_gram(x), w, np.array([0, 2, 5, 7]))
    assert fit.rel_error < 0.1 * fit.rel_error_plain
    assert fit.weight.shape == (5, 4)


def test_without_bias_the_delta_is_zero():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 4)) + 1.0
    fit = refit_columns(_gram(x), rng.normal(size=(2, 4)), np.array([0, 1]), bias=False)
    assert not fit.bias_delta.any()
