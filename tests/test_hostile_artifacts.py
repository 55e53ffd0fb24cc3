"""Tampered artifacts: ``optc run`` and ``optc bench`` on folders whose manifest, files or CPU do not match.

Each case starts from a well-formed artifact folder (a stand-in ``model.so``,
the sample ``model.onnx``, and a manifest pinning both by SHA-256, as
:func:`optc.targets.artifact.write_manifest` writes it) and tampers with it;
see :mod:`hostile` for the contract. Every refusal comes from the checks made
before anything is loaded, so no case needs TVM.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import SAMPLE
from hostile import assert_bad_input, invoke, npy_header, run_optc
from optc.targets.deploy.run_artifact import host_cpu_features, machine_arch


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_artifact(folder: Path, **manifest_changes: object) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.so").write_bytes(b"\x7fELF" + b"\0" * 60)
    (folder / "model.onnx").write_bytes((SAMPLE / "mnist_cnn.onnx").read_bytes())
    manifest = {
        "format": "optc-artifact/1",
        "target": {"name": "x86", "device": "cpu"},
        "library": "model.so",
        "runtime": {"libraries": [], "env": {}, "cpu": {"arch": machine_arch(), "features": sorted(host_cpu_features(machine_arch()))[:3]}},
        "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 1, 28, 28]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, 10]}],
        "files": {name: _digest(folder / name) for name in ("model.so", "model.onnx")},
    }
    manifest.update(manifest_changes)
    write_manifest(folder, manifest)
    return folder


def write_manifest(folder: Path, manifest: object) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _edit_manifest(edit: Callable[[dict], object]) -> Callable[[Path], object]:
    def tamper(folder: Path) -> None:
        manifest = _manifest(folder)
        edit(manifest)
        write_manifest(folder, manifest)

    return tamper


def _append(name: str) -> Callable[[Path], object]:
    def tamper(folder: Path) -> None:
        with open(folder / name, "ab") as f:
            f.write(b"\0")

    return tamper


def _replace_with_symlink(name: str) -> Callable[[Path], object]:
    def tamper(folder: Path) -> None:
        real = folder.parent / f"real-{name}"
        os.replace(folder / name, real)
        os.symlink(real, folder / name)

    return tamper


def _lacking_cpu(manifest: dict) -> None:
    manifest["runtime"]["cpu"]["features"] = ["avx512_vp2intersect_nowhere"]


def _other_arch(manifest: dict) -> None:
    manifest["runtime"]["cpu"]["arch"] = "riscv64" if machine_arch() != "riscv64" else "x86_64"


# name -> (how the folder is tampered with, what the one line must say); run and bench both refuse
ARTIFACT_CASES: dict[str, tuple[Callable[[Path], object], str]] = {
    "no-manifest": (lambda f: (f / "manifest.json").unlink(), "manifest.json"),
    "manifest-not-json": (lambda f: (f / "manifest.json").write_text("{files: "), "not valid json"),
    "manifest-not-utf8": (lambda f: (f / "manifest.json").write_bytes(b'{"files": "\xff\xfe"}'), "not valid json"),
    "manifest-a-list": (lambda f: write_manifest(f, [1, 2]), "files"),
    "manifest-nested-100000-deep": (lambda f: (f / "manifest.json").write_text("[" * 100_000 + "]" * 100_000), "manifest.json"),
    "digest-not-a-string": (_edit_manifest(lambda m: m["files"].update({"model.so": 7})), "files"),
    "entry-with-dotdot": (_edit_manifest(lambda m: m["files"].update({"../model.so": "0" * 64})), "outside"),
    "entry-absolute": (_edit_manifest(lambda m: m["files"].update({"/etc/passwd": "0" * 64})), "outside"),
    "library-not-listed": (_edit_manifest(lambda m: m.update(library="other.so")), "library"),
    "library-changed": (_append("model.so"), "model.so"),
    "model-onnx-changed": (_append("model.onnx"), "model.onnx"),
    "manifest-hash-changed": (_edit_manifest(lambda m: m["files"].update({"model.so": "0" * 64})), "model.so"),
    "extra-file": (lambda f: (f / "extra.so").write_bytes(b"x"), "extra.so"),
    "extra-folder": (lambda f: (f / "plugins").mkdir(), "plugins"),
    "library-a-symlink": (_replace_with_symlink("model.so"), "symbolic link"),
    "model-onnx-a-symlink": (_replace_with_symlink("model.onnx"), "symbolic link"),
    "symlinked-folder": (lambda f: os.symlink(f.parent, f / "up"), "symbolic link"),
    "listed-file-missing": (lambda f: (f / "model.onnx").unlink(), "missing"),
    "listed-file-a-folder": (lambda f: ((f / "model.onnx").unlink(), (f / "model.onnx").mkdir()), "model.onnx"),
    "cpu-lacks-a-feature": (_edit_manifest(_lacking_cpu), "lacks"),
    "cpu-of-another-arch": (_edit_manifest(_other_arch), "this artifact is for"),
}


@pytest.mark.parametrize("command", ["run", "bench"])
@pytest.mark.parametrize("case", sorted(ARTIFACT_CASES))
def test_tampered_artifact(tmp_path, case, command):
    tamper, expect = ARTIFACT_CASES[case]
    folder = make_artifact(tmp_path / "art")
    tamper(folder)
    assert_bad_input(invoke(command, folder, workdir=tmp_path), expect)


def test_library_that_is_a_fifo_does_not_hang(tmp_path):
    folder = make_artifact(tmp_path / "art")
    (folder / "model.so").unlink()
    os.mkfifo(folder / "model.so")
    assert_bad_input(run_optc("run", folder, workdir=tmp_path), "model.so")


@pytest.mark.slow  # imports TVM where it is installed (seconds, tens of them on a loaded machine)
def test_untampered_stand_in_reaches_the_loader(tmp_path):
    """The control: every check passes, and the stand-in (no library) is refused in one line where it is loaded,
    or, without TVM, where TVM is needed."""
    folder = make_artifact(tmp_path / "art")
    try:
        import tvm  # noqa: F401
    except ImportError:
        assert_bad_input(invoke("run", folder, workdir=tmp_path), "apache-tvm")
    else:
        assert_bad_input(run_optc("run", folder, workdir=tmp_path), "matches the manifest but cannot be loaded")


def _npy_file(tmp_path: Path, header: bytes, body: bytes = b"") -> Path:
    path = tmp_path / "x.npy"
    path.write_bytes(header + body)
    return path


# name -> (the --input value, what the one line must say)
INPUT_CASES: dict[str, tuple[Callable[[Path], str], str]] = {
    "no-equals": (lambda t: "input", "NAME=FILE.npy"),
    "missing-file": (lambda t: f"input={t / 'nope.npy'}", "nope.npy"),
    "declares-petabytes": (lambda t: f"input={_npy_file(t, npy_header('<f4', (10**12, 1, 28, 28)))}", "x.npy"),
    "object-array": (lambda t: f"input={_npy_file(t, npy_header('|O', (2,)), b'.' * 16)}", "x.npy"),
    "a-folder": (lambda t: f"input={t}", "input"),
    "not-npy": (lambda t: f"input={_npy_file(t, b'hello world')}", "x.npy"),
}


@pytest.mark.parametrize("case", sorted(INPUT_CASES))
def test_hostile_run_inputs(tmp_path, case):
    value, expect = INPUT_CASES[case]
    folder = make_artifact(tmp_path / "art")
    assert_bad_input(invoke("run", folder, "--input", value(tmp_path), workdir=tmp_path), expect)


def test_input_that_is_a_fifo_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "x.npy")
    np.save(tmp_path / "ok.npy", np.zeros((1, 1, 28, 28), np.float32))
    assert_bad_input(run_optc("run", make_artifact(tmp_path / "art"), "--input", f"input={tmp_path / 'x.npy'}", workdir=tmp_path), "x.npy")
