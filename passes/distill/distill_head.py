"""distill-head: refit a compressed model's classifier head to the teacher's soft labels.

After other passes have compressed a model (low-rank students, sparsity,
quantisation), the features reaching the final linear layer have drifted.
This pass refits that layer (weight and bias) so that the *student's* features
reproduce the *teacher's* outputs: knowledge distillation with temperature
``T`` (Hinton et al., 2015), restricted to the head, on the calibration data.
The teacher's outputs come from ``PassContext.teacher``, which the pass
manager captures from the pipeline's input model before the first pass
(``Requirement.TEACHER``), so the teacher is the original model however many
passes ran before.

Pattern: a float model output ``[batch, classes]`` produced by a MatMul/Gemm
with a constant weight, optionally through a bias Add with a constant.

Fit, in the head's input features ``x`` (captured on the compressed model)
augmented with 1 for the bias, whitened by the Cholesky factor of their second
moment (``x~ = [x, 1] R^-1``, so the problem is well conditioned):

* ``kd``: minimise ``mean T^2 KL(softmax(z_t/T) || softmax(z_s/T))`` over the
  head's parameters. It is convex in them (the log-sum-exp of a linear map),
  the Hessian in whitened coordinates is at most ``I/2``, so Nesterov's
  accelerated gradient with step ``1 / (1/2 + ridge)`` converges without a
  line search; ``steps`` bounds the iterations. It starts from the current head.
* ``lsq``: closed-form least squares on the logits (``T`` cancels: the
  ``T -> inf`` limit of KD).

``ridge`` pulls towards the starting point in the whitened metric (the mean
squared change of the logits); for ``lsq`` the start is the current head. A share ``holdout`` of the calibration samples
(chosen with the seed) is not fitted on; the refit is kept only when it lowers
the KD loss on those samples, so a fit that does not generalise changes nothing.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from optc.ir.graph import GraphEditor, consumers_by_tensor, producers_by_tensor
from optc.ir.model import Model
from optc.ir.view import attribute, graph_nodes
from optc.passes.framework import Pass, PassConfig, PassContext, PassResult, Requirement, option, register_pass
from optc.data.calibration import capture_activations
from optc.passes.layers import LinearLayer, find_linear_layers, weight_matrix

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DistillHeadConfig(PassConfig):
    mode: Literal["kd", "lsq"] = option("kd", "kd: KL to the teacher's softened outputs; lsq: least squares on logits")
    temperature: float = option(4.0, "KD temperature T", gt=0)
    steps: int = option(300, "max accelerated-gradient iterations (kd)", ge=1)
    ridge: float = option(1e-3, "pull towards the current head (mean squared logit change)", ge=0)
    holdout: float = option(0.25, "share of calibration samples held out to accept or reject the refit", ge=0, lt=1)


@dataclass(frozen=True)
class Head:
    layer: LinearLayer
    output: str  # the model output
    bias_add: tuple[str, int] | None  # MatMul head: (Add node, index of its constant input)


def find_heads(model: Model) -> tuple[list[Head], list[str]]:
    """Model outputs ``[batch, classes]`` computed by a linear layer (and a bias Add)."""
    layers, _ = find_linear_layers(model)
    by_output = {l.output: l for l in layers if l.op in ("MatMul", "Gemm") and not l.trans_a}
    producers, consumers = producers_by_tensor(model), consumers_by_tensor(model)
    inits = model.initializer_names
    heads, refused = [], []
    for spec in model.outputs:
        if spec.dtype is None or spec.dtype.kind != "f" or spec.shape is None or len(spec.shape) != 2:
            refused.append(f"{spec.name}: not a float [batch, classes] output")
            continue
        name, bias_add = spec.name, None
        prod = producers.get(name)
        if prod is not None and prod.op_type == "Add":
            const = [i for i, n in enumerate(prod.input) if n in inits]
            var = [n for n in prod.input if n not in inits]
            if len(const) == 1 and len(var) == 1 and var[0] in by_output and len(consumers.get(var[0], [])) == 1:
                bias_add, name = (prod.name, const[0]), var[0]
        layer = by_output.get(name)
        if layer is None:
            refused.append(f"{spec.name}: not produced by a MatMul/Gemm with a constant weight")
            continue
        if layer.op == "Gemm" and layer.bias is not None and layer.bias not in inits:
            refused.append(f"{spec.name}: bias of {layer.node} is not a constant")
            continue
        if layer.op == "MatMul" and len(layer.weight_shape) != 2:
            refused.append(f"{spec.name}: head weight of rank {len(layer.weight_shape)}")
            continue
        heads.append(Head(layer, spec.name, bias_add))
    return heads, refused


@register_pass("distill-head")
class DistillHead(Pass[DistillHeadConfig]):
    """Refit the classifier head to the teacher's temperature-softened outputs (see module docstring)."""

    config_class = DistillHeadConfig
    requires = frozenset({Requirement.CALIBRATION, Requirement.SHAPES, Requirement.TEACHER})
    exact = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        heads, skipped = find_heads(model)
        teacher = ctx.teacher
        if teacher is None:
            return PassResult(model, False, {"refit": 0}, skipped + ["model: no teacher outputs in the pass context "
                                                                     "(PassManager captures them for passes that require TEACHER)"])
        if not heads:
            return PassResult(model, False, {"refit": 0}, skipped)
        features: dict[str, list[np.ndarray]] = {h.layer.input: [] for h in heads}
        capture_activations(model, ctx.calibration, list(features), lambda t, v: features[t].append(v),
                            batch_size=teacher.batch_size, max_batches=teacher.max_batches)
        plans, reports = [], []
        for head in heads:
            x = np.concatenate(features[head.layer.input]).astype(np.float64)
            target = np.concatenate([b[head.output] for b in teacher.batches]).astype(np.float64)
            if len(x) != len(target):
                skipped.append(f"{head.output}: {len(x)} feature rows but {len(target)} teacher rows")
                continue
            weight, bias = head_parameters(model, head)
            fit = fit_head(x, target, weight, bias, cfg, seed=ctx.seed)
            reports.append({"output": head.output, "node": head.layer.node, **fit.report})
            if fit.accepted:
                plans.append((head, fit))
            else:
                skipped.append(f"{head.output}: refit not kept (held-out KD loss {fit.report['kd_before']:.4g} -> "
                               f"{fit.report['kd_after']:.4g})")
        if not plans:
            return PassResult(model, False, {"refit": 0, "heads": reports}, skipped)
        editor = GraphEditor(model)
        nodes = {n.name: n for n in editor.nodes}
        for head, fit in plans:
            _write_head(editor, nodes, head, fit.weight, fit.bias)
        return PassResult(editor.commit(), True, {"refit": len(plans), "heads": reports}, skipped)


