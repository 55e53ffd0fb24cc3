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

from optc.ir.model import Model
from optc.passes.framework.options import Bounds, check_options


class Requirement(enum.Enum):
    """Something a pass needs before it runs; the manager provides or checks it."""

    SHAPES = "inferred shapes"  # provided: the manager runs shape inference
    STATIC_SHAPES = "static input shapes"  # checked: give --input-shape
    CALIBRATION = "calibration data"  # checked: give --calib
    TEACHER = "the pipeline input's outputs on the calibration data"  # provided (needs --calib)


@dataclass(frozen=True, kw_only=True)
class PassConfig:
    """Base of pass configs: every construction checks the options' declared bounds.

    A config with checks that are not bounds of one option (one option
    constraining another) overrides ``__post_init__`` and calls this one first.
    """

    def __post_init__(self) -> None:
        check_options(self, type(self).__name__)


@dataclass(frozen=True, kw_only=True)
class NoOptions(PassConfig):
    """This pass takes no options."""


def option(
    default: Any,
    help: str,  # noqa: A002 - mirrors argparse
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    multiple_of: int | None = None,
) -> Any:
    """A config field with its documentation and allowed values (shown by ``optc passes --describe``).

    Args:
        default: the value when the option is not given.
        help: one line for ``optc passes``.
        ge, gt: lower bound, inclusive (``>=``) or exclusive (``>``); at most one.
        le, lt: upper bound, inclusive (``<=``) or exclusive (``<``); at most one.
        multiple_of: the value must be a multiple of this.

    Bounds apply to numbers only (``None`` of an optional option always passes);
    NaN and infinities are refused whether or not bounds are declared. A
    :class:`PassConfig` checks them on every construction.
    """
    bounds = Bounds.declared(ge=ge, gt=gt, le=le, lt=lt, multiple_of=multiple_of)
    return field(default=default, metadata={"help": help, "bounds": bounds})


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
    # Fewer calibration samples are refused before any pass runs (and the driver holds none out when that would
    # leave fewer: held out, 8 of quantize's 8 would have been 4).
    min_calibration_samples: ClassVar[int] = 0
    # Exact passes keep outputs equal (checked to 1e-5 by --verify-each);
    # lossy ones declare so and are held to their own budget.
    exact: ClassVar[bool] = True
    # A lossy pass names the float option that says how much it takes (``ratio``,
    # ``sparsity``, ...): under an accuracy budget the configured value is the most
    # it may take, and the driver searches below it (optc.search).
    strength: ClassVar[str | None] = None
    # Every option that says how much a lossy pass takes (default: ``strength`` alone). A pass whose
    # user set none of them runs under optc's default budget (optc.search.guard).
    strength_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: ConfigT | None = None):
        self.config: ConfigT = config if config is not None else self.config_class()
        # The option names the user wrote (make_pass: --pass, pipeline files); None when the
        # config was built in Python, which counts as every option chosen.
        self.options_given: frozenset[str] | None = None

    def strength_option(self) -> str | None:
        """The option an accuracy budget scales on this configured instance (``strength`` unless a pass says otherwise)."""
        return self.strength

    def requirements(self) -> frozenset[Requirement]:
        """What this configured instance needs (``requires`` lists the most any config needs)."""
        return self.requires

    def run(self, model: Model, ctx: "PassContext") -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else {}

    def __repr__(self) -> str:
        """A ``--pass`` value that ``parse_pass_spec`` turns back into this pass.

        Lists are joined with ``|`` (``exclude=a|b``; empty: ``exclude=``), None is
        ``None``. Values holding ``,`` or ``|`` cannot be written in this form;
        ``pipeline.yaml`` (written beside every output) is exact for any value.
        """

        def text(value: Any) -> str:
            if isinstance(value, (list, tuple)):
                return "|".join(text(v) for v in value)
            return str(value)

        opts = ",".join(f"{k}={text(v)}" for k, v in self.describe_config().items())
        return f"{self.name}:{opts}" if opts else self.name


@dataclass
class PassContext:
    """What a pipeline run shares between passes (read-only for passes)."""

    calibration: Any = None  # optc.data.calibration.CalibrationSet
    seed: int = 0
    # optc.data.teacher.TeacherOutputs of the pipeline's input model; the
    # manager fills it when a pass requires Requirement.TEACHER.
    teacher: Any = None
