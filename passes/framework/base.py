"""What a pass is: a small class with a frozen, typed config, registered by name.

Contract (checked by :class:`~optc.passes.framework.manager.PassManager` under
``--verify-each``):

* ``run`` never mutates the model it is given; it returns a new :class:`Model`
  when it changes something and the *same object* when it does not.
* ``PassResult.modified`` is honest: False means byte-identical.
* A pass that skips something says which node and why (``PassResult.skipped``).
* Passes keep no state between runs.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from optc.errors import ConfigError
from optc.ir.model import Model


class Requirement(enum.Enum):
    """Something a pass needs before it runs; the manager provides or checks it."""

    SHAPES = "inferred shapes"  # provided: the manager runs shape inference
    STATIC_SHAPES = "static input shapes"  # checked: give --input-shape
    CALIBRATION = "calibration data"  # checked: give --calib
    TEACHER = "the pipeline input's outputs on the calibration data"  # provided (needs --calib)


@dataclass(frozen=True, kw_only=True)
class NoOptions:
    """This pass takes no options."""


def option(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse
    """A config field with its documentation (shown by ``optc passes --describe``)."""
    return field(default=default, metadata={"help": help})


@dataclass
class PassResult:
    model: Model
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # "node: reason"


ConfigT = TypeVar("ConfigT")


class Pass(Generic[ConfigT]):
    """Base of every pass. Subclasses set ``config_class`` and implement :meth:`run`."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = NoOptions
    requires: ClassVar[frozenset[Requirement]] = frozenset()
    # The manager upgrades older models (onnx's version converter) before the pass runs.
    min_opset: ClassVar[int] = 0
    # Exact passes keep outputs equal (checked to 1e-5 by --verify-each);
    # lossy ones declare so and are held to their own budget.
    exact: ClassVar[bool] = True

    def __init__(self, config: ConfigT | None = None):
        self.config: ConfigT = config if config is not None else self.config_class()

    def requirements(self) -> frozenset[Requirement]:
        """What this configured instance needs (``requires`` lists the most any config needs)."""
        return self.requires

    def run(self, model: Model, ctx: "PassContext") -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else {}

    def __repr__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.describe_config().items())
        return f"{self.name}:{opts}" if opts else self.name


@dataclass
class PassContext:
    """What a pipeline run shares between passes (read-only for passes)."""

    calibration: Any = None  # optc.data.calibration.CalibrationSet
    seed: int = 0
    # optc.data.teacher.TeacherOutputs of the pipeline's input model; the
    # manager fills it when a pass requires Requirement.TEACHER.
    teacher: Any = None