def head_parameters(model: Model, head: Head) -> tuple[np.ndarray, np.ndarray]:
    """The head as ``logits = x @ M + b`` (``M``: in x classes), alpha/beta folded in."""
    layer = head.layer
    m = weight_matrix(layer, model.initializer_array(layer.weight).astype(np.float64)).T
    classes = m.shape[1]
    bias = np.zeros(classes)
    node = next(n for n in graph_nodes(model) if n.name == layer.node)
    if layer.op == "Gemm":
        alpha = attribute(node, "alpha", 1.0)
        beta = attribute(node, "beta", 1.0)
        m = alpha * m
        if layer.bias is not None:
            bias = bias + beta * np.broadcast_to(model.initializer_array(layer.bias).astype(np.float64), (classes,))
    if head.bias_add is not None:
        add = next(n for n in graph_nodes(model) if n.name == head.bias_add[0])
        bias = bias + np.broadcast_to(model.initializer_array(add.input[head.bias_add[1]]).astype(np.float64), (classes,))
    return m, bias


@dataclass(frozen=True)
class HeadFit:
    weight: np.ndarray  # (in, classes)
    bias: np.ndarray  # (classes,)
    accepted: bool
    report: dict


def kd_loss(logits: np.ndarray, target: np.ndarray, temperature: float) -> float:
    """``mean T^2 KL(softmax(target/T) || softmax(logits/T))``."""
    log_p = _log_softmax(target / temperature)
    log_q = _log_softmax(logits / temperature)
    return float(temperature**2 * (np.exp(log_p) * (log_p - log_q)).sum(axis=1).mean())


