// optc's Winograd kernels built for each vector width a CPU may have, and the width this CPU runs: included once by
// each glue (onednn_glue.cc, winograd_glue.cc) after it defines WinoDims. x86-64: AVX-512 (16 floats) and AVX2 with FMA
// (8), each in a GCC target region, and 4 floats (SSE2, every x86-64) where neither is there; aarch64: NEON's 4.
// Namespaces w16, w8, w4, each with the tiles m4 (F(4x4, 3x3)) and m2 (F(2x2, 3x3)) of winograd.h. The glue's Act and
// Algo codes (chains.py's ACT_* and ALGO_*) and tvm::ffi::Shape as Shape come first.

// The output tile's side an algorithm code asks for: 4 (F(4x4, 3x3)), 2 (F(2x2, 3x3)), or 0 (not one of optc's).
inline int wino_tile(int64_t algo) { return algo == kWinogradF43 ? 4 : algo == kWinogradF23 ? 2 : 0; }

// The activations the kernels apply on their output tiles (winograd_tile.h's activate).
inline bool wino_epilogue(int64_t act) { return act == kNone || act == kRelu || act == kClip || act == kSigmoid || act == kSwish; }

// Whether a convolution of kh x kw taps with attributes `a` (the glues' 14: strides, padding t/l/b/r, dilation, groups,
// activation, clip bits, NHWC, algorithm) is one optc's kernels take when asked: 3x3, stride 1, undilated, ungrouped,
// NHWC, an activation they apply themselves.
inline bool wino_takes(const Shape& a, int64_t kh, int64_t kw) {
  return a.size() == 14 && wino_tile(a[13]) && a[12] != 0 && kh == 3 && kw == 3 && a[0] == 1 && a[1] == 1 && a[6] == 1 && a[7] == 1 &&
         a[8] == 1 && wino_epilogue(a[9]);
}

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
namespace w16 {
constexpr int kW = 16;
#include "winograd.h"
}  // namespace w16
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace w8 {
constexpr int kW = 8;
#include "winograd.h"
}  // namespace w8
#pragma GCC pop_options
#endif
namespace w4 {
constexpr int kW = 4;
#include "winograd.h"
}  // namespace w4

// The vector width the kernels run at here: 16 floats (AVX-512), 8 (AVX2 with FMA), else 4 (SSE2 on x86-64, NEON on
// aarch64). Capped on x86 as oneDNN is by ONEDNN_MAX_CPU_ISA: optc's race sets it for a target CPU with fewer
// instructions than this one.
inline int wino_width() {
#if defined(__x86_64__)
  static const int width = [] {
    const char* cap = std::getenv("ONEDNN_MAX_CPU_ISA");
    if (!cap) cap = std::getenv("DNNL_MAX_CPU_ISA");
    std::string c = cap ? cap : "ALL";
    for (char& ch : c) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    bool below_avx2 = c == "SSE41" || c == "AVX";
    bool below_avx512 = below_avx2 || c.rfind("AVX2", 0) == 0;
    __builtin_cpu_init();
    if (!below_avx512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
      return 16;
    if (!below_avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 8;
    return 4;
  }();
  return width;
#else
  return 4;
#endif
}

// One entry point of the build and tile a call site runs: WINO_CALL(width, m, fn, args...).
#if defined(__x86_64__)
#define WINO_CALL(width, m, fn, ...)                                                                          \
  ((width) == 16 ? ((m) == 4 ? w16::m4::fn(__VA_ARGS__) : w16::m2::fn(__VA_ARGS__))                          \
   : (width) == 8 ? ((m) == 4 ? w8::m4::fn(__VA_ARGS__) : w8::m2::fn(__VA_ARGS__))                            \
                  : ((m) == 4 ? w4::m4::fn(__VA_ARGS__) : w4::m2::fn(__VA_ARGS__)))
#else
#define WINO_CALL(width, m, fn, ...) ((m) == 4 ? w4::m4::fn(__VA_ARGS__) : w4::m2::fn(__VA_ARGS__))
#endif

// A call site's plan, made on its first call: the build and tile it runs, its output tiles and how they are blocked,
// and its transformed weights (shared with the oneDNN glue's single-thread twin of a site).
struct WinoPlan {
  WinoDims d{};
  int width = 4, m = 4;  // vector width (floats) and output tile side: which build runs
  int64_t tiles = 0, block = 0;  // output tiles, and how many a thread transforms and multiplies at a time
  bool staged = false;  // one block of all tiles, its stages shared by the threads (large weights)
  std::shared_ptr<std::vector<float>> U;  // transformed weights
};

// Tiles a block, for `threads` threads taking whole blocks: `block`, unless the call has fewer than four blocks a
// thread, where blocks of 12 leave threads idle at the end (16 tiles, the MNIST sample's 14x14 at F(4x4), were 12 on
// one thread and 4 on the other). Then as many blocks as before, rounded up to a multiple of the threads, equal in size.
inline int64_t balanced_block(int64_t tiles, int64_t block, int threads) {
  int64_t blocks = (tiles + block - 1) / block;
  if (threads <= 1 || blocks >= 4 * threads || blocks % threads == 0) return block;
  blocks = (blocks + threads - 1) / threads * threads;
  return (tiles + blocks - 1) / blocks;
}

// Plans a call with the build of `width` floats and tiles of side `m`, transforming OIHW weights `w` once; `threads`
// is how many threads the call's blocks are shared by.
inline void plan_wino(WinoPlan& p, int width, int m, const WinoDims& d, const float* w, int threads) {
  p.width = width;
  p.m = m;
  p.d = d;
  p.tiles = WINO_CALL(width, m, tiles, d);
  p.U = std::make_shared<std::vector<float>>(WINO_CALL(width, m, packed_floats, d));
  WINO_CALL(width, m, pack_weights, d, w, p.U->data());
  // Blocks of 12 tiles keep a block's transformed inputs and products in L1/L2, and each thread takes whole blocks
  // (F(4x4) on 64 channels at 56x56, 1 thread: 0.69 ms against 0.76 in blocks of 48). Past 1 MB of transformed
  // weights (more than a Cortex-A76's L2), each block would read them all again from L3: all tiles are one block, and
  // the threads share its stages, each multiplying its share of the weights (256 channels at 14x14, 1 thread: 0.84
  // ms against 1.13). Only while that one block's scratch stays under 16 MB: at batch 64, 128 channels at 28x28 would
  // stage 115 MB.
  const bool large = static_cast<int64_t>(p.U->size()) * 4 > (int64_t{1} << 20);
  p.staged = large && WINO_CALL(width, m, scratch_floats, d, p.tiles) * 4 <= (int64_t{16} << 20);
  p.block = p.staged ? p.tiles : balanced_block(p.tiles, std::min<int64_t>(12, p.tiles), threads);
}
