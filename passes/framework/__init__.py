"""The pass framework: what a pass is, its options, pipelines, the manager, instruments, the registry.

Pass families import from here; nothing here imports a family (the registry
loads them by name, on first use).
"""
from __future__ import annotations

from optc.passes.framework.base import NoOptions, Pass, PassConfig, PassContext, PassResult, Requirement, option
from optc.passes.framework.manager import Instrument, PassManager, PassRecord, PipelineResult
from optc.passes.framework.pipeline import NAMED_PIPELINES, load_pipeline_file, make_pass, parse_pass_spec, parse_pass_specs
from optc.passes.framework.registry import BUILTIN_FAMILIES, pass_class, register_pass, registered_passes

__all__ = [
    "BUILTIN_FAMILIES", "NAMED_PIPELINES", "Instrument", "NoOptions", "Pass", "PassConfig", "PassContext", "PassManager", "PassRecord",
    "PassResult", "PipelineResult", "Requirement", "load_pipeline_file", "make_pass", "option", "parse_pass_spec",
    "parse_pass_specs", "pass_class", "register_pass", "registered_passes",
]
