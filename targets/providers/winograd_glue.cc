// optc's own Winograd kernels where no vendor library computes the convolutions, called from Relax with
// call_dps_packed: ARM artifacts (aarch64, NEON; Debian's oneDNN does not accelerate aarch64 without SVE-512) and x86
// ones built without oneDNN. F(4x4, 3x3) and F(2x2, 3x3) for NHWC float32 3x3 stride-1 convolutions, the same source
// as the oneDNN glue's (winograd_builds.h: AVX-512, AVX2 or SSE2 on x86-64 by the CPU it runs on; NEON on aarch64).
// Compiled (g++ or aarch64-linux-gnu-g++ -O3 -c) and linked into the exported model.so; the TVM runtime resolves each
// call through this library's own __tvm_ffi_<name> symbols, so nothing is registered globally and nothing beyond the
// TVM runtime is needed.
//
// Threads: the kernels run on TVM's own pool (TVMBackendParallelLaunch, as TVM's generated loops do), so the
// artifact keeps one pool and TVM_NUM_THREADS governs both. A call site's transformed weights are made on its
// first call and cached under the weight buffer's address (constants of a loaded artifact do not move), its
// shapes and attributes and a sample of its values (site_for).
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

extern "C" {  // TVM's runtime (tvm/runtime/c_backend_api.h), declared here: the glue builds against tvm-ffi's headers alone
typedef struct {
  void* sync_handle;
  int32_t num_task;
} TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);
int TVMBackendParallelLaunch(FTVMParallelLambda flambda, void* cdata, int num_task);
}

