"""Graph-rewriting passes, the pass framework and calibration data."""
from __future__ import annotations

from optc.passes.base import Pass, PassContext, PassResult, Requirement, option, register_pass, registered_passes
from optc.passes.calibration import CalibrationSet, capture_activations
from optc.passes.manager import Instrument, PassManager, PassRecord, PipelineResult
from optc.passes.pipeline import NAMED_PIPELINES, load_pipeline_file, make_pass, parse_pass_spec, parse_pass_specs

__all__ = [
    "NAMED_PIPELINES",
    "CalibrationSet",
    "Instrument",
    "Pass",
    "PassContext",
    "PassManager",
    "PassRecord",
    "PassResult",
    "PipelineResult",
    "Requirement",
    "capture_activations",
    "load_pipeline_file",
    "make_pass",
    "option",
    "parse_pass_spec",
    "parse_pass_specs",
    "register_pass",
    "registered_passes",
]
