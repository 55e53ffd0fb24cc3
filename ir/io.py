"""Loading and saving models: safe external data, no whole-model copies, atomic writes.

Every file optc reads from a user (models, external data, calibration arrays,
pipeline files) is opened by :func:`open_regular_file`: a FIFO, a device or
(where links are not allowed) a symbolic link is refused by looking at the
opened descriptor, so nothing can swap the file between a check and the read.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import stat
import uuid
from pathlib import Path
from typing import BinaryIO

import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from optc.errors import ModelLoadError, OptcError
from optc.ir.constants import lift_constant_nodes, name_unnamed_nodes
from optc.ir.external_data import check_location, load_external_data
from optc.ir.model import EXTERNAL_DATA_THRESHOLD_BYTES, EXTERNAL_SAVE_ABOVE_BYTES, PROTOBUF_LIMIT_BYTES, Model, tensor_nbytes
from optc.ir.validate import check_tensor_payloads, run_checker, validate_structure
from optc.ir.weights import mark_external_location, skeleton_copy, skeleton_without_initializers

logger = logging.getLogger(__name__)

# External payloads are aligned so that runtimes can mmap them.
_ALIGN = 4096
_STREAM_BATCH_BYTES = 16 << 20
# A sparse initializer is densified on load; its dense form may take at most this much.
MAX_DENSIFIED_BYTES = 4 << 30


def load_model(path: str | os.PathLike[str], *, lift_constants: bool = True, check: bool = True) -> Model:
    """Load an ONNX file (and its external data), refusing anything malformed or unsafe.

    Args:
        path: the ``.onnx`` file. External data must lie inside its folder.
        lift_constants: move weights held in ``Constant`` nodes into initializers.
        check: run the structural checks, onnx's checker and strict shape inference
            (inconsistent shapes, such as a Concat of rank-2 and rank-3 tensors, are refused).

    Raises:
        ModelLoadError: with a one-line message naming the file and the problem.
    """
    path = Path(path)
    try:
        return _load(path, lift_constants=lift_constants, check=check)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc


def open_regular_file(path: str | os.PathLike[str], *, follow_symlinks: bool = True) -> BinaryIO:
    """Open ``path`` for reading, refusing anything but a regular file.

    The type is checked on the opened descriptor (``fstat``), after a ``stat``
    that keeps devices from being opened at all; ``O_NONBLOCK`` keeps a FIFO
    from blocking the open. With ``follow_symlinks=False`` a symbolic link as
    the last component is refused too (files found inside a folder).

    Raises:
        OSError: with a message for :func:`file_problem`.
    """
    if "\0" in os.fspath(path):
        raise OSError(errno.EINVAL, "the path contains a NUL byte")
    st = os.stat(path, follow_symlinks=follow_symlinks)
    _require_regular(st.st_mode, follow_symlinks)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        _require_regular(os.fstat(fd).st_mode, follow_symlinks)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _require_regular(mode: int, follow_symlinks: bool) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file")
    kind = (
        "a symbolic link" if stat.S_ISLNK(mode) and not follow_symlinks
        else "a FIFO" if stat.S_ISFIFO(mode)
        else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "a socket" if stat.S_ISSOCK(mode)
        else "not a regular file"
    )
    raise OSError(errno.EINVAL, f"is {kind}; only regular files are read")


def file_problem(exc: OSError) -> str:
    """A short reason for an :class:`OSError` from :func:`open_regular_file` or a read."""
    if exc.errno == errno.ELOOP:
        return "is a symbolic link (or a loop of them); only regular files are read"
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    return exc.strerror or str(exc)


def _load(path: Path, *, lift_constants: bool, check: bool) -> Model:
    try:
        with open_regular_file(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ModelLoadError("the file is empty")
            if size > PROTOBUF_LIMIT_BYTES:
                raise ModelLoadError(f"the file is {size} bytes, over protobuf's 2 GiB limit; larger models keep their weights as external data")
            payload = f.read()
        proto = onnx.load_model_from_string(payload)
        del payload
    except IsADirectoryError as exc:
        raise ModelLoadError("is a folder, not an .onnx file") from exc
    except OSError as exc:
        raise ModelLoadError(file_problem(exc)) from exc
    except (DecodeError, RuntimeWarning, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"not a valid ONNX model (truncated or not an ONNX protobuf): {type(exc).__name__}") from exc
    dynamic = _negative_interface_dims_to_dynamic(proto.graph)
    if check:
        validate_structure(proto)
    try:
        load_external_data(proto.graph, path.parent)
    except OSError as exc:
        raise ModelLoadError(f"cannot read external data: {exc}") from exc
    if check:
        check_tensor_payloads(proto.graph)
    densified = _densify_sparse_initializers(proto.graph)
    model = Model(proto, path)
    if densified:
        # onnxruntime densifies them at session start too; passes edit dense weights.
        model.notes.append(f"densified {densified} sparse initializers")
    if check:
        run_checker(proto)
    if dynamic:
        model.notes.append(f"read {', '.join(dynamic)} as dynamic (a dim of -1, paddle2onnx's way of writing one)")
    named = name_unnamed_nodes(model)
    if named:
        model.notes.append(f"named {named} unnamed nodes")
    if lift_constants:
        lifted = lift_constant_nodes(model)
        if lifted:
            model.notes.append(f"lifted {lifted} Constant nodes into initializers")
    return model


def _negative_interface_dims_to_dynamic(graph: onnx.GraphProto) -> list[str]:
    """Graph input/output dims of -1 made dynamic, as onnxruntime reads them; returns ``name[axis]`` of each.

    paddle2onnx writes a dynamic dim as -1 (RapidOCR's models do); the ONNX spec wants a
    name or nothing. Only -1 is read so: another negative value is damage, refused by
    :func:`validate_structure`.
    """
    changed = []
    for vi in list(graph.input) + list(graph.output):
        if not vi.type.HasField("tensor_type"):
            continue
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value == -1:
                d.ClearField("dim_value")
                changed.append(f"{vi.name}[{axis}]")
    return changed


def _densify_sparse_initializers(graph: onnx.GraphProto) -> int:
    """Turn the main graph's ``sparse_initializer`` entries into dense initializers.

    ONNX's shape inference does not see them (a MatMul on one fails with
    "Input tensors of wrong rank (0)"), and every pass reads weights as
    initializers. Values are ``[NNZ]``; indices are linear ``[NNZ]`` or
    coordinates ``[NNZ, rank]``. The dense size is checked before anything is
    allocated: a few bytes can declare an exabyte.
    """
    import numpy as np
    from onnx import numpy_helper

    count = 0
    for sp in graph.sparse_initializer:
        name = sp.values.name
        shape = tuple(int(d) for d in sp.dims)
        values = numpy_helper.to_array(sp.values)
        indices = numpy_helper.to_array(sp.indices)
        size = math.prod(shape)
        if any(d < 0 for d in shape):
            raise ModelLoadError(f"sparse initializer '{name}' has a negative dim in its shape {list(shape)}")
        if size * values.dtype.itemsize > MAX_DENSIFIED_BYTES:
            raise ModelLoadError(
                f"sparse initializer '{name}' declares a dense shape {list(shape)} of {size * values.dtype.itemsize} bytes, "
                f"over optc's limit of {MAX_DENSIFIED_BYTES} for a densified weight"
            )
        nnz = values.shape[0] if values.ndim == 1 else -1
        if nnz < 0 or indices.dtype.kind not in "iu" or indices.shape[:1] != (nnz,) or indices.ndim not in (1, 2) or (
            indices.ndim == 2 and indices.shape[1] != len(shape)
        ):
            raise ModelLoadError(
                f"sparse initializer '{name}': values {list(values.shape)} and indices {list(indices.shape)} ({indices.dtype}) "
                f"do not match; expected values [NNZ] and integer indices [NNZ] or [NNZ, {len(shape)}]"
            )
        indices = indices.astype(np.int64)
        if indices.ndim == 2:
            if indices.size and ((indices < 0).any() or (indices >= np.array(shape, dtype=np.int64)).any()):
                raise ModelLoadError(f"sparse initializer '{name}' has indices outside its shape {list(shape)}")
            indices = np.ravel_multi_index(tuple(indices.T), shape) if indices.size else indices.reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= size):
            raise ModelLoadError(f"sparse initializer '{name}' has indices outside its shape {list(shape)}")
        dense = np.zeros(size, dtype=values.dtype)
        dense[indices] = values
        graph.initializer.append(numpy_helper.from_array(dense.reshape(shape), name))
        count += 1
    del graph.sparse_initializer[:]
    return count


def save_model(model: Model, path: str | os.PathLike[str], *, external_data: bool | None = None) -> list[Path]:
    """Write ``model`` to ``path`` atomically (temporary file, then rename).

    Args:
        external_data: store tensors of 1 KiB and more in ``<name>.data`` beside the
            model; by default only when the weights would not fit a protobuf.

    Returns:
        The files written.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    use_external = external_data if external_data is not None else model.weight_bytes() > EXTERNAL_SAVE_ABOVE_BYTES
    token = uuid.uuid4().hex[:8]
    tmp_model = folder / f".{path.name}.{token}.tmp"
    written = [path]
    try:
        if use_external:
            data_name = path.name + ".data"
            check_location(data_name, folder, tensor="*", must_exist=False)
            tmp_data = folder / f".{data_name}.{token}.tmp"
            _write_with_external_data(model.proto, tmp_model, tmp_data, data_name)
            # The data goes first: a model file never names data that is not there.
            os.replace(tmp_data, folder / data_name)
            written.append(folder / data_name)
        else:
            if model.weight_bytes() > PROTOBUF_LIMIT_BYTES:
                raise OptcError("the model is too large for one protobuf; save it with external data")
            _write_streamed(model.proto, tmp_model)
        os.replace(tmp_model, path)
    finally:
        for stale in folder.glob(f".*.{token}.tmp"):
            stale.unlink(missing_ok=True)
    return written


