"""Folders of images as calibration and evaluation data, with a declared preprocessing.

Users of torchvision, Olive and onnxruntime keep images on disk, not in ``.npz``
files. A folder of images becomes the model's input through an
:class:`ImagePreprocess` the user declares (in a pipeline file's ``data.images``,
or from Python): optc never guesses a normalisation, because a wrong mean or
colour order calibrates every range and refit on inputs the model never sees,
and nothing downstream would notice.

Each image is decoded with Pillow, converted to RGB or greyscale, resized
(its shorter side to ``resize`` then centre-cropped to ``size``, or straight to
``size``), scaled, normalised by ``mean``/``std``, put in the colour order and
layout the model takes, and cast to the input's dtype.

Labelled data is a folder with one subfolder per class (torchvision's
``ImageFolder`` layout): a sample's label is its class's position in
``classes`` when given, else in the sorted subfolder names.

Bounds: only regular files are read (no symbolic links, FIFOs or devices), at
most 64 MiB and 64 megapixels each (checked from the header, before decoding),
and at most :data:`MAX_DECODED_BYTES` of decoded samples in all, because the
set is held in memory.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from optc.errors import ConfigError
from optc.ir.io import file_problem, open_regular_file
from optc.ir.model import Model, TensorSpec

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"})
MAX_FILE_BYTES = 64 << 20
MAX_PIXELS = 64_000_000
MAX_DECODED_BYTES = 2 << 30
LAYOUTS = ("NCHW", "NHWC")
COLORS = ("RGB", "BGR", "L")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class ImagePreprocess:
    """How images become one model input; None fields follow from the input's shape and dtype."""

    input: str | None = None                 # the model input the images feed (default: the only input)
    size: tuple[int, int] | None = None      # height, width (default: the input's static spatial dims)
    resize: int | None = None                # shorter side resized to this, then a centre crop to ``size``
    layout: str | None = None                # NCHW or NHWC (default: where the input has 1 or 3 channels)
    color: str | None = None                 # RGB, BGR or L (default: RGB for 3 channels, L for 1)
    scale: float | None = None               # pixel values times this (default: 1/255 for float inputs, 1 for integers)
    mean: tuple[float, ...] = (0.0,)         # subtracted after scaling: one value, or one per channel
    std: tuple[float, ...] = (1.0,)          # divided by after the mean
    interpolation: str = "bilinear"
    classes: tuple[str, ...] | None = None   # labelled folders: subfolder names in class-index order

    @classmethod
    def from_dict(cls, raw: Any, where: str = "data.images") -> "ImagePreprocess":
        """Parse the ``data.images`` mapping of a pipeline file; unknown keys and bad values are refused."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where} must be a mapping such as {{resize: 256, size: [224, 224], mean: [0.485, 0.456, 0.406]}}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(map(str, raw)) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key '{unknown[0]}'; known: {', '.join(sorted(known))}")
        value = dict(raw)
        if value.get("size") is not None:
            value["size"] = _positive_ints(value["size"], f"{where}.size", 2)
        if value.get("resize") is not None:
            value["resize"] = _positive_ints([value["resize"]], f"{where}.resize", 1)[0]
        for key in ("mean", "std"):
            if key in value:
                value[key] = _floats(value[key], f"{where}.{key}")
        if value.get("scale") is not None:
            value["scale"] = _floats([value["scale"]], f"{where}.scale")[0]
        if value.get("classes") is not None:
            classes = value["classes"]
            if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
                raise ConfigError(f"{where}.classes must be a list of subfolder names, in class-index order")
            if len(set(classes)) != len(classes):
                raise ConfigError(f"{where}.classes names a class twice")
            value["classes"] = tuple(classes)
        for key, allowed in (("layout", LAYOUTS), ("color", COLORS), ("interpolation", INTERPOLATIONS)):
            if value.get(key) is not None and value[key] not in allowed:
                raise ConfigError(f"{where}.{key} is {value[key]!r}; use one of {', '.join(allowed)}")
        if value.get("input") is not None and not isinstance(value["input"], str):
            raise ConfigError(f"{where}.input must be a model input's name")
        if any(s == 0 for s in value.get("std", ())):
            raise ConfigError(f"{where}.std holds a 0: every sample would be divided by zero")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        """The declaration as a pipeline file holds it (for ``pipeline.yaml``); resolved values included."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def resolve(self, model: Model) -> tuple["ImagePreprocess", TensorSpec]:
        """Every None field filled from the model input's shape and dtype; refused where it cannot be."""
        spec = _image_input(model, self.input)
        shape = spec.shape
        if shape is None or len(shape) != 4:
            raise ConfigError(f"data.images: input '{spec.name}' has shape {_dims(shape)}; images feed a rank-4 input "
                              "([batch, channels, height, width] or [batch, height, width, channels])")
        layout = self.layout or _guess_layout(spec)
        channels, height, width = (shape[1], shape[2], shape[3]) if layout == "NCHW" else (shape[3], shape[1], shape[2])
        size = self.size
        if size is None:
            if not (isinstance(height, int) and isinstance(width, int)):
                raise ConfigError(f"data.images: input '{spec.name}' has dynamic height/width {_dims(shape)}: "
                                  "give size: [height, width] under data.images, or freeze them with --input-shape")
            size = (height, width)
        elif isinstance(height, int) and isinstance(width, int) and (height, width) != size:
            raise ConfigError(f"data.images.size {list(size)} but input '{spec.name}' takes {height}x{width}")
        color = self.color or ("L" if channels == 1 else "RGB")
        want = 1 if color == "L" else 3
        if isinstance(channels, int) and channels != want:
            raise ConfigError(f"data.images.color {color} gives {want} channel(s); input '{spec.name}' in {layout} takes {channels}")
        for key, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, want):
                raise ConfigError(f"data.images.{key} has {len(values)} values; give 1 or {want} (one per channel)")
        integer = spec.dtype is not None and np.dtype(spec.dtype).kind in "iub"
        scale = self.scale if self.scale is not None else (1.0 if integer else 1 / 255)
        resolved = ImagePreprocess(spec.name, tuple(size), self.resize, layout, color, scale, self.mean, self.std,
                                   self.interpolation, self.classes)
        if self.resize is not None and self.resize < min(size):
            raise ConfigError(f"data.images.resize {self.resize} is smaller than the crop {size[0]}x{size[1]}")
        return resolved, spec

    def apply(self, image: Any, dtype: np.dtype) -> np.ndarray:
        """One decoded PIL image as one sample (no batch axis), on a resolved preprocessing."""
        from PIL import Image

        assert self.size is not None and self.layout is not None and self.color is not None and self.scale is not None
        resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[self.interpolation]
        image = image.convert("L" if self.color == "L" else "RGB")
        height, width = self.size
        if self.resize is None:
            image = image.resize((width, height), resample)
        else:
            w, h = image.size
            ratio = self.resize / min(w, h)
            image = image.resize((max(width, round(w * ratio)), max(height, round(h * ratio))), resample)
            left, top = (image.size[0] - width) // 2, (image.size[1] - height) // 2
            image = image.crop((left, top, left + width, top + height))
        x = np.asarray(image, dtype=np.float32)
        x = x[..., None] if x.ndim == 2 else x
        x = (x * np.float32(self.scale) - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.color == "BGR":
            x = x[..., ::-1]
        if self.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        if np.dtype(dtype).kind in "iub":
            info = np.iinfo(dtype) if np.dtype(dtype).kind != "b" else None
            x = np.rint(x) if info is None else np.clip(np.rint(x), info.min, info.max)
        return np.ascontiguousarray(x.astype(dtype))


@dataclass(frozen=True)
class ImageFolder:
    """A folder of images and how they become model inputs: what ``calibration=``/``evaluation=`` take from Python."""

    path: Path
    preprocess: ImagePreprocess

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))


