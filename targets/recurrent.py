"""LSTM, GRU and RNN layers unrolled into the plain ops TVM's ONNX frontend takes.

TVM 0.27's Relax ONNX frontend converts none of the three recurrent ops (nor
Loop or Scan), so an OCR model with a bidirectional LSTM, or a voice-activity
model with one, could not be compiled at all. Once ``--input-shape`` has frozen
the input shapes the sequence length T is a number, and a layer is exactly T
steps of MatMul, Add and activations; this module writes those steps out.

The maths is ONNX's definition (operator docs, opset 14), per direction ``d``,
with ``x_t`` the step's input row, ``H``/``C`` the previous hidden and cell
state, gate order i, o, f, c for LSTM and z, r, h for GRU:

- LSTM: ``i = f(x_t·Wiᵀ + H·Riᵀ + Pi⊙C + Wbi + Rbi)``, ``f`` likewise with
  Pf (or ``1 - i`` with ``input_forget``), ``c = g(x_t·Wcᵀ + H·Rcᵀ + Wbc +
  Rbc)``, ``C' = f⊙C + i⊙c``, ``o = f(x_t·Woᵀ + H·Roᵀ + Po⊙C' + Wbo + Rbo)``,
  ``H' = o⊙h(C')``.
- GRU: ``z = f(x_t·Wzᵀ + H·Rzᵀ + Wbz + Rbz)``, ``r`` likewise, ``h = g(x_t·Whᵀ
  + (r⊙H)·Rhᵀ + Rbh + Wbh)``, or with ``linear_before_reset`` ``h = g(x_t·Whᵀ +
  r⊙(H·Rhᵀ + Rbh) + Wbh)``; ``H' = (1 - z)⊙h + z⊙H``, written ``h + z⊙(H - h)``.
- RNN: ``H' = f(x_t·Wᵀ + H·Rᵀ + Wb + Rb)``.

``clip`` bounds each gate's pre-activation to [-clip, clip] (not the cell
state LSTM's ``h`` reads, as in onnxruntime, the reference). The input part
``x_t·Wᵀ`` plus every bias that is added unconditionally is one MatMul over all
T steps at once; each step then adds one ``H·Rᵀ``, so a step costs one small
MatMul and elementwise ops TVM fuses.

Not unrolled, with the reason given: weights computed at run time (the compile
path folds constants first, so this means a model whose weights depend on its
inputs), a ``sequence_lens`` input that is not every sequence's full length,
and activation functions outside ONNX's list.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from optc.errors import TargetError
from optc.ir.graph import Constant, GraphEditor, Node, Tensor, Variable
from optc.ir.model import Model
from optc.ir.shapes import infer_shapes

RECURRENT = {"LSTM": 4, "GRU": 3, "RNN": 1}  # op -> gates
DEFAULT_ACTIVATIONS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"), "RNN": ("Tanh",)}
# Activations that read alpha (and beta): ONNX consumes the activation_alpha/beta lists in the order of the
# activations that take them; the defaults are the corresponding operators' own.
ALPHA_DEFAULTS = {"LeakyRelu": (0.01, None), "ThresholdedRelu": (1.0, None), "Elu": (1.0, None),
                  "HardSigmoid": (0.2, 0.5), "Affine": (1.0, 0.0), "ScaledTanh": (1.0, 1.0)}
PLAIN = {"Sigmoid", "Tanh", "Relu", "Softsign", "Softplus"}
INPUTS = ("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P")


@dataclass(frozen=True)
class Activation:
    op: str
    alpha: float | None = None
    beta: float | None = None


def unroll_recurrent(model: Model) -> tuple[Model, list[str]]:
    """``model`` with every top-level LSTM/GRU/RNN written out step by step; one note per layer.

    The model's input shapes must be static. Raises :class:`TargetError` naming
    the node when a layer cannot be unrolled.
    """
    if not any(n.op_type in RECURRENT and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return model, []
    typed = model.copy()
    infer_shapes(typed)
    editor = GraphEditor(typed)
    notes = []
    for node in [n for n in editor.nodes if n.op in RECURRENT and n.domain in ("", "ai.onnx", None)]:
        notes.append(_Layer(editor, node).unroll())
    return editor.commit(), notes


# Ops whose output keeps its first input's axes, so the time axis of a recurrent layer's X can be followed
# back through them to the graph input it comes from (Transpose maps it through its permutation).
_SAME_AXES = {"Identity", "Cast", "Dropout", "Relu", "LeakyRelu", "Tanh", "Sigmoid", "Neg", "Abs", "Exp", "Log", "Sqrt",
              "Clip", "Add", "Sub", "Mul", "Div", "Pow", "Transpose"}


def time_axes(model: Model) -> dict[str, tuple[int, str]]:
    """Graph inputs that hold a top-level recurrent layer's time axis: ``input -> (axis, 'LSTM node_name')``.

    X is ``[T, batch, features]`` (``layout=1``: ``[batch, T, features]``). A
    driver that freezes an input's leading dynamic dim as the batch must not take
    a time-major sequence's length for it: a 1-step model would compile.
    """
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    inputs = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    found: dict[str, tuple[int, str]] = {}
    for node in graph.node:
        if node.op_type not in RECURRENT or node.domain not in ("", "ai.onnx") or not node.input:
            continue
        layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
        name, axis = node.input[0], 1 if layout else 0
        while name not in inputs and name in producers and producers[name].op_type in _SAME_AXES:
            step = producers[name]
            if step.op_type == "Transpose":
                perm = next((list(a.ints) for a in step.attribute if a.name == "perm"), None)
                if perm is None or axis >= len(perm):
                    break
                axis = perm[axis]
            name = step.input[0]
        if name in inputs:
            found.setdefault(name, (axis, f"{node.op_type} {node.name or node.output[0]}"))
    return found


class _Layer:
    """One recurrent node: its checked attributes and inputs, then its steps."""

    def __init__(self, editor: GraphEditor, node: Node):
        self.editor, self.node, self.op = editor, node, node.op
        self.gates = RECURRENT[node.op]
        self.where = f"{node.op} '{node.name}'"
        attrs = node.attrs
        self.hidden = int(attrs.get("hidden_size", 0))
        direction = _text(attrs.get("direction", "forward"))
        if direction not in ("forward", "reverse", "bidirectional"):
            raise TargetError(f"{self.where}: unknown direction '{direction}'")
        self.directions = ("forward", "reverse") if direction == "bidirectional" else (direction,)
        self.layout = int(attrs.get("layout", 0))
        self.clip = attrs.get("clip")
        self.input_forget = bool(attrs.get("input_forget", 0))
        self.linear_before_reset = bool(attrs.get("linear_before_reset", 0))
        self.activations = self._activations(attrs)
        self.inputs = {name: t for name, t in zip(INPUTS, node.inputs) if t is not None and t.name}
        x = self.inputs["X"]
        if x.shape is None or len(x.shape) != 3 or not all(isinstance(d, int) for d in x.shape):
            raise TargetError(f"{self.where}: input '{x.name}' has shape {x.shape}; unrolling needs a static [seq, batch, features] shape "
                              "(freeze the model's inputs with --input-shape)")
        self.steps, self.batch = (x.shape[0], x.shape[1]) if self.layout == 0 else (x.shape[1], x.shape[0])
        self.weights = {k: self._constant(k) for k in ("W", "R", "B", "P") if k in self.inputs}
        if not self.hidden:
            self.hidden = self.weights["R"].shape[-1]
        self._check_lengths()
        self.dtype = self.weights["W"].dtype
        self._scalars: dict[float, Constant] = {}

    # --- checks ------------------------------------------------------------------
    def _constant(self, key: str) -> np.ndarray:
        value = GraphEditor.constant_value(self.inputs[key])
        if value is None:
            raise TargetError(f"{self.where}: its {key} input '{self.inputs[key].name}' is computed at run time; only constant weights can be unrolled")
        return value

    def _check_lengths(self) -> None:
        lengths = self.inputs.get("sequence_lens")
        if lengths is None:
            return
        value = GraphEditor.constant_value(lengths)
        if value is None or not np.all(value == self.steps):
            raise TargetError(f"{self.where}: sequence_lens '{lengths.name}' is not every sequence's full length ({self.steps}); "
                              "only full-length sequences can be unrolled")

    def _activations(self, attrs: dict[str, Any]) -> list[tuple[Activation, ...]]:
        """Per direction, the layer's activation functions (f, g, h for LSTM)."""
        per = len(DEFAULT_ACTIVATIONS[self.op])
        names = [_text(a) for a in attrs.get("activations", [])] or list(DEFAULT_ACTIVATIONS[self.op]) * len(self.directions)
        if len(names) != per * len(self.directions):
            raise TargetError(f"{self.where}: {len(names)} activations given, {per * len(self.directions)} expected")
        alphas, betas = list(attrs.get("activation_alpha", [])), list(attrs.get("activation_beta", []))
        out = []
        for name in names:
            canonical = next((k for k in (*PLAIN, *ALPHA_DEFAULTS) if k.lower() == name.lower()), None)
            if canonical is None:
                raise TargetError(f"{self.where}: activation '{name}' is not one ONNX defines for recurrent layers")
            alpha = beta = None
            if canonical in ALPHA_DEFAULTS:
                alpha, beta = ALPHA_DEFAULTS[canonical]
                alpha = alphas.pop(0) if alphas else alpha
                if beta is not None:
                    beta = betas.pop(0) if betas else beta
            out.append(Activation(canonical, alpha, beta))
        return [tuple(out[i * per:(i + 1) * per]) for i in range(len(self.directions))]

    # --- emission ----------------------------------------------------------------
    def _const(self, value: Any, dtype: Any = None) -> Constant:
        return self.editor.add_constant(f"{self.node.name}/const", np.asarray(value, dtype=dtype or self.dtype))

    def _scalar(self, value: float) -> Constant:
        """One initializer per scalar of a layer (clip bounds, 1, an activation's alpha), not one per step and gate."""
        if value not in self._scalars:
            self._scalars[value] = self._const(value)
        return self._scalars[value]

    def _split(self, tensor: Tensor, axis: int, parts: int) -> list[Tensor]:
        """``tensor`` cut into ``parts`` equal pieces along ``axis``. One Split, not a Gather per piece: TVM's
        frontend writes a Gather's index as ``where(i < 0, i + n, i)`` on a constant, which its FoldConstant then
        compiled one function at a time (440 of them, 100 s, for an OCR model's 22-step bidirectional LSTM)."""
        if parts == 1:
            return [tensor]
        outputs = [Variable(self.editor.fresh_name(f"{self.node.name}/Split")) for _ in range(parts)]
        # equal pieces: no ``split`` (opsets 1-17), or ``num_outputs`` (opset 18 requires it)
        attrs: dict[str, Any] = {"axis": axis, **({"num_outputs": parts} if self.editor.model.opset >= 18 else {})}
        self.editor.add_node("Split", [tensor], outputs, attrs, name=self.editor.fresh_name(f"{self.node.name}/Split"))
        return outputs

    def _shape(self, *dims: int) -> Constant:
        return self._const(np.array(dims, np.int64), np.int64)

    def _op(self, op: str, *inputs: Tensor, out: Tensor | None = None, **attrs: Any) -> Tensor:
        output = out if out is not None else Variable(self.editor.fresh_name(f"{self.node.name}/{op}"))
        self.editor.add_node(op, list(inputs), [output], attrs, name=self.editor.fresh_name(f"{self.node.name}/{op}"))
        return output

    def _activate(self, act: Activation, x: Tensor, clip: bool = True) -> Tensor:
        if clip and self.clip is not None:
            x = self._op("Min", self._op("Max", x, self._scalar(-float(self.clip))), self._scalar(float(self.clip)))
        if act.op in PLAIN:
            return self._op(act.op, x)
        if act.op == "Affine":
            return self._op("Add", self._op("Mul", x, self._scalar(act.alpha)), self._scalar(act.beta))
        if act.op == "ScaledTanh":
            return self._op("Mul", self._op("Tanh", self._op("Mul", x, self._scalar(act.beta))), self._scalar(act.alpha))
        attrs = {"alpha": float(act.alpha)}
        if act.beta is not None:
            attrs["beta"] = float(act.beta)
        return self._op(act.op, x, **attrs)

    def _initial_states(self, key: str) -> list[Tensor | None]:
        """Per direction, the initial state [batch, hidden]; None where it is zero (not given)."""
        if key not in self.inputs:
            return [None] * len(self.directions)
        pieces = self._split(self.inputs[key], 0 if self.layout == 0 else 1, len(self.directions))
        return [self._op("Reshape", p, self._shape(self.batch, self.hidden)) for p in pieces]

    def unroll(self) -> str:
        node, outputs = self.node, list(self.node.outputs)
        x = self.inputs["X"]
        if self.layout == 1:
            x = self._op("Transpose", x, perm=[1, 0, 2])
        x = self._op("Reshape", x, self._shape(self.steps * self.batch, -1))  # [T*B, I]: one step is B rows
        finals: list[list[Tensor | None]] = [[] for _ in outputs]
        states = list(zip(self._initial_states("initial_h"), self._initial_states("initial_c")))
        for d, direction in enumerate(self.directions):
            for slot, tensor in enumerate(self._direction(x, d, direction, outputs, *states[d])):
                finals[slot].append(tensor)
        node.outputs.clear()  # the original tensors are produced by the steps' final nodes from here on
        node.inputs.clear()
        layout_perm = {0: [2, 0, 1, 3], 1: [1, 0, 2], 2: [1, 0, 2]}
        for slot, out in enumerate(outputs):
            if not out.name or not finals[slot]:
                continue
            axis = 1 if slot == 0 else 0
            joined = finals[slot][0] if len(finals[slot]) == 1 else self._op("Concat", *finals[slot], axis=axis)
            if self.layout == 1:
                joined = self._op("Transpose", joined, perm=layout_perm[slot])
            self._op("Identity", joined, out=out)
        return (f"{self.where}: {'/'.join(self.directions)} over {self.steps} steps, hidden {self.hidden}, unrolled into plain ops "
                "(TVM's ONNX frontend has no recurrent layers)")

    def _direction(self, x: Tensor, d: int, direction: str, outputs: list[Tensor], h: Tensor | None, c: Tensor | None) -> list[Tensor | None]:
        """Per output slot (Y, Y_h, Y_c), this direction's part: Y [T, 1, B, H], states [1, B, H]. ``h``/``c``: the
        initial states, None for zeros (then the first step has no H·Rᵀ, and f⊙C is zero)."""
        g, hid = self.gates, self.hidden
        w, r = self.weights["W"][d], self.weights["R"][d]
        bias = self.weights["B"][d] if "B" in self.weights else np.zeros(2 * g * hid, self.dtype)
        wb, rb = bias[: g * hid], bias[g * hid:].copy()
        recurrent_bias = None
        if self.op == "GRU" and self.linear_before_reset:
            recurrent_bias = rb[2 * hid:].copy()  # Rbh sits inside the reset gate's product
            rb[2 * hid:] = 0
        projected = self._op("Add", self._op("MatMul", x, self._const(w.T)), self._const(wb + rb))  # [T*B, G*H]
        r_gates = r[: 2 * hid] if self.op == "GRU" and not self.linear_before_reset else r
        r_candidate = r[2 * hid:] if self.op == "GRU" and not self.linear_before_reset else None
        # the peepholes' i, o, f parts: one initializer each per direction, read by every step
        peep = None if "P" not in self.weights else tuple(self._const(p) for p in np.split(self.weights["P"][d], 3))
        acts = self.activations[d]
        ys: list[Tensor] = []
        order = range(self.steps) if direction == "forward" else range(self.steps - 1, -1, -1)
        r_t, r_cand = self._const(r_gates.T), None if r_candidate is None else self._const(r_candidate.T)
        rbh = None if recurrent_bias is None else self._const(recurrent_bias)
        rows = self._split(projected, 0, self.steps)  # [B, G*H] per step
        for t in order:
            xt = rows[t]
            hr = None if h is None else self._op("MatMul", h, r_t)
            if self.op == "LSTM":
                gates = self._split(xt if hr is None else self._op("Add", xt, hr), 1, g)
                h, c = self._lstm_step(gates, c, peep, acts)
            elif self.op == "GRU":
                h = self._gru_step(xt, hr, h, r_cand, rbh, acts)
            else:
                h = self._activate(acts[0], xt if hr is None else self._op("Add", xt, hr))
            ys.append(h)
        if direction == "reverse":
            ys.reverse()
        parts: list[Tensor | None] = [None]  # Y, when the model reads it
        if outputs and outputs[0].name:
            stacked = ys[0] if len(ys) == 1 else self._op("Concat", *ys, axis=0)  # [T*B, H]
            parts[0] = self._op("Reshape", stacked, self._shape(self.steps, 1, self.batch, hid))
        state_shape = self._shape(1, self.batch, hid)
        parts.append(self._op("Reshape", h, state_shape))
        if self.op == "LSTM":
            parts.append(self._op("Reshape", c, state_shape))
        return parts[: len(outputs)]

    def _lstm_step(self, gates: list[Tensor], c: Tensor | None, peep: tuple[Constant, ...] | None,
                   acts: tuple[Activation, ...]) -> tuple[Tensor, Tensor]:
        """One step from the gates' pre-activations; ``c`` None is a zero cell state (its terms vanish)."""
        i_in, o_in, f_in, c_in = gates
        if peep is not None and c is not None:
            i_in = self._op("Add", i_in, self._op("Mul", c, peep[0]))
            f_in = self._op("Add", f_in, self._op("Mul", c, peep[2]))
        i = self._activate(acts[0], i_in)
        cand = self._activate(acts[1], c_in)
        new_c = self._op("Mul", i, cand)
        if c is not None:
            f = self._op("Sub", self._scalar(1.0), i) if self.input_forget else self._activate(acts[0], f_in)
            new_c = self._op("Add", self._op("Mul", f, c), new_c)
        if peep is not None:
            o_in = self._op("Add", o_in, self._op("Mul", new_c, peep[1]))
        o = self._activate(acts[0], o_in)
        # onnxruntime, the reference, does not clip the cell state read by h (nor keep it clipped).
        return self._op("Mul", o, self._activate(acts[2], new_c, clip=False)), new_c

    def _gru_step(self, xt: Tensor, hr: Tensor | None, h: Tensor | None, r_cand: Constant | None, rbh: Constant | None,
                  acts: tuple[Activation, ...]) -> Tensor:
        """One step; ``h`` (and ``hr``, its product with Rᵀ) None is a zero state."""
        x_z, x_r, x_h = self._split(xt, 1, 3)
        if hr is None:
            z_in, r_in, h_h = x_z, x_r, None
        else:
            views = self._split(hr, 1, 2 if r_cand is not None else 3)  # with r_cand, hr holds only the z and r parts
            z_in, r_in = self._op("Add", x_z, views[0]), self._op("Add", x_r, views[1])
            h_h = views[2] if len(views) == 3 else None
        r = self._activate(acts[0], r_in)
        if r_cand is not None:  # H·Rhᵀ needs r first
            cand_in = x_h if h is None else self._op("Add", x_h, self._op("MatMul", self._op("Mul", r, h), r_cand))
        else:  # linear_before_reset: r⊙(H·Rhᵀ + Rbh)
            cand_in = self._op("Add", x_h, self._op("Mul", r, rbh if h_h is None else self._op("Add", h_h, rbh)))
        z = self._activate(acts[0], z_in)
        cand = self._activate(acts[1], cand_in)
        if h is None:
            return self._op("Sub", cand, self._op("Mul", z, cand))
        return self._op("Add", cand, self._op("Mul", z, self._op("Sub", h, cand)))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
