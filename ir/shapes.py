"""Shape inference and input-shape freezing.

Inference runs on a skeleton of the model (weights detached), so it costs
little memory and works past protobuf's 2 GiB limit. Declared output shapes
are not trusted: they are cleared before inference, compared with what was
inferred, and replaced (with a note) where the two disagree.

onnx's data propagation (which follows computed shapes into ``Reshape``) holds
a 1-D tensor's values as one dim per element, so it costs the size of every
tensor it passes through: a weight decoded by ``pack-sparse``'s constant
subgraph (MiniLM: 36 of them) took 4-8 s per inference, 0.4 s for one
384x1536 weight. So constant subgraphs whose outputs a first inference
without data propagation already types completely are inferred that way and
cut off (their outputs typed inputs) before the inference that propagates;
constant tensors of a few elements that the rest of the graph reads (shapes)
stay, with what computes them.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import onnx

from optc.errors import ConfigError
from optc.ir.model import Model, spec_from_value_info
from optc.ir.weights import skeleton_copy

logger = logging.getLogger(__name__)

Dim = int | str | None


@dataclass
class ShapeReport:
    """What shape inference found: tensors typed, and declared shapes it contradicted."""

    typed: int = 0
    untyped: list[str] = field(default_factory=list)
    output_mismatches: list[str] = field(default_factory=list)


def infer_shapes(model: Model) -> ShapeReport:
    """Infer every intermediate shape (symbolic dims kept) into ``model.graph.value_info``."""
    skeleton = skeleton_copy(model.proto)
    declared = {o.name: spec_from_value_info(o).shape for o in model.graph.output}
    del skeleton.graph.value_info[:]
    for out in skeleton.graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    try:
        inferred = _infer(skeleton)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as exc:
        logger.warning("shape inference failed: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return ShapeReport(untyped=["<inference failed>"])

    report = ShapeReport()
    graph = model.graph
    del graph.value_info[:]
    graph.value_info.extend(inferred.graph.value_info)
    report.typed = len(inferred.graph.value_info)
    for out, new in zip(graph.output, inferred.graph.output):
        inferred_shape = spec_from_value_info(new).shape
        old = declared.get(out.name)
        if inferred_shape is None:
            continue
        if old is not None and not _compatible(old, inferred_shape):
            msg = f"output '{out.name}' is declared {_fmt(old)} but infers to {_fmt(inferred_shape)}; using the inferred shape"
            report.output_mismatches.append(msg)
            logger.warning(msg)
            out.type.tensor_type.shape.CopyFrom(new.type.tensor_type.shape)
        elif old is None or all(d is None for d in old):  # undeclared, or dims unknown (freeze_input_shapes clears them)
            out.type.tensor_type.shape.CopyFrom(new.type.tensor_type.shape)
    known = {vi.name for vi in graph.value_info} | {o.name for o in graph.output} | {i.name for i in graph.input}
    known |= {t.name for t in graph.initializer}
    report.untyped = [o for n in graph.node for o in n.output if o and o not in known]
    if report.output_mismatches:
        model.notes.extend(report.output_mismatches)
    return report


# A constant tensor of at most this many elements that non-constant nodes read may be a shape: data propagation keeps it.
SHAPE_LIKE_ELEMENTS = 64


def _infer(skeleton: onnx.ModelProto) -> onnx.ModelProto:
    """onnx's inference with data propagation, constant subgraphs typed beforehand without it (module docstring)."""
    graph = skeleton.graph
    inputs = {i.name for i in graph.input}
    constant = {t.name for t in graph.initializer if t.name not in inputs}
    const_nodes: list[int] = []
    for i, node in enumerate(graph.node):
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        if all(not name or name in constant for name in node.input):
            const_nodes.append(i)
            constant.update(o for o in node.output if o)
    if not const_nodes:
        return onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    plain = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=False)
    typed = {vi.name: vi for vi in plain.graph.value_info if _fully_known(vi)}
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            readers.setdefault(name, []).append(i)
    const_set = set(const_nodes)
    producer = {o: i for i in const_nodes for o in graph.node[i].output if o}
    # Constant tensors the rest reads that may be shapes stay computed, with everything they come from.
    keep: set[int] = set()
    stack = [producer[name] for name, vi in typed.items() if name in producer and _elements(vi) <= SHAPE_LIKE_ELEMENTS
             and any(r not in const_set for r in readers.get(name, ()))]
    stack += [producer[name] for name in producer if name not in typed]  # not typed without propagation: left to it
    outputs = {o.name for o in graph.output}
    stack += [producer[name] for name in outputs if name in producer]
    while stack:
        i = stack.pop()
        if i in keep:
            continue
        keep.add(i)
        stack.extend(producer[name] for name in graph.node[i].input if name in producer)
    cut = [i for i in const_nodes if i not in keep]
    if not cut:
        return onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    cut_set = set(cut)
    reduced = onnx.ModelProto()
    reduced.CopyFrom(skeleton)
    del reduced.graph.node[:]
    reduced.graph.node.extend(node for i, node in enumerate(graph.node) if i not in cut_set)
    cut_outputs = [o for i in cut for o in graph.node[i].output if o]
    read_later = {name for i, node in enumerate(graph.node) if i not in cut_set for name in node.input}
    reduced.graph.input.extend(typed[name] for name in cut_outputs if name in read_later)
    inferred = onnx.shape_inference.infer_shapes(reduced, strict_mode=False, data_prop=True)
    inferred.graph.value_info.extend(typed[name] for name in cut_outputs)
    return inferred


