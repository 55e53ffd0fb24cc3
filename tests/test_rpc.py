"""Tuning through a real TVM RPC tracker and server on loopback (no mocks).

The test starts ``python -m tvm.exec.rpc_tracker`` and ``python -m
tvm.exec.rpc_server`` bound to 127.0.0.1, tunes a tiny model with
``--rpc-tracker/--rpc-key`` and checks that the candidates were measured on
that server (its log shows the uploaded modules), that the tuning records
hold real run times, and that the artifact matches onnxruntime.

Why it used to hang: ``tvm.exec.rpc_server`` searches ports in
``[--port, --port-end)`` and ``--port-end`` defaults to 9199. A free port from
the OS (above 32768) makes that range empty, the server dies at once with
"cannot bind to any port", and with its output sent to /dev/null the test
just waited for a registration that could never come. Both processes get an
explicit one-port range now, their logs go to files that failures quote,
and a process that exits is reported at once.
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

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import make_model, mlp_file, ort_run, rand
from onnx import helper

from optc.cli.main import cli
from optc.errors import TargetError

pytest.importorskip("tvm")
pytest.importorskip("tornado")  # TVM's tracker runs on tornado
pytestmark = [pytest.mark.tvm, pytest.mark.rpc, pytest.mark.slow]

KEY = "optc-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """A TVM RPC process in its own session (so its workers go with it), logging to a file."""

    def __init__(self, name: str, args: list[str], log: Path):
        self.name, self.log = name, log
        with open(log, "wb") as sink:
            self.proc = subprocess.Popen([sys.executable, "-m", *args], stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").strip().splitlines()[-15:])

    def wait_for(self, condition, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the RPC {self.name} exited with code {self.proc.returncode} before {what}:\n{self.tail()}")
            try:
                if condition():
                    return
            except (OSError, RuntimeError, TargetError):
                pass
            time.sleep(0.25)
        pytest.fail(f"{what}: not within {timeout:.0f} s; {self.name} log:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group of this process only (start_new_session)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def accepts(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


@pytest.fixture
def loopback_tracker(tmp_path):
    """A tracker and one server registered under KEY, both on 127.0.0.1; yields (port, server)."""
    from optc.targets.tuning import check_tracker

    port = free_port()
    tracker = Daemon("tracker", ["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)], tmp_path / "tracker.log")
    daemons = [tracker]
    try:
        tracker.wait_for(lambda: accepts(port), "the tracker listens")
        with pytest.raises(TargetError, match=f"no board with key '{KEY}'"):
            check_tracker("127.0.0.1", port, KEY)
        server_port = free_port()
        server = Daemon(
            "server",
            ["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(server_port), "--port-end", str(server_port + 1),
             "--tracker", f"127.0.0.1:{port}", "--key", KEY],
            tmp_path / "server.log",
        )
        daemons.append(server)
        server.wait_for(lambda: check_tracker("127.0.0.1", port, KEY) is None, f"the server registers under '{KEY}'")
        yield port, server
    finally:
        for daemon in reversed(daemons):
            daemon.stop()


def test_tuning_through_a_loopback_rpc_tracker(loopback_tracker, tmp_path):
    port, server = loopback_tracker
    path, proto = mlp_file(tmp_path)
    db = tmp_path / "db"
    res = CliRunner().invoke(cli, list(map(str, [
        "compile", path, "-o", tmp_path / "a", "--target", "x86", "--tune-trials", "2", "--tuning-db", db, "--kernels", "tvm",
        "--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", KEY, "--json", "--no-latency"])), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    tuning = json.loads(res.stdout)["target"]["tuning"]
    assert tuning["tasks"] >= 1 and sorted(tuning["tuned"]) and tuning["reused_from_db"] == []

    # every candidate was uploaded to and timed on the RPC server ...
    log = server.log.read_text(errors="replace")
    assert log.count("load_module") >= len(tuning["tuned"]), server.tail()
    # ... and came back with a real time (MetaSchedule stores failures as 1e10 s)
    records = [json.loads(line) for line in (db / "records.json").read_text().splitlines() if line.strip()]
    run_secs = [s for record in records for s in record[1][1]]
    assert records and all(0 < s < 1.0 for s in run_secs), run_secs

    from optc.targets.artifact import load_artifact

    x = rand(4, 64, seed=3)
    np.testing.assert_allclose(load_artifact(tmp_path / "a").run({"x": x})["y"], ort_run(proto, {"x": x})["y"], atol=1e-4, rtol=1e-4)


def test_winograd_raced_on_the_board_behind_the_tracker(loopback_tracker, tmp_path):
    """With --rpc-tracker the default compile races optc's Winograd kernels against TVM's on the board (the loopback
    server here; no vendor library assumed there): the race's module is uploaded and loaded there, the figures come
    back from its time_evaluator, a Winograd kernel wins the 64-channel layer, and the artifact matches onnxruntime."""
    from optc.cli.render import kernels_line
    from test_winograd_glue import check_conv64_race, conv64_model

    port, server = loopback_tracker
    model = conv64_model()
    onnx.save(model, tmp_path / "m.onnx")
    res = CliRunner().invoke(cli, list(map(str, [
        "compile", tmp_path / "m.onnx", "-o", tmp_path / "a", "--target", "x86", "--tune-trials", "0", "--tuning-db", tmp_path / "db",
        "--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", KEY, "--json", "--no-latency"])), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    providers = json.loads(res.stdout)["target"]["tuning"]["providers"]
    assert providers["board"] == f"measured on the board '{KEY}' through the RPC tracker at 127.0.0.1:{port}" and providers["measured"] == 1
    assert "kernels.so" in server.log.read_text(errors="replace"), server.tail()  # uploaded to and loaded on the server
    check_conv64_race(providers, model, tmp_path / "a")
    assert kernels_line(providers).startswith("kernels: TVM for every op but 1 of 2 convolutions, 1 by optc's ")
    assert kernels_line(providers).endswith(f"of transformed weights ({providers['board']}); oneDNN not used: with --rpc-tracker the "
                                            "candidates are timed on the board, which may lack oneDNN")


def test_unreachable_tracker_fails_fast(tmp_path):
    """A closed port is refused in seconds (TVM's own client retries for 60 s), before any tuning."""
    from optc.targets.tuning import check_tracker

    port = free_port()
    start = time.monotonic()
    with pytest.raises(TargetError, match=f"cannot reach the RPC tracker at 127.0.0.1:{port}"):
        check_tracker("127.0.0.1", port, KEY)
    assert time.monotonic() - start < 10
    path = tmp_path / "mlp.onnx"
    onnx.save_model(make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [2, 8])], [("y", [2, 8])]), str(path))
    res = CliRunner().invoke(cli, list(map(str, [
        "compile", path, "-o", tmp_path / "a", "--target", "x86", "--tune-trials", "2", "--tuning-db", tmp_path / "db",
        "--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", KEY, "--no-latency"])), catch_exceptions=False)
    assert res.exit_code == 2 and res.output.strip().splitlines() == [f"optc: error: cannot reach the RPC tracker at 127.0.0.1:{port}: Connection refused"]
    assert not (tmp_path / "a").exists() and not (tmp_path / "db").exists()
