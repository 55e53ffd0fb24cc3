"""IR scale benchmark: load -> canonicalize -> save on BERT-sized models.

Builds two transformer encoders with random weights and, for each, runs
``optc.ir.load_model`` -> ``PassManager(canonicalize).run`` -> ``optc.ir.save_model``
in a fresh subprocess, measuring the wall time of each stage and the peak RSS
of the process (``ru_maxrss``), raw and above the RSS after imports.

* ``bert-base``: 12 layers, hidden 768, 12 heads, FFN 3072, vocab 30522
  (~110 M parameters, ~440 MB), saved as one ``.onnx`` file.
* ``bert-2g``: 18 layers, hidden 1536, 16 heads, FFN 6144 (~557 M parameters,
  ~2.2 GB), saved with external data (over protobuf's 2 GiB limit).

The saved models are loaded back in another subprocess; for ``bert-base`` the
saved model's onnxruntime output is compared with the original's.

Usage::

    python benchmarks/ir_scale.py [--skip-large] [--workdir DIR] [--keep-input] [--rss-cap-gib N]

Not a pytest module: run it directly. The goal printed beside each peak is
peak RSS above baseline (the RSS after imports) <= 2.5x the model's weight
bytes; exceeding it is reported, not an error (the exit status is 1 only when
a stage fails, a saved model does not load back, or outputs differ). By
default the pipeline holds the only reference to the loaded model, as in
``optc/driver.py`` (which measures the input first, then lets it go);
``--keep-input`` keeps it referenced throughout. A worker whose RSS passes ``--rss-cap-gib``
(default 85% of available memory) is killed and reported with its stage, so
that a regression cannot take the machine down. The large case is skipped
when less than 8 GB of disk is free.

Every model is built in a subprocess too: on Linux a child's ``ru_maxrss``
starts from its parent's RSS at fork, so a parent that had built a model
would inflate every measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

GOAL_RATIO = 2.5
LARGE_MIN_FREE_BYTES = 8 * 10**9
SEQ = 128
GIB = 1024**3


@dataclass(frozen=True)
class Config:
    name: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int = 30522
    max_pos: int = 512
    type_vocab: int = 2
    external: bool = False  # build (and expect) external data


BERT_BASE = Config("bert-base", layers=12, hidden=768, heads=12, ffn=3072)
BERT_2G = Config("bert-2g", layers=18, hidden=1536, heads=16, ffn=6144, external=True)
CONFIGS = {c.name: c for c in (BERT_BASE, BERT_2G)}


# --------------------------------------------------------------------------- building


class _Builder:
    """Collects nodes and initializers; large payloads go straight to a data file."""

    def __init__(self, data_file=None, data_name: str | None = None, seed: int = 0):
        import numpy as np

        self.np = np
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []
        self.data_file = data_file
        self.data_name = data_name
        self.weight_bytes = 0
        self._n = 0

    def name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def init(self, name: str, array) -> str:
        import onnx
        from onnx import numpy_helper

        np = self.np
        array = np.asarray(array)
        if not array.flags.c_contiguous:  # (np.ascontiguousarray would turn scalars into [1])
            array = array.copy(order="C")
        self.weight_bytes += array.nbytes
        if self.data_file is not None and array.nbytes >= 1024:
            f = self.data_file
            f.write(b"\0" * ((-f.tell()) % 4096))
            offset = f.tell()
            f.write(array.tobytes())
            t = onnx.TensorProto()
            t.name = name
            t.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
            t.dims.extend(array.shape)
            for key, value in (("location", self.data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            t.data_location = onnx.TensorProto.EXTERNAL
        else:
            t = numpy_helper.from_array(array, name)
        self.inits.append(t)
        return name

    def weight(self, name: str, *shape: int) -> str:
        w = self.rng.standard_normal(shape, dtype=self.np.float32)
        w *= 0.02
        return self.init(name, w)

    def const(self, name: str, value, dtype) -> str:
        return self.init(name, self.np.asarray(value, dtype=dtype))

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        import onnx

        output = output or self.name(op.lower())
        self.nodes.append(onnx.helper.make_node(op, inputs, [output], name=self.name(op), **attrs))
        return output


def build_bert(cfg: Config, path: Path) -> int:
    """Write ``cfg``'s model to ``path`` (external data beside it when ``cfg.external``).

    Returns the weight bytes. With external data, weights are streamed to the
    data file as they are drawn, so building never holds the whole model.
    """
    import numpy as np
    import onnx

    data_name = path.name + ".data"
    data_file = open(path.parent / data_name, "wb") if cfg.external else None
    try:
        b = _Builder(data_file, data_name)
        h, nh = cfg.hidden, cfg.heads
        hd = h // nh
        i64 = np.int64

        # Embeddings: word + position + token type (positions and types are constants,
        # so fold-constants has real work, as with exported BERTs).
        word = b.weight("embeddings.word_embeddings.weight", cfg.vocab, h)
        pos = b.weight("embeddings.position_embeddings.weight", cfg.max_pos, h)
        typ = b.weight("embeddings.token_type_embeddings.weight", cfg.type_vocab, h)
        pos_ids = b.const("position_ids", np.arange(SEQ, dtype=i64)[None, :], i64)
        type_ids = b.const("token_type_ids", np.zeros((1, SEQ), dtype=i64), i64)
        x = b.node("Gather", [word, "input_ids"], axis=0)
        x = b.node("Add", [x, b.node("Gather", [pos, pos_ids], axis=0)])
        x = b.node("Add", [x, b.node("Gather", [typ, type_ids], axis=0)])

        def layer_norm(x: str, prefix: str) -> str:
            g = b.init(f"{prefix}.weight", np.ones(h, np.float32) + 0.01 * b.rng.standard_normal(h, dtype=np.float32))
            beta = b.init(f"{prefix}.bias", 0.01 * b.rng.standard_normal(h, dtype=np.float32))
            return b.node("LayerNormalization", [x, g, beta], axis=-1, epsilon=1e-12)

        def linear(x: str, prefix: str, n_in: int, n_out: int) -> str:
            w = b.weight(f"{prefix}.weight", n_in, n_out)
            bias = b.init(f"{prefix}.bias", 0.01 * b.rng.standard_normal(n_out, dtype=np.float32))
            return b.node("Add", [b.node("MatMul", [x, w]), bias])

        x = layer_norm(x, "embeddings.LayerNorm")

        # Shape-derived reshape targets, in the style of torch.onnx exports.
        c_heads = b.const("const_heads", [nh], i64)
        c_hd = b.const("const_head_dim", [hd], i64)
        c_hidden = b.const("const_hidden", [h], i64)
        idx0 = b.const("const_idx0", 0, i64)
        idx1 = b.const("const_idx1", 1, i64)
        axes0 = b.const("const_axes0", [0], i64)
        sqrt2 = b.const("const_sqrt2", np.sqrt(2.0), np.float32)
        half = b.const("const_half", 0.5, np.float32)
        one = b.const("const_one", 1.0, np.float32)
        head_dim_f = b.const("const_head_dim_f", float(hd), np.float32)

        for i in range(cfg.layers):
            p = f"encoder.layer.{i}"
            shape = b.node("Shape", [x])
            batch = b.node("Unsqueeze", [b.node("Gather", [shape, idx0], axis=0), axes0])
            seq = b.node("Unsqueeze", [b.node("Gather", [shape, idx1], axis=0), axes0])
            split_shape = b.node("Concat", [batch, seq, c_heads, c_hd], axis=0)
            merge_shape = b.node("Concat", [batch, seq, c_hidden], axis=0)

            def heads(t: str, perm: list[int]) -> str:
                return b.node("Transpose", [b.node("Reshape", [t, split_shape])], perm=perm)

            q = heads(linear(x, f"{p}.attention.self.query", h, h), [0, 2, 1, 3])
            k = heads(linear(x, f"{p}.attention.self.key", h, h), [0, 2, 3, 1])
            v = heads(linear(x, f"{p}.attention.self.value", h, h), [0, 2, 1, 3])
            scores = b.node("Div", [b.node("MatMul", [q, k]), b.node("Sqrt", [head_dim_f])])
            probs = b.node("Softmax", [scores], axis=-1)
            ctx = b.node("Transpose", [b.node("MatMul", [probs, v])], perm=[0, 2, 1, 3])
            ctx = b.node("Reshape", [ctx, merge_shape])
            attn = linear(ctx, f"{p}.attention.output.dense", h, h)
            x = layer_norm(b.node("Add", [attn, x]), f"{p}.attention.output.LayerNorm")
            up = linear(x, f"{p}.intermediate.dense", h, cfg.ffn)
            # Gelu (erf form): 0.5 * x * (1 + erf(x / sqrt(2)))
            erf = b.node("Erf", [b.node("Div", [up, sqrt2])])
            gelu = b.node("Mul", [b.node("Mul", [up, b.node("Add", [erf, one])]), half])
            down = linear(gelu, f"{p}.output.dense", cfg.ffn, h)
            x = layer_norm(b.node("Add", [down, x]), f"{p}.output.LayerNorm")

        # Exporters leave Identity nodes before outputs; remove-identity drops this one.
        last = b.node("Identity", [x], output="last_hidden_state")
        first_tok = b.node("Gather", [last, idx0], axis=1)
        b.node("Tanh", [linear(first_tok, "pooler.dense", h, h)], output="pooler_output")

        graph = onnx.helper.make_graph(
            b.nodes,
            cfg.name,
            [onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, SEQ])],
            [
                onnx.helper.make_tensor_value_info("last_hidden_state", onnx.TensorProto.FLOAT, [1, SEQ, h]),
                onnx.helper.make_tensor_value_info("pooler_output", onnx.TensorProto.FLOAT, [1, h]),
            ],
            initializer=b.inits,
        )
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], producer_name="optc-ir-scale")
        model.ir_version = 8
        del b.inits[:]
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        return b.weight_bytes
    finally:
        if data_file is not None:
            data_file.close()


# --------------------------------------------------------------------------- workers (subprocesses)


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _vm_hwm() -> int:
    """Peak RSS of this process's own address space (not inherited across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def worker_pipeline(src: str, dst: str, drop_input: bool = False) -> dict:
    """load -> canonicalize -> save.

    By default the loaded model stays referenced during the passes and the save,
    as in optc/driver.py (which keeps it to evaluate against); with
    ``drop_input`` the pipeline holds the only reference.
    """
    from optc.ir import load_model, save_model
    from optc.passes.framework.manager import PassManager
    from optc.passes.framework.pipeline import parse_pass_specs

    passes = parse_pass_specs(["canonicalize"])
    out: dict = {"baseline_rss": _maxrss(), "baseline_rss_now": _rss_now(), "baseline_hwm": _vm_hwm(), "stages": {}}

    def stage(name: str, fn):
        print(f"@@STAGE@@ {name}", flush=True)  # the parent names the stage if the worker dies
        t0 = time.perf_counter()
        value = fn()
        out["stages"][name] = {"s": time.perf_counter() - t0, "maxrss": _maxrss(), "hwm": _vm_hwm(), "rss_after": _rss_now()}
        print("@@DONE@@ " + json.dumps({"name": name, **out["stages"][name], "baseline_rss": out["baseline_rss"]}), flush=True)
        return value

    box = [stage("load", lambda: load_model(src))]
    out["weight_bytes"] = box[0].weight_bytes()
    model = None if drop_input else box[0]
    result = stage("passes", lambda: PassManager(passes).run(box.pop()))
    out["records"] = [
        {"pass": r.name, "modified": r.modified, "s": round(r.seconds, 3), "stats": r.stats} for r in result.records
    ]
    files = stage("save", lambda: save_model(result.model, dst))
    out["files"] = [(str(p), p.stat().st_size) for p in files]
    out["peak_rss"] = _maxrss()
    out["peak_hwm"] = _vm_hwm()
    del model
    return out


