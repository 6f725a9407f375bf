// pybind11 module lathe._C: the CPU kernels, seen through raw pointers (Python ints), shapes
// and strides. No torch headers: the Python side (lathe.kernels.cpu) owns dtype/device checks
// and passes tensor.data_ptr(); this layer re-checks shapes before any pointer is touched.
#include <pybind11/pybind11.h>

#include "cpu/attention.h"
#include "cpu/conv_chain.h"
#include "cpu/conv_f32_u8.h"
#include "cpu/conv_int8.h"
#include "cpu/int8_gemm.h"
#include "cpu/int8_gemm_amx.h"
#include "cpu/int4_gemm.h"
#include "cpu/isa.h"
#include "cpu/w8a16_gemm.h"

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
  m.def("active_isa", [] { return static_cast<int>(lathe::active_level()); });
  m.def("force_isa", &lathe::force_isa, py::arg("isa"),
        "Force the ISA level (0 scalar, 1 avx2, 2 avx512_vnni, 3 avx512_bf16, 4 amx); -1 resets "
        "to LATHE_ISA or the best.");
  m.def("isa_name", [](int isa) {
    check(isa >= 0 && isa < lathe::kIsaLevels, "isa level must be 0.." + std::to_string(lathe::kIsaLevels - 1));
    return std::string(lathe::isa_name(static_cast<lathe::Isa>(isa)));
  });
  m.def("cpu_flags", &lathe::cpu_flags);
  m.def("isa_env_error", &lathe::isa_env_error);

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
  m.def("amx_peak_gops", [](int nthreads) {
    py::gil_scoped_release nogil;
    return lathe::amx_peak_gops(nthreads);
  });
  m.attr("amx_min_m") = lathe::kAmxMinM;
  m.def("amx_emulate", &lathe::amx_emulate, py::arg("on"),
        "Tests only: the AMX int8 driver with emulated tile operations (on CPUs without AMX).");
  m.def("vnni_peak_gops", [](int nthreads) {
    py::gil_scoped_release nogil;
    return lathe::vnni_peak_gops(nthreads);
  });
  m.def("quantize_rows_u8",
        [](uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t q, uintptr_t scale,
           uintptr_t zp, int asym, int nthreads) {
          py::gil_scoped_release nogil;
          lathe::quantize_rows_u8(ptr<const float>(x), M, K, ldx, ptr<uint8_t>(q),
                                  ptr<float>(scale), ptr<int32_t>(zp), asym, nthreads);
        });

  // int4 weight-only GEMM (csrc/cpu/int4_gemm.h): pack once, then int4_linear.
  m.def("int4_packed_code_bytes", &lathe::int4_packed_code_bytes);
  m.def("int4_packed_scale_count", &lathe::int4_packed_scale_count);
  m.def("int4_pack",
        [](uintptr_t qweight, int64_t ldq, uintptr_t scales, int64_t lds, uintptr_t zeros,
           int64_t ldz, int64_t N, int64_t K, int64_t g, uintptr_t p_codes, uintptr_t p_scales,
           uintptr_t p_zeros) {
          py::gil_scoped_release nogil;
          lathe::int4_pack(ptr<const uint8_t>(qweight), ldq, ptr<const float>(scales), lds,
                           ptr<const uint8_t>(zeros), ldz, N, K, g, ptr<uint8_t>(p_codes),
                           ptr<float>(p_scales), ptr<uint8_t>(p_zeros));
        });
  m.def("int4_linear",
        [](uintptr_t x, int dtype, int64_t M, int64_t K, int64_t ldx, uintptr_t p_codes,
           uintptr_t p_scales, uintptr_t p_zeros, int64_t N, int64_t g, uintptr_t bias,
           uintptr_t out, int64_t ldo, int mode, int nthreads) {
          py::gil_scoped_release nogil;
          lathe::int4_linear(ptr<const void>(x), dtype, M, K, ldx, ptr<const uint8_t>(p_codes),
                             ptr<const float>(p_scales), ptr<const uint8_t>(p_zeros), N, g,
                             ptr<const float>(bias), ptr<void>(out), ldo, mode, nthreads);
        });

  // int8 weight-only GEMM (csrc/cpu/w8a16_gemm.h): pack once, then w8a16_linear.
  m.def("w8a16_scale_offset", &lathe::w8a16_scale_offset);
  m.def("w8a16_packed_bytes", &lathe::w8a16_packed_bytes);
  m.def("w8a16_pack",
        [](uintptr_t qweight, int64_t ldq, uintptr_t scales, int64_t lds, int64_t N, int64_t K,
           int64_t g, uintptr_t packed) {
          py::gil_scoped_release nogil;
          lathe::w8a16_pack(ptr<const int8_t>(qweight), ldq, ptr<const float>(scales), lds, N, K, g,
                            ptr<uint8_t>(packed));
        });
  m.def("w8a16_linear",
        [](uintptr_t x, int dtype, int64_t M, int64_t K, int64_t ldx, uintptr_t packed, int64_t N,
           int64_t g, uintptr_t bias, uintptr_t out, int64_t ldo, int nthreads) {
          py::gil_scoped_release nogil;
          lathe::w8a16_linear(ptr<const void>(x), dtype, M, K, ldx, ptr<const uint8_t>(packed), N, g,
                              ptr<const float>(bias), ptr<void>(out), ldo, nthreads);
        });

  // int8 convolutions on NHWC u8 activations (csrc/cpu/conv_int8.h)
  m.def("conv2d_int8_packed_bytes", &lathe::conv2d_int8_packed_bytes);
  m.def("conv2d_int8_wsum_len", &lathe::conv2d_int8_wsum_len);
  m.def("conv2d_int8_pack", [](uintptr_t w, int64_t N, int64_t kh, int64_t kw, int64_t C, uintptr_t packed,
                               uintptr_t wsum) {
    py::gil_scoped_release nogil;
    lathe::conv2d_int8_pack(ptr<const int8_t>(w), N, kh, kw, C, ptr<int8_t>(packed), ptr<int32_t>(wsum));
  });
  m.def("dwconv_int8_packed_bytes", &lathe::dwconv_int8_packed_bytes);
  m.def("dwconv_int8_pack", [](uintptr_t w, int64_t C, int64_t kh, int64_t kw, uintptr_t packed, uintptr_t wsum) {
    py::gil_scoped_release nogil;
    lathe::dwconv_int8_pack(ptr<const int8_t>(w), C, kh, kw, ptr<int8_t>(packed), ptr<int32_t>(wsum));
  });
  m.def("quantize_nchw_u8", [](uintptr_t x, int64_t B, int64_t C, int64_t H, int64_t W, double scale, int zp,
                               uintptr_t out, int64_t ldc, int nthreads) {
    py::gil_scoped_release nogil;
    lathe::quantize_nchw_u8(ptr<const float>(x), B, C, H, W, static_cast<float>(scale), zp, ptr<uint8_t>(out), ldc,
                            nthreads);
  });
  m.def(
      "conv_int8",
      [](bool depthwise, uintptr_t x, py::sequence in_shape, double x_scale, int x_zp, py::sequence geom,
         uintptr_t packed, uintptr_t wsum, uintptr_t w_scale, uintptr_t bias, int64_t N, uintptr_t res,
         int64_t ld_res, double res_scale, int res_zp, int act, bool out_u8, double out_scale, int out_zp,
         uintptr_t out, int64_t ldo, int nthreads) {
        check(py::len(in_shape) == 5, "conv_int8: in_shape is (B, H, W, C, ldc)");
        check(py::len(geom) == 7, "conv_int8: geom is (kh, kw, stride, pad_t, pad_l, OH, OW)");
        lathe::ConvArgs a;
        a.x = ptr<const uint8_t>(x);
        a.B = in_shape[0].cast<int64_t>(), a.H = in_shape[1].cast<int64_t>(), a.W = in_shape[2].cast<int64_t>();
        a.C = in_shape[3].cast<int64_t>(), a.ldc = in_shape[4].cast<int64_t>();
        a.x_scale = static_cast<float>(x_scale), a.x_zp = x_zp;
        a.kh = geom[0].cast<int64_t>(), a.kw = geom[1].cast<int64_t>(), a.stride = geom[2].cast<int64_t>();
        a.pad_t = geom[3].cast<int64_t>(), a.pad_l = geom[4].cast<int64_t>();
        a.OH = geom[5].cast<int64_t>(), a.OW = geom[6].cast<int64_t>();
        a.packed = ptr<const int8_t>(packed), a.wsum = ptr<const int32_t>(wsum);
        a.w_scale = ptr<const float>(w_scale), a.bias = ptr<const float>(bias), a.N = N;
        a.res = ptr<const uint8_t>(res), a.ld_res = ld_res, a.res_scale = static_cast<float>(res_scale);
        a.res_zp = res_zp, a.act = act, a.out_u8 = out_u8, a.out_scale = static_cast<float>(out_scale);
        a.out_zp = out_zp, a.out = ptr<void>(out), a.ldo = ldo, a.nthreads = nthreads;
        py::gil_scoped_release nogil;
        if (depthwise) lathe::dwconv_int8(a);
        else lathe::conv2d_int8(a);
      },
      "int8 convolution on NHWC u8 activations: dense (implicit GEMM) or depthwise.");
  // fp32 first layers writing u8 codes (csrc/cpu/conv_f32_u8.h)
  m.def("conv_f32_u8_packed_floats", &lathe::conv_f32_u8_packed_floats);
  m.def("conv_f32_u8_pack", [](uintptr_t w, int64_t N, int64_t C, int64_t kh, int64_t kw, uintptr_t packed) {
    py::gil_scoped_release nogil;
    lathe::conv_f32_u8_pack(ptr<const float>(w), N, C, kh, kw, ptr<float>(packed));
  });
  m.def(
      "conv_f32_u8",
      [](uintptr_t x, py::sequence in_shape, py::sequence geom, uintptr_t packed, uintptr_t bias, int64_t N, int act,
         double out_scale, int out_zp, uintptr_t out, int64_t ldo, uintptr_t bad, int nthreads) {
        check(py::len(in_shape) == 4, "conv_f32_u8: in_shape is (B, C, H, W)");
        check(py::len(geom) == 7, "conv_f32_u8: geom is (kh, kw, stride, pad_t, pad_l, OH, OW)");
        lathe::ConvF32Args a;
        a.x = ptr<const float>(x);
        a.B = in_shape[0].cast<int64_t>(), a.C = in_shape[1].cast<int64_t>();
        a.H = in_shape[2].cast<int64_t>(), a.W = in_shape[3].cast<int64_t>();
        a.kh = geom[0].cast<int64_t>(), a.kw = geom[1].cast<int64_t>(), a.stride = geom[2].cast<int64_t>();
        a.pad_t = geom[3].cast<int64_t>(), a.pad_l = geom[4].cast<int64_t>();
        a.OH = geom[5].cast<int64_t>(), a.OW = geom[6].cast<int64_t>();
        a.packed = ptr<const float>(packed), a.bias = ptr<const float>(bias), a.N = N, a.act = act;
        a.out_scale = static_cast<float>(out_scale), a.out_zp = out_zp, a.out = ptr<uint8_t>(out), a.ldo = ldo;
        a.bad = ptr<uint8_t>(bad), a.nthreads = nthreads;
        py::gil_scoped_release nogil;
        lathe::conv_f32_u8(a);
      },
      "fp32 convolution on NCHW images writing u8 NHWC codes (a first layer kept in fp32).");
  py::class_<lathe::ConvChain>(m, "ConvChain", "int8 convolutions run as one chain (csrc/cpu/conv_chain.h)")
      .def(py::init<int64_t, float, int32_t>())
      .def("add",
           [](lathe::ConvChain& c, bool depthwise, int64_t C, int64_t N, int64_t kh, int64_t kw, int64_t stride,
              int64_t pad, uintptr_t packed, uintptr_t wsum, uintptr_t w_scale, uintptr_t bias, int src, int res,
              int act, double out_scale, int out_zp, uintptr_t fpacked) {
             lathe::ChainLayer l;
             l.fpacked = ptr<const float>(fpacked);
             l.depthwise = depthwise, l.C = C, l.N = N, l.kh = kh, l.kw = kw, l.stride = stride, l.pad = pad;
             l.packed = ptr<const int8_t>(packed), l.wsum = ptr<const int32_t>(wsum);
             l.w_scale = ptr<const float>(w_scale), l.bias = ptr<const float>(bias);
             l.src = src, l.res = res, l.act = act, l.out_scale = static_cast<float>(out_scale), l.out_zp = out_zp;
             c.add(l);
           })
      .def("out_shape",
           [](const lathe::ConvChain& c, int64_t H, int64_t W) {
             const std::vector<int64_t> v = c.out_shape(H, W);
             return py::make_tuple(v[0], v[1], v[2], v[3] != 0);
           })
      .def("arena_bytes", &lathe::ConvChain::arena_bytes)
      .def("set_profile", &lathe::ConvChain::set_profile)
      .def("set_solo_fallback", &lathe::ConvChain::set_solo_fallback)
      .def("solo_runs", &lathe::ConvChain::solo_runs)
      .def("profile_ns",
           [](const lathe::ConvChain& c) {
             py::list l;
             for (int64_t v : c.profile_ns()) l.append(v);
             return l;
           })
      .def("profile_reset", &lathe::ConvChain::profile_reset)
      .def("run", [](lathe::ConvChain& c, uintptr_t x, int64_t B, int64_t H, int64_t W, uintptr_t out, uintptr_t bad,
                     int nthreads) {
        py::gil_scoped_release nogil;
        c.run(ptr<const float>(x), nullptr, B, H, W, ptr<void>(out), ptr<uint8_t>(bad), nthreads);
      })
      .def("run_codes", [](lathe::ConvChain& c, uintptr_t codes, int64_t B, int64_t H, int64_t W, uintptr_t out,
                           uintptr_t bad, int nthreads) {
        py::gil_scoped_release nogil;
        c.run(nullptr, ptr<const uint8_t>(codes), B, H, W, ptr<void>(out), ptr<uint8_t>(bad), nthreads);
      });

  m.def(
      "attention_fwd",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, int64_t B, int64_t Hq, int64_t Hkv,
         int64_t Sq, int64_t Sk, int64_t D, py::sequence q_strides, py::sequence k_strides,
         py::sequence v_strides, py::sequence out_strides, int dtype, uintptr_t mask,
         int64_t mask_stride, bool causal, double scale, int nthreads) {
        lathe::AttentionArgs a;
        a.q = ptr<const void>(q);
        a.k = ptr<const void>(k);
        a.v = ptr<const void>(v);
        a.out = ptr<void>(out);
        a.B = B, a.Hq = Hq, a.Hkv = Hkv, a.Sq = Sq, a.Sk = Sk, a.D = D;
        const struct {
          const char* name;
          py::sequence* seq;
          int64_t* dst;
        } views[] = {{"q", &q_strides, a.q_strides}, {"k", &k_strides, a.k_strides},
                     {"v", &v_strides, a.v_strides}, {"out", &out_strides, a.out_strides}};
        for (const auto& vw : views) {
          if (py::len(*vw.seq) != 4)
            throw std::invalid_argument(std::string("attention: ") + vw.name + " strides must have 4 entries, got " +
                                        std::to_string(py::len(*vw.seq)));
          for (int i = 0; i < 4; ++i) vw.dst[i] = (*vw.seq)[i].cast<int64_t>();
        }
        a.dtype = dtype;
        a.mask = ptr<const uint8_t>(mask);
        a.mask_stride = mask_stride;
        a.causal = causal;
        a.scale = static_cast<float>(scale);
        a.nthreads = nthreads;
        py::gil_scoped_release nogil;
        lathe::attention_fwd(a);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("B"), py::arg("Hq"),
      py::arg("Hkv"), py::arg("Sq"), py::arg("Sk"), py::arg("D"), py::arg("q_strides"),
      py::arg("k_strides"), py::arg("v_strides"), py::arg("out_strides"), py::arg("dtype"),
      py::arg("mask"), py::arg("mask_stride"), py::arg("causal"), py::arg("scale"),
      py::arg("nthreads"),
      "Fused attention forward: q [B,Hq,Sq,D], k/v [B,Hkv,Sk,D], out [B,Hq,Sq,D] given by "
      "pointers and element strides; dtype 0 fp32, 1 bf16; mask uint8 [B,Sk] or 0.");
}