def holds_images(path: Path) -> bool:
    """Whether ``path`` is a folder of images (directly, or in class subfolders) and no ``.npz`` files."""
    if not path.is_dir() or any(path.glob("*.npz")):
        return False
    return any(_is_image(p) for p in path.iterdir()) or any(
        _is_image(p) for d in path.iterdir() if d.is_dir() and not d.is_symlink() for p in d.iterdir())


def read_images(folder: ImageFolder, model: Model, kind: str, *, labelled: bool) -> tuple[dict[str, np.ndarray], np.ndarray | None, tuple[Path, ...]]:
    """Decode and preprocess every image: ``(arrays, labels or None, files)``.

    Raises:
        ConfigError: a missing or empty folder, a file that is not a readable image, a folder
            layout that does not give labels when they are needed, or too much data to hold.
    """
    path = folder.path
    if not path.is_dir():
        raise ConfigError(f"{kind} images {path}: not a folder")
    prep, spec = folder.preprocess.resolve(model)
    if len(model.inputs) != 1:
        others = [s.name for s in model.inputs if s.name != spec.name]
        raise ConfigError(f"{kind} images feed input '{spec.name}' only, and the model also takes {', '.join(others)}: "
                          "give .npz data (or feeds from Python) for models with several inputs")
    files, labels = _listing(path, prep.classes, kind, labelled)
    dtype = np.dtype(spec.dtype or np.float32)
    channels = 1 if prep.color == "L" else 3
    per_sample = prep.size[0] * prep.size[1] * channels * dtype.itemsize
    if per_sample * len(files) > MAX_DECODED_BYTES:
        raise ConfigError(f"{kind} images {path}: {len(files)} images of {per_sample >> 10} KiB decoded are more than "
                          f"{MAX_DECODED_BYTES >> 30} GiB held in memory; use fewer images")
    samples = np.empty((len(files), *_sample_shape(prep, channels)), dtype)
    for i, f in enumerate(files):
        samples[i] = prep.apply(_decode(f, kind), dtype)
    return {spec.name: samples}, labels, tuple(files)


