"""x86's VNNI ``vpdpbusd`` as TIR tensor intrinsics, for the int8 kernels of :mod:`optc.targets.tiled_kernels`.

``vpdpbusd`` adds to each int32 lane the dot product of four uint8 x int8 pairs, with no intermediate saturation: 64
multiply-adds a 512-bit instruction. Without it LLVM's vectoriser widens both operands to 32 bits and multiplies lane by
lane (16 an instruction, plus the widening): TVM's int8 convolution candidate ran 5x slower than oneDNN's on a 3x3,
24-channel layer. As :mod:`optc.targets.arm_dot` does for ``sdot``, each intrinsic computes
``C[i] += sum_k A[k] * B[i, k]`` for ``lanes`` output channels ``i`` and four inputs ``k``: ``A`` four consecutive uint8
input channels of one pixel (broadcast to every lane as one 32-bit word), ``B`` the packed weight ``[.., ic / 4, tc,
4]`` for those channels, ``C`` the tile's ``local`` accumulator.

One intrinsic per vector width: 16 lanes (zmm), and 8 or 4 (ymm, xmm) for tiles narrower than a zmm, which need
AVX512-VL or the VEX-encoded AVX-VNNI of client cores (LLVM picks the encoding from the target's features).
TVM ships the 16-lane one (``tvm.s_tir.tensor_intrin.x86``), but importing it registers every target's intrinsics
(see arm_dot), and its accumulator is a global buffer, which tensorize does not match to the tile's local one.
"""
from __future__ import annotations


def vnni_intrin(lanes: int) -> str:
    """The registered name of the ``lanes``-wide ``vpdpbusd`` intrinsic (registered on first use)."""
    from tvm.s_tir import TensorIntrin

    name = f"optc_vpdpbusd_{lanes}x4_u8i8i32"
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, *_vnni_functions(lanes))
    return name


def _vnni_functions(lanes: int) -> tuple[object, object]:
    from tvm.script import tirx as T

    intrinsic = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"
    bytes_ = f"int8x{4 * lanes}"
    words = f"int32x{lanes}"

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), dtype="uint8", offset_factor=1)
        B = T.match_buffer(b, (lanes, 4), dtype="int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), dtype="int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), dtype="uint8", offset_factor=1)
        B = T.match_buffer(b, (lanes, 4), dtype="int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), dtype="int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            word = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")  # four inputs, one 32-bit word
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(intrinsic),
                C.vload([0], dtype=words),
                T.reinterpret(T.broadcast(word, lanes), dtype=bytes_),
                B.vload([0, 0], dtype=bytes_),
                dtype=words,
            )

    return desc, impl
