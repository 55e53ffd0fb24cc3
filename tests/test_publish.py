"""Publishing an output folder: one-step swap, clean-up on signals, the sweep after kill -9.

The signal tests run optc as a real subprocess with a pass that waits, and send
it real signals once it is inside the pipeline (its temporary folder exists).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import SAMPLE

from optc import driver
from optc.cli.main import cli

# optc's CLI with one more pass, `test-wait`, that says it started and then sleeps.
WAITING_OPTC = """
import sys, time
from pathlib import Path
from optc.passes import Pass, PassResult, register_pass

@register_pass("test-wait")
class Wait(Pass):
    def run(self, model, ctx):
        Path(sys.argv[1]).write_text("started")
        time.sleep(300)
        return PassResult(model, modified=False)

from optc.cli.main import cli
cli(sys.argv[2:], prog_name="optc")
"""


def invoke(*args):
    return CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)


def temporaries(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*.tmp"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _default_signals() -> None:
    # The test runner may ignore some of these (nohup, xdist); optc keeps an ignored signal ignored.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def start_waiting_run(tmp_path: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    """optc compiling into ``out``, stopped inside its pipeline (its temporary folder exists)."""
    flag = tmp_path / "started"
    proc = subprocess.Popen(
        [sys.executable, "-c", WAITING_OPTC, str(flag), "compile", str(SAMPLE / "mnist_cnn.onnx"), "-o", str(out), "--pass", "test-wait", "--no-latency"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals,
    )
    deadline = time.monotonic() + 240
    while not flag.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the waiting run did not start: {proc.communicate()}")
        time.sleep(0.1)
    assert len(temporaries(out)) == 1
    return proc, flag


@pytest.fixture
def previous_output(tmp_path):
    out = tmp_path / "out"
    assert invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", out, "--no-latency", "--pass", "fold-batchnorm").exit_code == 0
    return out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: signal.Signals(s).name)
def test_a_signal_removes_the_temporary_folder_and_keeps_the_previous_output(tmp_path, previous_output, signum):
    before = snapshot(previous_output)
    proc, _ = start_waiting_run(tmp_path, previous_output)
    try:
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, stderr
    assert stderr.strip().splitlines() == [f"optc: interrupted ({signal.Signals(signum).name})"]
    assert temporaries(previous_output) == []
    assert snapshot(previous_output) == before


def test_after_kill_9_the_next_run_sweeps_the_temporary_folder(tmp_path):
    out = tmp_path / "out"
    proc, _ = start_waiting_run(tmp_path, out)
    proc.kill()
    proc.wait(timeout=60)
    (left,) = temporaries(out)
    assert json.loads((left / "owner.json").read_text())["pid"] == proc.pid
    # A temporary folder whose process is alive is someone's run in progress: kept.
    alive = out.parent / ".out.0123abcd.tmp"
    alive.mkdir()
    (alive / "owner.json").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", out, "--no-latency", "--pass", "fold-batchnorm")
    assert res.exit_code == 0, res.output
    assert temporaries(out) == [alive] and (out / "model.onnx").is_file()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_puts_back_an_output_parked_by_an_interrupted_fallback_swap(tmp_path):
    out = tmp_path / "out"
    root = tmp_path / ".out.89abcdef.tmp"
    (root / "old").mkdir(parents=True)
    (root / "old" / "model.onnx").write_text("previous")
    (root / "out").mkdir()
    (root / "owner.json").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    other = tmp_path / ".out.x.89abcdef.tmp"  # another output's (out.x) temporary folder: not this one's to sweep
    other.mkdir()
    (other / "owner.json").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    assert driver.sweep_stale(out) == [root]
    assert (out / "model.onnx").read_text() == "previous" and not root.exists() and other.exists()


def test_the_swap_exchanges_in_one_step_where_the_filesystem_can(tmp_path, previous_output, monkeypatch):
    calls = []
    exchange = driver._exchange

    def spy(a, b):
        calls.append(exchange(a, b))
        return calls[-1]

    monkeypatch.setattr(driver, "_exchange", spy)
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", previous_output, "--no-latency", "--pass", "remove-identity")
    assert res.exit_code == 0, res.output
    if sys.platform.startswith("linux"):
        assert calls == [True]  # renameat2(RENAME_EXCHANGE) on this filesystem
    assert json.loads((previous_output / "report.json").read_text())["pipeline"] == ["remove-identity"]
    assert temporaries(previous_output) == []


def test_fallback_swap_where_exchange_is_unsupported(tmp_path, previous_output, monkeypatch):
    monkeypatch.setattr(driver, "_exchange", lambda a, b: False)
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", previous_output, "--no-latency", "--pass", "remove-identity")
    assert res.exit_code == 0, res.output
    assert json.loads((previous_output / "report.json").read_text())["pipeline"] == ["remove-identity"]
    assert temporaries(previous_output) == []


def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "y").write_text("b")
    if not driver._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    assert [p.name for p in a.iterdir()] == ["y"] and [p.name for p in b.iterdir()] == ["x"]


def test_an_ignored_signal_stays_ignored():
    """Under nohup, SIGHUP is ignored: a compile must not turn it back on."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        guard = driver._TerminationSignals()
        guard.install()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        guard.uninstall()
    finally:
        signal.signal(signal.SIGHUP, previous)
