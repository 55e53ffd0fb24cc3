"""The tuning database under concurrent compiles and damage (real TVM, real compiles, no mocks).

The first compiles are the slow part: a module fixture runs two tunings of a
two-layer MLP into one database at the same time, and the other tests work on
copies of the database it leaves.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx
import pytest
from helpers import ROOT, make_model, rand
from onnx import helper

pytest.importorskip("tvm")
pytestmark = [pytest.mark.tvm, pytest.mark.slow]

OPTC = [sys.executable, "-m", "optc.cli.main"]
if (Path(sys.executable).parent / "optc").is_file():
    OPTC = [str(Path(sys.executable).parent / "optc")]
# Two dense layers of different widths: two tuning tasks, so the tunings take seconds, not
# the minutes of the sample CNN's ten tasks, while two processes still write one database.
MODEL_DIR = Path(tempfile.mkdtemp(prefix="optc-tuning-db-"))
MODEL = MODEL_DIR / "mlp2.onnx"
onnx.save_model(make_model(
    [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"], name="act"),
     helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")],
    [("x", [1, 64])], [("y", [1, 16])], [("W1", rand(64, 48)), ("W2", rand(48, 16, seed=1))],
), str(MODEL))


def compile_args(out: Path, db: Path, trials: int) -> list[str]:
    return [
        *OPTC, "compile", str(MODEL), "-o", str(out), "--target", "x86",
        # TVM kernels only: a provider race re-timed at another load may offload a matmul and change the task list
        "--tune-trials", str(trials), "--kernels", "tvm", "--no-latency", "--tuning-db", str(db), "--json",
    ]


def compile_from(db: Path, out: Path) -> tuple[dict, str]:
    """Compile with what ``db`` holds (no tuning); returns the report's tuning section and stderr."""
    done = subprocess.run(compile_args(out, db, 0), capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)["target"]["tuning"], done.stderr


def open_with_tvm(db: Path):
    """TVM's own loader on the shared files: what every compile used to do, and failed on once damaged."""
    from tvm.s_tir import meta_schedule as ms

    return ms.database.JSONDatabase(path_workload=str(db / "workloads.json"), path_tuning_record=str(db / "records.json"), allow_missing=False)


