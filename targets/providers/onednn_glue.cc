// oneDNN kernels for optc artifacts, called from Relax with call_dps_packed.
//
// Compiled at compile time (g++ -O3 -fPIC -c) and linked into the exported
// model.so; the TVM runtime resolves each call through this library's own
// __tvm_ffi_<name> symbols, so nothing is registered globally.
//
// Every tensor crosses the boundary in a plain row-major layout (NCHW or NHWC
// for convolutions; weights always OIHW). A call site's primitive, its weights reordered into the
// layout oneDNN's kernel reads, and the reorders around it are made on the
// first call and cached under the weight buffer's address (constants of a
// loaded artifact do not move) plus the shapes and attributes.
//
// Threads: oneDNN runs its kernels on OpenMP threads, and so do the artifact's TVM kernels once the
// first oneDNN call has run (openmp_pool.h): one pool, where two pools on the same cores each waited
// for the other's spinning threads. A small call (below kSerialMacs multiply-adds, or
// kSerialElements elements for softmax and layer norm) runs on the calling thread alone: its
// primitive is made and run with the calling thread's OpenMP thread count set to 1
// (omp_set_num_threads is per thread, and restored after). A larger call learns, per call site,
// whether all threads pay (pacer.h): on quiet cores they do; on a loaded machine where the
// scheduler leaves two OpenMP threads on one core, each parallel region waits out the other
// thread's spin (GOMP_SPINCOUNT), about 1-3 ms: the MNIST sample then ran 40-150 ms per inference
// for the whole life of some processes (issue 14; benchmarks/process_stalls.py), and the site
// goes to the calling thread alone.
#include <dnnl.hpp>
#include <omp.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "openmp_pool.h"
#include "pacer.h"

