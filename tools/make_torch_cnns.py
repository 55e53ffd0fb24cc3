#!/usr/bin/env python3
"""Build tiny torch models with seeded random weights and export them to ONNX.

Usage::

    python tools/make_torch_cnns.py OUTDIR        # e.g. tests/models/torch

Needs torch, numpy, onnx and onnxruntime (onnxscript for the dynamo variants).
Nothing is downloaded.  The files are real ``torch.onnx.export`` output, so they
carry the exporter's idioms (Constant nodes, Shape->Gather->Unsqueeze->Concat->
Reshape chains from dynamic batch, BatchNormalization nodes, Clip for ReLU6,
Erf-based GELU, ...), which hand-built test graphs do not.

Models (all in eval mode, weights from ``torch.manual_seed``; BatchNorm running
statistics and affine parameters are randomised so BN is never an identity):

* ``resnet``       conv3x3-BN-ReLU stem, two basic residual blocks (the second
                   strided with a 1x1 conv+BN downsample), global average pool,
                   flatten, linear.  Input ``input`` [1,3,32,32] -> ``logits`` [1,10].
* ``mobilenetv2``  conv-BN-ReLU6 stem, three inverted-residual blocks
                   (1x1 expand, 3x3 depthwise, 1x1 project; two with a residual
                   add), 1x1 head conv, global average pool, linear.
                   Input [1,3,32,32] -> [1,10].
* ``transformer``  one pre-LN encoder block: LayerNorm, multi-head attention
                   written with Linear/Reshape/Transpose/MatMul/Softmax, residual,
                   LayerNorm, MLP with exact GELU, residual.
                   Input [1,16,64] -> ``output`` [1,16,64].

Variants written for each model (weights identical across variants):

* ``<model>_bn.onnx``        legacy exporter, ``training=TrainingMode.PRESERVE``,
                             ``do_constant_folding=False``: BatchNormalization
                             kept as separate nodes (not fused into Conv), shape
                             arithmetic left unfolded.  For the transformer (no
                             BN) the same settings give ``transformer_nofold.onnx``.
* ``<model>.onnx``           legacy exporter, default settings (EVAL mode,
                             constant folding: BN folded into Conv), static shapes.
* ``<model>_dynbatch.onnx``  like ``<model>.onnx`` but with a dynamic batch axis
                             (``batch``): shape computations stay in the graph.
* ``<model>_dynamo.onnx``    the torch.export-based exporter (``dynamo=True``),
                             opset 18 (its lowest native opset; converting these
                             graphs down to 17 fails on ReduceMean axes), static
                             shapes, onnxscript-optimised (BN folded).
* ``<model>_io.npz``         ``input`` and ``output``: a seeded input and the torch
                             output, to check numerics of any variant.

Every file is checked with ``onnx.checker`` and run with onnxruntime against
torch (max abs diff must be < 1e-4; dynamic-batch files also at batch 3).
``OUTDIR/README.md`` is (re)written with sizes, inputs/outputs and op histograms.
"""

from __future__ import annotations

import argparse
import collections
import io
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

OPSET = 17
DYNAMO_OPSET = 18  # the dynamo exporter implements >= 18; down-conversion to 17 fails for ReduceMean
MAX_BYTES = 300 * 1024
TOL = 1e-4

# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def conv_bn(cin, cout, k, stride=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.relu = nn.ReLU()
        self.conv2 = conv_bn(cout, cout, 3)
        self.downsample = conv_bn(cin, cout, 1, stride) if (stride != 1 or cin != cout) else None

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.conv1(x))
        y = self.conv2(y)
        return self.relu(y + idt)


class TinyResNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3)
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(16, 16, 1)
        self.layer2 = BasicBlock(16, 32, 2)  # strided, 1x1 conv downsample
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.relu(self.stem(x))
        x = self.layer2(self.layer1(x))
        x = self.pool(x)
        x = x.view(x.size(0), -1)  # Shape/Gather/Concat/Reshape when batch is dynamic
        return self.fc(x)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            conv_bn(cin, hid, 1), nn.ReLU6(),
            conv_bn(hid, hid, 3, stride, groups=hid), nn.ReLU6(),  # depthwise
            conv_bn(hid, cout, 1),  # linear bottleneck
        )

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res else y


class TinyMobileNetV2(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16, 3, 2), nn.ReLU6())
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 1, 3),  # residual add
            InvertedResidual(16, 24, 2, 3),  # strided, no residual
            InvertedResidual(24, 24, 1, 3),  # residual add
        )
        self.head = nn.Sequential(conv_bn(24, 64, 1), nn.ReLU6())
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        x = x.mean(dim=(2, 3))  # global average pool (ReduceMean)
        return self.fc(x)


