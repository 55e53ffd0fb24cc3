"""Building pass configs from strings (CLI) or parsed files (YAML/TOML).

Every key is checked against the config dataclass before any work is done;
values are converted by the field's declared type, and every error names the
pass, the key and what was allowed.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, get_args, get_origin

from optc.errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
LIST_SEPARATOR = "|"  # inside one --pass option value: exclude=conv1|conv2


def option_docs(config_class: type) -> list[dict[str, Any]]:
    """Name, type, default and help of every option, for ``optc passes``."""
    hints = typing.get_type_hints(config_class)
    docs = []
    for f in dataclasses.fields(config_class):
        default = f.default if f.default is not dataclasses.MISSING else None
        docs.append({"name": f.name, "type": _type_name(hints[f.name]), "default": default, "help": f.metadata.get("help", "")})
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
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be {'an integer' if hint is int else 'a number'}, not {raw!r}") from None
        if hint is int and isinstance(raw, float) and raw != value:
            raise ConfigError(f"{where} must be an integer, not {raw!r}")
        return value
    if hint is str:
        return str(raw)
    raise ConfigError(f"{where}: unsupported option type {hint!r}")


def _type_name(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (tuple, list):
        return f"list of {_type_name(args[0]) if args else 'str'} (separated by '{LIST_SEPARATOR}')"
    return getattr(hint, "__name__", str(hint))
