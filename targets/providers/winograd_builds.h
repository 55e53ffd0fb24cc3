// optc's Winograd kernels built for each vector width a CPU may have, and the width this CPU runs: included once by
// each glue (onednn_glue.cc, winograd_glue.cc) after it defines WinoDims. x86-64: AVX-512 (16 floats) and AVX2 with FMA
// (8), each in a GCC target region, and 4 floats (SSE2, every x86-64) where neither is there; aarch64: NEON's 4.
// Namespaces w16, w8, w4, each with the tiles m4 (F(4x4, 3x3)) and m2 (F(2x2, 3x3)) of winograd.h.
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
