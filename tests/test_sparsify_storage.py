"""pack-sparse and sparsify:storage=packed: smaller on disk, bit-identical outputs, loads in optc and onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import make_model, ort_run, rand
from onnx import helper

from optc.ir import load_model, save_model
from optc.data import CalibrationSet
from optc.passes.framework import PassContext
from optc.passes.framework.options import build_config
from optc.passes.sparsify.sparsify import Sparsify, SparsifyConfig
from optc.passes.sparsify.pack_sparse import PackSparse, PackSparseConfig, packed_bytes, unpack
from test_sparsify import _small_cnn


def _ort_default(proto: onnx.ModelProto, feeds: dict) -> np.ndarray:
    """The model's first output in a default onnxruntime session (constant folding on)."""
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _sparsified(tmp_path, save, storage: str, sparsity: str = "0.5", pattern: str = "unstructured"):
    model = load_model(save(_small_cnn()))
    x = np.abs(rand(64, 4, 6, 6, seed=7))
    np.savez(tmp_path / "calib.npz", x=x)
    calib = CalibrationSet.from_path(tmp_path / "calib.npz", model)
    config = build_config("sparsify", SparsifyConfig, {"sparsity": sparsity, "pattern": pattern, "storage": storage})
    return Sparsify(config).run(model, PassContext(calibration=calib)), x


