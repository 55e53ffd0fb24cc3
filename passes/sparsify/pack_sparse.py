"""pack-sparse: store mostly-zero weights as nonzeros + a bitmask, decoded by a constant subgraph (lossless).

A weight ``W`` (``n`` entries, ``nz`` nonzero) becomes two initializers, the
nonzero values in row-major order (``4 nz`` bytes for float32) and the mask
``W != 0`` packed eight entries to a byte, least significant bit first
(``n / 8`` bytes), plus a few int64 shape constants. Standard ops (opset 11)
rebuild it::

    bits  = Reshape(Mod(BitShift(mask[P, 1], [0..7], RIGHT), 2), [8P])   # uint8, entry 8p+k
    index = CumSum(Cast(bits, int64), 0) - 1                            # rank of each kept entry
    W     = Reshape(Slice(Where(Cast(bits, bool), Gather(values, index), 0), 0, n), shape(W))

Where an entry is kept, ``index`` counts the kept entries before it, which is
its position in ``values`` (stored in row-major order); elsewhere the gathered
value is discarded (``-1`` before the first kept entry is a valid index).
Every input is a constant, so onnxruntime folds the whole subgraph once when
it builds a session (default optimisation level) and runs its dense kernels
on the same weights; optc's ``fold-constants`` turns it back into the dense
initializer. (NonZero + ScatterND would be shorter, but onnxruntime does not
constant-fold NonZero.)

Why not ONNX ``sparse_initializer`` (COO): its indices are int64 (``12 nz``
bytes for float32 values), which is smaller than dense only above 2/3
sparsity, whereas values + bitmask pay from 1/32. Entries equal to ``-0.0``
come back as ``+0.0``; every other value (NaN included) is kept bit for bit.

Passes after this one that need constant weights (``quantize``, ``distill``,
``sparsify`` itself) see the decoded weights as computed; run them first, or
``fold-constants`` before them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from optc.ir.graph import GraphEditor
from optc.ir.stats import record_packed_weights
from optc.ir.model import Model
from optc.ir.view import initializers, onnx_type
from optc.passes.framework import Pass, PassConfig, PassContext, PassResult, option, register_pass

log = logging.getLogger(__name__)

MIN_OPSET = 11  # BitShift, CumSum
PACKABLE = (np.float32, np.float64, np.float16)


def packed_bytes(weight: np.ndarray) -> int:
    """Bytes of the packed form's two initializers (values + bitmask), shape constants excluded."""
    return int(np.count_nonzero(weight)) * weight.itemsize + -(-weight.size // 8)


def unpack(values: np.ndarray, mask: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """numpy mirror of the decode subgraph (``mask`` as stored, ``(P, 1)`` uint8)."""
    n = int(np.prod(shape))
    bits = np.unpackbits(mask.ravel(), bitorder="little")[:n].astype(bool)
    out = np.zeros(n, dtype=values.dtype)
    out[bits] = values
    return out.reshape(shape)


@dataclass(frozen=True)
class PackedModel:
    model: Model
    stats: dict
    skipped: list[str]


def pack_sparse_weights(model: Model, names: Sequence[str], *, min_saving: float = 0.05) -> PackedModel:
    """``model`` with the initializers ``names`` packed where that saves at least ``min_saving`` of their bytes.

    Returns the model unchanged (the same object) when nothing is packed.
    """
    skipped: list[str] = []
    stats = {"packed": 0, "bytes_weights_dense": model.weight_bytes(), "bytes_weights": model.weight_bytes()}
    if model.opset < MIN_OPSET:
        return PackedModel(model, stats, [f"{n}: opset {model.opset} < {MIN_OPSET}, stored dense" for n in names])
    chosen: dict[str, np.ndarray] = {}
    for name in names:
        w = model.initializer_array(name)
        if w is None or w.dtype.type not in PACKABLE or w.size < 64:
            skipped.append(f"{name}: not a float initializer of >= 64 entries, stored dense")
        elif packed_bytes(w) > (1 - min_saving) * w.nbytes:
            skipped.append(f"{name}: packing would save under {min_saving:.0%} ({np.count_nonzero(w)}/{w.size} nonzero), stored dense")
        else:
            chosen[name] = w
    if not chosen:
        return PackedModel(model, stats, skipped)
    editor = GraphEditor(model)
    shifts = editor.add_constant("bit_shifts", np.arange(8, dtype=np.uint8))
    two = editor.add_constant("two", np.array([2], dtype=np.uint8))
    one = editor.add_constant("one", np.array([1], dtype=np.int64))
    axis0 = editor.add_constant("zero", np.array([0], dtype=np.int64))  # CumSum axis, Slice start
    tensors = editor.tensors()
    entries = {}
    for name, w in chosen.items():
        values, mask = _decode(editor, tensors[name], w, shifts, two, one, axis0)
        entries[values] = {"mask": mask, "shape": list(w.shape), "weight": name}
    packed = editor.commit()
    record_packed_weights(packed, entries)
    stats.update(packed=len(chosen), bytes_weights=packed.weight_bytes(), names=sorted(chosen))
    log.debug("packed %d weights: %d -> %d bytes", len(chosen), stats["bytes_weights_dense"], stats["bytes_weights"])
    return PackedModel(packed, stats, skipped)


def _decode(editor: GraphEditor, constant, w: np.ndarray, shifts, two, one, axis0) -> tuple[str, str]:
    """Replace every use of ``constant`` (holding ``w``) by its decode subgraph; returns the
    names of the values and mask initializers."""
    flat = w.ravel()
    nonzero = flat != 0
    mask = np.packbits(nonzero, bitorder="little").reshape(-1, 1)
    stem = constant.name
    values = editor.add_constant(f"{stem}_values", flat[nonzero])
    bits = editor.add_constant(f"{stem}_mask", mask)
    shifted = editor.add_node("BitShift", [bits, shifts], attrs={"direction": "RIGHT"}).outputs[0]
    unpacked = editor.add_node("Mod", [shifted, two]).outputs[0]
    line = editor.add_node("Reshape", [unpacked, editor.add_constant(f"{stem}_bits", np.array([mask.size * 8], dtype=np.int64))]).outputs[0]
    count = editor.add_node("CumSum", [editor.add_node("Cast", [line], attrs={"to": onnx_type(np.int64)}).outputs[0], axis0]).outputs[0]
    index = editor.add_node("Sub", [count, one]).outputs[0]
    gathered = editor.add_node("Gather", [values, index], attrs={"axis": 0}).outputs[0]
    keep = editor.add_node("Cast", [line], attrs={"to": onnx_type(np.bool_)}).outputs[0]
    zero = editor.add_constant(f"{stem}_zero", np.zeros(1, dtype=w.dtype))
    padded = editor.add_node("Where", [keep, gathered, zero]).outputs[0]
    size = editor.add_constant(f"{stem}_size", np.array([w.size], dtype=np.int64))
    dense = editor.add_node("Slice", [padded, axis0, size]).outputs[0]
    out = editor.add_node("Reshape", [dense, editor.add_constant(f"{stem}_shape", np.array(w.shape, dtype=np.int64))]).outputs[0]
    out.dtype, out.shape = w.dtype, list(w.shape)
    editor.replace_uses(constant, out)
    return values.name, bits.name


@dataclass(frozen=True, kw_only=True)
class PackSparseConfig(PassConfig):
    min_sparsity: float = option(0.1, "initializers with at least this fraction of zeros are packed", gt=0, lt=1)
    min_size: int = option(1024, "initializers with fewer entries stay dense", ge=64)


@register_pass("pack-sparse")
class PackSparse(Pass[PackSparseConfig]):
    """Store mostly-zero float initializers as nonzeros + bitmask with a constant decode subgraph (exact)."""

    config_class = PackSparseConfig
    exact = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        names = []
        for name, w in initializers(model).items():
            if w.dtype.type in PACKABLE and w.size >= self.config.min_size and np.count_nonzero(w) <= (1 - self.config.min_sparsity) * w.size:
                names.append(name)
        packed = pack_sparse_weights(model, names)
        if packed.model is model:
            return PassResult(model, modified=False, stats=packed.stats, skipped=packed.skipped)
        return PassResult(packed.model, modified=True, stats=packed.stats, skipped=packed.skipped)
