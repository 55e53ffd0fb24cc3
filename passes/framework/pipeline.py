"""Pipelines: ordered lists of configured passes, from the CLI or a file.

CLI form, repeatable and in order::

    --pass fold-constants --pass prune-channels:ratio=0.3,criterion=l1

File form (YAML or TOML), the same thing::

    passes:                          # YAML
      - fold-constants
      - name: prune-channels
        ratio: 0.3

    [[passes]]                       # TOML
    name = "prune-channels"
    ratio = 0.3

Everything is validated (names, keys, values) before any pass runs.

Pipeline files are untrusted input: only a regular file of at most
:data:`MAX_PIPELINE_FILE_BYTES` is read, and YAML anchors and aliases are
refused (a kilobyte of nested aliases expands to gigabytes; a pipeline never
needs them).
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml

from optc.errors import ConfigError
from optc.ir.io import file_problem, open_regular_file
from optc.passes.framework.base import Pass
from optc.passes.framework.registry import pass_class, registered_passes
from optc.passes.framework.options import build_config

# Larger pipeline files are refused unread (a hand-written one is a few hundred bytes).
MAX_PIPELINE_FILE_BYTES = 1 << 20

CANONICALIZE = ("fold-constants", "conv3d-to-2d", "fold-batchnorm", "remove-identity", "eliminate-dead-code")

# Named pipelines usable wherever a pass name is (``--pass canonicalize``).
NAMED_PIPELINES: dict[str, tuple[str, ...]] = {
    "canonicalize": CANONICALIZE,
}


def make_pass(name: str, options: dict[str, Any] | None = None) -> Pass:
    cls = pass_class(name)
    made = cls(build_config(name, cls.config_class, options or {}))
    made.options_given = frozenset(options or {})
    return made


def parse_pass_spec(spec: str) -> list[Pass]:
    """``NAME`` or ``NAME:key=value,key=value``; a named pipeline expands in place."""
    spec = spec.strip()
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise ConfigError(f"empty pass name in '{spec}'")
    options: dict[str, str] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"bad option '{item}' in '{spec}': expected key=value")
            options[key.strip()] = value.strip()
    if name in NAMED_PIPELINES:
        if options:
            raise ConfigError(f"pipeline '{name}' takes no options")
        return [make_pass(n) for n in NAMED_PIPELINES[name]]
    if name not in registered_passes():
        valid = ", ".join(list(registered_passes()) + list(NAMED_PIPELINES))
        raise ConfigError(f"unknown pass '{name}'; valid passes: {valid}")
    return [make_pass(name, options)]


def parse_pass_specs(specs: list[str]) -> list[Pass]:
    passes: list[Pass] = []
    for spec in specs:
        passes.extend(parse_pass_spec(spec))
    return passes


def load_pipeline_file(path: str | Path) -> list[Pass]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) pipeline file."""
    return pipeline_from_data(read_pipeline_data(path), source=str(path))


def read_pipeline_data(path: str | Path) -> Any:
    """The parsed content of a YAML or TOML pipeline file (see the module docstring for what is refused).

    Raises:
        ConfigError: naming the file and the problem.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise ConfigError(f"pipeline file {path}: no such file")
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"pipeline file {path}: use .yaml, .yml or .toml")
    try:
        with open_regular_file(path) as f:
            raw = f.read(MAX_PIPELINE_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"pipeline file {path}: {file_problem(exc)}") from exc
    if len(raw) > MAX_PIPELINE_FILE_BYTES:
        raise ConfigError(f"pipeline file {path}: larger than {MAX_PIPELINE_FILE_BYTES >> 10} KiB (optc's limit for a pipeline file)")
    text = raw.decode("utf-8", errors="replace")
    try:
        if suffix == ".toml":
            return tomllib.loads(text)
        return _load_yaml(text)
    except ConfigError as exc:
        raise ConfigError(f"pipeline file {path}: {exc}") from exc
    except Exception as exc:  # yaml/toml syntax errors come in several types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"pipeline file {path}: cannot parse: {first}") from exc


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing anchors and aliases before anything is built."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise ConfigError("YAML aliases (*name) are not allowed in a pipeline file")
        anchor = getattr(self.peek_event(), "anchor", None)
        if anchor is not None:
            raise ConfigError(f"YAML anchors (&{anchor}) are not allowed in a pipeline file")
        return super().compose_node(parent, index)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader


def pipeline_from_data(data: Any, *, source: str = "pipeline") -> list[Pass]:
    if isinstance(data, dict):
        unknown = set(data) - {"passes", "pass"}
        if unknown:
            raise ConfigError(f"{source}: unknown top-level key(s) {', '.join(sorted(unknown))}; expected 'passes'")
        data = data.get("passes", data.get("pass"))
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{source}: expected a non-empty list under 'passes'")
    passes: list[Pass] = []
    for i, entry in enumerate(data):
        if isinstance(entry, str):
            passes.extend(parse_pass_spec(entry))
        elif isinstance(entry, dict):
            options = dict(entry)
            name = options.pop("name", None)
            if not isinstance(name, str):
                raise ConfigError(f"{source}: pass #{i + 1} has no 'name'")
            if isinstance(options.get("options"), dict):
                options.update(options.pop("options"))
            if name in NAMED_PIPELINES and not options:
                passes.extend(parse_pass_spec(name))
            else:
                pass_class(name)  # unknown names fail with the list of valid ones
                passes.append(make_pass(name, options))
        else:
            raise ConfigError(f"{source}: pass #{i + 1} must be a name or a mapping with 'name'")
    return passes
