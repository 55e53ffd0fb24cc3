"""targets/weight_bounds.py: on x86 without VNNI, the fused functions whose every int8 weight is a constant within
+-64 are marked, so the tiled template uses vpmaddubsw (whose int16 pairs saturate past that) where, and only where,
it is exact; elsewhere, and on targets that accumulate in int32, nothing is marked."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

HASWELL = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}


def _module(weights: list[np.ndarray | None], shape=(1, 6, 7, 16)):
    """x -> one int8 NHWC 3x3 conv per weight, all on the same uint8 input; a None weight is a parameter ``w``."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(shape), "uint8"))
    w = relax.Var("w", relax.TensorType([16, 3, 3, shape[-1]], "int8"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            outs = [bb.emit(relax.op.nn.conv2d(x, relax.const(v) if v is not None else w, padding=[1, 1, 1, 1], data_layout="NHWC",
                                               kernel_layout="OHWI", out_dtype="int32")) for v in weights]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get()


def _convs(mod):
    import tvm

    return [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "conv2d_nhwc" in f.script()]


def _marked(func) -> bool:
    from optc.targets.tiled_kernels import PAIRS_FIT_ATTR

    return func.attrs is not None and bool(func.attrs.get(PAIRS_FIT_ATTR, False))


def _weights(bound: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-bound, bound + 1, (16, 3, 3, 16)).astype(np.int8)


@pytest.mark.parametrize(("weights", "marked"), [
    ([63], [True]),
    ([127], [False]),
    ([63, 127], [False]),  # two layers of one shape share a function: the 8-bit one keeps it unmarked
    ([10, None], [False]),  # one called with a weight computed at run time: nothing bounds it
    ([None], [False]),
], ids=["7-bit", "8-bit", "shared-with-8-bit", "shared-with-computed", "computed"])
def test_a_function_is_marked_only_where_every_weight_it_is_called_with_fits(weights, marked):
    import tvm
    from optc.targets.cpu_schedule import schedule_function
    from optc.targets.tuned_compile import fused

    target = tvm.target.Target(HASWELL)
    mod = _module([_weights(b, i) if b is not None else None for i, b in enumerate(weights)])
    convs = _convs(fused(mod, target, True))
    assert sorted({_marked(f) for f in convs}) == sorted(set(marked)), [f.attrs for f in convs]
    with target:
        for conv in convs:
            assert ("pmadd.ub.sw" in schedule_function(conv).script()) == _marked(conv)


def test_a_function_shared_with_a_computed_weight_stays_exact_where_pairs_would_saturate():
    """The case a bound taken from the constants alone got wrong: a layer with weights within +-10 and one of the same
    shape whose weight is an input share one function. Fed 127s and 255s, the second must still compute exactly."""
    import tvm
    from optc.targets.tuned_compile import compile_with_database
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    target = tvm.target.Target(HASWELL)
    small = _weights(10)
    executable = compile_with_database(ms.database.MemoryDatabase(), _module([small, None]), target, True)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    x = np.full((1, 6, 7, 16), 255, np.uint8)
    w = np.full((16, 3, 3, 16), 127, np.int8)
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w))
    exact = 255 * 127 * 16 * 9  # the centre pixels: every tap inside
    assert int(got[1].numpy()[0, 3, 3, 0]) == exact


def test_targets_that_accumulate_in_int32_mark_nothing_and_keep_their_tuning_keys():
    """VNNI and Arm's dot products accumulate in int32: their functions get no mark, so they hash as before this pass
    existed and the tuning records already made for them still apply."""
    import tvm
    from optc.targets.tuned_compile import fused

    mod = _module([_weights(63)])
    for target in ({"kind": "llvm", "mcpu": "icelake-server"}, {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"}):
        assert not any(_marked(f) for f in _convs(fused(mod, tvm.target.Target(target), True)))


def test_marks_key_tuning_records_apart():
    """A function marked for vpmaddubsw hashes apart from the same one unmarked: a record tuned with vpmaddubsw in its
    trace is not found for a layer with wider weights."""
    import tvm
    from optc.targets.tuned_compile import fused
    from tvm_ffi import structural_hash

    target = tvm.target.Target(HASWELL)
    (seven,), (eight,) = (_convs(fused(_module([_weights(b)]), target, True)) for b in (63, 127))
    assert _marked(seven) and not _marked(eight)
    assert structural_hash(seven) != structural_hash(eight)
