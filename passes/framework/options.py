"""Building pass configs from strings (CLI) or parsed files (YAML/TOML), and their bounds.

Every key is checked against the config dataclass before any work is done;
values are converted by the field's declared type, and every error names the
pass, the key and what was allowed.

Numeric options declare their allowed range with the option
(``option(0.5, "...", ge=0, lt=1)``); :func:`check_options` enforces it, and
refuses NaN and infinities, however the config is built: from strings, from
parsed YAML/TOML values (both through :func:`build_config`) or from Python
(``PassConfig.__post_init__``).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from optc.errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
LIST_SEPARATOR = "|"  # inside one --pass option value: exclude=conv1|conv2


@dataclass(frozen=True)
class Bounds:
    """The values a numeric option allows: an interval, optionally on a grid of ``multiple_of``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # (low, ... rather than [low, ...
    high_open: bool = False
    multiple_of: int | None = None

    @classmethod
    def declared(cls, *, ge: float | None, gt: float | None, le: float | None, lt: float | None, multiple_of: int | None) -> Bounds | None:
        """The bounds of ``option(..., ge=, gt=, le=, lt=, multiple_of=)``; None when nothing is declared."""
        if ge is not None and gt is not None or le is not None and lt is not None:
            raise TypeError("give at most one lower bound (ge or gt) and one upper bound (le or lt)")
        if ge is gt is le is lt is multiple_of is None:
            return None
        return cls(low=gt if gt is not None else ge, high=lt if lt is not None else le, low_open=gt is not None, high_open=lt is not None, multiple_of=multiple_of)

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return self.multiple_of is None or value % self.multiple_of == 0

    def __str__(self) -> str:
        """What a message says after "must be": ``in [0, 1)``, ``>= 1``, ``> 0 and a multiple of 4``."""
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {_number(self.low)}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {_number(self.high)}"
        else:
            text = ""
        if self.multiple_of is not None:
            text = f"{text} and a multiple of {self.multiple_of}" if text else f"a multiple of {self.multiple_of}"
        return text


def option_bounds(config_class: type) -> dict[str, Bounds]:
    """The declared bounds of ``config_class``'s options, by field name."""
    return {f.name: f.metadata["bounds"] for f in dataclasses.fields(config_class) if f.metadata.get("bounds") is not None}


def check_options(config: Any, owner: str) -> None:
    """Raise :class:`ConfigError` unless every numeric option of ``config`` is finite and within its bounds.

    ``owner`` opens the message: ``pass 'sparsify'`` or ``SparsifyConfig``.
    """
    for f in dataclasses.fields(config):
        check_option(f"{owner} option '{f.name}'", f, getattr(config, f.name))


def check_option(where: str, f: dataclasses.Field, value: Any) -> None:
    """Raise :class:`ConfigError` if ``value`` is NaN, infinite or outside ``f``'s declared bounds (None passes)."""
    bounds: Bounds | None = f.metadata.get("bounds")
    if value is None:
        return
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not is_number:
        if bounds is not None:
            raise ConfigError(f"{where} must be a number {bounds}, not {value!r}")
        return
    if not math.isfinite(value):  # NaN passes every comparison; inf is no size, ratio or count
        raise ConfigError(f"{where} must be a finite number, not {value}")
    if bounds is not None and not bounds.contains(value):
        raise ConfigError(f"{where} must be {bounds}, not {_number(value)}")


def option_docs(config_class: type) -> list[dict[str, Any]]:
    """Name, type, default, help and allowed range of every option, for ``optc passes``."""
    hints = typing.get_type_hints(config_class)
    docs = []
    for f in dataclasses.fields(config_class):
        default = f.default if f.default is not dataclasses.MISSING else None
        bounds = f.metadata.get("bounds")
        docs.append({
            "name": f.name, "type": _type_name(hints[f.name]), "default": default, "help": f.metadata.get("help", ""),
            "range": str(bounds) if bounds is not None else "",
        })
    return docs


def build_config(pass_name: str, config_class: type, values: dict[str, Any]) -> Any:
    """Instantiate ``config_class`` from ``values`` (strings or already-typed values)."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    hints = typing.get_type_hints(config_class)
    kwargs: dict[str, Any] = {}
    for key, raw in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            valid = ", ".join(fields) or "(this pass takes no options)"
            raise ConfigError(f"pass '{pass_name}' has no option '{key}'; valid options: {valid}")
        kwargs[name] = _convert(pass_name, key, raw, hints[name])
        # Checked here too so that the message names the pass, not the config class.
        check_option(f"pass '{pass_name}' option '{key}'", fields[name], kwargs[name])
    try:
        return config_class(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"pass '{pass_name}': {exc}") from exc


def _convert(pass_name: str, key: str, raw: Any, hint: Any) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    where = f"pass '{pass_name}' option '{key}'"
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "")):
            if type(None) in args:
                return None
        errors = []
        for a in non_none:
            try:
                return _convert(pass_name, key, raw, a)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1] if errors else f"{where}: cannot convert {raw!r}")
    if origin is Literal:
        choices = [str(a) for a in args]
        if str(raw) not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(choices)}, not {raw!r}")
        return next(a for a in args if str(a) == str(raw))
    if origin in (tuple, list):
        if not isinstance(raw, (str, list, tuple)):
            raise ConfigError(f"{where} must be a list (or one text value), not {raw!r}")
        items = raw.split(LIST_SEPARATOR) if isinstance(raw, str) else list(raw)
        item_type = args[0] if args else str
        converted = [_convert(pass_name, key, item, item_type) for item in items if item != ""]
        return tuple(converted) if origin is tuple else converted
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"{where} must be true or false, not {raw!r}")
    if hint in (int, float):
        if isinstance(raw, bool):
            raise ConfigError(f"{where} must be a number, not {raw!r}")
        try:
            value = hint(raw)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
            raise ConfigError(f"{where} must be {'an integer' if hint is int else 'a number'}, not {raw!r}") from None
        if hint is int and isinstance(raw, float) and raw != value:
            raise ConfigError(f"{where} must be an integer, not {raw!r}")
        return value
    if hint is str:
        return str(raw)
    raise ConfigError(f"{where}: unsupported option type {hint!r}")


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "None"
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (tuple, list):
        return f"list of {_type_name(args[0]) if args else 'str'} (separated by '{LIST_SEPARATOR}')"
    return getattr(hint, "__name__", str(hint))


def _number(x: float) -> str:
    if isinstance(x, int) and abs(x) < 10**15:
        return str(x)
    try:
        return repr(float(x))  # shortest exact form; a YAML 1e300 given to an integer option stays short
    except OverflowError:
        return f"an integer of {len(str(abs(x)))} digits"