def _fully_known(vi: onnx.ValueInfoProto) -> bool:
    t = vi.type
    return t.HasField("tensor_type") and t.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in t.tensor_type.shape.dim)


def _elements(vi: onnx.ValueInfoProto) -> int:
    n = 1
    for d in vi.type.tensor_type.shape.dim:
        n *= d.dim_value
    return n


def drop_inferred_shapes(model: Model) -> None:
    """Forget every intermediate shape (``value_info``): after an edit that resizes tensors they are stale.

    Graph inputs and outputs keep their declared types. :func:`infer_shapes`
    replaces them anyway, but keeps the stale ones when inference fails.
    """
    del model.graph.value_info[:]


def _compatible(declared: tuple[Dim, ...], inferred: tuple[Dim, ...]) -> bool:
    if len(declared) != len(inferred):
        return False
    return all(not (isinstance(a, int) and isinstance(b, int)) or a == b for a, b in zip(declared, inferred))


def _fmt(shape: tuple[Dim, ...]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


_SHAPE_RE = re.compile(r"^(?P<name>[^=]+)=(?P<dims>\d+(?:[x,]\d+)*)$")
# A frozen dim must fit ONNX's int64 dims with room to multiply; larger sizes are refused.
MAX_DIM = 2**31 - 1


def parse_shape_spec(spec: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``name=1x3x224x224`` (or ``name=1,3,224,224``)."""
    m = _SHAPE_RE.match(spec.strip())
    if not m:
        raise ConfigError(f"bad input shape '{spec}': expected NAME=DxDx..., for example input=1x3x224x224")
    digits = re.split(r"[x,]", m.group("dims"))
    if any(len(d.lstrip("0")) > 10 for d in digits):  # int() of a huge digit string is itself slow
        raise ConfigError(f"bad input shape '{spec[:200]}': dimensions must be at most {MAX_DIM}")
    dims = tuple(int(d) for d in digits)
    if any(d <= 0 for d in dims):
        raise ConfigError(f"bad input shape '{spec}': dimensions must be positive")
    if any(d > MAX_DIM for d in dims):
        raise ConfigError(f"bad input shape '{spec}': dimensions must be at most {MAX_DIM}")
    return m.group("name"), dims


def graph_input(model: Model, name: str, option: str) -> onnx.ValueInfoProto:
    """Graph input ``name`` (an initializer listed as an input is not one), or a ConfigError naming ``option``."""
    inputs = {vi.name: vi for vi in model.graph.input if vi.name not in model.initializer_names}
    if name not in inputs:
        raise ConfigError(f"{option} names '{name}', but the model's inputs are: {', '.join(inputs) or '(none)'}")
    return inputs[name]


def freeze_input_shapes(model: Model, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Fix the dims of graph inputs. Returns True when anything changed.

    Raises:
        ConfigError: unknown input, wrong rank, or a fixed dim contradicted.
    """
    changed = False
    for name, dims in shapes.items():
        vi = graph_input(model, name, "--input-shape")
        current = spec_from_value_info(vi).shape
        if current is not None and len(current) != len(dims):
            raise ConfigError(f"--input-shape {name}: rank {len(dims)} given, the model declares rank {len(current)} {_fmt(current)}")
        if current is not None:
            for i, (have, want) in enumerate(zip(current, dims)):
                if isinstance(have, int) and have != want:
                    raise ConfigError(f"--input-shape {name}: dim {i} is fixed to {have} in the model, {want} given")
        if current == dims:
            continue
        # Dims held elsewhere (value_info, outputs) are stale now, named or fixed: an output's named dim stays
        # named through shape inference, and MACs counted it as 1 (a frozen 1-D conv's `frames`); a fixed one is
        # often the exporter's trace (LORE's table model declares [batch, 54, 4], the 54 cells of its example),
        # and contradicts the dims inferred from the frozen input ("Inferred=16 Declared=54": onnxruntime refused it).
        del model.graph.value_info[:]
        for out in model.graph.output:
            for d in out.type.tensor_type.shape.dim:
                d.Clear()
        shape = vi.type.tensor_type.shape
        shape.Clear()
        for d in dims:
            shape.dim.add().dim_value = d
        changed = True
    return changed
