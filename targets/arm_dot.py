"""Armv8.2's ``sdot`` as a TIR tensor intrinsic, for the int8 kernels of :mod:`optc.targets.tiled_kernels`.

``sdot vd.4s, vn.16b, vm.16b`` adds to each of four int32 lanes the dot product of four int8 pairs: 16
multiply-adds in one instruction, where the widening multiply-accumulate that LLVM's vectoriser emits does 4.
The intrinsic computes ``C[i] += sum_k A[k] * B[i, k]`` for four output channels ``i`` and four inputs ``k``: ``A`` is
four consecutive input channels of one pixel (broadcast to every lane as one 32-bit word), ``B`` the 16 bytes of
the packed weight ``[.., ic / 4, tc, 4]`` for those channels. ``C`` is the tile's accumulator, a ``local`` buffer
(tensorize matches storage scopes).

TVM ships the same intrinsic (``tvm.s_tir.tensor_intrin.arm_cpu``), but importing it parses every target's
intrinsics, CUDA's included: 45 s on this machine for a compile that otherwise takes 10. This module parses two
small functions once, under a name of its own.
"""
from __future__ import annotations

SDOT_INTRIN = "optc_sdot_4x4_i8i8i32"


def sdot_intrin() -> str:
    """The registered name of the ``sdot`` intrinsic (registered on first use)."""
    from tvm.s_tir import TensorIntrin

    if TensorIntrin.get(SDOT_INTRIN, allow_missing=True) is None:
        TensorIntrin.register(SDOT_INTRIN, *_sdot_functions())
    return SDOT_INTRIN


def _sdot_functions() -> tuple[object, object]:
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), dtype="int8", offset_factor=1)
        B = T.match_buffer(b, (4, 4), dtype="int8", offset_factor=1)
        C = T.match_buffer(c, (4,), dtype="int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            for i in T.serial(0, 4):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), dtype="int8", offset_factor=1)
        B = T.match_buffer(b, (4, 4), dtype="int8", offset_factor=1)
        C = T.match_buffer(c, (4,), dtype="int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            word = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")  # four inputs, one 32-bit word
            a16 = T.reinterpret(T.broadcast(word, 4), dtype="int8x16")
            C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                C.vload([0], dtype="int32x4"),
                a16,
                B.vload([0, 0], dtype="int8x16"),
                dtype="int32x4",
            )

    return desc, impl
