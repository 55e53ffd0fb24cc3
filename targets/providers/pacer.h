// Whether a call site runs on all of OpenMP's threads or on the calling thread alone, learnt from the times
// of both. Used by the oneDNN glue for its larger calls and by openmp_pool.h for TVM's parallel loops.
//
// On quiet cores all threads pay. On oversubscribed ones, where the scheduler can leave two OpenMP threads
// on one core, each parallel region waits for a descheduled thread (ResNet-18 at 2 threads took 226 ms
// against onnxruntime's 60 beside another busy process), and the calling thread alone is faster. A site keeps
// the median of each kind's recent runs and runs the faster, trying the other now and then.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>

namespace pacing {

inline double now_ns() {
  return std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Paced runs on all threads and on one, over the life of the process (optc_dnnl_pacing).
inline std::atomic<uint64_t> parallel_runs{0}, serial_runs{0};

// Tries of the kind a site did not choose, spread over time for the whole process: on a loaded machine each
// try of all threads can stall for milliseconds, and ShuffleNet's 30 paced sites all came due in the same
// inference (one run of 250 ms). A try takes the gate only when the last one is kExploreGapNs old (a
// stall closes it for kStallGapNs); a site whose try is due and finds the gate closed tries on a later call.
inline std::atomic<double> explore_gate_ns{0.0};
constexpr double kExploreGapNs = 20e6, kStallGapNs = 1e9;

inline bool take_explore_gate(double now) {
  double open = explore_gate_ns.load(std::memory_order_relaxed);
  return now >= open && explore_gate_ns.compare_exchange_strong(open, now + kExploreGapNs, std::memory_order_relaxed);
}

class Pacer {
 public:
  bool serial_next() {
    std::lock_guard<std::mutex> lock(mutex_);
    uint64_t n = calls_++;
    if (n < kLearnCalls) return n % 2 == 1;  // all threads, one, all, one, ...: both measured from the start
    bool serial_better = serial_.estimate() < parallel_.estimate();
    bool due = n >= next_explore_ && take_explore_gate(now_ns());
    if (due) next_explore_ = n + explore_every_;
    bool other = probe_ || due;
    probe_ = false;
    return other ? !serial_better : serial_better;
  }
  void record(bool serial, double ns) {
    std::lock_guard<std::mutex> lock(mutex_);
    bool serial_chosen = serial_.estimate() < parallel_.estimate();
    (serial ? serial_ : parallel_).add(ns);
    (serial ? serial_runs : parallel_runs)++;
    if (calls_ <= kLearnCalls || serial == serial_chosen) return;
    // A run of the kind not chosen that beat the chosen kind's estimate: try it again at once, so a load
    // that went away is noticed in a few calls. One that lost: wait twice as long before the next try, so
    // a site that stays slow on all threads (a loaded machine) pays for a stall ever more rarely; one that
    // stalled (kStall times the chosen kind's time: a parallel region waiting out a descheduled thread,
    // about 5 ms against 0.03 on the MNIST sample beside a busy process) waits the longest at once.
    double chosen = (serial_chosen ? serial_ : parallel_).estimate();
    if (ns < chosen) {
      probe_ = true;
      explore_every_ = kExploreFirst;
    } else if (ns > kStall * chosen) {
      explore_every_ = kExploreMost;
      explore_gate_ns.store(now_ns() + kStallGapNs, std::memory_order_relaxed);
    } else {
      explore_every_ = std::min(explore_every_ * 2, kExploreMost);
    }
  }

 private:
  // The median of a kind's last five runs (its first run, which also touches its scratch first, left
  // out): one burst of another process's threads moves it by nothing, a machine that stays oversubscribed
  // moves it within three runs. A mean of all runs let a few stalls in a benchmark's alternating blocks
  // hold a quiet machine's ResNet-18 on one thread (29.8 ms against 17.2).
  struct Recent {
    double ns[5] = {0, 0, 0, 0, 0};
    uint64_t runs = 0;
    void add(double t) {
      if (runs++ > 0) ns[(runs - 2) % 5] = t;
    }
    double estimate() const {
      uint64_t n = runs > 1 ? std::min<uint64_t>(runs - 1, 5) : 0;
      if (n == 0) return 0.0;
      double v[5];
      std::copy(ns, ns + n, v);
      std::nth_element(v, v + n / 2, v + n);
      return v[n / 2];
    }
  };
  // Four runs of each first; then the faster, with the other tried after 64 calls, then 128, ... up to
  // 4096 while it keeps losing, so the choice comes back when the load goes.
  static constexpr uint64_t kLearnCalls = 8, kExploreFirst = 64, kExploreMost = 4096;
  static constexpr double kStall = 4.0;
  std::mutex mutex_;
  uint64_t calls_ = 0, next_explore_ = kLearnCalls + kExploreFirst, explore_every_ = kExploreFirst;
  bool probe_ = false;
  Recent parallel_, serial_;
};

}  // namespace pacing