namespace {

using tvm::ffi::Shape;
using tvm::ffi::TensorView;

// The shapes and padding of one convolution (winograd_tile.h's Geometry extends it).
struct WinoDims {
  int64_t N, H, W, C, K, OH, OW, pt, pl;
};

// Activation and algorithm codes shared with optc/targets/providers/chains.py (ACT_*, ALGO_*).
enum Act : int64_t { kNone = 0, kRelu = 1, kClip = 2, kSigmoid = 3, kGeluErf = 4, kSwish = 5 };
enum Algo : int64_t { kWinogradF43 = 2, kWinogradF23 = 3 };

#include "winograd_builds.h"

float* data_of(const TensorView& t) { return reinterpret_cast<float*>(static_cast<char*>(t.data_ptr()) + t.byte_offset()); }

float bits_to_float(int64_t v) {
  uint32_t u = static_cast<uint32_t>(v);
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

void check_f32(const TensorView& t, const char* what) {
  DLDataType d = t.dtype();
  if (d.code != kDLFloat || d.bits != 32 || d.lanes != 1) TVM_FFI_THROW(TypeError) << "optc Winograd: " << what << " must be float32";
  if (!t.IsContiguous()) TVM_FFI_THROW(ValueError) << "optc Winograd: " << what << " must be contiguous";
}

// Below this many multiply-adds a call runs on the calling thread alone: waking the pool costs more than it saves
// (the oneDNN glue's line, kSerialMacs).
constexpr int64_t kSerialMacs = int64_t{2} << 20;

// f(i) for i in [0, n) on TVM's pool, in contiguous shares; on the calling thread where n is 1 or `serial`. An
// exception in a share (a scratch buffer's allocation) must not cross the pool's C boundary: the share stops, and the
// calling thread throws once every share has returned.
template <class F>
void parallel_for(int64_t n, bool serial, F&& f) {
  if (n <= 1 || serial) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  struct Ctx {
    F* f;
    int64_t n;
    std::atomic<bool> failed{false};
  } ctx{&f, n};
  auto share = [](int task, TVMParallelGroupEnv* env, void* cdata) -> int {
    auto* c = static_cast<Ctx*>(cdata);
    int64_t per = (c->n + env->num_task - 1) / env->num_task, lo = task * per, hi = std::min(c->n, lo + per);
    try {
      for (int64_t i = lo; i < hi; ++i) (*c->f)(i);
    } catch (...) {
      c->failed = true;
      return -1;
    }
    return 0;
  };
  if (TVMBackendParallelLaunch(share, &ctx, 0) != 0 || ctx.failed)
    TVM_FFI_THROW(RuntimeError) << "optc Winograd: a thread's share of the convolution failed (out of memory?)";
}

// How many tasks TVM's pool splits a launch into (TVM_NUM_THREADS, or OpenMP's threads where the oneDNN glue put
// the pool on them): asked of the pool itself, once.
int pool_tasks() {
  static const int tasks = [] {
    std::atomic<int> seen{1};
    auto ask = [](int, TVMParallelGroupEnv* env, void* cdata) -> int {
      static_cast<std::atomic<int>*>(cdata)->store(env->num_task);
      return 0;
    };
    return TVMBackendParallelLaunch(ask, &seen, 0) == 0 ? std::max(1, seen.load()) : 1;
  }();
  return tasks;
}

struct Site : WinoPlan {
  bool serial = false;  // below kSerialMacs
};

std::shared_ptr<Site> make_site(const TensorView& x, const TensorView& w, const TensorView& out, const Shape& a) {
  auto s = std::make_shared<Site>();
  WinoDims d{x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3], out.shape()[3], out.shape()[1], out.shape()[2], a[2], a[3]};
  const int m = wino_tile(a[13]);
  const bool serial = WINO_CALL(wino_width(), m, tiles, d) * d.C * d.K * (m + 2) * (m + 2) < kSerialMacs;
  plan_wino(*s, wino_width(), m, d, data_of(w), serial ? 1 : pool_tasks());
  s->serial = serial;
  return s;
}

// Call sites: made once per process under a lock (their weights transformed once), then found through the calling
// thread's own map, its key built in a buffer the thread reuses: a call allocates nothing and takes no lock.
std::mutex sites_mu;
std::unordered_map<std::string, std::shared_ptr<Site>> sites;

std::shared_ptr<Site> site_for(const TensorView& x, const TensorView& w, const TensorView& out, const Shape& a) {
  thread_local std::string key;
  thread_local std::unordered_map<std::string, std::shared_ptr<Site>> mine;
  key.assign(reinterpret_cast<const char*>(a.data()), a.size() * sizeof(int64_t));
  const float* wp = data_of(w);
  int64_t n = w.numel();
  // a sample of the weight's values: a later artifact's constant can land at a freed one's address
  const float sample[8] = {wp[0], wp[n / 7], wp[2 * n / 7], wp[3 * n / 7], wp[4 * n / 7], wp[5 * n / 7], wp[6 * n / 7], wp[n - 1]};
  const void* addr = wp;
  key.append(reinterpret_cast<const char*>(&addr), sizeof addr).append(reinterpret_cast<const char*>(sample), sizeof sample);
  for (const TensorView* t : {&x, &w, &out})
    for (int i = 0; i < t->ndim(); ++i) {
      int64_t dim = t->shape()[i];
      key.append(reinterpret_cast<const char*>(&dim), sizeof dim);
    }
  auto found = mine.find(key);
  if (found != mine.end()) return found->second;
  std::shared_ptr<Site> site;
  {
    std::lock_guard<std::mutex> lock(sites_mu);
    auto& s = sites[key];
    if (!s) s = make_site(x, w, out, a);
    site = s;
  }
  mine.emplace(key, site);
  return site;
}

void run(const Site& s, const float* x, const float* bias, const float* res, int act, float lo, float hi, float* out) {
  const size_t need = static_cast<size_t>(WINO_CALL(s.width, s.m, scratch_floats, s.d, s.block));
  if (s.staged) {
    thread_local std::vector<float> shared;  // the calling thread's, which the pool's tasks share (no allocation per call)
    if (shared.size() < need) shared.resize(need);
    float* p = shared.data();
    const int64_t T = s.tiles;
    parallel_for(T, s.serial, [&](int64_t t) { WINO_CALL(s.width, s.m, stage_input, s.d, x, t, T, p); });
    parallel_for(WINO_CALL(s.width, s.m, products, s.d), s.serial, [&](int64_t j) { WINO_CALL(s.width, s.m, stage_multiply, s.d, s.U->data(), j, T, p); });
    parallel_for(T, s.serial, [&](int64_t t) { WINO_CALL(s.width, s.m, stage_output, s.d, t, T, p, bias, res, act, lo, hi, out); });
    return;
  }
  parallel_for((s.tiles + s.block - 1) / s.block, s.serial, [&](int64_t b) {
    thread_local std::vector<float> scratch;
    if (scratch.size() < need) scratch.resize(need);
    int64_t t0 = b * s.block, tb = std::min(s.block, s.tiles - t0);
    WINO_CALL(s.width, s.m, run_block, s.d, s.U->data(), t0, tb, s.block, scratch.data(), x, bias, res, act, lo, hi, out);
  });
}

void run_conv(TensorView x, TensorView w, const TensorView* b, const TensorView* res, const Shape& a, TensorView out) {
  check_f32(x, "input");
  check_f32(w, "weight");
  check_f32(out, "output");
  if (b) check_f32(*b, "bias");
  if (res) check_f32(*res, "residual");
  if (x.ndim() != 4 || w.ndim() != 4 || out.ndim() != 4 || a.size() != 14 || !wino_takes(a, w.shape()[2], w.shape()[3]))
    TVM_FFI_THROW(ValueError) << "optc Winograd conv2d: only NHWC 3x3 stride-1 convolutions asking for Winograd F(4x4) or F(2x2)";
  // Shapes that agree, so that no call writes or reads past a buffer: the output is the padded input less 2 a side.
  const int64_t K = w.shape()[0];
  if (w.shape()[1] != x.shape()[3] || out.shape()[3] != K || out.shape()[0] != x.shape()[0] ||
      out.shape()[1] != x.shape()[1] + a[2] + a[4] - 2 || out.shape()[2] != x.shape()[2] + a[3] + a[5] - 2 ||
      (b && b->numel() != K) || (res && (res->ndim() != 4 || res->numel() != out.numel())))
    TVM_FFI_THROW(ValueError) << "optc Winograd conv2d: input, weight, bias, residual and output shapes do not agree";
  auto s = site_for(x, w, out, a);
  run(*s, data_of(x), b ? data_of(*b) : nullptr, res ? data_of(*res) : nullptr, static_cast<int>(a[9]), bits_to_float(a[10]),
      bits_to_float(a[11]), data_of(out));
}

void conv2d(TensorView x, TensorView w, TensorView b, Shape attrs, TensorView out) { run_conv(x, w, &b, nullptr, attrs, out); }
void conv2d_nobias(TensorView x, TensorView w, Shape attrs, TensorView out) { run_conv(x, w, nullptr, nullptr, attrs, out); }
void conv2d_sum(TensorView x, TensorView w, TensorView b, TensorView res, Shape attrs, TensorView out) {
  run_conv(x, w, &b, &res, attrs, out);
}

// The build a call runs here, for the race's report: "avx512", "avx2", "sse2" or "neon".
tvm::ffi::String impl() {
#if defined(__x86_64__)
  return wino_width() == 16 ? "avx512" : wino_width() == 8 ? "avx2" : "sse2";
#else
  return "neon";
#endif
}

}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(optc_winograd_impl, impl);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(optc_winograd_conv2d, conv2d);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(optc_winograd_conv2d_nobias, conv2d_nobias);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(optc_winograd_conv2d_sum, conv2d_sum);
