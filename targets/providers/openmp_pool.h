// One thread pool for the whole artifact: TVM's parallel loops run on oneDNN's OpenMP threads.
//
// Included by onednn_glue.cc, so it is in every model.so that calls oneDNN (and only there).
//
// Why: TVM's kernels run on TVM's own thread pool and oneDNN's on OpenMP's, two sets of threads on the
// same cores. After a oneDNN call its OpenMP workers spin for a while (GOMP_SPINCOUNT) waiting for the
// next region; a TVM parallel loop started meanwhile needs its pool worker on a core a spinning OpenMP
// thread holds, and waits until the spin ends or the scheduler preempts it. Measured on 2 cores, 2
// threads: ShuffleNet's first max-pool after a oneDNN convolution took 2.6 ms (0.03 ms on one thread),
// and the artifact was slower at 2 threads than at 1 (5.0 against 4.5 ms).
//
// How: the LLVM code TVM generates calls TVMBackendParallelLaunch through a function pointer of the
// library itself, `__TVMBackendParallelLaunch`, which TVM's loader fills in when it loads model.so
// (tvm's InitContextFunctions; also `__TVMBackendParallelBarrier` where a kernel uses barriers). The
// first oneDNN call repoints them at an OpenMP launch. The contract is TVM's: the lambda is called with
// task ids 0..n-1 and `num_task` = n, all n at once (TVM's barrier assumes it), and returns non-zero on
// error. This is what TVM itself does when built with USE_OPENMP; the pip wheel is built with its own
// pool. Kernels that run before the first oneDNN call of the process use TVM's pool, correctly.
//
// Threads: a TVM loop gets omp_get_max_threads() threads (OMP_NUM_THREADS), capped by TVM_NUM_THREADS
// where that is set. OPTC_THREAD_POOL=tvm keeps TVM's own pool.
#pragma once

#include <dlfcn.h>
#include <omp.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "pacer.h"

namespace openmp_pool {
// Internal to the library that includes it: own_symbol's own address must be this library's, and an inline
// function of default visibility may resolve to another loaded copy's (two optc libraries in one process: a
// compile's kernel race and its artifact).
namespace {

// TVM's ABI (tvm/runtime/c_backend_api.h: TVMParallelGroupEnv, FTVMParallelLambda), declared here so the
// glue needs only TVM-FFI's headers.
struct GroupEnv {
  void* sync_handle;
  int32_t num_task;
};
using Lambda = int (*)(int task_id, GroupEnv* env, void* cdata);

inline int thread_cap() {
  static const int cap = [] {
    const char* v = std::getenv("TVM_NUM_THREADS");
    int n = v ? std::atoi(v) : 0;
    return n > 0 ? n : 0;
  }();
  return cap;
}

// A parallel loop's pacer (pacer.h), one per loop: TVM passes each parallel loop of each kernel as a lambda of
// its own, so its address names the loop. The table only grows, by the artifact's loops.
inline pacing::Pacer& pacer_of(Lambda lambda) {
  static std::mutex mutex;
  static std::unordered_map<Lambda, std::unique_ptr<pacing::Pacer>> table;
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = table[lambda];
  if (!slot) slot = std::make_unique<pacing::Pacer>();
  return *slot;
}

inline int run(Lambda lambda, void* cdata, int threads) {
  if (threads <= 1) {  // no region to open: a team of one still costs a call into libgomp per loop
    GroupEnv env{nullptr, 1};
    return lambda(0, &env, cdata);
  }
  std::atomic<int> failed{0};
#pragma omp parallel num_threads(threads)
  {
    // OpenMP may give fewer threads than asked (OMP_DYNAMIC, nesting): the lambda splits its loop by num_task
    GroupEnv env{nullptr, static_cast<int32_t>(omp_get_num_threads())};
    if (lambda(omp_get_thread_num(), &env, cdata) != 0) failed.store(1, std::memory_order_relaxed);
  }
  return failed.load() ? -1 : 0;
}

// TVMBackendParallelLaunch on OpenMP, each loop paced as the oneDNN glue paces its calls: on all threads
// while they pay, on the calling thread while a loaded machine makes every region wait for a descheduled one.
inline int launch(Lambda lambda, void* cdata, int num_task) {
  int threads = omp_get_max_threads();
  if (thread_cap() > 0 && thread_cap() < threads) threads = thread_cap();
  if (num_task > 0 && num_task < threads) threads = num_task;
  if (threads <= 1) return run(lambda, cdata, 1);
  pacing::Pacer& pacer = pacer_of(lambda);
  bool serial = pacer.serial_next();
  double start = pacing::now_ns();
  int status = run(lambda, cdata, serial ? 1 : threads);
  pacer.record(serial, pacing::now_ns() - start);
  return status;
}

inline int barrier(int, GroupEnv*) {
#pragma omp barrier
  return 0;
}

// The address of one of this library's own symbols, found as TVM's loader finds it (dlsym on this library's
// handle), not through the global scope, where another artifact's model.so may export the same name. The
// handle comes from dladdr1's link map (glibc's handles are link maps), not from the file's name: optc's
// runner loads model.so through a name it deletes once loaded.
inline void** own_symbol(const char* name) {
  Dl_info info;
  void* self = nullptr;
  if (dladdr1(reinterpret_cast<void*>(&own_symbol), &info, &self, RTLD_DL_LINKMAP) == 0 || self == nullptr) return nullptr;
  return static_cast<void**>(dlsym(self, name));
}

// Repoints this library's TVM kernels at OpenMP; true when they now use it. Called once, before the first
// oneDNN call of the process runs (TVM's loader has filled the pointers in by then).
inline bool install() {
  const char* choice = std::getenv("OPTC_THREAD_POOL");
  if (choice != nullptr && std::strcmp(choice, "tvm") == 0) return false;
  void** launch_ptr = own_symbol("__TVMBackendParallelLaunch");
  if (launch_ptr == nullptr) return false;  // no kernel of this library has a parallel loop
  if (void** barrier_ptr = own_symbol("__TVMBackendParallelBarrier")) *barrier_ptr = reinterpret_cast<void*>(&barrier);
  *launch_ptr = reinterpret_cast<void*>(&launch);
  return true;
}

}  // namespace
}  // namespace openmp_pool
