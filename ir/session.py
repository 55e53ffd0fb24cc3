"""onnxruntime, the numerical reference for every pass.

Sessions are built from the in-memory model without copying it: intermediate
tensors are exposed as extra outputs by editing the graph's output list for the
moment of serialisation, and models too large for one protobuf go through a
temporary folder with external data.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from optc.errors import OptcError
from optc.ir.model import EXTERNAL_SAVE_ABOVE_BYTES, Model, TensorSpec

# Symbolic dims without a better guess run with this size.
DEFAULT_DYNAMIC_DIM = 1


@contextlib.contextmanager
def _extra_outputs(model: Model, names: Sequence[str]) -> Iterator[None]:
    graph = model.graph
    existing = {o.name for o in graph.output}
    added = [n for n in dict.fromkeys(names) if n not in existing]
    types = {vi.name: vi for vi in list(graph.value_info) + list(graph.input)}
    for name in added:
        vi = graph.output.add()
        if name in types:
            vi.CopyFrom(types[name])
            if vi.type.HasField("tensor_type"):
                # Only the element type: a wrong intermediate shape would make ORT refuse the graph.
                vi.type.tensor_type.ClearField("shape")
        else:
            vi.name = name
    try:
        yield
    finally:
        if added:
            del graph.output[len(graph.output) - len(added):]


def make_session(
    model: Model,
    *,
    extra_outputs: Sequence[str] = (),
    optimize: bool = True,
    threads: int | None = None,
) -> ort.InferenceSession:
    """An onnxruntime CPU session for ``model`` (with ``extra_outputs`` exposed)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    with _extra_outputs(model, extra_outputs):
        try:
            if model.weight_bytes() <= EXTERNAL_SAVE_ABOVE_BYTES:
                return ort.InferenceSession(model.proto.SerializeToString(), options, providers=providers)
            from optc.ir.io import save_model  # large models only: a file with external data

            with tempfile.TemporaryDirectory(prefix="optc-ort-") as tmp:
                path = Path(tmp) / "model.onnx"
                save_model(model, path, external_data=True)
                return ort.InferenceSession(str(path), options, providers=providers)
        except (ort.capi.onnxruntime_pybind11_state.Fail, RuntimeError, ValueError) as exc:  # type: ignore[attr-defined]
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OptcError(f"onnxruntime cannot load the model: {first}") from exc


def run(
    model: Model | ort.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Run once; returns the requested outputs (all graph outputs by default) by name."""
    session = model if isinstance(model, ort.InferenceSession) else make_session(model, extra_outputs=outputs or ())
    names = list(outputs) if outputs else [o.name for o in session.get_outputs()]
    values = session.run(names, dict(feeds))
    return dict(zip(names, values))


def concrete_shape(spec: TensorSpec, batch: int = DEFAULT_DYNAMIC_DIM) -> tuple[int, ...]:
    if spec.shape is None:
        raise OptcError(f"input '{spec.name}' has no declared shape; give one with --input-shape")
    return tuple(d if isinstance(d, int) else batch for d in spec.shape)


def sample_feeds(model: Model, *, seed: int = 0, batch: int = DEFAULT_DYNAMIC_DIM) -> dict[str, np.ndarray]:
    """Random inputs matching the model's input specs (dynamic dims set to ``batch``).

    Integer inputs get small non-negative values (valid as token ids or indices);
    floats are standard normal.
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in model.inputs:
        shape = concrete_shape(spec, batch)
        dtype = spec.dtype or np.dtype(np.float32)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise OptcError(f"input '{spec.name}': cannot make sample data of type {dtype}")
    return feeds


def onnx_type_name(dtype: np.dtype) -> str:
    return onnx.helper.tensor_dtype_to_string(onnx.helper.np_dtype_to_tensor_dtype(dtype))


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
