"""ONNX -> Relax -> a TVM executable for a target spec.

The model arrives canonicalised with frozen input shapes (TVM's ONNX frontend
rejects Reshape targets computed at run time; shape folding removes them).
Unsupported ops are found before any compilation by asking the frontend's own
converter table. GPU modules get dlight's default schedules; CPU modules use
TVM's default pipeline (untuned: see the targets issue for MetaSchedule).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from optc.errors import TargetError, first_line
from optc.ir.model import Model
from optc.targets.recurrent import unroll_recurrent
from optc.targets.spec import TargetSpec
from optc.targets.support import frontend_support, require_tvm
from optc.targets.tuning import TuneOptions, tune_and_compile

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """TVM's C++ logging writes warnings straight to fd 2 (one per function on export);
    keep them for --debug (logged) and out of the user's terminal otherwise."""
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace").strip()
            if text:
                logger.debug("TVM native log:\n%s", text)


def check_compilable(model: Model) -> None:
    """Fail before any work when TVM cannot take the model, naming ops and nodes."""
    dynamic = [s.describe() for s in model.inputs if not s.is_static]
    if dynamic:
        raise TargetError(f"TVM needs static input shapes; freeze them with --input-shape ({'; '.join(dynamic)})")
    support = frontend_support(model)
    if not support.available:
        raise TargetError(support.reason)
    if support.unsupported:
        raise TargetError(support.message())


def to_relax(model: Model) -> Any:
    from tvm.relax.frontend.onnx import from_onnx

    try:
        # The frontend prints the failing operator's inputs (a page of Relax) before raising: the error line says it.
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            return from_onnx(model.proto, keep_params_in_input=False)
    except Exception as exc:  # the frontend raises many kinds
        logger.debug("TVM's ONNX frontend printed:\n%s", printed.getvalue())
        first = first_line(exc)
        hint = ""
        if "requires the input new shape to be Shape" in first:
            # a Reshape/Expand whose shape is computed at run time: folded away when shapes are static (the default)
            hint = ("; the shape is computed in the graph: run fold-constants with fold_shapes on (its default, "
                    "and canonicalize's) so that the static input shapes fold it to a constant")
        raise TargetError(f"TVM's ONNX frontend failed: {type(exc).__name__}: {first}{hint}") from exc


def tvm_target(spec: TargetSpec) -> Any:
    import tvm

    if spec.host is not None:
        return tvm.target.Target(spec.target, host=spec.host)
    return tvm.target.Target(spec.target)