def _write_with_external_data(proto: onnx.ModelProto, model_path: Path, data_path: Path, location: str) -> None:
    with open(data_path, "wb") as data:

        def write_payload(src: onnx.TensorProto, stub: onnx.TensorProto) -> None:
            data.write(b"\0" * ((-data.tell()) % _ALIGN))
            raw = src.raw_data if src.HasField("raw_data") else numpy_helper.to_array(src).tobytes()
            offset = data.tell()
            data.write(raw)
            mark_external_location(stub, location, offset, len(raw))

        skeleton = skeleton_copy(proto, EXTERNAL_DATA_THRESHOLD_BYTES, write_payload).SerializeToString()
        data.flush()
        os.fsync(data.fileno())
    _write_file(model_path, skeleton)


def _write_streamed(proto: onnx.ModelProto, path: Path) -> None:
    """Serialise without a whole-model byte string: the graph without its
    initializers, then the initializers in batches, each as its own
    ``ModelProto{graph{initializer: [...]}}`` record. Protobuf merges repeated
    occurrences of a message field, so the file parses to the same model."""
    with open(path, "wb") as f:
        f.write(skeleton_without_initializers(proto).SerializeToString())
        batch, size = onnx.ModelProto(), 0
        for tensor in proto.graph.initializer:
            batch.graph.initializer.add().CopyFrom(tensor)
            size += tensor_nbytes(tensor)
            if size >= _STREAM_BATCH_BYTES:
                f.write(batch.SerializeToString())
                batch, size = onnx.ModelProto(), 0
        if len(batch.graph.initializer):
            f.write(batch.SerializeToString())
        f.flush()
        os.fsync(f.fileno())


def _write_file(path: Path, payload: bytes) -> None:
    with open(path, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
