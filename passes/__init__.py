"""Graph-rewriting passes. The folder tree is the map:

* ``framework/``: what a pass is (base, options), pipelines, the manager, instruments, the registry;
* ``numerics/``: shared numerical solvers that need only numpy (Grams, least-squares refit,
  low rank, OBS, unit selection);
* ``layers/``: shared views of linear layers over the IR (weight matrices, streamed Grams,
  bias folding, the one graph-order sequential refit);
* one package per family, holding its passes (one module each, named after the pass) and
  its own helpers: ``canonicalize/``, ``prune/``, ``sparsify/``, ``quantize/``, ``distill/``.

A family imports the framework, the shared packages, ``optc.ir`` and ``optc.data``,
never another family (``tests/test_boundaries.py`` enforces it).
"""
from __future__ import annotations

from optc.passes.framework import (
    NAMED_PIPELINES,
    Instrument,
    NoOptions,
    Pass,
    PassConfig,
    PassContext,
    PassManager,
    PassRecord,
    PassResult,
    PipelineResult,
    Requirement,
    load_pipeline_file,
    make_pass,
    option,
    parse_pass_spec,
    parse_pass_specs,
    pass_class,
    register_pass,
    registered_passes,
)

__all__ = [
    "NAMED_PIPELINES", "Instrument", "NoOptions", "Pass", "PassConfig", "PassContext", "PassManager", "PassRecord", "PassResult",
    "PipelineResult", "Requirement", "load_pipeline_file", "make_pass", "option", "parse_pass_spec", "parse_pass_specs",
    "pass_class", "register_pass", "registered_passes",
]