def build(model: Model, spec: TargetSpec, tune: TuneOptions | None = None, *, int8: bool = True) -> tuple[Any, dict[str, Any]]:
    """Compile ``model`` for ``spec``; returns a ``tvm.runtime.Executable`` and a tuning summary.

    Recurrent layers are unrolled first (:mod:`optc.targets.recurrent`); the
    summary's ``"lowered"`` entry says which, over how many steps.
    With ``int8`` the QDQ regions are lowered to integer kernels first
    (:mod:`optc.targets.int8_lowering`); the summary's ``"int8"`` entry says
    which regions were lowered and which stayed float, and why.

    CPU targets compile through the tuning database (``tune``): tasks missing
    from it are tuned with MetaSchedule when ``tune.trials_per_task > 0``;
    functions without records get default schedules.
    """
    require_tvm()
    import tvm
    from tvm import relax

    check_compilable(model)
    spec.check_toolchain()
    model, unrolled = unroll_recurrent(model)
    mod = to_relax(model)
    int8_summary: dict[str, Any] = {"enabled": False}
    target = tvm_target(spec)
    if int8:
        from optc.targets.int8_lowering import lower_int8, weight_owners
        from optc.targets.tiled_kernels import dot_product, pair_weight_max
        from optc.targets.tuning import tvm_computes_all

        dot = dot_product(target) if spec.device == "cpu" else None
        # Activations of the other 8-bit type are shifted into the instruction's where TVM's kernels compute every
        # layer. Where oneDNN may take them (which multiplies either type), the shift would be one more pass for it;
        # TVM's candidate then races without the instruction on such layers.
        if dot is not None and not tvm_computes_all(target, tune):
            dot = replace(dot, shifted=False)
        shift = dot.activation if dot is not None and dot.shifted else None
        mod, int8_report = lower_int8(mod, weight_owners(model), activations=shift, weight_max=pair_weight_max(target))
        int8_summary = {**int8_report.to_dict(), **({"dot_product": dot.describe()} if dot else {})}
    try:
        with quiet_native_stderr():
            if spec.device == "cpu" and tune is not None:
                executable, report = tune_and_compile(mod, target, tune)
                summary = report.to_dict()
            else:
                if spec.device == "cuda":
                    from tvm.s_tir import dlight as dl

                    with target:
                        mod = relax.get_pipeline("zero")(mod)
                        mod = dl.ApplyDefaultSchedule(
                            dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()
                        )(mod)
                executable, summary = tvm.compile(mod, target=target), {"tasks": None, "tuned": [], "reused_from_db": []}
    except TargetError:
        raise
    except Exception as exc:
        first = first_line(exc)
        raise TargetError(f"TVM compilation for {spec.name} failed: {type(exc).__name__}: {first}") from exc
    _warn_db_health(tune, summary.get("db_health") or {})
    return executable, {**summary, "int8": int8_summary, "lowered": unrolled}


def _warn_db_health(tune: TuneOptions | None, health: dict[str, Any]) -> None:
    """Say it again outside :func:`quiet_native_stderr`, which also captures Python's writes to fd 2."""
    if tune is None:
        return
    damaged = health.get("damaged_lines") or []
    if damaged:
        more = f" (and {len(damaged) - 3} more)" if len(damaged) > 3 else ""
        logger.warning("tuning database %s: skipped %d damaged lines: %s%s", tune.db_dir, len(damaged), "; ".join(damaged[:3]), more)
    if health.get("moved_aside"):
        logger.warning("tuning database %s could not be read; moved aside to %s, compiled without its records", tune.db_dir, health["moved_aside"])


def linked_libraries(summary: dict[str, Any]) -> list[dict[str, str]]:
    """The vendor libraries a build's kernels call (recorded in the manifest, checked before loading)."""
    return list((summary.get("providers") or {}).get("libraries") or [])


def own_kernels(summary: dict[str, Any]) -> bool:
    """Whether a build's kernels call optc's own glue (its Winograd kernels, where no vendor library computes them)."""
    return (summary.get("providers") or {}).get("glue") == "winograd"


def export(executable: Any, path: Path, spec: TargetSpec, libraries: list[dict[str, str]] | None = None, own: bool = False) -> None:
    """Write the shared library (cross-linked for ARM), with the glue of the kernel providers it calls (``own``:
    optc's Winograd kernels)."""
    import shutil

    kwargs: dict[str, Any] = {}
    if any(lib.get("name") == "oneDNN" for lib in libraries or ()):
        from optc.targets.providers import onednn

        # fresh lists: export_library appends to them in place (TVM_NOTES.md)
        kwargs.update(addons=[str(onednn.glue_object())], options=onednn.link_options())
    if own:
        from optc.targets.providers import winograd_glue

        kwargs["addons"] = [str(winograd_glue.glue_object(*winograd_glue.toolchain(spec.cross_compiler)))]
    if spec.cross_compiler:
        if shutil.which(spec.cross_compiler) is None:
            raise TargetError(f"{spec.name} needs the cross compiler '{spec.cross_compiler}' (Debian: apt-get install g++-aarch64-linux-gnu)")
        import tvm.support

        kwargs["fcompile"] = tvm.support.cc.cross_compiler(spec.cross_compiler)
    with quiet_native_stderr():
        executable.export_library(str(path), **kwargs)