def test_unpack_mirrors_the_packing():
    w = rand(7, 13)
    w[np.abs(w) < 0.6] = 0
    mask = np.packbits(w.ravel() != 0, bitorder="little").reshape(-1, 1)
    np.testing.assert_array_equal(unpack(w.ravel()[w.ravel() != 0], mask, w.shape), w)
    assert packed_bytes(w) == 4 * np.count_nonzero(w) + 12


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", "0.5"), ("2:4", "0.5"), ("unstructured", "0.8")])
def test_packed_model_is_smaller_and_bit_identical(tmp_path, save, pattern, sparsity):
    dense, x = _sparsified(tmp_path, save, "dense", sparsity, pattern)
    packed, _ = _sparsified(tmp_path, save, "packed", sparsity, pattern)
    onnx.checker.check_model(packed.model.proto, full_check=True)
    storage = packed.stats["storage"]
    assert storage["packed"] == 3 and packed.model.op_histogram()["CumSum"] == 3
    assert storage["bytes_weights"] < storage["bytes_weights_dense"] == dense.model.weight_bytes()
    # Values (4 bytes each) + 1 bit per entry, + per weight its int64 shape constants and a zero,
    # + the shared bit shifts and constants.
    level = 0.5 if pattern == "2:4" else float(sparsity)
    shapes = [(8, 4, 3, 3), (8, 8, 3, 3), (5, 288)]
    expected = sum(4 * round((1 - level) * np.prod(s)) + -(-np.prod(s) // 8) + 8 + 8 + 4 + 8 * len(s) for s in shapes) + 8 + 1 + 8 + 8
    assert storage["bytes_weights"] - expected == dense.model.weight_bytes() - 4 * sum(np.prod(s) for s in shapes)
    # On disk through optc's own save and load; a default onnxruntime session folds the decoding: same bits.
    save_model(dense.model, tmp_path / "dense" / "model.onnx")
    save_model(packed.model, tmp_path / "packed" / "model.onnx")
    size_dense = (tmp_path / "dense" / "model.onnx").stat().st_size
    size_packed = (tmp_path / "packed" / "model.onnx").stat().st_size
    # The decode nodes and their names cost about 1 KB per weight (negligible on real layers).
    assert size_packed < size_dense - (storage["bytes_weights_dense"] - storage["bytes_weights"]) + 1500 * storage["packed"]
    reloaded = load_model(tmp_path / "packed" / "model.onnx")
    y_dense = ort_run(dense.model.proto, {"x": x[:8]})["y"]
    # Without optimisations the weights are computed tensors: same values, but kernels without prepacking.
    np.testing.assert_allclose(ort_run(reloaded.proto, {"x": x[:8]})["y"], y_dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(_ort_default(reloaded.proto, {"x": x[:8]}), _ort_default(dense.model.proto, {"x": x[:8]}))


def test_fold_constants_restores_the_dense_weights(tmp_path, save):
    from optc.passes import make_pass

    dense, _ = _sparsified(tmp_path, save, "dense")
    packed, _ = _sparsified(tmp_path, save, "packed")
    folded = make_pass("fold-constants").run(packed.model, PassContext())
    assert folded.modified and "CumSum" not in folded.model.op_histogram()
    weights = lambda m: sorted((w.shape, w.tobytes()) for w in (m.initializer_array(t.name) for t in m.graph.initializer) if w.ndim >= 2)
    assert weights(folded.model) == weights(dense.model)


def test_pack_sparse_pass_packs_only_what_pays(tmp_path, save):
    w_sparse = rand(64, 64, seed=1)
    w_sparse[np.abs(w_sparse) < 1.0] = 0  # ~68 % zeros
    w_dense = rand(64, 64, seed=2)
    w_dense[0, :10] = 0  # 0.2 % zeros: packing would not pay
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"], name="mm1"), helper.make_node("MatMul", ["h", "B"], ["y"], name="mm2")]
    proto = make_model(nodes, [("x", ["N", 64])], [("y", ["N", 64])], [("A", w_sparse), ("B", w_dense)])
    model = load_model(save(proto))
    result = PackSparse(PackSparseConfig()).run(model, PassContext())
    assert result.modified and result.stats["packed"] == 1 and result.stats["names"] == ["A"]
    onnx.checker.check_model(result.model.proto)
    x = rand(5, 64, seed=3)
    np.testing.assert_array_equal(ort_run(result.model.proto, {"x": x})["y"], ort_run(proto, {"x": x})["y"])
    again = PackSparse(PackSparseConfig()).run(result.model, PassContext())
    assert not again.modified and again.model is result.model


def test_old_opsets_stay_dense(tmp_path, save):
    w = rand(32, 32)
    w[np.abs(w) < 1.0] = 0
    proto = make_model([helper.make_node("MatMul", ["x", "A"], ["y"], name="mm")], [("x", ["N", 32])], [("y", ["N", 32])], [("A", w)], opset=10)
    model = load_model(save(proto))
    result = PackSparse(PackSparseConfig()).run(model, PassContext())
    assert not result.modified and "opset 10" in result.skipped[0]


def test_stats_count_packed_and_sparse_weights_by_their_entries(tmp_path, save):
    """Packed storage changes the bytes, not the parameter count; zeros show as nonzero_params."""
    from onnx import numpy_helper

    from optc.ir.stats import compute_stats, packed_weights

    dense, _ = _sparsified(tmp_path, save, "dense")
    packed, _ = _sparsified(tmp_path, save, "packed")
    before, after = compute_stats(dense.model), compute_stats(packed.model)
    # Beyond the weights' own entries, the decode subgraph adds its constants (bit shifts, shape vectors).
    storage = {n for e in packed_weights(packed.model).items() for n in (e[0], e[1]["mask"])}
    assert len(storage) == 6
    dense_names = {t.name for t in dense.model.graph.initializer}
    added = [numpy_helper.to_array(t) for t in packed.model.graph.initializer if t.name not in dense_names | storage]
    assert added and all(a.size <= 8 for a in added)
    assert after.params - before.params == sum(a.size for a in added)
    assert after.nonzero_params - before.nonzero_params == sum(np.count_nonzero(a) for a in added)
    assert before.nonzero_params < 0.6 * before.params
    assert after.param_bytes < 0.65 * before.param_bytes
    zeros = {w.name.split("_sparse")[0]: round(w.zero_fraction, 3) for w in after.weights if len(w.shape) >= 2}
    assert len(zeros) == 3 and all(z >= 0.49 for z in zeros.values())
    reloaded = load_model(save_model(packed.model, tmp_path / "p" / "model.onnx")[0])  # metadata survives a save
    assert compute_stats(reloaded).nonzero_params == after.nonzero_params

    # An ONNX sparse initializer counts its dense shape, not its indices.
    w = rand(16, 16)
    w[np.abs(w) < 1.0] = 0
    flat = w.ravel()
    idx = np.flatnonzero(flat)
    sparse = onnx.helper.make_sparse_tensor(
        onnx.numpy_helper.from_array(flat[idx].astype(np.float32), "A"), onnx.numpy_helper.from_array(idx.astype(np.int64), "A_idx"), [16, 16]
    )
    proto = make_model([helper.make_node("MatMul", ["x", "A"], ["y"], name="mm")], [("x", ["N", 16])], [("y", ["N", 16])], [])
    proto.graph.sparse_initializer.append(sparse)
    stats = compute_stats(load_model(save(proto)))
    assert stats.params == 256 and stats.nonzero_params == idx.size
