"""targets/weight_bounds.py: each fused function carries the largest |int8 weight| it is called with, so the tiled
template uses vpmaddubsw (exact for weights within +-64 only) where, and only where, every weight it multiplies fits."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm


def _module(weights: list[np.ndarray], shape=(1, 6, 7, 16)):
    """x -> one int8 NHWC 3x3 conv per weight, all on the same uint8 input, outputs as a tuple."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(shape), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            outs = [bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=[1, 1, 1, 1], data_layout="NHWC", kernel_layout="OHWI",
                                               out_dtype="int32")) for w in weights]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get()


def _convs(mod):
    import tvm

    return [(g, f) for g, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "conv2d_nhwc" in f.script()]


def test_a_function_shared_by_weights_gets_the_largest_and_keys_the_tuning_records_apart():
    """Two layers of the same shape share one fused function: its bound is the larger weight's, so the 7-bit layer does
    not lend vpmaddubsw to the 8-bit one. Functions of different bounds hash apart: a tuning record made for 7-bit
    weights (vpmaddubsw in its trace) is not found for 8-bit ones."""
    import tvm
    from optc.targets.cpu_schedule import schedule_function
    from optc.targets.tiled_kernels import WEIGHT_MAX_ATTR
    from optc.targets.tuned_compile import fused
    from tvm_ffi import structural_hash

    rng = np.random.default_rng(0)
    narrow = rng.integers(-63, 64, (16, 3, 3, 16)).astype(np.int8)
    wide = rng.integers(-127, 128, (16, 3, 3, 16)).astype(np.int8)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    shared = _convs(fused(_module([narrow, wide]), target, True))
    alone = {bound: _convs(fused(_module([w]), target, True)) for bound, w in ((63, narrow), (127, wide))}
    assert [int(f.attrs[WEIGHT_MAX_ATTR]) for _, f in shared] == [127]  # one function, two call sites: the larger
    assert [int(f.attrs[WEIGHT_MAX_ATTR]) for _, f in alone[63]] == [63]
    (_, seven), (_, eight) = alone[63][0], alone[127][0]
    assert structural_hash(seven) != structural_hash(eight)
    with target:
        assert "pmadd.ub.sw" in schedule_function(seven).script()
        assert "pmadd.ub.sw" not in schedule_function(eight).script()
        assert "pmadd.ub.sw" not in schedule_function(shared[0][1]).script()


def test_an_int8_operand_computed_at_run_time_gets_no_bound():
    """An int8 matmul of two activations: nothing bounds the second operand, so no bound is written and the widening
    kernel, exact for any values, stays."""
    import tvm
    from optc.targets.tiled_kernels import WEIGHT_MAX_ATTR
    from optc.targets.tuned_compile import fused
    from tvm import relax

    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType([1, 8, 16], "uint8"))
    b = relax.Var("b", relax.TensorType([1, 16, 16], "int8"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.matmul(a, b, out_dtype="int32")))
        bb.emit_func_output(out)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    funcs = [f for _, f in fused(bb.get(), target, True).functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert funcs and all(f.attrs is None or WEIGHT_MAX_ATTR not in f.attrs for f in funcs)
