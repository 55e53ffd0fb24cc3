"""onnxruntime, the numerical reference for every pass.

Sessions are built from the in-memory model without copying it: intermediate
tensors are exposed as extra outputs by editing the graph's output list for the
moment of serialisation, and models too large for one protobuf go through a
temporary folder with external data.

An onnxruntime error, creating a session or running one, is reported as bad
input (:class:`~optc.errors.OptcError`, exit code 2) with the runtime's
message: the model passed onnx's checker, so the runtime disagreeing with it
is most likely about the model. Before a session is made, models whose
``Loop`` nodes run more than :data:`MAX_LOOP_ITERATIONS` iterations (constant
trip counts, multiplied through nesting) are refused: such a run would not end
in useful time. The model is valid, so optc's own runs of it (fidelity,
latency, ``--verify-each``) are skipped with :func:`unrunnable_reason` as the
reason; only what must run it (a data-driven pass, ``--eval``, a budget) is refused.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from optc.errors import OptcError, first_line
from optc.ir.model import EXTERNAL_SAVE_ABOVE_BYTES, Model, TensorSpec, iter_all_nodes, iter_graphs

logger = logging.getLogger(__name__)

# Symbolic dims without a better guess run with this size.
DEFAULT_DYNAMIC_DIM = 1
# Iterations of Loop bodies in one run, nested loops multiplied (about 2 s for a trivial body).
MAX_LOOP_ITERATIONS = 1_000_000
# Bytes of generated sample inputs, all inputs together.
MAX_SAMPLE_BYTES = 1 << 30

# Every exception class onnxruntime's C++ layer raises (Fail, InvalidArgument, InvalidGraph, ...).
_ORT_ERRORS: tuple[type[BaseException], ...] = tuple(
    obj for obj in vars(ort.capi.onnxruntime_pybind11_state).values()  # type: ignore[attr-defined]
    if isinstance(obj, type) and issubclass(obj, Exception)
)


class Session(ort.InferenceSession):
    """An onnxruntime session whose run errors are :class:`OptcError` (bad input), not crashes."""

    def run(self, output_names: Any, input_feed: Any, run_options: Any = None) -> Any:
        try:
            return super().run(output_names, input_feed, run_options)
        except _ORT_ERRORS as exc:
            raise OptcError(f"onnxruntime cannot run the model: {first_line(exc)}") from exc


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
    spinning: bool = True,
) -> Session:
    """An onnxruntime CPU session for ``model`` (with ``extra_outputs`` exposed); ``spinning=False``: its
    intra-op workers sleep as soon as a run ends instead of spinning for the next one.

    Raises:
        OptcError: the model is beyond :data:`MAX_LOOP_ITERATIONS`, or onnxruntime refuses it.
    """
    reason = unrunnable_reason(model)
    if reason is not None:
        raise OptcError(f"{reason}: optc does not run such a model, and this step must run it (a data-driven pass, --eval or a budget)")
    options = ort.SessionOptions()
    # Errors reach the caller as exceptions; onnxruntime's own log would add lines to stderr.
    options.log_severity_level = 3 if logger.isEnabledFor(logging.DEBUG) else 4
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    with _extra_outputs(model, extra_outputs):
        try:
            if model.weight_bytes() <= EXTERNAL_SAVE_ABOVE_BYTES:
                return Session(model.proto.SerializeToString(), options, providers=providers)
            from optc.ir.io import save_model  # large models only: a file with external data

            with tempfile.TemporaryDirectory(prefix="optc-ort-") as tmp:
                path = Path(tmp) / "model.onnx"
                save_model(model, path, external_data=True)
                return Session(str(path), options, providers=providers)
        except (*_ORT_ERRORS, RuntimeError, ValueError) as exc:
            raise OptcError(f"onnxruntime cannot load the model: {first_line(exc)}{_frozen_branch_hint(model)}") from exc


def _frozen_branch_hint(model: Model) -> str:
    """Why a model with If nodes may load with dynamic inputs and not with frozen ones."""
    froze = any(n.startswith("froze input shapes") or "froze the leading batch" in n for n in model.notes)
    if not froze or not any(n.op_type == "If" for n in iter_all_nodes(model.graph)):
        return ""
    return (" (the input shapes were frozen, and onnxruntime checks every If branch against them: a shape only one "
            "branch accepts is refused; leave that input's dims dynamic)")


def unrunnable_reason(model: Model) -> str | None:
    """Why optc will not run ``model`` (its Loops iterate too often), or None.

    Only constant trip counts (an initializer or a ``Constant`` node feeding
    ``M``) are known before running; a body nested in a Loop counts that Loop's
    trips for every one of its own.
    """
    if not any(n.op_type == "Loop" for n in iter_all_nodes(model.graph)):
        return None
    return _loop_reason(model.graph, 1, _constant_scalars(model.graph), "")


def _constant_scalars(graph: onnx.GraphProto) -> dict[str, int]:
    """Integer scalars defined anywhere in the model (names of subgraphs included)."""
    found: dict[str, int] = {}
    for g in iter_graphs(graph):
        tensors = [(t.name, t) for t in g.initializer]
        for node in g.node:
            if node.op_type == "Constant" and node.output and len(node.attribute) == 1:
                attr = node.attribute[0]
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    tensors.append((node.output[0], attr.t))
                elif attr.name == "value_int":
                    found[node.output[0]] = attr.i
        for name, t in tensors:
            if math.prod(t.dims) == 1 and t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
                with contextlib.suppress(ValueError, TypeError):
                    found[name] = int(numpy_helper.to_array(t).reshape(-1)[0])
    return found


def _loop_reason(graph: onnx.GraphProto, outer: int, constants: dict[str, int], where: str) -> str | None:
    for node in graph.node:
        trips = outer
        if node.op_type == "Loop" and node.input and node.input[0] in constants:
            trips = outer * max(constants[node.input[0]], 0)
            if trips > MAX_LOOP_ITERATIONS:
                return (
                    f"Loop node '{node.name}'{where} runs {trips:.3g} iterations per run (constant trip counts, nested loops "
                    f"multiplied), beyond optc's limit of {MAX_LOOP_ITERATIONS:.0e}"
                )
        for attr in node.attribute:
            for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                reason = _loop_reason(body, trips, constants, f" (inside '{node.name}')" if not where else where)
                if reason is not None:
                    return reason
    return None


def run(
    model: Model | ort.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Run once; returns the requested outputs (all graph outputs by default) by name."""
    session = model if isinstance(model, ort.InferenceSession) else make_session(model, extra_outputs=outputs or ())
    names = list(outputs) if outputs else [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, dict(feeds))
    except _ORT_ERRORS as exc:  # a plain InferenceSession handed in
        raise OptcError(f"onnxruntime cannot run the model: {first_line(exc)}") from exc
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
    total = 0
    for spec in model.inputs:
        shape = concrete_shape(spec, batch)
        dtype = spec.dtype or np.dtype(np.float32)
        total += math.prod(shape) * max(dtype.itemsize, 8 if dtype.kind == "f" else 1)
        if total > MAX_SAMPLE_BYTES:
            raise OptcError(
                f"input '{spec.name}' of shape {list(shape)}: random sample inputs would take over {MAX_SAMPLE_BYTES >> 20} MiB "
                "(optc's limit); freeze smaller dims with --input-shape or give calibration data"
            )
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