@pytest.fixture(scope="module")
def concurrent_db(tmp_path_factory):
    """A database two compiles tuned into at the same time; (folder, their reports)."""
    base = tmp_path_factory.mktemp("concurrent")
    db = base / "db"
    start = time.perf_counter()
    runs = [subprocess.Popen(compile_args(base / f"out{i}", db, 2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for i in (1, 2)]
    results = [run.communicate(timeout=1200) for run in runs]
    for run, (_, err) in zip(runs, results):
        assert run.returncode == 0, err[-3000:]
    print(f"two concurrent tunings: {time.perf_counter() - start:.0f} s")
    return db, [json.loads(out)["target"]["tuning"] for out, _ in results]


def test_concurrent_tunings_leave_a_usable_database(concurrent_db, tmp_path):
    db, reports = concurrent_db
    tasks = reports[0]["tasks"]
    assert tasks >= 2 and all(r["tuned"] for r in reports)
    records = (db / "records.json").read_text().splitlines()
    assert records and all(json.loads(line)[0] < len((db / "workloads.json").read_text().splitlines()) for line in records)
    assert len(open_with_tvm(db)) == len(records)  # TVM itself reads every line
    tuning, err = compile_from(db, tmp_path / "again")
    assert tuning["tuned"] == [] and len(tuning["reused_from_db"]) == tasks - len(tuning["untunable"])
    assert tuning["db_health"] == {"damaged_lines": [], "moved_aside": None}
    assert "damaged" not in err


def test_garbage_line_is_skipped_with_a_warning(concurrent_db, tmp_path):
    db = tmp_path / "db"
    shutil.copytree(concurrent_db[0], db)
    good = (db / "records.json").read_text().splitlines()
    with open(db / "records.json", "a") as f:
        f.write('[0,[[["GetSBlock", tor\n')  # a torn line, as an interrupted append leaves
    with pytest.raises(Exception, match="parallel_for_dynamic"):
        open_with_tvm(db)  # what made every later compile fail
    tuning, err = compile_from(db, tmp_path / "a")
    assert tuning["db_health"]["damaged_lines"] == [f"records.json line {len(good) + 1}: not JSON (Expecting value at column 20)"]
    assert f"skipped 1 damaged lines: records.json line {len(good) + 1}" in err
    assert tuning["tuned"] == [] and tuning["reused_from_db"]
    # repaired: the line moved aside, TVM reads the database again, and the next compile says nothing
    assert (db / "records.json.damaged").read_text() == '[0,[[["GetSBlock", tor\n'
    assert len(open_with_tvm(db)) == len(good)
    again, err = compile_from(db, tmp_path / "b")
    assert again["db_health"]["damaged_lines"] == [] and "damaged" not in err and sorted(again["reused_from_db"]) == sorted(tuning["reused_from_db"])


def test_unreadable_database_is_moved_aside(tmp_path):
    from optc.targets.tuning_db import TuningDatabase

    db = tmp_path / "db"
    db.mkdir()
    (db / "workloads.json").write_bytes(b"\x00\xff garbage \x00\n" * 3)
    (db / "records.json").write_text("[0, []]\n")
    with TuningDatabase(db).snapshot() as snapshot:
        assert len(snapshot.database) == 0
        aside = Path(snapshot.health.moved_aside)
    assert aside.parent == db and aside.name.startswith("broken-")
    assert sorted(p.name for p in aside.iterdir()) == ["records.json", "workloads.json"]
    assert not (db / "workloads.json").exists()


def test_merges_renumber_workloads(concurrent_db, tmp_path):
    """Two snapshots of one database, each adding records for workloads the other lacks
    (appended to its private files as MetaSchedule appends them): both merges land,
    every record on its own workload."""
    from optc.targets.tuning_db import TuningDatabase

    source = concurrent_db[0]
    workloads = (source / "workloads.json").read_text().splitlines()
    records = [json.loads(line) for line in (source / "records.json").read_text().splitlines()]
    used = sorted({index for index, _ in records})
    assert len(used) >= 2
    half = used[: len(used) // 2], used[len(used) // 2 :]
    db = tmp_path / "db"
    db.mkdir()
    shared = TuningDatabase(db)
    with shared.snapshot() as first, shared.snapshot() as second:
        for snapshot, mine in zip((first, second), half):
            private_workloads = snapshot.folder / "workloads.json"
            private_records = snapshot.folder / "records.json"
            with open(private_workloads, "a") as w, open(private_records, "a") as r:
                for n, index in enumerate(mine):
                    w.write(workloads[index] + "\n")
                    for i, record in records:
                        if i == index:
                            r.write(json.dumps([n, record]) + "\n")
        assert first.commit() + second.commit() == len(records)
        second.committed = 0
        assert second.commit() == 0  # the same records again: nothing new
    merged = open_with_tvm(db)
    assert len(merged) == len(records)
    shared_workloads = (db / "workloads.json").read_text().splitlines()
    for line in (db / "records.json").read_text().splitlines():
        index, record = json.loads(line)
        assert [workloads.index(shared_workloads[index]), record] in records


def test_records_tuned_for_another_cpu_are_not_replayed(concurrent_db, tmp_path):
    """MetaSchedule finds records by workload alone: a compile for another CPU (here --cpu haswell) found this
    machine's and replayed them, and a trace with one CPU's instructions could land in another's build. Each compile now
    reads its own target's records; the others stay in the shared files."""
    db = tmp_path / "db"
    shutil.copytree(concurrent_db[0], db)
    before = (db / "records.json").read_bytes()
    done = subprocess.run([*compile_args(tmp_path / "hsw", db, 0), "--cpu", "haswell"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["target"]["tuning"]["reused_from_db"] == []
    assert (db / "records.json").read_bytes() == before
    tuning, _ = compile_from(db, tmp_path / "host")  # this machine's target still finds them
    assert len(tuning["reused_from_db"]) >= 2


def test_a_record_tensorized_with_optc_dot_products_is_reused_by_the_next_compile(tmp_path):
    """A tuned int8 convolution's trace tensorizes with optc's dot-product intrinsic. The next compile, a fresh process,
    used to reject that record as damaged (the intrinsic was not registered when the database was read) and move it
    out of the shared files. It is now reused, and the files keep it."""
    import tvm

    from optc.targets.tiled_kernels import dot_product
    from test_int8_lowering import _saturating_conv

    model = tmp_path / "int8.onnx"
    onnx.save_model(_saturating_conv(64), str(model))  # 7-bit weights: int8 on any x86 (VNNI, or vpmaddubsw)
    db = tmp_path / "db"
    args = [*OPTC, "compile", str(model), "--target", "x86", "--kernels", "tvm", "--no-latency", "--tuning-db", str(db), "--json"]
    first = subprocess.run([*args, "-o", str(tmp_path / "a"), "--tune-trials", "1"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    records = (db / "records.json").read_bytes()
    host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    if dot_product(host) is not None:
        assert b"optc_" in records  # the trace names the intrinsic
    second = subprocess.run([*args, "-o", str(tmp_path / "b")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    tuning = json.loads(second.stdout)["target"]["tuning"]
    assert tuning["db_health"]["damaged_lines"] == [] and any("conv2d" in name for name in tuning["reused_from_db"]), tuning
    assert (db / "records.json").read_bytes() == records and not (db / "records.json.damaged").exists()