def fit_head(x: np.ndarray, target: np.ndarray, weight: np.ndarray, bias: np.ndarray, cfg: DistillHeadConfig, *, seed: int = 0) -> HeadFit:
    """Refit ``x @ weight + bias`` to ``target`` (teacher logits); see the module docstring."""
    n = len(x)
    order = np.random.default_rng(seed).permutation(n)
    held_n = int(math.floor(cfg.holdout * n))
    held, fit = order[:held_n], order[held_n:]
    xa = np.hstack([x, np.ones((n, 1))])
    theta0 = np.vstack([weight, bias[None]])
    gram = xa[fit].T @ xa[fit] / len(fit)
    gram[np.diag_indices_from(gram)] += 1e-6 * max(float(np.mean(np.diag(gram))), 1e-12)
    upper = np.linalg.cholesky(gram).T  # gram = R^T R
    xw = np.linalg.solve(upper.T, xa[fit].T).T  # [x, 1] R^-1
    start = upper @ theta0
    t = cfg.temperature
    steps = 0
    # Least squares on the logits: the lsq answer, and kd's starting point when it fits the soft labels better.
    lhs = xw.T @ xw / len(fit) + cfg.ridge * np.eye(len(upper))
    theta_w = np.linalg.solve(lhs, xw.T @ target[fit] / len(fit) + cfg.ridge * start)
    if cfg.mode == "kd":
        soft = np.exp(_log_softmax(target[fit] / t))
        step = 1.0 / (0.5 + cfg.ridge)
        if kd_loss(xw @ start, target[fit], t) < kd_loss(xw @ theta_w, target[fit], t):
            theta_w = start.copy()
        anchor = theta_w.copy()

        def grad(theta: np.ndarray) -> np.ndarray:
            q = np.exp(_log_softmax(xw @ theta / t))
            return t * xw.T @ (q - soft) / len(fit) + cfg.ridge * (theta - anchor)

        momentum, k = theta_w.copy(), 1.0
        for steps in range(1, cfg.steps + 1):
            g = grad(momentum)
            if float(np.abs(g).max()) < 1e-9:
                break
            nxt = momentum - step * g
            k_next = (1 + math.sqrt(1 + 4 * k * k)) / 2
            momentum = nxt + ((k - 1) / k_next) * (nxt - theta_w)
            theta_w, k = nxt, k_next
    theta = np.linalg.solve(upper, theta_w)
    check = held if held_n else fit
    before = xa[check] @ theta0
    after = xa[check] @ theta
    ref = target[check]
    report = {
        "mode": cfg.mode, "temperature": t, "samples_fit": int(len(fit)), "samples_held_out": int(held_n), "steps": steps,
        "kd_before": kd_loss(before, ref, t), "kd_after": kd_loss(after, ref, t),
        "agreement_before": float((before.argmax(1) == ref.argmax(1)).mean()),
        "agreement_after": float((after.argmax(1) == ref.argmax(1)).mean()),
    }
    # A margin, so that float noise around an already optimal head is not a "change".
    accepted = report["kd_after"] < report["kd_before"] * (1 - 1e-3) - 1e-12
    return HeadFit(theta[:-1], theta[-1], accepted, report)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _write_head(editor: GraphEditor, nodes: dict, head: Head, weight: np.ndarray, bias: np.ndarray) -> None:
    layer = head.layer
    node = nodes[layer.node]
    dtype = np.asarray(node.inputs[1].values).dtype
    if layer.op == "Gemm":
        # alpha * A B' + beta * C with alpha = beta = 1 from now on.
        node.attrs["alpha"], node.attrs["beta"] = 1.0, 1.0
        node.inputs[1] = editor.add_constant(f"{node.name}_kd", (weight.T if layer.trans_b else weight).astype(dtype))
        if head.bias_add is None:
            c = editor.add_constant(f"{node.name}_kd_bias", bias.astype(dtype))
            if len(node.inputs) > 2:
                node.inputs[2] = c
            else:
                node.inputs.append(c)
            return
        if len(node.inputs) > 2:
            node.inputs[2] = editor.add_constant(f"{node.name}_kd_bias", np.zeros_like(bias, dtype=dtype))
    else:
        node.inputs[1] = editor.add_constant(f"{node.name}_kd", weight.astype(dtype))
    if head.bias_add is not None:
        add = nodes[head.bias_add[0]]
        shape = np.asarray(add.inputs[head.bias_add[1]].values).shape
        new = bias.reshape(shape) if math.prod(shape) == len(bias) else bias
        add.inputs[head.bias_add[1]] = editor.add_constant(f"{add.name}_kd", new.astype(dtype))
        return
    editor.add_after(node, "Add", bias.astype(dtype), f"{node.name}_kd_bias")
