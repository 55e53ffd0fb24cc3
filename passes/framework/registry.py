"""The pass registry: pass names to classes, and the families that ship with optc.

``BUILTIN_FAMILIES`` is the table of contents: each family package's
``__init__`` imports its pass modules, whose ``@register_pass`` decorators fill
the registry. Adding a pass is one module in its family, one import line in the
family's ``__init__`` and one test. Families are imported on first use, so
``optc --help`` does not pay for numpy-heavy pass modules.
"""
from __future__ import annotations

import importlib

from optc.errors import ConfigError
from optc.passes.framework.base import Pass

BUILTIN_FAMILIES = (
    "optc.passes.canonicalize",
    "optc.passes.prune",
    "optc.passes.sparsify",
    "optc.passes.quantize",
    "optc.passes.distill",
)

_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(name: str):
    """Class decorator: make a pass available by ``name`` to pipelines and the CLI."""

    def wrap(cls: type[Pass]) -> type[Pass]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"pass name '{name}' registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def registered_passes() -> dict[str, type[Pass]]:
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def pass_class(name: str) -> type[Pass]:
    passes = registered_passes()
    if name not in passes:
        raise ConfigError(f"unknown pass '{name}'; valid passes: {', '.join(passes)}")
    return passes[name]


def _load_builtin_passes() -> None:
    # Importing a family runs its passes' @register_pass decorators; the list is
    # explicit so that the registry is what this file says, not what a folder holds.
    for family in BUILTIN_FAMILIES:
        importlib.import_module(family)
