// pybind11 module lathe._C_cuda: lathe's CUDA kernels seen through raw device pointers
// (Python ints), shapes, a dtype code (0 float16, 1 bfloat16) and a cudaStream_t (int).
// Compiled by g++, so it sees only cuda_runtime_api.h and the host launchers; no torch.
// The Python side (lathe.kernels.cuda_ops) checks tensors; this layer re-checks every argument
// before a pointer is used (bad value -> std::invalid_argument -> ValueError), then requires a
// device (std::runtime_error "no CUDA device ..." -> RuntimeError), then launches.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>

#include "cuda/launchers.h"

namespace py = pybind11;

namespace {

void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

void check_size(const char* name, int64_t v) {
  check(v > 0, std::string(name) + " must be positive, got " + std::to_string(v));
  check(v <= INT_MAX, std::string(name) + " = " + std::to_string(v) + " is too large (max " +
                          std::to_string(INT_MAX) + ")");
}

void check_ptr(const char* name, uintptr_t p, uintptr_t align) {
  check(p != 0, std::string(name) + " pointer is null");
  if (p % align != 0) {
    std::ostringstream msg;
    msg << name << " pointer 0x" << std::hex << p << " is not " << std::dec << align
        << "-byte aligned";
    throw std::invalid_argument(msg.str());
  }
}

void check_dtype(int dtype) {
  check(dtype == lathe_cuda::kFloat16 || dtype == lathe_cuda::kBFloat16,
        "dtype must be 0 (float16) or 1 (bfloat16), got " + std::to_string(dtype));
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver / no device: clear the error, report zero devices
    return 0;
  }
  return n;
}

void require_device() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("no CUDA device available (cudaGetDeviceCount: ") +
                             cudaGetErrorString(err) + ")");
  }
  if (n == 0) throw std::runtime_error("no CUDA device available (cudaGetDeviceCount returned 0)");
}

void raise_on_error(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(err));
}

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// After the checks: a device must exist, the launcher runs without the GIL, and its error
// becomes a Python exception naming `what`.
template <class Launch>
void launch(const char* what, Launch&& run) {
  require_device();
  cudaError_t err;
  {
    py::gil_scoped_release nogil;
    err = run();
  }
  raise_on_error(err, what);
}

void w4a16_linear(uintptr_t x, uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
                  uintptr_t bias, uintptr_t out, int64_t M, int64_t N, int64_t K,
                  int64_t group_size, int dtype, uintptr_t stream) {
  check_dtype(dtype);
  check_size("M", M);
  check_size("N", N);
  check_size("K", K);
  check(group_size == 32 || group_size == 64 || group_size == 128,
        "group_size must be 32, 64 or 128, got " + std::to_string(group_size));
  check(K % group_size == 0, "K (" + std::to_string(K) + ") must be a multiple of group_size (" +
                                 std::to_string(group_size) + ")");
  check_ptr("x", x, 16);  // 128-bit loads of x and qweight rows (K % 32 == 0 keeps rows aligned)
  check_ptr("qweight", qweight, 16);
  check_ptr("scales", scales, 2);
  check_ptr("zeros", zeros, 1);
  if (bias != 0) check_ptr("bias", bias, 2);
  check_ptr("out", out, 2);
  launch("w4a16_linear launch", [&] {
    return lathe_cuda::w4a16_linear(ptr<const void>(x), ptr<const uint8_t>(qweight),
                                    ptr<const void>(scales), ptr<const uint8_t>(zeros),
                                    ptr<const void>(bias), ptr<void>(out), M, N, K, group_size,
                                    dtype, reinterpret_cast<cudaStream_t>(stream));
  });
}

void decode_attention(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t seq_lens, uintptr_t out,
                      int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D,
                      std::optional<double> scale, int dtype, uintptr_t stream) {
  check_dtype(dtype);
  check_size("B", B);
  check_size("Hq", Hq);
  check_size("Hkv", Hkv);
  check_size("S", S);
  check_size("D", D);
  check(Hq % Hkv == 0, "Hq (" + std::to_string(Hq) + ") must be a multiple of Hkv (" +
                           std::to_string(Hkv) + ")");
  check(lathe_cuda::attention_head_dim_supported(D),
        "head dim D = " + std::to_string(D) + " is not supported (expected 32, 64, 96, 128 or 256)");
  // Grid limits: B and the head groups are grid.z / grid.y (<= 65535); B*Hq rows in grid.x.
  check(B <= 65535, "B = " + std::to_string(B) + " exceeds the grid limit 65535");
  check(Hq <= 65535, "Hq = " + std::to_string(Hq) + " exceeds the grid limit 65535");
  check(B * Hq <= INT_MAX, "B * Hq = " + std::to_string(B * Hq) + " is too large");
  double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
  check(std::isfinite(s), "scale must be finite, got " + std::to_string(s));
  check_ptr("q", q, 16);  // 16-byte loads of head-dim slices
  check_ptr("k", k, 16);
  check_ptr("v", v, 16);
  if (seq_lens != 0) check_ptr("seq_lens", seq_lens, 4);
  check_ptr("out", out, 2);
  launch("decode_attention launch", [&] {
    return lathe_cuda::decode_attention(ptr<const void>(q), ptr<const void>(k), ptr<const void>(v),
                                        ptr<const int32_t>(seq_lens), ptr<void>(out), B, Hq, Hkv,
                                        S, D, static_cast<float>(s), dtype,
                                        reinterpret_cast<cudaStream_t>(stream));
  });
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "lathe CUDA kernels: W4A16 decode GEMV and flash-decoding attention";

  m.def("device_count", &device_count, "Number of visible CUDA devices (0 without a driver).");
  m.def("has_device", [] { return device_count() > 0; });
  m.def("w4a16_linear", &w4a16_linear, py::arg("x"), py::arg("qweight"), py::arg("scales"),
        py::arg("zeros"), py::arg("bias"), py::arg("out"), py::arg("M"), py::arg("N"),
        py::arg("K"), py::arg("group_size"), py::arg("dtype"), py::arg("stream"),
        "out[M, N] = x[M, K] @ dequant(W)^T (+ bias); pointers as ints, bias may be 0.");
  m.def("decode_attention", &decode_attention, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("seq_lens"), py::arg("out"), py::arg("B"), py::arg("Hq"), py::arg("Hkv"),
        py::arg("S"), py::arg("D"), py::arg("scale"), py::arg("dtype"), py::arg("stream"),
        "out[B, Hq, D] = softmax(q k^T * scale) v for one query per head; seq_lens may be 0, "
        "scale None means 1/sqrt(D).");
}
