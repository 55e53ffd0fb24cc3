"""8-bit dot-product instructions as TIR tensor intrinsics, for the int8 kernels of :mod:`optc.targets.tiled_kernels`.

Each intrinsic computes ``C[i] += sum_k A[k] * B[i, k]`` for ``lanes`` output channels ``i`` and four inputs ``k``:
``A`` is four consecutive input channels of one pixel (broadcast to every lane as one 32-bit word), ``B`` the
packed weight ``[.., ic / 4, tc, 4]`` for those channels, ``C`` the tile's accumulator, a buffer of the scope the
template gives it (tensorize matches storage scopes). LLVM's vectoriser, without them, widens both operands to 32 bits and multiplies
lane by lane.

- Armv8.2's ``sdot vd.4s, vn.16b, vm.16b``: int8 by int8, four lanes, 16 multiply-adds an instruction where the
  widening multiply-accumulate does 4.
- x86's VNNI ``vpdpbusd``: uint8 by int8 with no intermediate saturation, 16 lanes in a zmm register (64
  multiply-adds an instruction), 8 or 4 in ymm / xmm for narrower tiles (AVX512-VL, or the VEX-encoded AVX-VNNI of
  client cores; LLVM picks the encoding from the target's features). TVM's int8 3x3 24->24 convolution at batch 64:
  5.4 ms widening, 0.6 with it, oneDNN's speed.
- x86 without VNNI (AVX2, AVX-512BW): ``vpmaddubsw`` multiplies uint8 by int8 and adds each pair into a saturating
  int16, ``vpmaddwd`` by ones adds those pairs into int32: what oneDNN and onnxruntime's MLAS run on such cores. Exact
  only while no pair leaves int16 (255 x (64 + 64) = 32640 <= 32767): weights within +-64, the 7-bit weights optc's
  quantize writes for such CPUs. The kernels use it only on functions marked as fitting (:mod:`optc.targets.weight_bounds`).

TVM ships such intrinsics (``tvm.s_tir.tensor_intrin.arm_cpu``, ``.x86``), but importing one parses every target's
intrinsics, CUDA's included: 45 s on this machine for a compile that otherwise takes 10. These are parsed once, under
names of their own, and name no buffer of their own (TVM took one from its workspace pool on every tile).
"""
from __future__ import annotations

SDOT_INTRIN = "optc_sdot_4x4_i8i8i32"


# The storage scope of the tile's accumulators (tiled_kernels.ACCUMULATOR_SCOPE), which tensorize matches. Names made
# for "local" accumulators, the scope before session 21, keep their names: tuning records replay them.
SCOPES = ("global", "local")


def _suffix(scope: str) -> str:
    return "" if scope == "local" else f"_{scope}"


def sdot_intrin(scope: str = "global") -> str:
    """The registered name of the ``sdot`` intrinsic (registered on first use)."""
    return _registered(SDOT_INTRIN + _suffix(scope), 4, "int8", "llvm.aarch64.neon.sdot.v4i32.v16i8", scope)


def vnni_intrin(lanes: int, scope: str = "global") -> str:
    """The registered name of the ``lanes``-wide ``vpdpbusd`` intrinsic (16, 8 or 4; registered on first use)."""
    name = f"optc_vpdpbusd_{lanes}x4_u8i8i32{_suffix(scope)}"
    return _registered(name, lanes, "uint8", f"llvm.x86.avx512.vpdpbusd.{32 * lanes}", scope)


# lanes -> (uint8 x int8 pairs into int16, int16 pairs into int32): zmm (AVX-512BW), ymm (AVX2), xmm (SSSE3)
PMADD = {
    16: ("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"),
    8: ("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"),
    4: ("llvm.x86.ssse3.pmadd.ub.sw.128", "llvm.x86.sse2.pmadd.wd"),
}


def pmaddubsw_intrin(lanes: int, scope: str = "global") -> str:
    """The registered name of the ``lanes``-wide ``vpmaddubsw`` + ``vpmaddwd`` intrinsic (16, 8 or 4). Exact for
    weights within +-64 only (module docstring)."""
    return _registered(f"optc_pmaddubsw_{lanes}x4_u8i8i32{_suffix(scope)}", lanes, "uint8", "+".join(PMADD[lanes]), scope)


def register_all() -> None:
    """Register every intrinsic here: a tuning record's trace names the one it tensorized with."""
    for scope in SCOPES:
        sdot_intrin(scope)
        for lanes in (16, 8, 4):
            vnni_intrin(lanes, scope)
            pmaddubsw_intrin(lanes, scope)


def _registered(name: str, lanes: int, activation: str, intrinsic: str, scope: str) -> str:
    from tvm.s_tir import TensorIntrin

    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, *_functions(lanes, activation, intrinsic, scope))
    return name


def _functions(lanes: int, activation: str, intrinsic: str, scope: str) -> tuple[object, object]:
    """(description, implementation): ``lanes`` int32 accumulators, each adding a 4-deep ``activation`` x int8 product.
    ``intrinsic``: one LLVM intrinsic accumulating into int32 (sdot, vpdpbusd), or two joined by ``+``: a pairwise
    product into int16 and its pairwise sum into int32, added to the accumulator (vpmaddubsw, vpmaddwd). ``scope``:
    the accumulator's storage scope."""
    from tvm.script import tirx as T

    bytes_, words = f"int8x{4 * lanes}", f"int32x{lanes}"
    pairwise, _, widen = intrinsic.partition("+")

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), dtype=activation, offset_factor=1)
        B = T.match_buffer(b, (lanes, 4), dtype="int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), dtype="int32", offset_factor=1, scope=scope)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    two_step = bool(widen)  # a Python bool: TVMScript parses only the branch taken (each names an LLVM intrinsic)

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), dtype=activation, offset_factor=1)
        B = T.match_buffer(b, (lanes, 4), dtype="int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), dtype="int32", offset_factor=1, scope=scope)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            # Expressions, not names: a name assigned here became a buffer of its own, taken from TVM's workspace
            # pool on every tile (the four inputs' 32-bit word, and vpmaddubsw's int16 pairs).
            if two_step:
                C[T.ramp(T.int32(0), 1, lanes)] = C.vload([0], dtype=words) + T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(widen),
                    T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id(pairwise),
                        # four inputs as one 32-bit word in every lane; the unsigned operand comes first
                        T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], f"{activation}x4"), dtype="int32"), lanes), dtype=bytes_),
                        B.vload([0, 0], dtype=bytes_),
                        dtype=f"int16x{2 * lanes}",
                    ),
                    T.broadcast(T.int16(1), 2 * lanes),
                    dtype=words,
                )
            else:
                C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(pairwise),
                    C.vload([0], dtype=words),
                    T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], f"{activation}x4"), dtype="int32"), lanes), dtype=bytes_),
                    B.vload([0, 0], dtype=bytes_),
                    dtype=words,
                )

    return desc, impl