namespace {

using tvm::ffi::Shape;
using tvm::ffi::TensorView;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

// Whether this library's TVM kernels run on OpenMP's threads (openmp_pool.h): decided by the first oneDNN call.
bool shared_pool() {
  static const bool installed = openmp_pool::install();
  return installed;
}

dnnl::engine& cpu_engine() {
  shared_pool();
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::memory::dims dims_of(const TensorView& t) {
  dnnl::memory::dims d;
  for (int i = 0; i < t.ndim(); ++i) d.push_back(t.shape()[i]);
  return d;
}

float* data_of(const TensorView& t) {
  return reinterpret_cast<float*>(static_cast<char*>(t.data_ptr()) + t.byte_offset());
}

void check_f32(const TensorView& t, const char* what) {
  DLDataType d = t.dtype();
  if (d.code != kDLFloat || d.bits != 32 || d.lanes != 1) TVM_FFI_THROW(TypeError) << "optc oneDNN: " << what << " must be float32";
  if (!t.IsContiguous()) TVM_FFI_THROW(ValueError) << "optc oneDNN: " << what << " must be contiguous";
}

void check_int8(const TensorView& t, const char* what) {
  DLDataType d = t.dtype();
  if (d.bits != 8 || d.lanes != 1 || (d.code != kDLInt && d.code != kDLUInt)) TVM_FFI_THROW(TypeError) << "optc oneDNN: " << what << " must be int8 or uint8";
  if (!t.IsContiguous()) TVM_FFI_THROW(ValueError) << "optc oneDNN: " << what << " must be contiguous";
}

dt dtype_of(const TensorView& t) {
  DLDataType d = t.dtype();
  if (d.code == kDLFloat && d.bits == 32) return dt::f32;
  if (d.code == kDLUInt && d.bits == 8) return dt::u8;
  if (d.code == kDLInt && d.bits == 8) return dt::s8;
  TVM_FFI_THROW(TypeError) << "optc oneDNN: unsupported dtype";
}

void* raw_of(const TensorView& t) { return static_cast<char*>(t.data_ptr()) + t.byte_offset(); }

float bits_to_float(int64_t v) {
  uint32_t u = static_cast<uint32_t>(v);
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Activation codes shared with optc/targets/providers/chains.py (ACT_*).
enum Act : int64_t { kNone = 0, kRelu = 1, kClip = 2, kSigmoid = 3, kGeluErf = 4, kSwish = 5 };

void append_act(dnnl::post_ops& po, int64_t act, float lo, float hi) {
  using a = dnnl::algorithm;
  switch (act) {
    case kNone: return;
    case kRelu: po.append_eltwise(1.f, a::eltwise_relu, 0.f, 0.f); return;
    case kClip: po.append_eltwise(1.f, a::eltwise_clip, lo, hi); return;
    case kSigmoid: po.append_eltwise(1.f, a::eltwise_logistic, 0.f, 0.f); return;
    case kGeluErf: po.append_eltwise(1.f, a::eltwise_gelu_erf, 0.f, 0.f); return;
    case kSwish: po.append_eltwise(1.f, a::eltwise_swish, 1.f, 0.f); return;  // x * sigmoid(1 * x): SiLU
    default: TVM_FFI_THROW(ValueError) << "optc oneDNN: unknown activation code " << act;
  }
}

// A call site's cache key: the weight buffer's address when there is one (constants of a loaded
// artifact do not move; activations do, between runs) and a sample of its bytes (a later artifact's
// constant of the same shape can land at a freed one's address), plus every shape and attribute, as
// raw bytes. Written into one buffer per thread: a call formats nothing and allocates nothing.
const std::string& key_of(char op, const TensorView* weight, std::initializer_list<const TensorView*> ts, const Shape& attrs) {
  thread_local std::string k;
  k.assign(1, op);
  auto put = [](int64_t v) { k.append(reinterpret_cast<const char*>(&v), sizeof v); };
  if (weight) {
    put(static_cast<int64_t>(reinterpret_cast<uintptr_t>(weight->data_ptr())));
    const unsigned char* bytes = static_cast<const unsigned char*>(weight->data_ptr()) + weight->byte_offset();
    size_t size = static_cast<size_t>(weight->numel()) * ((weight->dtype().bits + 7) / 8), step = size / 16 + 1;
    for (size_t i = 0; i < size; i += step) k.push_back(static_cast<char>(bytes[i]));
  }
  for (const TensorView* t : ts) {
    put(t->ndim());
    for (int i = 0; i < t->ndim(); ++i) put(t->shape()[i]);
  }
  for (size_t i = 0; i < attrs.size(); ++i) put(attrs[i]);
  return k;
}

// Below these, a call runs on the calling thread alone (see the top of this file); above, it is paced.
// 2 M multiply-adds take about 40 us on one core here. Below that, a second thread gained nothing on
// a quiet machine (the MNIST sample's 0.9 and 1.8 M convolutions: 0.075 ms on 1 or 2 threads), and
// beside a busy process each parallel region the pacer tried cost a stall (1.5 % of its runs over
// 10x the median, against 0.01 % on one thread). Above it, ShuffleNet's 3.6 M grouped convolutions
// gain: at 4 M (session 13's line, before calls were paced) all 51 of its convolutions ran on one
// thread. 128 K elements is where optc's TVM code starts threading its light (elementwise, reduction) functions.
constexpr int64_t kSerialMacs = int64_t{1} << 21;
constexpr int64_t kSerialElements = int64_t{1} << 17;
// ... but a call that reads this many bytes of weights is bound by them, not by its multiply-adds: an LSTM
// step's 1x512 @ 512x2048 (1 M multiply-adds, 4 MB) took 190 us on one thread, 105 threaded (each core reads
// its own columns). optc's TVM kernels draw the same line (tiled_kernels.PARALLEL_WEIGHT_BYTES).
constexpr int64_t kParallelWeightBytes = int64_t{1} << 20;

int64_t numel(const TensorView& t) {
  int64_t n = 1;
  for (int i = 0; i < t.ndim(); ++i) n *= t.shape()[i];
  return n;
}

// A call small enough for the calling thread alone: few multiply-adds and few weight bytes.
bool serial_call(int64_t macs, const TensorView& w) {
  return macs < kSerialMacs && numel(w) * (w.dtype().bits / 8) < kParallelWeightBytes;
}

// While alive, primitives made or run on this thread use one OpenMP thread when `serial`.
class SerialScope {
 public:
  explicit SerialScope(bool serial) : saved_(serial ? omp_get_max_threads() : 0) {
    if (saved_ > 1) omp_set_num_threads(1);
  }
  ~SerialScope() {
    if (saved_ > 1) omp_set_num_threads(saved_);
  }
  SerialScope(const SerialScope&) = delete;
  SerialScope& operator=(const SerialScope&) = delete;

 private:
  int saved_;
};

// One stream per calling thread: streams are cheap to keep and not meant for concurrent use.
dnnl::stream& cpu_stream() {
  thread_local dnnl::stream stream(cpu_engine());
  return stream;
}

struct Conv {
  dnnl::primitive prim;  // a convolution_forward, or a deconvolution_forward (ConvTranspose)
  dnnl::memory weights, bias;  // reordered once into the layout the kernel reads
  bool src_reorder = false, dst_reorder = false;
  dnnl::memory::desc src_md, dst_md;  // the kernel's own layouts, where they differ from the plain ones
  dnnl::memory::desc src_plain, dst_plain;
  // Made once: building a reorder's primitive descriptor costs microseconds, a tenth of a small convolution.
  dnnl::reorder to_src, to_dst, from_dst;  // plain src -> src; plain residual -> dst; dst -> plain output
  // A call large enough for all threads: the same convolution made for the calling thread alone (oneDNN
  // fixes a kernel's thread count when it makes it), on first need, and what the site has learnt.
  std::shared_ptr<Conv> serial;
  int threads = 0;  // the OpenMP thread count it was made for
  pacing::Pacer pacer;
};

struct MatMul {
  dnnl::matmul prim;
  dnnl::memory weights, bias;
  bool has_bias = false;
  dnnl::memory::desc src_md, dst_md;
  std::shared_ptr<MatMul> serial;  // as Conv::serial
  int threads = 0;
  pacing::Pacer pacer;
};

// Every cached primitive sits in one of these maps, all under one lock (taken only to look up or build).
std::mutex cache_mutex;
template <class T>
using Cache = std::unordered_map<std::string, std::shared_ptr<T>>;

// Each thread keeps the kernels it has used in a map of its own, so a call takes no lock.
template <class T, class Make>
std::shared_ptr<T> cached(Cache<T>& cache, const std::string& key, Make make) {
  thread_local Cache<T> mine;
  auto found = mine.find(key);
  if (found != mine.end()) return found->second;
  std::string owned(key);  // key_of's buffer, which building a kernel may reuse
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = cache.find(owned);
  if (it == cache.end()) it = cache.emplace(owned, make()).first;
  mine.emplace(owned, it->second);
  return it->second;
}

// The memory objects and argument map of one kernel on one thread, made on its first call; later calls point
// them at the call's buffers. Making them each call (dnnl_memory_create for each buffer, a hash map, and their
// frees) cost about a microsecond, a tenth of one of the MNIST sample's convolutions. Per thread: two VMs of one
// model in two threads share the cached kernel (and its packed weights), not these.
struct Bound {
  std::vector<dnnl::memory> user;  // the caller's buffers, in the order the kernel's run gives them
  std::unordered_map<int, dnnl::memory> args;
};

template <class T, class Make>
Bound& bound(const T& kernel, std::initializer_list<void*> buffers, Make make) {
  thread_local std::unordered_map<const T*, Bound> all;
  auto [it, fresh] = all.try_emplace(&kernel);
  Bound& b = it->second;
  if (fresh) {
    make(b);
    return b;
  }
  size_t i = 0;
  for (void* p : buffers) b.user[i++].set_data_handle(p);
  return b;
}

// A single-thread twin reads the site's packed weights where its kernel wants them in the same layout.
template <class T>
void share_weights(T& twin, const T& site) {
  if (twin.weights.get_desc() == site.weights.get_desc()) twin.weights = site.weights;
}

struct BatchMatMul;
void share_weights(BatchMatMul&, const BatchMatMul&) {}  // no weights: both operands are activations

// The kernel a call of `site` (made for all threads) runs: the site itself, or its single-thread twin when
// the pacer says so (made on first need with one OpenMP thread; packed weights shared when the layouts
// agree). Runs `run(kernel)` with the thread count that kernel was made for, timed for the pacer.
template <class T, class Make, class Run>
void paced(const std::shared_ptr<T>& site, Make make_serial, Run run) {
  // The calling thread held to one (OMP_NUM_THREADS=1, or omp_set_num_threads(1) as optc's kernel race does):
  // nothing to choose or learn, and a site made for more threads runs its single-thread twin.
  bool threaded = omp_get_max_threads() > 1;
  bool serial = threaded ? site->pacer.serial_next() : site->threads > 1;
  T* kernel = site.get();
  if (serial) {
    {
      std::lock_guard<std::mutex> lock(cache_mutex);
      if (!site->serial) {
        SerialScope one(true);
        site->serial = make_serial();
        share_weights(*site->serial, *site);
      }
    }
    kernel = site->serial.get();
  }
  SerialScope scope(serial);
  double start = pacing::now_ns();
  run(*kernel);
  if (threaded) site->pacer.record(serial, pacing::now_ns() - start);
}

// One call of a cached kernel: looked up under `key` (made on the first call, with one OpenMP thread when
// the call is small), then run on the calling thread alone when small, else paced.
template <class T, class Make, class Run>
void call_site(Cache<T>& cache, const std::string& key, bool small, Make make, Run run) {
  std::shared_ptr<T> site;
  {
    SerialScope scope(small);
    site = cached(cache, key, [&] {
      auto made = make();
      made->threads = omp_get_max_threads();
      return made;
    });
  }
  if (small) {
    SerialScope scope(true);
    run(*site);
  } else {
    paced(site, make, run);
  }
}

Cache<Conv> conv_cache;
Cache<MatMul> matmul_cache;

// The operands of a convolution or matmul: float32, or int8 activations and weights with float32 scales.
void check_operands(const char* op, const TensorView& x, const TensorView& w, const TensorView* scales, const TensorView& out) {
  std::string name(op);
  if (scales) {
    check_int8(x, (name + " input").c_str());
    check_int8(w, (name + " weight").c_str());
    check_f32(*scales, (name + " scales").c_str());
    // float, or requantised to 8 bits (the scales, bias and clip then include the output's scale and zero point)
    if (out.dtype().bits == 8) check_int8(out, (name + " output").c_str());
    else check_f32(out, (name + " output").c_str());
    return;
  }
  check_f32(x, (name + " input").c_str());
  check_f32(w, (name + " weight").c_str());
  check_f32(out, (name + " output").c_str());
}

// Post-ops (a residual sum, an activation) and, for int8, per-output-channel scales on dst's axis 1.
dnnl::primitive_attr make_attr(bool sum, int64_t act, int64_t lo_bits, int64_t hi_bits, const TensorView* scales, int64_t channels) {
  dnnl::post_ops po;
  if (sum) po.append_sum(1.f);
  append_act(po, act, bits_to_float(lo_bits), bits_to_float(hi_bits));
  dnnl::primitive_attr attr;
  attr.set_post_ops(po);
  if (scales) {
    const float* sp = static_cast<const float*>(raw_of(*scales));
    attr.set_output_scales(1 << 1, std::vector<float>(sp, sp + channels));
  }
  return attr;
}

// A constant copied once into the layout a primitive reads (weights packed, a bias as is).
dnnl::memory packed(const dnnl::memory::desc& given, void* data, const dnnl::memory::desc& wanted) {
  auto& eng = cpu_engine();
  dnnl::stream s(eng);
  dnnl::memory from(given, eng, data), to(wanted, eng);
  dnnl::reorder(from, to).execute(s, from, to);
  s.wait();
  return to;
}

// Logical NCHW dims of an activation stored as NCHW (nhwc false) or NHWC.
dnnl::memory::dims nchw_dims(const TensorView& t, bool nhwc) {
  auto d = dims_of(t);
  return nhwc ? dnnl::memory::dims{d[0], d[3], d[1], d[2]} : d;
}

// Convolution algorithms (attribute 13), shared with optc/targets/providers/chains.py (ALGO_*).
enum Algo : int64_t { kDirect = 0, kWinograd = 1, kWinogradF43 = 2, kWinogradF23 = 3 };

// The convolution's primitive descriptor: Winograd when asked and oneDNN has a Winograd kernel for this
// CPU and shape (AVX-512 only in oneDNN 2.x, fp32, 3x3 stride 1), else the direct algorithm. Winograd
// kernels read a blocked layout, never NHWC: the reorders around them are what `run_conv` does for NCHW.
dnnl::convolution_forward::primitive_desc conv_pd(const dnnl::memory::dims& xd, const dnnl::memory::dims& od, dt src_dt,
                                                   const dnnl::memory::desc& w_any, const dnnl::memory::desc* b_md,
                                                   const Shape& a, const dnnl::primitive_attr& attr, bool nhwc,
                                                   dt dst_dt = dt::f32) {
  auto& eng = cpu_engine();
  dnnl::memory::dims strides = {a[0], a[1]}, dil = {a[6] - 1, a[7] - 1}, pl = {a[2], a[3]}, pr = {a[4], a[5]};
  auto make = [&](dnnl::algorithm alg, tag layout) {
    auto src = dnnl::memory::desc(xd, src_dt, layout), dst = dnnl::memory::desc(od, dst_dt, layout);
    auto desc = b_md ? dnnl::convolution_forward::desc(dnnl::prop_kind::forward_inference, alg, src, w_any, *b_md, dst, strides, dil, pl, pr)
                     : dnnl::convolution_forward::desc(dnnl::prop_kind::forward_inference, alg, src, w_any, dst, strides, dil, pl, pr);
    return dnnl::convolution_forward::primitive_desc(desc, attr, eng);
  };
  if (a[13] == kWinograd) {
    try {
      return make(dnnl::algorithm::convolution_winograd, tag::any);
    } catch (const dnnl::error&) {
      // no Winograd kernel here (another CPU than the one optc measured on): the direct one computes the same
    }
  }
  // oneDNN picks its own activation layout (blocked for NCHW); an NHWC model is served in place.
  return make(dnnl::algorithm::convolution_direct, nhwc ? tag::nhwc : tag::any);
}

// attrs: stride h,w; pad top,left,bottom,right; dilation h,w; groups; act; clip lo,hi (float bits); nhwc; algorithm
// int8 (scales given): x u8/s8, w s8, dst f32 = scales[oc] · (x ⊛ w + b[oc]) (oneDNN 2.x scales the bias too); a u8/s8
// dst is that value rounded half to even and saturated (offload.py folds the requantisation into scales, b and the clip).
std::shared_ptr<Conv> make_conv(const TensorView& x, const TensorView& w, const TensorView* b, const TensorView& out,
                                const Shape& a, bool sum, const TensorView* scales = nullptr) {
  if (a.size() != 14) TVM_FFI_THROW(ValueError) << "optc oneDNN conv2d: expected 14 attributes, got " << a.size();
  auto& eng = cpu_engine();
  bool nhwc = a[12] != 0;
  tag plain = nhwc ? tag::nhwc : tag::nchw;
  int64_t groups = a[8];
  dnnl::memory::dims wd = dims_of(w);  // O, I/g, kh, kw
  dnnl::memory::dims wdims = wd;
  tag wtag = tag::oihw;
  if (groups > 1) {
    wdims = {groups, wd[0] / groups, wd[1], wd[2], wd[3]};
    wtag = tag::goihw;
  }
  dt src_dt = dtype_of(x), w_dt = scales ? dt::s8 : dt::f32, dst_dt = dtype_of(out);
  auto w_any = dnnl::memory::desc(wdims, w_dt, tag::any);
  auto b_md = dnnl::memory::desc({wd[0]}, dt::f32, tag::x);
  auto pd = conv_pd(nchw_dims(x, nhwc), nchw_dims(out, nhwc), src_dt, w_any, b ? &b_md : nullptr, a,
                    make_attr(sum, a[9], a[10], a[11], scales, wd[0]), nhwc, dst_dt);

  auto c = std::make_shared<Conv>();
  c->prim = dnnl::convolution_forward(pd);
  c->weights = packed({wdims, w_dt, wtag}, raw_of(w), pd.weights_desc());
  if (b) c->bias = packed(b_md, data_of(*b), b_md);
  c->src_plain = dnnl::memory::desc(nchw_dims(x, nhwc), src_dt, plain);
  c->dst_plain = dnnl::memory::desc(nchw_dims(out, nhwc), dst_dt, plain);
  c->src_reorder = pd.src_desc() != c->src_plain;
  c->dst_reorder = pd.dst_desc() != c->dst_plain;
  c->src_md = pd.src_desc();
  c->dst_md = pd.dst_desc();
  if (c->src_reorder) {
    c->to_src = dnnl::reorder(dnnl::reorder::primitive_desc(eng, c->src_plain, eng, pd.src_desc()));
  }
  if (c->dst_reorder) {
    c->to_dst = dnnl::reorder(dnnl::reorder::primitive_desc(eng, c->dst_plain, eng, pd.dst_desc()));
    c->from_dst = dnnl::reorder(dnnl::reorder::primitive_desc(eng, pd.dst_desc(), eng, c->dst_plain));
  }
  return c;
}

// ConvTranspose, NCHW: x (N, IC, H, W), w as ONNX stores it (IC, OC, kh, kw), groups 1. attrs as make_conv's; the
// right/bottom padding is ONNX's end padding less its output padding, which the output's shape carries.
std::shared_ptr<Conv> make_deconv(const TensorView& x, const TensorView& w, const TensorView* b, const TensorView& out, const Shape& a) {
  if (a.size() != 14 || a[8] != 1 || a[12] != 0) TVM_FFI_THROW(ValueError) << "optc oneDNN deconv2d: NCHW, groups 1, 14 attributes";
  auto& eng = cpu_engine();
  dnnl::memory::dims wd = dims_of(w);  // IC, OC, kh, kw
  dnnl::memory::dims wdims = {wd[1], wd[0], wd[2], wd[3]};  // oneDNN's logical order: OC, IC, kh, kw
  auto xd = dims_of(x), od = dims_of(out);
  int64_t pr_h = (xd[2] - 1) * a[0] + (wd[2] - 1) * a[6] + 1 - a[2] - od[2];
  int64_t pr_w = (xd[3] - 1) * a[1] + (wd[3] - 1) * a[7] + 1 - a[3] - od[3];
  auto src = dnnl::memory::desc(xd, dt::f32, tag::any), dst = dnnl::memory::desc(od, dt::f32, tag::any);
  auto w_any = dnnl::memory::desc(wdims, dt::f32, tag::any);
  auto b_md = dnnl::memory::desc({wdims[0]}, dt::f32, tag::x);
  dnnl::memory::dims strides = {a[0], a[1]}, dil = {a[6] - 1, a[7] - 1}, pl = {a[2], a[3]}, pr = {pr_h, pr_w};
  auto desc = b ? dnnl::deconvolution_forward::desc(dnnl::prop_kind::forward_inference, dnnl::algorithm::deconvolution_direct, src, w_any,
                                                    b_md, dst, strides, dil, pl, pr)
                : dnnl::deconvolution_forward::desc(dnnl::prop_kind::forward_inference, dnnl::algorithm::deconvolution_direct, src, w_any,
                                                    dst, strides, dil, pl, pr);
  auto pd = dnnl::deconvolution_forward::primitive_desc(desc, make_attr(false, a[9], a[10], a[11], nullptr, wdims[0]), eng);
  auto c = std::make_shared<Conv>();
  c->prim = dnnl::deconvolution_forward(pd);
  c->weights = packed({wdims, dt::f32, tag::iohw}, raw_of(w), pd.weights_desc());
  if (b) c->bias = packed(b_md, data_of(*b), b_md);
  c->src_plain = dnnl::memory::desc(xd, dt::f32, tag::nchw);
  c->dst_plain = dnnl::memory::desc(od, dt::f32, tag::nchw);
  c->src_reorder = pd.src_desc() != c->src_plain;
  c->dst_reorder = pd.dst_desc() != c->dst_plain;
  c->src_md = pd.src_desc();
  c->dst_md = pd.dst_desc();
  if (c->src_reorder) c->to_src = dnnl::reorder(dnnl::reorder::primitive_desc(eng, c->src_plain, eng, pd.src_desc()));
  if (c->dst_reorder) c->from_dst = dnnl::reorder(dnnl::reorder::primitive_desc(eng, pd.dst_desc(), eng, c->dst_plain));
  return c;
}

// ---- optc's own Winograd kernels (winograd.h, winograd_tile.h), F(4x4, 3x3) and F(2x2, 3x3), for NHWC float32 3x3 stride-1
// convolutions. The shapes and padding of one such convolution (winograd_tile.h's Geometry extends it):
struct WinoDims {
  int64_t N, H, W, C, K, OH, OW, pt, pl;
};

#include "winograd_builds.h"

// The width optc's kernels run at in this glue: AVX-512's or AVX2's, else 0 (oneDNN's direct kernel computes the
// request; the 4-float build is winograd_glue.cc's, for CPUs without a vendor library).
int wino_vector() {
#if defined(__x86_64__)
  return wino_width() >= 8 ? wino_width() : 0;
#else
  return 0;
#endif
}

#if defined(__x86_64__)
struct Wino : WinoPlan {
  std::shared_ptr<Wino> serial;  // as Conv::serial
  int threads = 0;
  pacing::Pacer pacer;
};
void share_weights(Wino& twin, const Wino& site) { twin.U = site.U; }
Cache<Wino> wino_cache;


std::shared_ptr<Wino> make_wino(const TensorView& x, const TensorView& w, const TensorView& out, const Shape& a) {
  auto c = std::make_shared<Wino>();
  WinoDims d{x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3], out.shape()[3], out.shape()[1], out.shape()[2], a[2], a[3]};
  plan_wino(*c, wino_vector(), wino_tile(a[13]), d, data_of(w), omp_get_max_threads());  // 1 for a serial twin
  return c;
}

void run_wino(const Wino& c, const float* x, const float* bias, const float* res, int act, float lo, float hi, float* out) {
  const size_t need = static_cast<size_t>(WINO_CALL(c.width, c.m, scratch_floats, c.d, c.block));
  if (c.staged) {
    thread_local std::vector<float> shared;  // the calling thread's, which its OpenMP team shares
    if (shared.size() < need) shared.resize(need);
    float* scratch = shared.data();
    const int64_t T = c.tiles, jobs = WINO_CALL(c.width, c.m, products, c.d);
#pragma omp parallel
    {
#pragma omp for schedule(static)
      for (int64_t t = 0; t < T; ++t) WINO_CALL(c.width, c.m, stage_input, c.d, x, t, T, scratch);
#pragma omp for schedule(static)
      for (int64_t j = 0; j < jobs; ++j) WINO_CALL(c.width, c.m, stage_multiply, c.d, c.U->data(), j, T, scratch);
#pragma omp for schedule(static)
      for (int64_t t = 0; t < T; ++t) WINO_CALL(c.width, c.m, stage_output, c.d, t, T, scratch, bias, res, act, lo, hi, out);
    }
    return;
  }
  const int64_t blocks = (c.tiles + c.block - 1) / c.block;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    thread_local std::vector<float> scratch;
    if (scratch.size() < need) scratch.resize(need);
    int64_t t0 = b * c.block, tb = std::min(c.block, c.tiles - t0);
    WINO_CALL(c.width, c.m, run_block, c.d, c.U->data(), t0, tb, c.block, scratch.data(), x, bias, res, act, lo, hi, out);
  }
}
#undef WINO_CALL

void conv_wino(const TensorView& x, const TensorView& w, const TensorView* b, const TensorView* res, const Shape& a, TensorView out) {
  bool small = serial_call(numel(out) * w.shape()[1] * 9, w);
  auto make = [&] { return make_wino(x, w, out, a); };
  auto run = [&](Wino& c) {
    run_wino(c, data_of(x), b ? data_of(*b) : nullptr, res ? data_of(*res) : nullptr, static_cast<int>(a[9]), bits_to_float(a[10]),
             bits_to_float(a[11]), data_of(out));
  };
  call_site(wino_cache, key_of(res ? 'V' : b ? 'W' : 'X', &w, {&x, &w, &out}, a), small, make, run);
}
#else  // another architecture (an aarch64 host with its own libdnnl): oneDNN's kernels compute every convolution
void conv_wino(const TensorView&, const TensorView&, const TensorView*, const TensorView*, const Shape&, TensorView) {}
#endif

// Whether one of optc's kernels computes this call: asked for, a shape they take (wino_takes), on a CPU with one of
// their instruction sets. Anything else goes to oneDNN's direct kernel, which computes the same (an artifact carried
// to another CPU).
bool wino_applies(const Shape& a, const TensorView& w) { return wino_vector() > 0 && w.ndim() == 4 && wino_takes(a, w.shape()[2], w.shape()[3]); }

// The kernel a convolution asking for one of optc's Winograd algorithms (attrs[13]) would run here, for the race's
// report: its name, or why not.
tvm::ffi::String conv2d_wino_impl(Shape w, Shape attrs) {
  if (wino_vector() == 0) return "no AVX2 or AVX-512 here (or oneDNN held below them)";
  if (w.size() != 4 || !wino_takes(attrs, w[2], w[3]))
    return "not a 3x3 stride-1 NHWC convolution with no activation, ReLU, a clip, sigmoid or SiLU";
  std::string name = wino_tile(attrs[13]) == 4 ? "optc_wino_4x3:" : "optc_wino_2x3:";
  return name + (wino_vector() == 16 ? "avx512" : "avx2");
}

void run_conv(TensorView x, TensorView w, const TensorView* b, const TensorView* res, const Shape& a, TensorView out,
              const TensorView* scales = nullptr, bool transposed = false) {
  check_operands("conv2d", x, w, scales, out);
  if (x.ndim() != 4 || w.ndim() != 4 || out.ndim() != 4) TVM_FFI_THROW(ValueError) << "optc oneDNN conv2d: 4-d tensors only";
  if (!scales && !transposed && wino_applies(a, w)) return conv_wino(x, w, b, res, a, out);
  bool small = serial_call((transposed ? numel(x) * w.shape()[1] : numel(out) * w.shape()[1]) * w.shape()[2] * w.shape()[3], w);
  auto make = [&] { return transposed ? make_deconv(x, w, b, out, a) : make_conv(x, w, b, out, a, res != nullptr, scales); };
  auto run = [&](Conv& c) {
    dnnl::stream& s = cpu_stream();
    // user: src, dst, then the residual; args: the kernel's src and dst (scratch where it reorders), weights, bias
    Bound& m = bound(c, {raw_of(x), data_of(out), res ? data_of(*res) : nullptr}, [&](Bound& m) {
      auto& eng = cpu_engine();
      m.user = {dnnl::memory(c.src_plain, eng, raw_of(x)), dnnl::memory(c.dst_plain, eng, data_of(out)),
                dnnl::memory(c.dst_plain, eng, res ? data_of(*res) : nullptr)};
      m.args = {{DNNL_ARG_SRC, c.src_reorder ? dnnl::memory(c.src_md, eng) : m.user[0]}, {DNNL_ARG_WEIGHTS, c.weights},
                {DNNL_ARG_DST, c.dst_reorder ? dnnl::memory(c.dst_md, eng) : m.user[1]}};
      if (b) m.args[DNNL_ARG_BIAS] = c.bias;
    });
    dnnl::memory& src = m.args[DNNL_ARG_SRC];
    dnnl::memory& dst = m.args[DNNL_ARG_DST];
    if (c.src_reorder) c.to_src.execute(s, m.user[0], src);
    if (res) {
      if (c.dst_reorder) c.to_dst.execute(s, m.user[2], dst);
      else std::memcpy(data_of(out), data_of(*res), c.dst_plain.get_size());
    }
    c.prim.execute(s, m.args);
    if (c.dst_reorder) c.from_dst.execute(s, dst, m.user[1]);
    s.wait();
  };
  char op = transposed ? (b ? 'd' : 'e') : scales ? (res ? 'S' : out.dtype().bits == 8 ? 'R' : 'Q') : res ? 's' : b ? 'c' : 'n';
  call_site(conv_cache, key_of(op, &w, {&x, &w, &out}, a), small, make, run);
}

void conv2d(TensorView x, TensorView w, TensorView b, Shape attrs, TensorView out) { run_conv(x, w, &b, nullptr, attrs, out); }
void conv2d_nobias(TensorView x, TensorView w, Shape attrs, TensorView out) { run_conv(x, w, nullptr, nullptr, attrs, out); }
void conv2d_sum(TensorView x, TensorView w, TensorView b, TensorView res, Shape attrs, TensorView out) {
  run_conv(x, w, &b, &res, attrs, out);
}
void deconv2d(TensorView x, TensorView w, TensorView b, Shape attrs, TensorView out) {
  run_conv(x, w, &b, nullptr, attrs, out, nullptr, true);
}
void deconv2d_nobias(TensorView x, TensorView w, Shape attrs, TensorView out) { run_conv(x, w, nullptr, nullptr, attrs, out, nullptr, true); }
void conv2d_q(TensorView x, TensorView w, TensorView b, TensorView scales, Shape attrs, TensorView out) {
  run_conv(x, w, &b, nullptr, attrs, out, &scales);
}
void conv2d_q_sum(TensorView x, TensorView w, TensorView b, TensorView scales, TensorView res, Shape attrs, TensorView out) {
  run_conv(x, w, &b, &res, attrs, out, &scales);
}

// x: (..., K) activations; w: (K, N) constant weights; bias: (N,). attrs: act, clip lo, hi.
std::shared_ptr<MatMul> make_matmul(const TensorView& x, const TensorView& w, const TensorView* b, const Shape& a,
                                    const TensorView& out, const TensorView* scales = nullptr) {
  auto& eng = cpu_engine();
  int64_t k = w.shape()[0], n = w.shape()[1];
  int64_t m = 1;
  for (int i = 0; i + 1 < x.ndim(); ++i) m *= x.shape()[i];
  auto m_ = std::make_shared<MatMul>();
  dt w_dt = scales ? dt::s8 : dt::f32;
  m_->src_md = dnnl::memory::desc({m, k}, dtype_of(x), tag::ab);
  m_->dst_md = dnnl::memory::desc({m, n}, dtype_of(out), tag::ab);
  auto w_any = dnnl::memory::desc({k, n}, w_dt, tag::any);
  auto b_md = dnnl::memory::desc({1, n}, dt::f32, tag::ab);
  auto desc = b ? dnnl::matmul::desc(m_->src_md, w_any, b_md, m_->dst_md) : dnnl::matmul::desc(m_->src_md, w_any, m_->dst_md);
  auto pd = dnnl::matmul::primitive_desc(desc, make_attr(false, a[0], a[1], a[2], scales, n), eng);
  m_->prim = dnnl::matmul(pd);
  m_->weights = packed({{k, n}, w_dt, tag::ab}, raw_of(w), pd.weights_desc());
  if (b) {
    m_->has_bias = true;
    m_->bias = packed(b_md, data_of(*b), b_md);
  }
  return m_;
}

void run_matmul(TensorView x, TensorView w, const TensorView* b, const Shape& a, TensorView out,
                const TensorView* scales = nullptr) {
  check_operands("matmul", x, w, scales, out);
  if (w.ndim() != 2 || a.size() != 3) TVM_FFI_THROW(ValueError) << "optc oneDNN matmul: a 2-d weight and 3 attributes";
  bool small = serial_call(numel(x) * w.shape()[1], w);
  auto make = [&] { return make_matmul(x, w, b, a, out, scales); };
  auto run = [&](MatMul& mm) {
    dnnl::stream& s = cpu_stream();
    Bound& m = bound(mm, {raw_of(x), data_of(out)}, [&](Bound& m) {
      auto& eng = cpu_engine();
      m.user = {dnnl::memory(mm.src_md, eng, raw_of(x)), dnnl::memory(mm.dst_md, eng, data_of(out))};
      m.args = {{DNNL_ARG_SRC, m.user[0]}, {DNNL_ARG_WEIGHTS, mm.weights}, {DNNL_ARG_DST, m.user[1]}};
      if (mm.has_bias) m.args[DNNL_ARG_BIAS] = mm.bias;
    });
    mm.prim.execute(s, m.args);
    s.wait();
  };
  char op = scales ? (out.dtype().bits == 8 ? 'P' : 'M') : b ? 'm' : 'u';
  call_site(matmul_cache, key_of(op, &w, {&x, &w}, a), small, make, run);
}

void matmul(TensorView x, TensorView w, TensorView b, Shape attrs, TensorView out) { run_matmul(x, w, &b, attrs, out); }
void matmul_nobias(TensorView x, TensorView w, Shape attrs, TensorView out) { run_matmul(x, w, nullptr, attrs, out); }
void matmul_q(TensorView x, TensorView w, TensorView b, TensorView scales, Shape attrs, TensorView out) {
  run_matmul(x, w, &b, attrs, out, &scales);
}

// Batched product of two activations, (B..., M, K) x (B..., K, N), both batch shapes equal.
// No weights to keep: the primitive (shape-dependent JIT code) is what costs.
struct BatchMatMul {
  dnnl::matmul prim;
  std::shared_ptr<BatchMatMul> serial;  // as Conv::serial
  int threads = 0;
  pacing::Pacer pacer;
};
Cache<BatchMatMul> batch_matmul_cache;

void batch_matmul(TensorView x, TensorView y, Shape attrs, TensorView out) {
  check_f32(x, "batch_matmul lhs");
  check_f32(y, "batch_matmul rhs");
  check_f32(out, "batch_matmul output");
  int nd = x.ndim();
  if (nd < 3 || y.ndim() != nd || out.ndim() != nd || attrs.size() != 0) TVM_FFI_THROW(ValueError) << "optc oneDNN batch_matmul: equal ranks >= 3, no attributes";
  int64_t batch = 1;
  for (int i = 0; i + 2 < nd; ++i) batch *= x.shape()[i];
  int64_t m = x.shape()[nd - 2], k = x.shape()[nd - 1], n = y.shape()[nd - 1];
  bool small = batch * m * k * n < kSerialMacs;
  dnnl::memory::desc a_md({batch, m, k}, dt::f32, tag::abc);
  dnnl::memory::desc b_md({batch, k, n}, dt::f32, tag::abc);
  dnnl::memory::desc c_md({batch, m, n}, dt::f32, tag::abc);
  auto make = [&] {
    auto bm = std::make_shared<BatchMatMul>();
    bm->prim = dnnl::matmul(dnnl::matmul::primitive_desc(dnnl::matmul::desc(a_md, b_md, c_md), cpu_engine()));
    return bm;
  };
  auto run = [&](BatchMatMul& bm) {
    auto& eng = cpu_engine();
    dnnl::stream& s = cpu_stream();
    dnnl::memory a_mem(a_md, eng, data_of(x)), b_mem(b_md, eng, data_of(y)), c_mem(c_md, eng, data_of(out));
    bm.prim.execute(s, {{DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, b_mem}, {DNNL_ARG_DST, c_mem}});
    s.wait();
  };
  call_site(batch_matmul_cache, key_of('b', nullptr, {&x, &y}, attrs), small, make, run);
}

// Row-major (plain) descriptor of any rank up to 6.
dnnl::memory::desc plain_md(const TensorView& t) {
  static const tag tags[] = {tag::a, tag::ab, tag::abc, tag::abcd, tag::abcde, tag::abcdef};
  if (t.ndim() < 1 || t.ndim() > 6) TVM_FFI_THROW(ValueError) << "optc oneDNN: rank " << t.ndim() << " not supported";
  return dnnl::memory::desc(dims_of(t), dt::f32, tags[t.ndim() - 1]);
}

struct Norm {
  dnnl::layer_normalization_forward::primitive_desc pd;
  dnnl::layer_normalization_forward prim;
};

Cache<dnnl::softmax_forward> softmax_cache;
Cache<Norm> norm_cache;

// Softmax over one axis (attrs: axis, non-negative).
void softmax(TensorView x, Shape attrs, TensorView out) {
  check_f32(x, "softmax input");
  check_f32(out, "softmax output");
  if (attrs.size() != 1 || attrs[0] < 0 || attrs[0] >= x.ndim()) TVM_FFI_THROW(ValueError) << "optc oneDNN softmax: bad axis";
  SerialScope scope(numel(x) < kSerialElements);
  auto& eng = cpu_engine();
  auto md = plain_md(x);
  auto prim = cached(softmax_cache, key_of('x', nullptr, {&x}, attrs), [&] {
    return std::make_shared<dnnl::softmax_forward>(dnnl::softmax_forward::primitive_desc(
        dnnl::softmax_forward::desc(dnnl::prop_kind::forward_inference, md, static_cast<int>(attrs[0])), eng));
  });
  dnnl::memory src(md, eng, data_of(x)), dst(md, eng, data_of(out));
  auto& s = cpu_stream();
  prim->execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DST, dst}});
  s.wait();
}