def _listing(path: Path, classes: tuple[str, ...] | None, kind: str, labelled: bool) -> tuple[list[Path], np.ndarray | None]:
    direct = sorted(p for p in path.iterdir() if _is_image(p))
    folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    linked = [p for p in folders if p.is_symlink()]
    if linked:  # its images would be read from wherever it points, past the no-links rule for files
        raise ConfigError(f"{kind} images {path}: subfolder '{linked[0].name}' is a symbolic link; only real folders are read")
    if not labelled:
        files = direct + [p for d in folders for p in sorted(d.iterdir()) if _is_image(p)]
        if not files:
            raise ConfigError(f"{kind} images {path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return files, None
    if direct:
        raise ConfigError(f"{kind} images {path}: {direct[0].name} sits outside a class subfolder; labelled images go in "
                          "one subfolder per class (folder/CLASS/image.png)")
    names = [d.name for d in folders]
    order = list(classes) if classes is not None else names
    missing = sorted(set(names) - set(order))
    if missing:
        raise ConfigError(f"{kind} images {path}: subfolder '{missing[0]}' is not in data.images.classes")
    files, labels = [], []
    for d in folders:
        found = sorted(p for p in d.iterdir() if _is_image(p))
        files += found
        labels += [order.index(d.name)] * len(found)
    if not files:
        raise ConfigError(f"{kind} images {path}: no image files in class subfolders (folder/CLASS/image.png)")
    return files, np.asarray(labels, dtype=np.int64)


def _decode(path: Path, kind: str) -> Any:
    from PIL import Image

    where = f"{kind} image {path.name}"
    try:
        with open_regular_file(path, follow_symlinks=False) as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{where}: {file_problem(exc)}") from exc
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_FILE_BYTES >> 20} MiB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            if math.prod(image.size) > MAX_PIXELS:
                raise ConfigError(f"{where}: {image.size[0]}x{image.size[1]} pixels, over optc's {MAX_PIXELS // 10**6} megapixels")
            image.load()
    except ConfigError:
        raise
    except Exception as exc:  # Pillow raises many types for a damaged or unknown file
        raise ConfigError(f"{where}: not a readable image ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    return image


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _image_input(model: Model, name: str | None) -> TensorSpec:
    specs = {s.name: s for s in model.inputs}
    if name is not None:
        if name not in specs:
            raise ConfigError(f"data.images.input '{name}' is not a model input; inputs are {', '.join(specs)}")
        return specs[name]
    rank4 = [s for s in model.inputs if s.shape is not None and len(s.shape) == 4]
    if len(rank4) == 1:
        return rank4[0]
    raise ConfigError(f"data.images: name the model input the images feed (input: NAME); inputs are {', '.join(specs)}")


def _guess_layout(spec: TensorSpec) -> str:
    shape = spec.shape or ()
    nchw, nhwc = shape[1] in (1, 3), shape[3] in (1, 3)
    if nchw != nhwc:
        return "NCHW" if nchw else "NHWC"
    raise ConfigError(f"data.images: cannot tell the layout of input '{spec.name}' {_dims(shape)}; give layout: NCHW or NHWC")


def _sample_shape(prep: ImagePreprocess, channels: int) -> tuple[int, int, int]:
    h, w = prep.size
    return (channels, h, w) if prep.layout == "NCHW" else (h, w, channels)


def _dims(shape: Any) -> str:
    return "[?]" if shape is None else "[" + "x".join("?" if not isinstance(d, int) else str(d) for d in shape) + "]"


def _positive_ints(raw: Any, where: str, count: int) -> tuple[int, ...]:
    if not isinstance(raw, (list, tuple)) or len(raw) != count or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 65536 for v in raw):
        raise ConfigError(f"{where} must be {'a positive integer' if count == 1 else f'{count} positive integers'} (at most 65536)")
    return tuple(raw)


def _floats(raw: Any, where: str) -> tuple[float, ...]:
    values = raw if isinstance(raw, (list, tuple)) else [raw]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ConfigError(f"{where} must be a finite number or a list of them")
    return tuple(float(v) for v in values)