class TinyTransformerBlock(nn.Module):
    def __init__(self, dim=64, heads=4, mlp=128):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x):
        b, s, d = x.shape
        h = self.ln1(x)
        qkv = self.qkv(h).reshape(b, s, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.hd), dim=-1)
        y = torch.matmul(att, v).transpose(1, 2).reshape(b, s, d)
        x = x + self.proj(y)
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))
        return x


def randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(1.0 + 0.2 * torch.randn(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
        if isinstance(m, nn.LayerNorm):
            with torch.no_grad():
                m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=gen))


MODELS = {
    # name: (factory, input shape, input name, output name, seed)
    "resnet": (TinyResNet, (1, 3, 32, 32), "input", "logits", 1),
    "mobilenetv2": (TinyMobileNetV2, (1, 3, 32, 32), "input", "logits", 2),
    "transformer": (TinyTransformerBlock, (1, 16, 64), "input", "output", 3),
}

# ---------------------------------------------------------------------------
# Export helpers
# ---------------------------------------------------------------------------


def export_legacy(model, x, path, in_name, out_name, *, preserve_bn=False, dyn_batch=False):
    kw = dict(dynamo=False, opset_version=OPSET, input_names=[in_name], output_names=[out_name])
    if preserve_bn:
        kw.update(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    if dyn_batch:
        kw["dynamic_axes"] = {in_name: {0: "batch"}, out_name: {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), **kw)


def export_dynamo(model, x, path, in_name, out_name):
    import contextlib
    import logging
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, (x,), dynamo=True, opset_version=DYNAMO_OPSET,
                                 input_names=[in_name], output_names=[out_name],
                                 external_data=False)
        prog.save(str(path), external_data=False)
    # Drop the per-node Python stack traces: they hold local file paths and make the
    # files machine-dependent.  The other pkg.torch.onnx.* metadata is kept.
    m = onnx.load(str(path))
    for g in [m.graph] + [f for f in m.functions]:
        for n in g.node:
            keep = [p for p in n.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
            del n.metadata_props[:]
            n.metadata_props.extend(keep)
    onnx.save(m, str(path))


def op_histogram(m: onnx.ModelProto) -> dict[str, int]:
    c = collections.Counter(n.op_type for n in m.graph.node)
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def shape_str(vi) -> str:
    dims = [d.dim_param if d.dim_param else str(d.dim_value) for d in vi.type.tensor_type.shape.dim]
    return f"{vi.name} {onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type).lower()}[{','.join(dims)}]"


def verify(path: Path, model, in_name, x, dyn_batch) -> float:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    xs = [x]
    if dyn_batch:
        xs.append(torch.randn((3,) + tuple(x.shape[1:]), generator=torch.Generator().manual_seed(7)))
    diff = 0.0
    for xi in xs:
        with torch.no_grad():
            ref = model(xi).numpy()
        got = sess.run(None, {in_name: xi.numpy()})[0]
        assert got.shape == ref.shape, (path, got.shape, ref.shape)
        diff = max(diff, float(np.abs(got - ref).max()))
    return diff


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--no-dynamo", action="store_true", help="skip the dynamo-exported variants")
    args = ap.parse_args(argv)
    out = args.outdir
    out.mkdir(parents=True, exist_ok=True)

    rows = []  # (file, bytes, exporter, inputs, outputs, hist, max_diff, seconds)
    failures = []
    for name, (factory, shape, in_name, out_name, seed) in MODELS.items():
        torch.manual_seed(seed)
        model = factory()
        randomise_bn(model, torch.Generator().manual_seed(100 + seed))
        model.eval()
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1000 + seed))
        with torch.no_grad():
            y = model(x)
        np.savez(out / f"{name}_io.npz", input=x.numpy(), output=y.numpy())

        has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        nofold_suffix = "bn" if has_bn else "nofold"
        variants = [
            (f"{name}_{nofold_suffix}.onnx", "legacy, TrainingMode.PRESERVE, no constant folding",
             lambda p: export_legacy(model, x, p, in_name, out_name, preserve_bn=True), False),
            (f"{name}.onnx", "legacy, default (EVAL, constant folding)",
             lambda p: export_legacy(model, x, p, in_name, out_name), False),
            (f"{name}_dynbatch.onnx", "legacy, default, dynamic batch axis",
             lambda p: export_legacy(model, x, p, in_name, out_name, dyn_batch=True), True),
        ]
        if not args.no_dynamo:
            variants.append((f"{name}_dynamo.onnx", f"dynamo=True (torch.export), opset {DYNAMO_OPSET}, static shapes",
                             lambda p: export_dynamo(model, x, p, in_name, out_name), False))
        for fname, how, fn, dyn in variants:
            path = out / fname
            t0 = time.perf_counter()
            try:
                fn(path)
            except Exception as exc:  # noqa: BLE001
                print(f"{fname}: export failed: {type(exc).__name__}: {exc}")
                failures.append(fname)
                if path.exists():
                    path.unlink()
                continue
            secs = time.perf_counter() - t0
            m = onnx.load(str(path))
            onnx.checker.check_model(m, full_check=True)
            diff = verify(path, model, in_name, x, dyn)
            size = path.stat().st_size
            hist = op_histogram(m)
            opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
            rows.append((fname, size, how, opset, [shape_str(v) for v in m.graph.input],
                         [shape_str(v) for v in m.graph.output], hist, diff, secs))
            flag = "" if (diff < TOL and size < MAX_BYTES) else "   <-- FAIL"
            if flag:
                failures.append(fname)
            print(f"{fname:28s} {size:8,d} B  opset {opset}  {secs:5.2f}s  max|ort-torch| {diff:.2e}  "
                  f"nodes {sum(hist.values())}{flag}")
            print(f"    {hist}")

    write_readme(out, rows)
    if failures:
        print("FAILED:", failures)
        return 1
    print(f"all {len(rows)} files OK")
    return 0


