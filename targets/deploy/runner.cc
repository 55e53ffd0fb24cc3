// Runs an optc artifact with TVM's runtime alone: one source for x86-64 and aarch64.
//
//   optc-runner ARTIFACT_DIR [--input NAME=FILE.npy ...] [--output-dir DIR] [--repeats N]
//
// Links libtvm_runtime.so and libtvm_ffi.so, and uses only the tvm-ffi headers (the wheel's
// tvm/runtime headers include files the wheel does not ship). Before anything runs it checks
// what ARTIFACT_DIR/manifest.json states, as run_artifact.py does beside it:
//   - model.so is read once into memory, its SHA-256 compared with the manifest's, and those
//     bytes put in a sealed memory file (memfd) that TVM loads: a library swapped after the
//     check cannot run. Integrity, not authenticity: the manifest is not signed;
//   - the machine's architecture and CPU features (runtime.cpu): x86-64 reads /proc/cpuinfo's
//     flags; aarch64 reads the HWCAP bits (the names /proc/cpuinfo's Features prints), which
//     qemu-user emulates where it shows the host's /proc/cpuinfo;
//   - the vendor libraries the artifact links (runtime.libraries) can be loaded;
//   - every input the manifest names, with its dtype and shape (C-order .npy files).
// It sets runtime.env's variables the user has not set, calls "main" REPEATS times, prints
// "run_ms <ms>" per call and "median_ms <ms>", and writes each output as DIR/output_<i>.npy
// with a line "output_<i>.npy NAME DTYPE [SHAPE]". A refusal is one line on stderr and exit
// code 2; a failure inside TVM, one line and exit code 1.
#include <dlfcn.h>
#include <dlpack/dlpack.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#if defined(__aarch64__)
#include <sys/auxv.h>
#endif
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;
namespace json = tvm::ffi::json;

namespace {

#if defined(__x86_64__)
const char* kArch = "x86_64";
#elif defined(__aarch64__)
const char* kArch = "aarch64";
#else
#error "optc-runner is built for x86-64 or aarch64"
#endif

// Bad artifact, machine or input: exit code 2.
struct Refused : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---- SHA-256 (FIPS 180-4), to check model.so without a crypto library ------------------------
class Sha256 {
 public:
  void Update(const unsigned char* data, size_t n) {
    for (size_t i = 0; i < n; ++i) {
      block_[used_++] = data[i];
      if (used_ == 64) Compress();
    }
    bits_ += static_cast<uint64_t>(n) * 8;
  }
  std::string HexDigest() {
    uint64_t bits = bits_;
    block_[used_++] = 0x80;
    if (used_ > 56) {
      while (used_ < 64) block_[used_++] = 0;
      Compress();
    }
    while (used_ < 56) block_[used_++] = 0;
    for (int i = 7; i >= 0; --i) block_[used_++] = static_cast<unsigned char>(bits >> (8 * i));
    Compress();
    char hex[65];
    for (int i = 0; i < 8; ++i) std::snprintf(hex + 8 * i, 9, "%08x", h_[i]);
    return std::string(hex, 64);
  }

