"""The one error hierarchy of optc.

The CLI maps :class:`OptcError` subclasses to a one-line message and exit code 2
(bad input or usage); anything else is an internal error (exit code 1).

Messages quote names from models and files, which are untrusted: an
:class:`OptcError` reads as :func:`visible_text` (an escape sequence in a
tensor name is shown as ``\\x1b``, not sent to the terminal).
"""
from __future__ import annotations

import unicodedata

# Control (Cc), format (Cf: bidirectional overrides, zero-width) and line/paragraph separators.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})



def first_line(exc: BaseException) -> str:
    """An exception's first line (its message, before any backtrace), or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

def visible_text(text: str, *, keep: str = "") -> str:
    """``text`` with control and format characters written as Python escapes (``\\x1b``, ``\\u202e``).

    Characters in ``keep`` (such as ``"\\n"``) are left as they are.
    """
    if text.isprintable():
        return text
    return "".join(
        ch.encode("unicode_escape").decode("ascii") if ch not in keep and unicodedata.category(ch) in _HIDDEN_CATEGORIES else ch
        for ch in text
    )


class OptcError(Exception):
    """Base of every error optc raises on purpose."""

    def __str__(self) -> str:
        return visible_text(super().__str__(), keep="\n\t")


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
