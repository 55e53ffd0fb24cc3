"""Numerical solvers shared by the pass families. Only numpy: no graph, no onnxruntime.

* ``grams``: the second-moment statistics the solvers read (``InputGram``, ``PairedGram``);
* ``refit``: least-squares refit of a layer that loses input columns;
* ``lowrank``: activation-aware low-rank factorisations;
* ``obs``: Optimal Brain Surgeon sweeps (sparsification, GPTQ rounding);
* ``unit_selection``: which input units to keep, with the refit error of every width.
"""