def worker_verify(src: str, dst: str, compare: bool) -> dict:
    """The saved model loads back; optionally its onnxruntime outputs equal the original's."""
    import numpy as np

    from optc.ir import load_model

    t0 = time.perf_counter()
    back = load_model(dst)
    out: dict = {
        "reload_s": time.perf_counter() - t0,
        "nodes": len(back.graph.node),
        "weight_bytes": back.weight_bytes(),
        "ops": dict(back.op_histogram()),
    }
    del back
    if compare:
        import onnxruntime as ort

        rng = np.random.default_rng(1)
        feeds = {"input_ids": rng.integers(0, BERT_BASE.vocab, size=(1, SEQ), dtype=np.int64)}
        results = []
        for path in (src, dst):
            sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            names = [o.name for o in sess.get_outputs()]
            results.append(dict(zip(names, sess.run(names, feeds))))
            del sess
        ref, got = results
        cmp = {}
        for name in ref:
            a, b = ref[name], got.get(name)
            if b is None or a.shape != b.shape:
                cmp[name] = {"ok": False, "error": f"missing or shape {None if b is None else b.shape} != {a.shape}"}
                continue
            cmp[name] = {
                "bit_exact": bool(np.array_equal(a, b)),
                "max_abs_diff": float(np.max(np.abs(a - b))),
                "ok": bool(np.allclose(a, b, rtol=1e-5, atol=1e-5)),
            }
        out["compare"] = cmp
    return out


