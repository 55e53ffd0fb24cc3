"""The one error hierarchy of optc.

The CLI maps :class:`OptcError` subclasses to a one-line message and exit code 2
(bad input or usage); anything else is an internal error (exit code 1).
"""
from __future__ import annotations


class OptcError(Exception):
    """Base of every error optc raises on purpose."""


class ModelLoadError(OptcError):
    """The model file cannot be read, is malformed, or is unsafe to load."""


class ConfigError(OptcError):
    """A pipeline, pass option, calibration set or CLI argument is invalid."""


class PassError(OptcError):
    """A pass failed; the message names the pass (and the node, where known)."""

    def __init__(self, message: str, *, pass_name: str | None = None, node: str | None = None):
        prefix = f"pass '{pass_name}'" if pass_name else "pass"
        where = f" at node '{node}'" if node else ""
        super().__init__(f"{prefix}{where}: {message}")
        self.pass_name = pass_name
        self.node = node


class PassCrash(RuntimeError):
    """A pass raised something unexpected: a bug in optc, not bad input (exit code 1).

    Not an :class:`OptcError` on purpose; the message names the pass and the passes before it.
    """

    def __init__(self, message: str, *, pass_name: str):
        super().__init__(f"pass '{pass_name}': {message}")
        self.pass_name = pass_name


class TargetError(OptcError):
    """Compilation for a target failed or the target is misconfigured."""
