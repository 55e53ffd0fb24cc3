"""The architecture's boundaries, checked on every import statement of the package.

Every ``import`` and ``from ... import`` is read from the source (module level
and inside functions alike: a lazy import crosses a boundary just the same) and
checked against what its package may reach. A new dependency between packages
is a decision: make it here, in the table, where a reviewer sees it.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("canonicalize", "prune", "sparsify", "quantize", "distill")

# Third-party packages only one part of optc may import.
OWNED = {
    "onnx": "ir",
    "onnx_graphsurgeon": "ir",
    "onnxruntime": "ir",
    "tvm": "targets",
    "tvm_ffi": "targets",
}

# optc-internal imports each area may make (prefixes of module names). optc.errors and
# optc.progress are leaves (they import nothing of optc's) that every layer may use.
SHARED_BELOW_PASSES = ("optc.errors", "optc.progress", "optc.ir", "optc.data", "optc.evaluation")
ALLOWED: dict[str, tuple[str, ...]] = {
    "ir": ("optc.errors", "optc.ir"),
    "data": ("optc.errors", "optc.progress", "optc.ir", "optc.data"),
    "evaluation": ("optc.errors", "optc.ir", "optc.data", "optc.evaluation"),
    "passes.framework": SHARED_BELOW_PASSES + ("optc.passes.framework",),
    "passes.numerics": ("optc.passes.numerics",),
    "passes.layers": SHARED_BELOW_PASSES + ("optc.passes.framework", "optc.passes.numerics", "optc.passes.layers"),
    **{
        f"passes.{family}": SHARED_BELOW_PASSES
        + ("optc.passes.framework", "optc.passes.numerics", "optc.passes.layers", f"optc.passes.{family}")
        for family in FAMILIES
    },
    "search": SHARED_BELOW_PASSES + ("optc.passes.framework", "optc.search"),
    "reporting": ("optc.reporting",),
    "targets": ("optc", "optc.errors", "optc.ir", "optc.evaluation", "optc.targets"),
    "cli": ("optc", "optc.errors", "optc.api", "optc.driver", "optc.passes", "optc.targets", "optc.reporting", "optc.cli"),
}
# Areas held to a short list of third-party packages (others may use any that are not OWNED elsewhere).
THIRD_PARTY: dict[str, frozenset[str]] = {
    "passes.numerics": frozenset({"numpy"}),
    "cli": frozenset({"click", "rich"}),
    "reporting": frozenset(),
}


def area_of(path: Path) -> str | None:
    """The boundary area a source file belongs to (None: top-level modules, not checked here)."""
    parts = path.relative_to(ROOT).parts
    if parts[0] == "passes" and len(parts) > 2:
        return f"passes.{parts[1]}"
    if parts[0] in ("ir", "data", "evaluation", "search", "reporting", "targets", "cli") and len(parts) > 1:
        return parts[0]
    return None


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
    return found


def violations(path: Path, area: str) -> list[str]:
    out = []
    for line, name in imports_of(path):
        top = name.split(".")[0]
        where = f"{path.relative_to(ROOT)}:{line} imports {name}"
        if top == "optc":
            allowed = ALLOWED[area]
            if not any(name == p or name.startswith(p + ".") for p in allowed):
                out.append(f"{where}: {area} may import only {', '.join(allowed)}")
        elif top in sys.stdlib_module_names or top == "__future__":
            continue
        elif top in OWNED and not area.startswith(OWNED[top]):
            out.append(f"{where}: only {OWNED[top]}/ may import {top}")
        elif area in THIRD_PARTY and top not in THIRD_PARTY[area]:
            out.append(f"{where}: {area} may import only {', '.join(sorted(THIRD_PARTY[area]))} besides the stdlib")
    return out


def source_files() -> list[tuple[Path, str]]:
    files = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).parts
        if rel[0] in ("tests", "tools", "benchmarks", "build") or rel[0].startswith("."):
            continue
        area = area_of(path)
        if area is not None:
            files.append((path, area))
    return files


def test_every_package_file_is_in_an_area():
    areas = {a for _, a in source_files()}
    assert set(ALLOWED) <= areas, f"areas without files: {set(ALLOWED) - areas}"
    for path in (ROOT / "passes").rglob("*.py"):
        if path.parent != ROOT / "passes":
            assert area_of(path) in ALLOWED, f"{path}: in no declared area; add its package to tests/test_boundaries.py"


@pytest.mark.parametrize("path,area", source_files(), ids=lambda v: str(v.relative_to(ROOT)) if isinstance(v, Path) else v)
def test_imports_stay_within_their_boundary(path: Path, area: str):
    assert violations(path, area) == []


def test_the_checker_catches_a_violating_import(tmp_path):
    """The rule above can fail: a family importing another family, onnx in a pass, tvm outside targets."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import onnx\n"
        "def f():\n"
        "    from optc.passes.distill.mlp import MlpBlock\n"
        "    import tvm\n"
    )
    found = violations_for_source(bad, "passes.prune")
    assert len(found) == 3, found


def violations_for_source(path: Path, area: str) -> list[str]:
    """:func:`violations` for a file outside the tree (reported relative to its folder)."""
    global ROOT
    saved, ROOT = ROOT, path.parent
    try:
        return violations(path, area)
    finally:
        ROOT = saved


def test_the_checker_catches_numpy_in_the_cli(tmp_path):
    """cli/ only parses and renders: a numerical library there is a violation."""
    bad = tmp_path / "bad.py"
    bad.write_text("def run():\n    import numpy as np\n")
    assert len(violations_for_source(bad, "cli")) == 1


# Names that exist only on protobuf messages (and ``graph``: a model's GraphProto,
# or the onnx-graphsurgeon graph behind a GraphEditor). Passes read graphs through
# optc.ir.view and edit them through GraphEditor, so an attribute access with one of
# these names under passes/ reaches into ONNX by hand, past the ir/ boundary.
PROTOBUF_NAMES = frozenset({
    "attribute", "initializer", "value_info", "tensor_type", "elem_type", "data_type", "raw_data", "dims",
    "CopyFrom", "MergeFrom", "HasField", "ClearField", "SerializeToString", "graph", "proto",
})


def protobuf_accesses(source: str, where: str) -> list[str]:
    """``where:line`` for every ``x.name`` with a protobuf-only ``name`` in ``source``."""
    return [
        f"{where}:{node.lineno} reads .{node.attr}: use optc.ir.view (or GraphEditor) instead"
        for node in ast.walk(ast.parse(source, filename=where))
        if isinstance(node, ast.Attribute) and node.attr in PROTOBUF_NAMES
    ]


@pytest.mark.parametrize("path", sorted((ROOT / "passes").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_passes_read_graphs_through_the_ir_view(path: Path):
    assert protobuf_accesses(path.read_text(), str(path.relative_to(ROOT))) == []


def test_the_checker_catches_protobuf_access():
    """The rule above can fail: hand-read initializers, attributes, value_info types, an editor's gs graph."""
    bad = (
        "def f(model, node, editor):\n"
        "    names = [t.name for t in model.graph.initializer]\n"
        "    attrs = {a.name: a.i for a in node.attribute}\n"
        "    nodes = editor.graph.nodes\n"
        "    return model.proto.graph.value_info[0].type.tensor_type.elem_type\n"
    )
    found = protobuf_accesses(bad, "bad.py")
    assert len(found) == 9, found