def write_readme(out: Path, rows) -> None:
    lines = [
        "# Exported torch models (test material)",
        "",
        "Generated by `tools/make_torch_cnns.py` (do not edit by hand; re-run it):",
        "",
        "```",
        "python tools/make_torch_cnns.py tests/models/torch",
        "```",
        "",
        f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}; "
        f"opset {OPSET} (legacy exporter) / {DYNAMO_OPSET} (dynamo exporter).  Weights are random but seeded (`torch.manual_seed`), "
        "BatchNorm/LayerNorm statistics and affine parameters randomised so they are not identities. "
        "All models are in eval mode.  Each file was checked with `onnx.checker` (full check) and run "
        "with onnxruntime (optimisations off) against torch; dynamic-batch files also at batch 3.",
        "",
        "## Models",
        "",
        "* **resnet**: Conv3x3(3->16)-BN-ReLU stem; basic block 16->16 (identity shortcut); basic block "
        "16->32 stride 2 with Conv1x1 stride-2 + BN downsample; AdaptiveAvgPool2d(1) (GlobalAveragePool); "
        "`x.view(x.size(0), -1)`; Linear(32->10).",
        "* **mobilenetv2**: Conv3x3 s2 (3->16)-BN-ReLU6 stem; inverted residuals (expand 3) 16->16 (residual "
        "Add), 16->24 stride 2, 24->24 (residual Add), each 1x1 expand-BN-ReLU6, 3x3 depthwise "
        "(group = channels)-BN-ReLU6, 1x1 project-BN; 1x1 head conv 24->64-BN-ReLU6; mean over H,W "
        "(ReduceMean); Linear(64->10).  ReLU6 exports as `Clip(0, 6)`.",
        "* **transformer**: pre-LN encoder block, dim 64, 4 heads, MLP 128: LayerNorm; fused QKV Linear; "
        "Reshape [b,s,3,h,d] + Transpose; Q.K^T (MatMul), / sqrt(d), Softmax, MatMul V; Transpose + Reshape; "
        "output Linear; residual Add; LayerNorm; Linear-GELU(exact, Erf)-Linear; residual Add.",
        "",
        "## Variants",
        "",
        "* `<model>_bn.onnx` (CNNs) / `transformer_nofold.onnx`: legacy exporter, `training=TrainingMode.PRESERVE`, "
        "`do_constant_folding=False` -> BatchNormalization nodes kept separate (inference form, `training_mode=0`; "
        "not fused into Conv) and constant shape arithmetic (Constant->Unsqueeze->Concat->Reshape) left unfolded.",
        "* `<model>.onnx`: legacy exporter, defaults (EVAL, constant folding) -> BN fused into Conv, static shapes.",
        "* `<model>_dynbatch.onnx`: as `<model>.onnx` with a dynamic batch axis named `batch` -> "
        "Shape/Gather/Unsqueeze/Concat/Reshape chains stay in the graph.",
        "* `<model>_dynamo.onnx`: `torch.onnx.export(..., dynamo=True, opset_version=18)` (torch.export + onnxscript "
        "optimiser, which folds BN into Conv), static shapes; opset 18 so ReduceMean takes `axes` as an input.",
        "* `<model>_io.npz`: `input` (seeded) and `output` (torch, fp32) -- the same for every variant of a model.",
        "",
        "## Files",
        "",
        "| file | bytes | exporter / settings | opset | inputs | outputs | max abs diff vs torch |",
        "|---|---:|---|---:|---|---|---:|",
    ]
    for fname, size, how, opset, ins, outs, hist, diff, secs in rows:
        lines.append(f"| `{fname}` | {size:,} | {how} | {opset} | {'; '.join(ins)} | {'; '.join(outs)} | {diff:.1e} |")
    lines += ["", "## Op histograms", ""]
    for fname, size, how, opset, ins, outs, hist, diff, secs in rows:
        ops = ", ".join(f"{k} {v}" for k, v in hist.items())
        lines.append(f"* `{fname}` ({sum(hist.values())} nodes): {ops}")
    lines.append("")
    (out / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