// Layer normalisation over the last axis with scale and shift (attrs: epsilon as float bits).
void layer_norm(TensorView x, TensorView gamma, TensorView beta, Shape attrs, TensorView out) {
  check_f32(x, "layer_norm input");
  check_f32(gamma, "layer_norm scale");
  check_f32(beta, "layer_norm shift");
  check_f32(out, "layer_norm output");
  if (attrs.size() != 1) TVM_FFI_THROW(ValueError) << "optc oneDNN layer_norm: one attribute (epsilon)";
  SerialScope scope(numel(x) < kSerialElements);
  auto& eng = cpu_engine();
  auto md = plain_md(x);
  auto norm = cached(norm_cache, key_of('l', nullptr, {&x}, attrs), [&] {
    auto flags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
    auto desc = dnnl::layer_normalization_forward::desc(dnnl::prop_kind::forward_inference, md, bits_to_float(attrs[0]), flags);
    dnnl::layer_normalization_forward::primitive_desc pd(desc, eng);
    return std::make_shared<Norm>(Norm{pd, dnnl::layer_normalization_forward(pd)});
  });
  const auto& pd = norm->pd;
  dnnl::memory src(md, eng, data_of(x)), dst(md, eng, data_of(out));
  dnnl::memory scale(pd.weights_desc(), eng, data_of(gamma)), shift(pd.weights_desc(), eng, data_of(beta));
  // Inference computes the statistics itself; the primitive still names buffers for them.
  dnnl::memory mean(pd.mean_desc(), eng), var(pd.variance_desc(), eng);
  auto& s = cpu_stream();
  norm->prim.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DST, dst}, {DNNL_ARG_SCALE, scale}, {DNNL_ARG_SHIFT, shift},
                    {DNNL_ARG_MEAN, mean}, {DNNL_ARG_VARIANCE, var}});
  s.wait();
}

