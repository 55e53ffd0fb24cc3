"""Binding a graph input to a constant (``--input-value NAME=VALUE``).

Some inputs are settings, not data: Silero VAD's ``sr`` (16000 or 8000) chooses, through an ``If``, between
two copies of the whole network, and a compiled artifact needs one. Bound, the input becomes an initializer
with the value given; each ``If`` whose condition it decides is replaced by the branch taken at once
(:func:`~optc.ir.branches.inline_decided_ifs`, before onnxruntime sees the model), ``fold-constants`` folds
the rest, and the model, its reports and its artifact no longer have that input. Data that
still holds an array for it (a calibration set made for the original model) must hold that value: the
array is checked, then dropped (:func:`check_bound_arrays`).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from onnx import numpy_helper

from optc.errors import ConfigError
from optc.ir.branches import inline_decided_ifs
from optc.ir.model import Model, spec_from_value_info
from optc.ir.shapes import graph_input

_VALUE_RE = re.compile(r"^(?P<name>[^=]+)=(?P<values>[^=]+)$")
MAX_ELEMENTS = 4096  # a setting, or a small table: a tensor of data belongs in the data


def parse_value_spec(spec: str) -> tuple[str, list[str]]:
    """``name=16000`` or ``name=1,0,1``: the name and the values as written."""
    m = _VALUE_RE.match(spec.strip())
    if not m or not m.group("name").strip():
        raise ConfigError(f"bad input value '{spec[:200]}': expected NAME=VALUE or NAME=V1,V2,..., for example sr=16000")
    values = [v.strip() for v in m.group("values").split(",")]
    if any(not v for v in values) or len(values) > MAX_ELEMENTS:
        raise ConfigError(f"bad input value '{spec[:200]}': expected 1 to {MAX_ELEMENTS} comma-separated numbers")
    return m.group("name").strip(), values


def bind_inputs(model: Model, values: Mapping[str, Any]) -> bool:
    """Turn each named graph input into an initializer holding the value given; True when anything changed.

    A value is a number, a boolean or a string of one (as ``--input-value`` or ``pipeline.yaml`` give it), or a list or
    tuple of them. It takes the input's declared dtype; a single value fills a rank-0 input, or any static shape whose
    elements it is repeated over; a list must have as many values as the declared shape has elements.

    Raises:
        ConfigError: unknown input, a value its dtype cannot hold exactly, or a count that fits no declared shape.
    """
    changed = False
    for name, given in values.items():
        vi = graph_input(model, name, "--input-value")
        array = _array_for(name, spec_from_value_info(vi), list(given) if isinstance(given, (list, tuple)) else [given])
        model.graph.initializer.append(numpy_helper.from_array(array, name))
        model.graph.input.remove(vi)
        model.bound[name] = array
        model.notes.append(f"input '{name}' bound to {_text(array)} (--input-value): it is a constant of the model")
        changed = True
    if changed:
        for label in inline_decided_ifs(model):
            model.notes.append(f"{label}: its condition is decided by the bound inputs; the branch taken replaces it")
    return changed


def _array_for(name: str, spec, given: list) -> np.ndarray:
    where = f"--input-value {name}"
    if spec.dtype is None or spec.shape is None:
        raise ConfigError(f"{where}: the model does not declare the input's type and rank")
    dtype = np.dtype(spec.dtype)
    if dtype.kind not in "biuf":
        raise ConfigError(f"{where}: a {dtype} input cannot be bound; only numbers and booleans can")
    raw = [_number(where, v, dtype) for v in given]
    shape = spec.shape
    if all(isinstance(d, int) for d in shape):
        size = int(np.prod(shape)) if shape else 1
        if len(raw) == 1:
            raw = raw * size
        elif len(raw) != size:
            raise ConfigError(f"{where}: {len(raw)} values, the input's shape {list(shape)} holds {size}")
        return np.array(raw, dtype=dtype).reshape(shape)
    if len(shape) == 1:  # 1-D of dynamic length: the values given set it
        return np.array(raw, dtype=dtype)
    raise ConfigError(f"{where}: the input's shape {list(shape)} is not static; freeze it with --input-shape first")


def _number(where: str, text, dtype: np.dtype):
    value = str(text).strip()
    if dtype.kind == "b":
        low = value.lower()
        if low in ("true", "1"):
            return True
        if low in ("false", "0"):
            return False
        raise ConfigError(f"{where}: '{value[:40]}' is not a boolean (true, false, 1 or 0)")
    try:
        number = float(value) if dtype.kind == "f" else int(value, 0)
    except ValueError:
        kind = "a number" if dtype.kind == "f" else "an integer"
        raise ConfigError(f"{where}: '{value[:40]}' is not {kind} (the input is {dtype})") from None
    if dtype.kind == "f":
        if not np.isfinite(number):
            raise ConfigError(f"{where}: '{value[:40]}' is not finite")
        return number
    info = np.iinfo(dtype)
    if not info.min <= number <= info.max:
        raise ConfigError(f"{where}: {number} does not fit the input's {dtype} ({info.min} to {info.max})")
    return number


def _text(array: np.ndarray) -> str:
    flat = array.ravel()
    if flat.size == 1:
        return str(flat[0].item())
    shown = ", ".join(str(v.item()) for v in flat[:8])
    return f"[{shown}{', ...' if flat.size > 8 else ''}] (shape {list(array.shape)})"


def check_bound_arrays(bound: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray], label: str) -> None:
    """Data holding an array for a bound input (``Model.bound``): every sample must hold the bound value, else the
    data was made for another use of the model. Samples stack on the leading axes, the value fills the trailing ones."""
    for name, value in bound.items():
        if name not in arrays:
            continue
        got = np.asarray(arrays[name])
        same = got.size > 0 and got.shape[got.ndim - value.ndim:] == value.shape and bool(np.all(got == value))
        if not same:
            differs = next((v.item() for v in got.ravel() if v != value.ravel()[0]), None) if got.size else "no value"
            raise ConfigError(f"{label}: input '{name}' is bound to {_text(value)} (--input-value), but the data holds "
                              f"{differs if differs is not None else 'an array of shape ' + str(list(got.shape))}")


def describe_values(model: Model) -> dict[str, object]:
    """The bound values as ``pipeline.yaml`` records them: a scalar, or a flat list."""
    return {name: (a.item() if a.size == 1 else a.ravel().tolist()) for name, a in model.bound.items()}


def values_from_document(raw, where: str) -> dict[str, list[str]]:
    """``input_values`` of a pipeline file: name -> a number (or boolean), or a list of them."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: 'input_values' must map input names to values, such as sr: 16000")
    out = {}
    for name, value in raw.items():
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, (int, float, bool)) for v in items):
            raise ConfigError(f"{where}: input_values.{name} must be a number or a list of numbers, not {value!r}")
        out[str(name)] = [str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, float) else str(v) for v in items]
    return out


__all__ = ["bind_inputs", "check_bound_arrays", "describe_values", "parse_value_spec", "values_from_document"]
