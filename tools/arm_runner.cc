// A minimal Relax VM runner for optc artifacts, cross-compiled for aarch64 and
// run under qemu-user by tests/test_targets_arm.py (see tools/make_arm_root.py).
//
//   optc-arm-runner MODEL.so OUT_DIR REPEATS IN0.npy [IN1.npy ...]
//
// Loads MODEL.so with TVM's runtime (libtvm_runtime.so + libtvm_ffi.so from the
// aarch64 wheels), calls "main" on the inputs (C-order .npy files, in the
// artifact's input order) REPEATS times, writes each output as
// OUT_DIR/output_<i>.npy and prints one line per run: "run_ms <milliseconds>".
// Only the tvm-ffi headers are used: the wheel's tvm/runtime headers include
// files the wheel does not ship.
#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

struct CPUAlloc {
  void AllocData(DLTensor* t) {
    size_t n = ffi::GetDataSize(*t);
    t->data = std::aligned_alloc(64, (n + 63) / 64 * 64 + 64);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

struct DescrType {
  const char* descr;
  DLDataType dtype;
};

const DescrType kTypes[] = {
    {"<f4", {kDLFloat, 32, 1}}, {"<f8", {kDLFloat, 64, 1}}, {"<f2", {kDLFloat, 16, 1}},
    {"|i1", {kDLInt, 8, 1}},    {"<i2", {kDLInt, 16, 1}},   {"<i4", {kDLInt, 32, 1}},
    {"<i8", {kDLInt, 64, 1}},   {"|u1", {kDLUInt, 8, 1}},   {"<u2", {kDLUInt, 16, 1}},
    {"<u4", {kDLUInt, 32, 1}},  {"<u8", {kDLUInt, 64, 1}},  {"|b1", {kDLBool, 8, 1}},
};

DLDataType DtypeOf(const std::string& descr) {
  for (const auto& t : kTypes)
    if (descr == t.descr) return t.dtype;
  throw std::runtime_error("unsupported .npy dtype " + descr);
}

std::string DescrOf(DLDataType d) {
  for (const auto& t : kTypes)
    if (t.dtype.code == d.code && t.dtype.bits == d.bits && d.lanes == 1) return t.descr;
  throw std::runtime_error("unsupported output dtype code " + std::to_string(d.code) + " bits " +
                           std::to_string(d.bits));
}

// The value of 'key' in a .npy header dict, e.g. "'<f4'" or "(1, 3)".
std::string HeaderField(const std::string& header, const std::string& key) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) throw std::runtime_error(".npy header lacks " + key);
  at = header.find(':', at) + 1;
  while (header[at] == ' ') ++at;
  size_t end = header[at] == '(' ? header.find(')', at) + 1 : header.find(',', at);
  return header.substr(at, end - at);
}

ffi::Tensor ReadNpy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  char magic[8];
  f.read(magic, 8);
  if (!f || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error(path + ": not .npy");
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    uint16_t n;
    f.read(reinterpret_cast<char*>(&n), 2);
    header_len = n;
  } else {
    f.read(reinterpret_cast<char*>(&header_len), 4);
  }
  std::string header(header_len, '\0');
  f.read(header.data(), header_len);
  std::string descr = HeaderField(header, "descr");
  descr = descr.substr(1, descr.size() - 2);
  if (HeaderField(header, "fortran_order") != "False")
    throw std::runtime_error(path + ": Fortran order is not supported");
  std::string shape_text = HeaderField(header, "shape");
  std::vector<int64_t> shape;
  std::stringstream ss(shape_text.substr(1, shape_text.size() - 2));
  for (std::string item; std::getline(ss, item, ',');)
    if (item.find_first_not_of(' ') != std::string::npos) shape.push_back(std::stoll(item));
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::Shape(shape), DtypeOf(descr),
                                           DLDevice{kDLCPU, 0});
  f.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(ffi::GetDataSize(*t.GetDLTensorPtr())));
  if (!f) throw std::runtime_error(path + ": truncated data");
  return t;
}

void WriteNpy(const std::string& path, const ffi::Tensor& t) {
  const DLTensor* dl = t.GetDLTensorPtr();
  if (!t.IsContiguous()) throw std::runtime_error("non-contiguous output");
  std::string shape = "(";
  for (int i = 0; i < dl->ndim; ++i) shape += std::to_string(dl->shape[i]) + (dl->ndim == 1 || i + 1 < dl->ndim ? "," : "");
  shape += ")";
  std::string header = "{'descr': '" + DescrOf(dl->dtype) + "', 'fortran_order': False, 'shape': " + shape + ", }";
  size_t total = 10 + header.size() + 1;
  header += std::string((64 - total % 64) % 64, ' ') + "\n";
  std::ofstream f(path, std::ios::binary);
  uint16_t n = static_cast<uint16_t>(header.size());
  f.write("\x93NUMPY\x01\x00", 8);
  f.write(reinterpret_cast<const char*>(&n), 2);
  f.write(header.data(), static_cast<std::streamsize>(header.size()));
  f.write(static_cast<const char*>(dl->data) + dl->byte_offset,
          static_cast<std::streamsize>(ffi::GetDataSize(*dl)));
  if (!f) throw std::runtime_error("cannot write " + path);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::cerr << "usage: " << argv[0] << " MODEL.so OUT_DIR REPEATS IN0.npy [IN1.npy ...]\n";
    return 2;
  }
  try {
    const std::string out_dir = argv[2];
    const int repeats = std::atoi(argv[3]);
    std::vector<ffi::Tensor> inputs;
    for (int i = 4; i < argc; ++i) inputs.push_back(ReadNpy(argv[i]));

    ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
    ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    // one CPU device (kDLCPU, id 0) with the pooled allocator (2), as relax.VirtualMachine does
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
    ffi::Function main_fn = vm->GetFunction("main").value();

    std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
    ffi::Any result;
    for (int r = 0; r < (repeats > 0 ? repeats : 1); ++r) {
      auto start = std::chrono::steady_clock::now();
      main_fn.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
      auto ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
      std::printf("run_ms %.3f\n", ms);
    }
    std::vector<ffi::Tensor> outputs;
    if (auto single = result.as<ffi::Tensor>()) {
      outputs.push_back(*single);
    } else {
      for (const ffi::Any& item : result.cast<ffi::Array<ffi::Any>>()) outputs.push_back(item.cast<ffi::Tensor>());
    }
    for (size_t i = 0; i < outputs.size(); ++i)
      WriteNpy(out_dir + "/output_" + std::to_string(i) + ".npy", outputs[i]);
    std::printf("outputs %zu\n", outputs.size());
  } catch (const std::exception& e) {
    std::cerr << "optc-arm-runner: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