// The name of the kernel oneDNN runs for an fp32 convolution with bias (x, w, out as given to conv2d, in the
// layout attribute 12 says), e.g. "jit_wino_4x3:avx512_core": how optc learns whether Winograd was available.
tvm::ffi::String conv2d_impl(Shape x, Shape w, Shape out, Shape a) {
  if (x.size() != 4 || w.size() != 4 || out.size() != 4 || a.size() != 14) TVM_FFI_THROW(ValueError) << "optc oneDNN conv2d_impl: bad shapes";
  bool nhwc = a[12] != 0;
  auto logical = [nhwc](const Shape& t) {
    return nhwc ? dnnl::memory::dims{t[0], t[3], t[1], t[2]} : dnnl::memory::dims{t[0], t[1], t[2], t[3]};
  };
  int64_t groups = a[8];
  dnnl::memory::dims wdims = groups > 1 ? dnnl::memory::dims{groups, w[0] / groups, w[1], w[2], w[3]} : dnnl::memory::dims{w[0], w[1], w[2], w[3]};
  auto w_any = dnnl::memory::desc(wdims, dt::f32, tag::any);
  auto b_md = dnnl::memory::desc({w[0]}, dt::f32, tag::x);
  return conv_pd(logical(x), logical(out), dt::f32, w_any, &b_md, a, make_attr(false, a[9], a[10], a[11], nullptr, w[0]), nhwc).impl_info_str();
}

