// pybind11 module lathe._C: the CPU kernels, seen through raw pointers (Python ints), shapes
// and strides. No torch headers: the Python side (lathe.kernels.cpu) owns dtype/device checks
// and passes tensor.data_ptr(); this layer re-checks shapes before any pointer is touched.
#include <pybind11/pybind11.h>

#include "cpu/int8_gemm.h"
#include "cpu/isa.h"

namespace py = pybind11;
using lathe::check;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lathe CPU kernels (AVX-512 VNNI / AVX2 / scalar, chosen at run time)";

  m.def("best_isa", [] { return static_cast<int>(lathe::best_isa()); });
  m.def("active_isa", [] { return static_cast<int>(lathe::active_isa()); });
  m.def("force_isa", &lathe::force_isa, py::arg("isa"),
        "Force the ISA level (0 scalar, 1 avx2, 2 avx512_vnni); -1 resets to the best.");
  m.def("isa_name", [](int isa) {
    check(isa >= 0 && isa <= 2, "isa level must be 0, 1 or 2");
    return std::string(lathe::isa_name(static_cast<lathe::Isa>(isa)));
  });

  m.def("int8_packed_bytes", &lathe::int8_packed_bytes);
  m.def("int8_packed_cols", &lathe::int8_packed_cols);
  m.def("int8_pack_weight",
        [](uintptr_t w, int64_t N, int64_t K, int64_t ldw, uintptr_t packed, uintptr_t colsum) {
          py::gil_scoped_release nogil;
          lathe::int8_pack_weight(ptr<const int8_t>(w), N, K, ldw, ptr<int8_t>(packed),
                                  ptr<int32_t>(colsum));
        });
  m.def("int8_linear",
        [](uintptr_t x, uintptr_t smooth, int64_t M, int64_t K, int64_t ldx, uintptr_t packed,
           uintptr_t colsum,
           uintptr_t w_scale, uintptr_t bias, int64_t N, uintptr_t out, int64_t ldo, int act,
           int asym, int nthreads) {
          py::gil_scoped_release nogil;
          lathe::int8_linear(ptr<const float>(x), ptr<const float>(smooth), M, K, ldx, ptr<const int8_t>(packed),
                             ptr<const int32_t>(colsum), ptr<const float>(w_scale),
                             ptr<const float>(bias), N, ptr<float>(out), ldo, act, asym,
                             nthreads);
        });
  m.def("quantize_rows_u8",
        [](uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t q, uintptr_t scale,
           uintptr_t zp, int asym, int nthreads) {
          py::gil_scoped_release nogil;
          lathe::quantize_rows_u8(ptr<const float>(x), M, K, ldx, ptr<uint8_t>(q),
                                  ptr<float>(scale), ptr<int32_t>(zp), asym, nthreads);
        });
}