 private:
  static uint32_t Rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
  void Compress() {
    static const uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
    uint32_t w[64];
    for (int i = 0; i < 16; ++i)
      w[i] = (uint32_t(block_[4 * i]) << 24) | (uint32_t(block_[4 * i + 1]) << 16) |
             (uint32_t(block_[4 * i + 2]) << 8) | uint32_t(block_[4 * i + 3]);
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = Rotr(w[i - 15], 7) ^ Rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = Rotr(w[i - 2], 17) ^ Rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], h = h_[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = h + (Rotr(e, 6) ^ Rotr(e, 11) ^ Rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      uint32_t t2 = (Rotr(a, 2) ^ Rotr(a, 13) ^ Rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    uint32_t add[8] = {a, b, c, d, e, f, g, h};
    for (int i = 0; i < 8; ++i) h_[i] += add[i];
    used_ = 0;
  }
  uint32_t h_[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  unsigned char block_[64];
  size_t used_ = 0;
  uint64_t bits_ = 0;
};

// ---- files -----------------------------------------------------------------------------------
// The whole of a regular file (a FIFO or device is refused before it is read); nofollow: refuse a link.
std::string ReadRegularFile(const std::string& path, bool nofollow) {
  struct stat st;
  if (stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) throw Refused(path + ": not a regular file");  // never open a device
  int fd = open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | (nofollow ? O_NOFOLLOW : 0));
  if (fd < 0) throw Refused(path + ": cannot be read: " + std::strerror(errno));
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    throw Refused(path + ": not a regular file");
  }
  std::string data(static_cast<size_t>(st.st_size), '\0');
  size_t got = 0;
  while (got < data.size()) {
    ssize_t n = read(fd, data.data() + got, data.size() - got);
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  close(fd);
  if (got != data.size()) throw Refused(path + ": changed size while it was read");
  return data;
}

// ---- the manifest ----------------------------------------------------------------------------
json::Object AsObject(const ffi::Any& v, const std::string& what) {
  if (auto obj = v.as<json::Object>()) return *obj;
  throw Refused("manifest.json: " + what + " is not an object");
}

std::optional<ffi::Any> Field(const json::Object& obj, const char* key) {
  return obj.Get(ffi::String(key));
}

std::string StringField(const json::Object& obj, const char* key, const std::string& what) {
  auto v = Field(obj, key);
  if (v.has_value())
    if (auto s = v->as<ffi::String>()) return std::string(*s);
  throw Refused("manifest.json: " + what + " lacks the string '" + key + "'");
}

std::vector<ffi::Any> ArrayField(const json::Object& obj, const char* key) {
  auto v = Field(obj, key);
  std::vector<ffi::Any> items;
  if (v.has_value())
    if (auto arr = v->as<json::Array>())
      for (const ffi::Any& item : *arr) items.push_back(item);
  return items;
}

std::optional<json::Object> ObjectField(const json::Object& obj, const char* key) {
  auto v = Field(obj, key);
  if (v.has_value())
    if (auto o = v->as<json::Object>()) return *o;
  return std::nullopt;
}

std::string ShapeText(const std::vector<std::string>& dims) {
  std::string text = "[";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + dims[i];
  return text + "]";
}

std::string ShapeText(const int64_t* shape, int ndim) {
  std::vector<std::string> dims;
  for (int i = 0; i < ndim; ++i) dims.push_back(std::to_string(shape[i]));
  return ShapeText(dims);
}

struct IoSpec {
  std::string name, dtype;
  std::string shape;  // as ShapeText writes it; an output's may name a symbolic dim
};

std::vector<IoSpec> IoSpecs(const json::Object& manifest, const char* key) {
  std::vector<IoSpec> specs;
  for (const ffi::Any& item : ArrayField(manifest, key)) {
    json::Object obj = AsObject(item, key);
    std::vector<std::string> dims;
    for (const ffi::Any& dim : ArrayField(obj, "shape")) {
      // A dim is a size, a symbolic name, or null where shape inference could not tell (a -1 read as dynamic).
      auto size = dim.as<int64_t>();
      auto name = dim.as<ffi::String>();
      dims.push_back(size ? std::to_string(*size) : name ? "'" + std::string(*name) + "'" : "?");
    }
    specs.push_back({StringField(obj, "name", key), StringField(obj, "dtype", key), ShapeText(dims)});
  }
  return specs;
}

// ---- the machine -----------------------------------------------------------------------------
std::set<std::string> HostCpuFeatures() {
  std::set<std::string> features;
#if defined(__aarch64__)
  // Linux's arch/arm64/include/uapi/asm/hwcap.h; run_artifact.py's AARCH64_HWCAP is the same table.
  struct Bit {
    const char* name;
    int word;
    int bit;
  };
  static const Bit kBits[] = {{"fp", 0, 0},       {"asimd", 0, 1},   {"crc32", 0, 7},     {"atomics", 0, 8},
                              {"fphp", 0, 9},     {"asimdhp", 0, 10}, {"asimdrdm", 0, 12}, {"jscvt", 0, 13},
                              {"fcma", 0, 14},    {"lrcpc", 0, 15},   {"asimddp", 0, 20},  {"sve", 0, 22},
                              {"asimdfhm", 0, 23}, {"sve2", 1, 1},    {"i8mm", 1, 13},     {"bf16", 1, 14}};
  unsigned long words[2] = {getauxval(AT_HWCAP), getauxval(AT_HWCAP2)};
  for (const Bit& b : kBits)
    if (words[b.word] >> b.bit & 1UL) features.insert(b.name);
#else
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);) {
    size_t colon = line.find(':');
    if (colon == std::string::npos || line.compare(0, 5, "flags") != 0) continue;
    std::istringstream words(line.substr(colon + 1));
    for (std::string w; words >> w;) features.insert(w);
    break;
  }
#endif
  return features;
}

void CheckMachine(const json::Object& runtime) {
  if (auto cpu = ObjectField(runtime, "cpu")) {
    std::string arch = StringField(*cpu, "arch", "runtime.cpu");
    if (arch != kArch) throw Refused("this artifact is for " + arch + "; this machine is " + kArch);
    std::set<std::string> have = HostCpuFeatures();
    std::string missing;
    for (const ffi::Any& f : ArrayField(*cpu, "features")) {
      std::string name(f.cast<ffi::String>());
      if (!have.count(name)) missing += (missing.empty() ? "" : ", ") + name;
    }
    if (!missing.empty()) {
      std::string compiled_for = StringField(*cpu, "mcpu", "runtime.cpu");
      std::string mattr;
      for (const ffi::Any& a : ArrayField(*cpu, "mattr")) mattr += (mattr.empty() ? "" : ",") + std::string(a.cast<ffi::String>());
      compiled_for += (compiled_for.empty() || mattr.empty() ? "" : " ") + mattr;
      std::string hint = arch == "x86_64" ? " (optc compile --target x86 on this machine, or --cpu naming it)" : "";
      throw Refused("this CPU lacks " + missing + ", which the artifact's code uses (compiled for " +
                    (compiled_for.empty() ? "a generic CPU" : compiled_for) + "); compile it for this CPU" + hint);
    }
  }
  // The environment first: OpenMP reads GOMP_SPINCOUNT once, when libgomp loads, and a vendor library below loads it.
  if (auto env = ObjectField(runtime, "env"))
    for (const auto& kv : *env)
      setenv(std::string(kv.first.cast<ffi::String>()).c_str(), std::string(kv.second.cast<ffi::String>()).c_str(), 0);
  for (const ffi::Any& item : ArrayField(runtime, "libraries")) {
    json::Object lib = AsObject(item, "runtime.libraries");
    std::string soname = StringField(lib, "soname", "runtime.libraries");
    if (dlopen(soname.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr)
      throw Refused("this artifact needs " + StringField(lib, "name", "runtime.libraries") + " (" + soname +
                    "), which cannot be loaded here: " + dlerror());
  }
}

// ---- .npy ------------------------------------------------------------------------------------
struct DescrType {
  const char* descr;
  const char* name;  // numpy's dtype name, as the manifest writes it
  DLDataType dtype;
};

const DescrType kTypes[] = {
    {"<f4", "float32", {kDLFloat, 32, 1}}, {"<f8", "float64", {kDLFloat, 64, 1}}, {"<f2", "float16", {kDLFloat, 16, 1}},
    {"|i1", "int8", {kDLInt, 8, 1}},       {"<i2", "int16", {kDLInt, 16, 1}},     {"<i4", "int32", {kDLInt, 32, 1}},
    {"<i8", "int64", {kDLInt, 64, 1}},     {"|u1", "uint8", {kDLUInt, 8, 1}},     {"<u2", "uint16", {kDLUInt, 16, 1}},
    {"<u4", "uint32", {kDLUInt, 32, 1}},   {"<u8", "uint64", {kDLUInt, 64, 1}},   {"|b1", "bool", {kDLBool, 8, 1}},
};

const DescrType& TypeOfDescr(const std::string& descr, const std::string& path) {
  for (const auto& t : kTypes)
    if (descr == t.descr) return t;
  throw Refused(path + ": unsupported .npy dtype " + descr);
}

const DescrType& TypeOf(DLDataType d) {
  for (const auto& t : kTypes)
    if (t.dtype.code == d.code && t.dtype.bits == d.bits && d.lanes == 1) return t;
  throw std::runtime_error("unsupported output dtype code " + std::to_string(d.code) + " bits " + std::to_string(d.bits));
}

// The value of 'key' in a .npy header dict, e.g. "'<f4'" or "(1, 3)".
std::string HeaderField(const std::string& header, const std::string& key, const std::string& path) {
  size_t at = header.find("'" + key + "'");
  size_t colon = at == std::string::npos ? at : header.find(':', at);
  if (colon == std::string::npos) throw Refused(path + ": .npy header lacks " + key);
  at = header.find_first_not_of(' ', colon + 1);
  size_t end = at == std::string::npos ? at : header[at] == '(' ? header.find(')', at) : header.find(',', at);
  if (end == std::string::npos) throw Refused(path + ": malformed .npy header");
  return header.substr(at, end - at + (header[at] == '(' ? 1 : 0));
}

struct NpyArray {
  const DescrType* type;
  std::vector<int64_t> shape;
  std::string bytes;  // the data, C order
};

NpyArray ReadNpy(const std::string& path) {
  std::string file = ReadRegularFile(path, false);
  if (file.size() < 10 || file.compare(0, 6, "\x93NUMPY") != 0) throw Refused(path + ": not a .npy file");
  size_t header_len = static_cast<unsigned char>(file[8]) | static_cast<unsigned char>(file[9]) << 8;
  size_t start = 10;
  if (file[6] != 1) {
    if (file.size() < 12) throw Refused(path + ": not a .npy file");
    header_len |= static_cast<size_t>(static_cast<unsigned char>(file[10])) << 16 |
                  static_cast<size_t>(static_cast<unsigned char>(file[11])) << 24;
    start = 12;
  }
  if (start + header_len > file.size()) throw Refused(path + ": truncated .npy header");
  std::string header = file.substr(start, header_len);
  std::string descr = HeaderField(header, "descr", path);
  NpyArray array{&TypeOfDescr(descr.substr(1, descr.size() - 2), path), {}, {}};
  if (HeaderField(header, "fortran_order", path) != "False") throw Refused(path + ": Fortran order is not supported");
  std::string shape_text = HeaderField(header, "shape", path);
  std::stringstream ss(shape_text.substr(1, shape_text.size() - 2));
  uint64_t count = 1;
  for (std::string item; std::getline(ss, item, ',');) {
    if (item.find_first_not_of(' ') == std::string::npos) continue;
    char* end = nullptr;
    array.shape.push_back(std::strtoll(item.c_str(), &end, 10));
    if (end == item.c_str() || end[std::strspn(end, " ")] != '\0') throw Refused(path + ": malformed .npy shape " + shape_text);
    if (array.shape.back() < 0) throw Refused(path + ": negative dimension");
    count *= static_cast<uint64_t>(array.shape.back());
  }
  uint64_t declared = count * (array.type->dtype.bits / 8);
  if (declared > file.size() - start - header_len)
    throw Refused(path + ": its header declares " + ShapeText(array.shape.data(), static_cast<int>(array.shape.size())) + " " + array.type->name + ", more than the file holds");
  array.bytes = file.substr(start + header_len, static_cast<size_t>(declared));
  return array;
}

struct CPUAlloc {
  void AllocData(DLTensor* t) {
    size_t n = ffi::GetDataSize(*t);
    t->data = std::aligned_alloc(64, (n + 63) / 64 * 64 + 64);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

ffi::Tensor ToTensor(const NpyArray& a) {
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::Shape(a.shape), a.type->dtype, DLDevice{kDLCPU, 0});
  std::memcpy(t.data_ptr(), a.bytes.data(), a.bytes.size());
  return t;
}

void WriteNpy(const std::string& path, const ffi::Tensor& t) {
  const DLTensor* dl = t.GetDLTensorPtr();
  if (!t.IsContiguous()) throw std::runtime_error("non-contiguous output");
  std::string shape = "(";
  for (int i = 0; i < dl->ndim; ++i) shape += std::to_string(dl->shape[i]) + (dl->ndim == 1 || i + 1 < dl->ndim ? "," : "");
  shape += ")";
  std::string header = "{'descr': '" + std::string(TypeOf(dl->dtype).descr) + "', 'fortran_order': False, 'shape': " + shape + ", }";
  size_t total = 10 + header.size() + 1;
  header += std::string((64 - total % 64) % 64, ' ') + "\n";
  std::ofstream f(path, std::ios::binary);
  uint16_t n = static_cast<uint16_t>(header.size());
  f.write("\x93NUMPY\x01\x00", 8);
  f.write(reinterpret_cast<const char*>(&n), 2);
  f.write(header.data(), static_cast<std::streamsize>(header.size()));
  f.write(static_cast<const char*>(dl->data) + dl->byte_offset, static_cast<std::streamsize>(ffi::GetDataSize(*dl)));
  if (!f) throw Refused("cannot write " + path);
}

// ---- the library ---------------------------------------------------------------------------
// Load the verified bytes: a sealed memfd (a private copy where there is none), linked from a
// private folder as model.so (TVM picks its loader by the suffix).
ffi::Module LoadVerified(const std::string& bytes) {
  char folder[] = "/tmp/optc-runner-XXXXXX";
  if (mkdtemp(folder) == nullptr) throw std::runtime_error(std::string("mkdtemp: ") + std::strerror(errno));
  std::string link = std::string(folder) + "/model.so";
  int fd = memfd_create("optc-model.so", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  bool sealed = fd >= 0;
  if (!sealed) fd = open(link.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  size_t done = 0;
  while (fd >= 0 && done < bytes.size()) {
    ssize_t n = write(fd, bytes.data() + done, bytes.size() - done);
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  bool ok = fd >= 0 && done == bytes.size();
  if (ok && sealed) {
    ok = fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) == 0 &&
         symlink(("/proc/" + std::to_string(getpid()) + "/fd/" + std::to_string(fd)).c_str(), link.c_str()) == 0;
  }
  std::string why = ok ? "" : std::strerror(errno);
  std::optional<ffi::Module> lib;
  std::string load_error;
  if (ok) {
    try {
      lib = ffi::Module::LoadFromFile(link);
    } catch (const std::exception& e) {
      load_error = e.what();
    }
  }
  if (fd >= 0) close(fd);  // the loaded library keeps its own mapping
  unlink(link.c_str());
  rmdir(folder);
  if (!ok) throw std::runtime_error("cannot make the private copy of model.so: " + why);
  if (!lib) throw std::runtime_error("loading model.so: " + load_error);
  return *lib;
}

struct Options {
  std::string artifact, output_dir;
  int repeats = 1;
  std::vector<std::pair<std::string, std::string>> inputs;  // name, file
};

Options ParseArgs(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw Refused(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--input") {
      std::string item = value();
      size_t eq = item.find('=');
      if (eq == std::string::npos || eq == 0) throw Refused("--input " + item + ": expected NAME=FILE.npy");
      o.inputs.emplace_back(item.substr(0, eq), item.substr(eq + 1));
    } else if (arg == "--output-dir") {
      o.output_dir = value();
    } else if (arg == "--repeats") {
      std::string text = value();
      char* end = nullptr;
      long n = std::strtol(text.c_str(), &end, 10);
      if (*end != '\0' || n < 1 || n > 1000000) throw Refused("--repeats " + text + ": must be a whole number, 1 or more");
      o.repeats = static_cast<int>(n);
    } else if (arg.rfind("--", 0) == 0 || !o.artifact.empty()) {
      throw Refused("unexpected argument " + arg +
                    "; usage: optc-runner ARTIFACT_DIR [--input NAME=FILE.npy ...] [--output-dir DIR] [--repeats N]");
    } else {
      o.artifact = arg;
    }
  }
  if (o.artifact.empty())
    throw Refused("usage: optc-runner ARTIFACT_DIR [--input NAME=FILE.npy ...] [--output-dir DIR] [--repeats N]");
  return o;
}

int Run(const Options& o) {
  std::string manifest_path = o.artifact + "/manifest.json";
  ffi::String parse_error;
  json::Value parsed = json::Parse(ReadRegularFile(manifest_path, true), &parse_error);
  if (!parse_error.empty()) throw Refused(manifest_path + ": not valid JSON: " + std::string(parse_error));
  json::Object manifest = AsObject(parsed, "the manifest");
  std::string library = StringField(manifest, "library", "the manifest");
  auto files = ObjectField(manifest, "files");
  auto digest = files ? Field(*files, library.c_str()) : std::nullopt;
  if (!digest || !digest->as<ffi::String>()) throw Refused(manifest_path + ": the library is not covered by the manifest");
  if (auto target = ObjectField(manifest, "target"))
    if (auto device = Field(*target, "device"))
      if (auto kind = device->as<ffi::String>(); kind && std::string(*kind) != "cpu")
        throw Refused("this artifact runs on a " + std::string(*kind) + " device; optc-runner runs CPU artifacts");
  std::optional<json::Object> runtime = ObjectField(manifest, "runtime");
  if (runtime) CheckMachine(*runtime);

  std::vector<IoSpec> specs = IoSpecs(manifest, "inputs");
  std::vector<IoSpec> out_specs = IoSpecs(manifest, "outputs");
  std::map<std::string, std::string> files_by_name;
  std::string names;
  for (const IoSpec& s : specs) names += (names.empty() ? "" : ", ") + s.name;
  for (const auto& [name, file] : o.inputs) {
    if (files_by_name.count(name)) throw Refused("--input " + name + " is given twice");
    bool known = std::any_of(specs.begin(), specs.end(), [&](const IoSpec& s) { return s.name == name; });
    if (!known) throw Refused("unknown input '" + name + "'; the artifact takes " + names);
    files_by_name[name] = file;
  }
  std::vector<ffi::Tensor> inputs;
  for (const IoSpec& s : specs) {
    auto it = files_by_name.find(s.name);
    if (it == files_by_name.end()) throw Refused("missing input '" + s.name + "'; the artifact takes " + names);
    NpyArray a = ReadNpy(it->second);
    std::string shape = ShapeText(a.shape.data(), static_cast<int>(a.shape.size()));
    if (shape != s.shape || a.type->name != s.dtype)
      throw Refused("input '" + s.name + "': got " + a.type->name + " " + shape + ", the artifact takes " + s.dtype + " " + s.shape);
    inputs.push_back(ToTensor(a));
  }

  std::string bytes = ReadRegularFile(o.artifact + "/" + library, true);
  Sha256 sha;
  sha.Update(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size());
  if (sha.HexDigest() != std::string(digest->cast<ffi::String>()))
    throw Refused(o.artifact + ": '" + library + "' does not match its SHA-256 in the manifest; refusing to load it");
  ffi::Module lib = LoadVerified(bytes);
  bytes.clear();
  bytes.shrink_to_fit();
  // An artifact that calls oneDNN runs its TVM kernels on oneDNN's OpenMP threads from the first inference on, as
  // optc's Python loaders set it up (run_artifact.share_thread_pool); older artifacts and others have no such function.
  if (auto pool = lib->GetFunction("optc_dnnl_thread_pool", true)) (*pool)();

  ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
  // one CPU device (kDLCPU, id 0) with the pooled allocator (2), as relax.VirtualMachine does
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
  ffi::Function main_fn = vm->GetFunction("main").value();
  std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
  ffi::Any result;
  std::vector<double> times;
  for (int r = 0; r < o.repeats; ++r) {
    auto start = std::chrono::steady_clock::now();
    main_fn.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    std::printf("run_ms %.3f\n", times.back());
  }
  std::sort(times.begin(), times.end());
  size_t mid = times.size() / 2;
  std::printf("median_ms %.3f\n", times.size() % 2 ? times[mid] : (times[mid - 1] + times[mid]) / 2);

  std::vector<ffi::Tensor> outputs;
  if (auto single = result.as<ffi::Tensor>()) {
    outputs.push_back(*single);
  } else {
    for (const ffi::Any& item : result.cast<ffi::Array<ffi::Any>>()) outputs.push_back(item.cast<ffi::Tensor>());
  }
  for (size_t i = 0; i < outputs.size(); ++i) {
    std::string file = "output_" + std::to_string(i) + ".npy";
    if (!o.output_dir.empty()) WriteNpy(o.output_dir + "/" + file, outputs[i]);
    const DLTensor* dl = outputs[i].GetDLTensorPtr();
    std::printf("%s %s %s %s\n", file.c_str(), i < out_specs.size() ? out_specs[i].name.c_str() : "?", TypeOf(dl->dtype).name,
                ShapeText(dl->shape, dl->ndim).c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(ParseArgs(argc, argv));
  } catch (const Refused& e) {
    std::cerr << "optc-runner: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::string first = e.what();
    std::cerr << "optc-runner: error: " << first.substr(0, first.find('\n')) << "\n";
    return 1;
  }
}