def _worker_main(argv: list[str]) -> int:
    kind, src, dst = argv[0], argv[1], argv[2]
    try:
        if kind == "build":
            res = {"weight_bytes": build_bert(CONFIGS[dst], Path(src))}
        elif kind in ("pipeline", "pipeline-drop-input"):
            res = worker_pipeline(src, dst, drop_input=kind == "pipeline-drop-input")
        else:
            res = worker_verify(src, dst, compare=kind == "verify-compare")
        res["ok"] = True
    except BaseException as exc:  # report everything, including MemoryError
        res = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(), "peak_rss": _maxrss()}
    print("@@RESULT@@" + json.dumps(res))
    return 0


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 16 * GIB


def _proc_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _run_worker(kind: str, src: Path, dst: Path | str, rss_cap: int | None = None) -> dict:
    """Run a worker; kill it (and say in which stage) if its RSS passes ``rss_cap``."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", kind, str(src), str(dst)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        seen, capped = 0, False
        while proc.poll() is None:
            rss = _proc_rss(proc.pid)
            seen = max(seen, rss)
            if rss_cap and rss > rss_cap:
                proc.kill()
                capped = True
                proc.wait()
                break
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    stages = [line.split(" ", 1)[1] for line in stdout.splitlines() if line.startswith("@@STAGE@@ ")]
    done = [json.loads(line.split(" ", 1)[1]) for line in stdout.splitlines() if line.startswith("@@DONE@@ ")]
    partial = {d.pop("name"): d for d in done}
    base = next(iter(partial.values()))["baseline_rss"] if partial else None
    where = f" during stage '{stages[-1]}'" if stages else ""
    for line in stdout.splitlines()[::-1]:
        if line.startswith("@@RESULT@@"):
            res = json.loads(line[len("@@RESULT@@"):])
            if stderr.strip():
                res["stderr"] = stderr.strip()[-4000:]
            if not res["ok"]:
                res.update(stages=partial, baseline_rss=base, error=res["error"] + where)
            return res
    if capped:
        error = f"killed by the benchmark: RSS passed the cap of {rss_cap / GIB:.1f} GiB{where}"
    else:
        error = f"worker exited with status {proc.returncode}{where}" + (" (killed: out of memory?)" if proc.returncode < 0 else "")
    return {"ok": False, "error": error, "traceback": stderr[-8000:], "peak_rss": seen, "capped": capped,
            "stages": partial, "baseline_rss": base, "stages_started": stages}


# --------------------------------------------------------------------------- driver


def _fmt_s(stages: dict, name: str) -> str:
    return f"{stages[name]['s']:.2f}" if name in stages else "-"


def run_case(cfg: Config, workdir: Path, rss_cap: int | None, drop_input: bool = False) -> dict:
    folder = workdir / cfg.name
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "out").mkdir(parents=True)
    src = folder / "model.onnx"
    dst = folder / "out" / "model.onnx"
    print(f"[{cfg.name}] building ({cfg.layers} layers, hidden {cfg.hidden}, {'external data' if cfg.external else 'single file'}) ...", flush=True)
    t0 = time.perf_counter()
    # Built in a subprocess too: the parent stays small, and a child's ru_maxrss
    # starts from the parent's RSS at fork (Linux counts it across exec).
    built = _run_worker("build", src, cfg.name)
    if not built["ok"]:
        raise RuntimeError(f"building {cfg.name} failed: {built['error']}\n{built.get('traceback', '')}")
    weight_bytes = built["weight_bytes"]
    print(f"[{cfg.name}] built {weight_bytes / 1e9:.3f} GB of weights in {time.perf_counter() - t0:.1f}s", flush=True)
    print(f"[{cfg.name}] load -> canonicalize -> save in a fresh process ...", flush=True)
    res = _run_worker("pipeline-drop-input" if drop_input else "pipeline", src, dst, rss_cap)
    res["config"] = cfg
    res["built_weight_bytes"] = weight_bytes
    if not res["ok"]:
        print(f"[{cfg.name}] FAILED: {res['error']}\n{res.get('traceback', '')}", flush=True)
        return res
    print(f"[{cfg.name}] verifying the saved model in a fresh process ...", flush=True)
    res["verify"] = _run_worker("verify-compare" if cfg.name == BERT_BASE.name else "verify", src, dst, rss_cap)
    if not res["verify"]["ok"]:
        print(f"[{cfg.name}] VERIFY FAILED: {res['verify']['error']}\n{res['verify'].get('traceback', '')}", flush=True)
    return res


def print_report(results: list[dict]) -> None:
    header = ["model", "weight bytes", "load s", "passes s", "save s", "peak RSS GiB", "peak-base GiB", "peak/weights", "(peak-base)/w", "goal", "verdict"]
    rows = []
    for r in results:
        cfg: Config = r["config"]
        wb = r.get("weight_bytes", r["built_weight_bytes"])
        stages = r.get("stages", {})
        peak = r.get("peak_rss")
        base = r.get("baseline_rss")
        if peak is None or not r["ok"]:
            more = ">" if r.get("capped") else ""
            net = f"{more}{(peak - base) / wb:.2f}x" if peak is not None and base is not None else "-"
            rows.append([cfg.name, f"{wb:,}", _fmt_s(stages, "load"), _fmt_s(stages, "passes"), _fmt_s(stages, "save"),
                         "-" if peak is None else f"{more}{peak / GIB:.2f}",
                         f"{more}{(peak - base) / GIB:.2f}" if peak is not None and base is not None else "-",
                         "-" if peak is None else f"{more}{peak / wb:.2f}x", net, f"<= {GOAL_RATIO}x",
                         "KILLED" if r.get("capped") else "FAILED"])
            continue
        ratio_net = (peak - base) / wb
        verdict = "ok" if ratio_net <= GOAL_RATIO else "OVER GOAL"
        rows.append([
            cfg.name, f"{wb:,}", _fmt_s(stages, "load"), _fmt_s(stages, "passes"), _fmt_s(stages, "save"),
            f"{peak / GIB:.2f}", f"{(peak - base) / GIB:.2f}", f"{peak / wb:.2f}x", f"{ratio_net:.2f}x", f"<= {GOAL_RATIO}x", verdict,
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print()
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print()
    for r in results:
        cfg = r["config"]
        print(f"{cfg.name}:")
        wb = r.get("weight_bytes", r["built_weight_bytes"])
        if not r["ok"]:
            print(f"  pipeline FAILED: {r['error']}")
            for name, st in r.get("stages", {}).items():
                print(f"  after {name:<6}: {st['s']:7.2f}s  peak so far {st['maxrss'] / GIB:6.2f} GiB "
                      f"({(st['maxrss'] - st['baseline_rss']) / wb:.2f}x weights)  RSS now {st['rss_after'] / GIB:6.2f} GiB "
                      f"({(st['rss_after'] - st['baseline_rss']) / wb:.2f}x weights)")
            continue
        print(f"  baseline RSS after imports: {r['baseline_rss'] / GIB:.2f} GiB (ru_maxrss; RSS now {r['baseline_rss_now'] / GIB:.2f} GiB); "
              f"peak cross-check: VmHWM {r['peak_hwm'] / GIB:.2f} GiB")
        for name, st in r["stages"].items():
            print(f"  after {name:<6}: {st['s']:7.2f}s  peak so far {st['maxrss'] / GIB:6.2f} GiB "
                  f"({(st['maxrss'] - r['baseline_rss']) / wb:.2f}x weights)  RSS now {st['rss_after'] / GIB:6.2f} GiB "
                  f"({(st['rss_after'] - r['baseline_rss']) / wb:.2f}x weights)")
        for rec in r.get("records", []):
            print(f"  pass {rec['pass']:<20} modified={rec['modified']!s:<5} {rec['s']:7.2f}s  {rec['stats']}")
        for path, size in r.get("files", []):
            print(f"  wrote {Path(path).name} ({size:,} bytes)")
        v = r.get("verify")
        if v is None:
            continue
        if not v["ok"]:
            print(f"  verify FAILED: {v['error']}")
            continue
        print(f"  reloaded in {v['reload_s']:.2f}s: {v['nodes']} nodes, {v['weight_bytes']:,} weight bytes")
        for name, c in v.get("compare", {}).items():
            if "error" in c:
                print(f"  onnxruntime {name}: MISMATCH ({c['error']})")
            else:
                print(f"  onnxruntime {name}: {'equal' if c['ok'] else 'DIFFERENT'} "
                      f"(bit-exact: {c['bit_exact']}, max |diff| {c['max_abs_diff']:.3g})")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_worker"]:
        return _worker_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-large", action="store_true", help="skip the model over 2 GB")
    parser.add_argument("--workdir", type=Path, help="where models are written (kept); default: a temporary folder, deleted at the end")
    parser.add_argument("--keep-input", action="store_true",
                        help="keep the loaded model referenced during passes and save (optc/driver.py lets it go)")
    parser.add_argument("--rss-cap-gib", type=float, help="kill a worker whose RSS passes this (default: 85%% of available memory)")
    args = parser.parse_args(argv)
    rss_cap = int((args.rss_cap_gib * GIB) if args.rss_cap_gib else 0.85 * _mem_available())
    print(f"RSS cap per worker: {rss_cap / GIB:.1f} GiB")

    temp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="optc-ir-scale-")) if temp else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    failed = False
    try:
        cases = [BERT_BASE] + ([] if args.skip_large else [BERT_2G])
        for cfg in cases:
            if cfg.external:
                free = shutil.disk_usage(workdir).free
                if free < LARGE_MIN_FREE_BYTES:
                    print(f"[{cfg.name}] skipped: {free / 1e9:.1f} GB free in {workdir}, need {LARGE_MIN_FREE_BYTES / 1e9:.0f} GB")
                    continue
            res = run_case(cfg, workdir, rss_cap, not args.keep_input)
            results.append(res)
            failed |= not res["ok"] or not res.get("verify", {}).get("ok", False)
            cmp = res.get("verify", {}).get("compare", {})
            failed |= any(not c.get("ok", False) for c in cmp.values())
            if temp:  # free the disk before the next case
                shutil.rmtree(workdir / cfg.name, ignore_errors=True)
        if results:
            print_report(results)
    finally:
        if temp:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
