"""Realistic inputs for the zoo, made from what wheels and Debian ship.

* images: the photographs of the ``scikit-image`` wheel (``skimage/data``); the
  calibration and evaluation crops come from disjoint photographs;
* faces: ``skimage/data/lfw_subset.npy`` (100 LFW faces, 100 non-faces, 25x25 grey);
* text: English prose from ``/usr/share/common-licenses`` (calibration from the GPL-3,
  evaluation from other licences), rendered with the DejaVu fonts of ``/usr/share/fonts``;
* captchas: the ``captcha`` package, with their text as labels;
* audio: speech-like signals (a glottal pulse train with a moving pitch through
  moving vowel formants, syllable envelopes, pauses, room noise), harmonic
  notes with known pitch, and polyphonic note sequences;
* files: real files of this machine, labelled by extension.

Pillow is imported lazily: it comes from the zoo's own ``site/`` folder.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.signal import lfilter

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
LICENSES = Path("/usr/share/common-licenses")
CALIB_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "motorcycle_right", "ihc", "brick", "grass", "color")
EVAL_PHOTOS = ("retina", "hubble_deep_field", "camera", "coins", "moon", "gravel", "cell", "logo")
_PHOTO_EXT = {"retina": "jpg", "hubble_deep_field": "jpg", "rocket": "jpg"}


def photo(path: Path) -> np.ndarray:
    """An image file as uint8 RGB [H, W, 3]."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def photo_member(name: str) -> str:
    return f"skimage/data/{name}.{_PHOTO_EXT.get(name, 'png')}"


def random_crops(images: Sequence[np.ndarray], count: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """``count`` crops (random scale, place and mirror) resized to ``size`` (h, w): uint8 [count, h, w, 3]."""
    from PIL import Image

    h, w = size
    out = np.empty((count, h, w, 3), np.uint8)
    for i in range(count):
        img = images[i % len(images)]
        ih, iw = img.shape[:2]
        scale = rng.uniform(0.35, 1.0)
        ch = max(8, int(min(ih, iw * h / w) * scale))
        cw = max(8, int(ch * w / h))
        y = rng.integers(0, ih - ch + 1)
        x = rng.integers(0, iw - cw + 1)
        crop = Image.fromarray(img[y : y + ch, x : x + cw]).resize((w, h), Image.BILINEAR)
        arr = np.asarray(crop)
        out[i] = arr[:, ::-1] if rng.random() < 0.5 else arr
    return out


def license_words(names: Sequence[str]) -> list[str]:
    """The words of some Debian licence texts, in order (punctuation kept)."""
    words: list[str] = []
    for name in names:
        text = (LICENSES / name).read_text(encoding="utf-8", errors="replace")
        words.extend(w for w in text.split() if re.fullmatch(r"[A-Za-z0-9,.;:'()\-]+", w))
    return words


def phrases(words: Sequence[str], count: int, rng: np.random.Generator, min_chars: int, max_chars: int) -> list[str]:
    """``count`` runs of consecutive words, each ``min_chars``..``max_chars`` long."""
    out: list[str] = []
    while len(out) < count:
        start = int(rng.integers(0, len(words) - 40))
        want = int(rng.integers(min_chars, max_chars + 1))
        text = words[start]
        for w in words[start + 1 : start + 40]:
            if len(text) + 1 + len(w) > want:
                break
            text += " " + w
        if min_chars <= len(text) <= max_chars:
            out.append(text)
    return out


def fonts(rng: np.random.Generator, count: int) -> list[Path]:
    faces = sorted(p for p in FONT_DIR.glob("DejaVu*.ttf") if "Math" not in p.name and "ExtraLight" not in p.name)
    return [faces[int(rng.integers(len(faces)))] for _ in range(count)]


def render_line(text: str, font: Path, px: int, rng: np.random.Generator):
    """A tight RGB image of one line of dark text on a light, slightly uneven background."""
    from PIL import Image, ImageDraw, ImageFont

    face = ImageFont.truetype(str(font), px)
    left, top, right, bottom = face.getbbox(text)
    pad = int(rng.integers(2, 8))
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    bg = tuple(int(v) for v in rng.integers(200, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 70, 3))
    im = Image.new("RGB", (w, h), bg)
    ImageDraw.Draw(im).text((pad - left, pad - top), text, font=face, fill=fg)
    arr = np.asarray(im).astype(np.float32) + rng.normal(0, 4, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def text_page(lines: Sequence[str], size: int, rng: np.random.Generator, background: np.ndarray | None = None) -> np.ndarray:
    """A ``size``-square page of text lines (uint8 RGB), on paper or on a photograph."""
    from PIL import Image, ImageDraw, ImageFont

    if background is None:
        im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(215, 256, 3)))
    else:
        im = Image.fromarray(background)
    draw = ImageDraw.Draw(im)
    y = int(rng.integers(4, 20))
    for text, font in zip(lines, fonts(rng, len(lines))):
        px = int(rng.integers(14, 26))
        draw.text((int(rng.integers(4, 30)), y), text, font=ImageFont.truetype(str(font), px), fill=tuple(int(v) for v in rng.integers(0, 60, 3)))
        y += int(px * rng.uniform(1.3, 2.0))
        if y > size - 20:
            break
    return np.asarray(im)