// How many paced calls ran on all threads and on the calling thread alone, e.g. "parallel=120 serial=3".
tvm::ffi::String paced_runs() {
  return "parallel=" + std::to_string(pacing::parallel_runs.load()) + " serial=" + std::to_string(pacing::serial_runs.load());
}

// Which pool this library's TVM kernels use once oneDNN has run: "openmp" (shared with oneDNN) or "tvm".
tvm::ffi::String thread_pool() { return shared_pool() ? "openmp" : "tvm"; }

// The oneDNN version the artifact was linked against, checked by optc before it loads.
tvm::ffi::String version() {
  const dnnl_version_t* v = dnnl_version();
  std::ostringstream s;
  s << v->major << '.' << v->minor << '.' << v->patch;
  return s.str();
}

}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(optc_dnnl_conv2d, conv2d);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(optc_dnnl_conv2d_nobias, conv2d_nobias);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(optc_dnnl_conv2d_sum, conv2d_sum);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(optc_dnnl_deconv2d, deconv2d);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(optc_dnnl_deconv2d_nobias, deconv2d_nobias);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(optc_dnnl_conv2d_q, conv2d_q);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(optc_dnnl_conv2d_q_sum, conv2d_q_sum);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(optc_dnnl_matmul_q, matmul_q);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(optc_dnnl_matmul, matmul);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(optc_dnnl_matmul_nobias, matmul_nobias);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(optc_dnnl_batch_matmul, batch_matmul);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(optc_dnnl_softmax, softmax);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(optc_dnnl_layer_norm, layer_norm);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(optc_dnnl_version, version);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(optc_dnnl_conv2d_impl, conv2d_impl);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(optc_wino_impl, conv2d_wino_impl);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(optc_dnnl_pacing, paced_runs);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(optc_dnnl_thread_pool, thread_pool);
