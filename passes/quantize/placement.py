"""Where activation QuantizeLinear/DequantizeLinear pairs go: layer inputs only, or int8 chains.

A QDQ runtime (onnxruntime's CPU provider, TVM's QNN lowering) replaces
``DQ -> op -> Q`` by the op's integer kernel. With QDQ on layer inputs only,
every Conv ends in float: onnxruntime then keeps a float Conv that dequantizes
its weight on every run, which is slower than the fp32 model. (MatMul and Gemm
do not need it: ``DQ -> MatMul`` and ``DQ -> Gemm`` have integer kernels with a
float output, MatMulIntegerToFloat and QGemm.)

``chains`` adds, on top of the layer inputs:

* the output of every quantized Conv, after a following Relu/Clip (the
  runtime folds those into the requantisation when the zero point sits at the
  clip, which a calibrated ``[0, hi]`` range gives), unless it is a graph output;
* the inputs and output of every Add, Concat and pooling node whose output
  (through Relu/Clip and shape-only ops: Flatten, Reshape, Transpose, Squeeze,
  Unsqueeze) reaches a tensor that is already int8, repeated to a fixed point,
  so residual joins and pooling between quantized layers run in int8 too.
  Adds with a constant input (biases) are left alone.

Nothing else is quantized: elementwise arithmetic such as a decomposed
LayerNorm (``E[x^2] - E[x]^2``) loses everything in int8.

Readers: a layer input's DQ is read only by the quantized layers (and int8
chain nodes) that read the tensor, so another float reader (a transformer's
residual) keeps full precision; a Conv output's DQ is read by every consumer,
because a float reader of the unquantized tensor would stop the runtime from
fusing the Conv.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from optc.ir.graph import consumers_by_tensor
from optc.ir.model import Model
from optc.ir.view import graph_nodes, is_float, output_names, value_specs

CHAIN_OPS = ("Add", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
ACTIVATIONS = ("Relu", "Clip")
VALUE_PRESERVING = ("MaxPool", "GlobalMaxPool")
SHAPE_ONLY = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity")


@dataclass(frozen=True)
class Placement:
    """Activation tensors that get a QDQ pair, each with the nodes that read its DQ output."""

    readers: dict[str, frozenset[str] | None]  # None: every consumer
    chain_nodes: tuple[str, ...]  # Add/Concat/pooling nodes that run in int8
    shared: dict[str, str]  # tensor -> the tensor whose scale and zero point it reuses

    def source(self, tensor: str) -> str:
        """The tensor whose calibrated range sets ``tensor``'s quantisation parameters."""
        while tensor in self.shared:
            tensor = self.shared[tensor]
        return tensor

    @property
    def tensors(self) -> list[str]:
        return sorted(self.readers)


def place_qdq(model: Model, layers: Iterable[tuple[str, str, str, str]], chains: bool) -> Placement:
    """QDQ placement for quantized ``layers`` given as ``(node, op, input, output)``.

    Without ``chains`` only the layer inputs are quantized (read by those layers).
    """
    layers = list(layers)
    readers: dict[str, set[str] | None] = {}

    def add(tensor: str, reader: str | None) -> None:
        if tensor in readers and readers[tensor] is None:
            return
        if reader is None:
            readers[tensor] = None
        else:
            readers.setdefault(tensor, set()).add(reader)  # type: ignore[union-attr]

    for node, _, x, _ in layers:
        add(x, node)
    if not chains:
        return Placement({t: frozenset(r) for t, r in readers.items()}, (), {})

    consumers = consumers_by_tensor(model)
    outputs = set(output_names(model))
    floating = {name: is_float(spec.dtype) for name, spec in value_specs(model).items()}  # int64 shape arithmetic never joins a chain
    constants = model.initializer_names | {o for n in graph_nodes(model) if n.op_type == "Constant" for o in n.output}

    def follow(tensor: str, ops: tuple[str, ...]) -> list[str]:
        """``tensor`` and the tensors after it through single-reader nodes of ``ops``."""
        path = [tensor]
        while tensor not in outputs and len(consumers.get(tensor, [])) == 1:
            node = consumers[tensor][0]
            if node.op_type not in ops or node.input[0] != tensor:  # data input only, not a Reshape's shape
                break
            tensor = node.output[0]
            path.append(tensor)
        return path

    for node, op, _, y in layers:
        if op == "Conv":
            end = follow(y, ACTIVATIONS)[-1]
            if end not in outputs:
                add(end, None)

    chain: list[str] = []
    shared: dict[str, str] = {}
    candidates = [n for n in graph_nodes(model) if n.op_type in CHAIN_OPS and n.name]
    changed = True
    while changed:
        changed = False
        for n in candidates:
            if n.name in chain:
                continue
            ins = [t for t in n.input if t]
            if not ins or any(t in constants or not floating.get(t, True) for t in ins):
                continue
            end = follow(n.output[0], ACTIVATIONS)[-1]
            reach = follow(end, ACTIVATIONS + SHAPE_ONLY)
            if end in outputs or not any(t in readers for t in reach):
                continue
            chain.append(n.name)
            changed = True
            for t in ins:
                add(t, n.name)
            add(end, None)
            # Shape-only nodes between the chain node and the int8 tensor it reaches read int8 too.
            for t in reach[1:]:
                if t in readers:
                    break
                add(t, None)
            if n.op_type in VALUE_PRESERVING and end == n.output[0]:
                shared[end] = ins[0]
    # Shape-only ops and max pooling move int8 values without changing them: their
    # output reuses the input's parameters, so the runtime can drop the Q/DQ around them.
    for t in list(readers):
        path = follow(t, SHAPE_ONLY)
        for later in path[1:]:
            if later in readers and later not in shared:
                shared[later] = t
    return Placement({t: (None if r is None else frozenset(r)) for t, r in readers.items()}, tuple(chain), shared)