def click_captcha(background: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Characters scattered over a photograph, as in click-to-select captchas (uint8 RGB)."""
    from PIL import Image, ImageDraw, ImageFont

    im = Image.fromarray(background)
    draw = ImageDraw.Draw(im)
    size = background.shape[0]
    chars = "ABCDEFGHJKLMNPQRSTUVWXYZabdefghkmnpqrtuy23456789"
    for font in fonts(rng, int(rng.integers(3, 6))):
        px = int(rng.integers(28, 64))
        face = ImageFont.truetype(str(font).replace(".ttf", "-Bold.ttf") if "Bold" not in str(font) and Path(str(font).replace(".ttf", "-Bold.ttf")).exists() else str(font), px)
        x, y = (int(v) for v in rng.integers(0, size - px, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.text((x, y), chars[int(rng.integers(len(chars)))], font=face, fill=colour, stroke_width=1, stroke_fill=(255, 255, 255))
    return np.asarray(im)


def captchas(count: int, rng: np.random.Generator, width: int = 160, height: int = 60) -> tuple[list, list[str]]:
    """``count`` PIL images from the ``captcha`` package and their 4-character texts."""
    from captcha.image import ImageCaptcha

    import random

    random.seed(int(rng.integers(1 << 31)))  # the captcha package draws from `random`
    gen = ImageCaptcha(width=width, height=height)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    texts = ["".join(alphabet[int(i)] for i in rng.integers(0, len(alphabet), 4)) for _ in range(count)]
    return [gen.generate_image(t) for t in texts], texts


# --- audio -------------------------------------------------------------------------------

_VOWELS = np.array([[730, 1090, 2440], [270, 2290, 3010], [300, 870, 2240], [530, 1840, 2480], [570, 840, 2410], [440, 1020, 2240], [660, 1720, 2410]], float)


def _resonator(x: np.ndarray, freq: float, bw: float, sr: int) -> np.ndarray:
    r = np.exp(-np.pi * bw / sr)
    a = [1.0, -2 * r * np.cos(2 * np.pi * freq / sr), r * r]
    return lfilter([1 - r], a, x)


def speech_like(seconds: float, sr: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A speech-like signal and its per-sample voiced mask.

    Syllables of 120-300 ms: a glottal pulse train (pitch 90-240 Hz with
    intonation), shaped by three vowel formants that glide between vowels, with
    an attack/decay envelope, fricative noise bursts between some syllables,
    pauses, and low room noise.
    """
    n = int(seconds * sr)
    out = np.zeros(n)
    voiced = np.zeros(n, bool)
    t = int(rng.integers(0, sr // 4))
    base = rng.uniform(90, 240)
    while t < n:
        if rng.random() < 0.25:  # pause
            t += int(rng.uniform(0.15, 0.6) * sr)
            continue
        dur = int(rng.uniform(0.12, 0.3) * sr)
        seg = min(dur, n - t)
        f0 = base * (1 + 0.15 * np.sin(np.linspace(0, rng.uniform(1, 3), seg)) + rng.normal(0, 0.01, seg))
        phase = np.cumsum(f0 / sr)
        pulses = np.diff(np.floor(phase), prepend=0.0) + 0.02 * rng.normal(size=seg)
        v0, v1 = _VOWELS[rng.integers(len(_VOWELS), size=2)]
        sig = np.zeros(seg)
        for k in range(3):
            half = seg // 2
            sig[:half] += _resonator(pulses[:half], v0[k], 80 + 40 * k, sr)
            sig[half:] += _resonator(pulses[half:], v1[k], 80 + 40 * k, sr)
        env = np.minimum(1, np.linspace(0, 6, seg)) * np.minimum(1, np.linspace(4, 0, seg))
        out[t : t + seg] += sig * env * rng.uniform(0.3, 1.0)
        voiced[t : t + seg] = True
        t += seg
        if rng.random() < 0.3 and t < n:  # fricative
            fl = min(int(rng.uniform(0.04, 0.1) * sr), n - t)
            out[t : t + fl] += lfilter([1, -0.95], [1], rng.normal(0, 0.05, fl))
            t += fl
    out /= np.abs(out).max() + 1e-9
    out = out * rng.uniform(0.2, 0.8) + rng.normal(0, rng.uniform(0.001, 0.01), n)
    return out.astype(np.float32), voiced


def harmonic_tone(f0: float, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """A note at pitch ``f0`` with random harmonic amplitudes, slight vibrato and noise."""
    t = np.arange(n) / sr
    vib = 1 + 0.003 * np.sin(2 * np.pi * rng.uniform(4, 6) * t)
    phase = 2 * np.pi * f0 * np.cumsum(vib) / sr + rng.uniform(0, 2 * np.pi)
    sig = np.zeros(n)
    for k in range(1, 9):
        if k * f0 < sr / 2:
            sig += rng.uniform(0.1, 1.0) / k * np.sin(k * phase)
    return (sig / (np.abs(sig).max() + 1e-9) + rng.normal(0, 0.01, n)).astype(np.float32)


def music_like(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """A few overlapping notes (MIDI 40-84) with decaying envelopes: float32 [n]."""
    out = np.zeros(n)
    for _ in range(int(rng.integers(3, 9))):
        start = int(rng.integers(0, n - sr // 8))
        dur = min(int(rng.uniform(0.2, 1.2) * sr), n - start)
        f0 = 440 * 2 ** ((rng.integers(40, 85) - 69) / 12)
        env = np.exp(-np.arange(dur) / (rng.uniform(0.2, 0.8) * sr)) * np.minimum(1, np.arange(dur) / 200)
        out[start : start + dur] += harmonic_tone(f0, dur, sr, rng) * env * rng.uniform(0.3, 1)
    return (out / (np.abs(out).max() + 1e-9) * 0.8 + rng.normal(0, 0.003, n)).astype(np.float32)


# --- files -------------------------------------------------------------------------------

EXTENSION_LABELS = {
    ".py": "python", ".c": "c", ".h": "c", ".json": "json", ".html": "html", ".xml": "xml", ".sh": "shell",
    ".png": "png", ".gz": "gzip", ".pem": "pem", ".md": "markdown", ".css": "css", ".js": "javascript",
    ".yaml": "yaml", ".yml": "yaml", ".ini": "ini", ".toml": "toml", ".txt": "txt", ".whl": "zip", ".so": "elf",
    ".pl": "perl", ".pm": "perl", ".svg": "svg", ".ttf": "ttf", ".rst": "rst", ".csv": "csv", ".pyi": "python",
    ".cfg": "ini", ".jpg": "jpeg", ".npz": "zip", ".tcl": "tcl", ".rb": "ruby", ".mo": "gettext",
}
FILE_ROOTS = ("/usr/lib/python3", "/usr/share", "/usr/include", "/etc", "/usr/lib/x86_64-linux-gnu", "/usr/local/lib")


def labelled_files(labels: Sequence[str], per_label: int, roots: Sequence[str] = FILE_ROOTS) -> dict[str, list[Path]]:
    """Up to ``per_label`` files (at least 64 bytes) for each label, found by extension, in a fixed order."""
    wanted = {ext: lab for ext, lab in EXTENSION_LABELS.items() if lab in labels}
    found: dict[str, list[Path]] = {lab: [] for lab in set(wanted.values())}
    for root in roots:
        base = Path(root)
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            lab = wanted.get(path.suffix.lower())
            if lab is None or len(found[lab]) >= per_label:
                continue
            try:
                if path.is_file() and not path.is_symlink() and path.stat().st_size >= 64:
                    found[lab].append(path)
            except OSError:
                continue
    return {k: v for k, v in found.items() if v}


def magika_features(path: Path, beg_size: int = 1024, end_size: int = 1024, block_size: int = 4096, padding: int = 256) -> np.ndarray:
    """The model input magika builds for a file: stripped first/last bytes, padded: int32 [beg+end]."""
    data = path.read_bytes()
    block = min(block_size, len(data))
    beg = data[:block].lstrip()[:beg_size]
    end = data[len(data) - block :].rstrip()
    end = end[len(end) - end_size :] if len(end) > end_size else end
    out = np.full(beg_size + end_size, padding, np.int32)
    out[: len(beg)] = np.frombuffer(beg, np.uint8)
    out[beg_size + end_size - len(end) :] = np.frombuffer(end, np.uint8)
    return out
