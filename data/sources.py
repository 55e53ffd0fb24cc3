"""Every form calibration and evaluation data may take, opened on the model being compiled.

``calibration=`` and ``evaluation=`` (and ``--calib``/``--eval``) take:

* a path: an ``.npz`` file or a folder of them; a folder of images needs an
  :class:`~optc.data.images.ImagePreprocess` (``data.images`` in a pipeline file);
* an :class:`~optc.data.images.ImageFolder` (a folder and its preprocessing);
* from Python, an iterable of feed dicts or a ``CalibrationDataReader``
  (evaluation: ``(feed, labels)`` pairs), see :mod:`optc.data.feeds`;
* a :class:`CalibrationSet` / :class:`LabelledSet` already opened on this model.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from optc.data.calibration import CalibrationSet
from optc.data.feeds import from_feeds, is_feed_source, labelled_from_feeds
from optc.data.images import ImageFolder, ImagePreprocess, holds_images, read_images
from optc.data.labelled import LabelledSet
from optc.errors import ConfigError
from optc.ir.model import Model

IMAGES_HINT = ("say how they become inputs under data.images in a --pipeline file, e.g. "
               "'data: {images: {resize: 256, size: [224, 224], mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}' "
               "(see the README's 'Data')")


def open_calibration(data: Any, model: Model, images: ImagePreprocess | None = None) -> CalibrationSet | None:
    """Calibration data in any accepted form, validated against ``model``."""
    return _open(data, model, "calibration", images)


def open_evaluation(data: Any, model: Model, images: ImagePreprocess | None = None) -> LabelledSet | None:
    """Labelled evaluation data in any accepted form, validated against ``model``."""
    return _open(data, model, "evaluation", images)


def _open(data: Any, model: Model, kind: str, images: ImagePreprocess | None) -> Any:
    labelled = kind == "evaluation"
    if data is None:
        return None
    if isinstance(data, (CalibrationSet, LabelledSet)):
        return _same_inputs(data, model, kind)
    if isinstance(data, (str, Path)) or hasattr(data, "__fspath__"):
        path = Path(data)
        if not holds_images(path):
            return LabelledSet.from_path(path, model) if labelled else CalibrationSet.from_path(path, model)
        if images is None:
            raise ConfigError(f"{kind} folder {path} holds images: {IMAGES_HINT}")
        data = ImageFolder(path, images)
    if isinstance(data, ImageFolder):
        arrays, labels, files = read_images(data, model, kind, labelled=labelled)
        inputs = dataclasses.replace(CalibrationSet.from_chunks([arrays], model, kind=kind), sources=files)
        return LabelledSet.checked(inputs, labels) if labelled else inputs
    if is_feed_source(data):
        return labelled_from_feeds(data, model) if labelled else from_feeds(data, model, kind=kind)
    raise ConfigError(f"{kind} data of type {type(data).__name__}: give a path, an ImageFolder or an iterable of feeds")


def _same_inputs(data: Any, model: Model, kind: str) -> Any:
    inputs = data.inputs if isinstance(data, CalibrationSet) else data.inputs.inputs
    if tuple(inputs) != tuple(model.inputs):
        have = "; ".join(s.describe() for s in inputs)
        want = "; ".join(s.describe() for s in model.inputs)
        raise ConfigError(f"the {kind} set was opened on inputs ({have}), the model compiled has ({want}) after freezing shapes: "
                          f"open it on the prepared model, or pass its path")
    return data
