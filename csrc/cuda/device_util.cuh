// Device helpers the .cu files share (nvcc only: bindings_cuda.cpp must not include this).
#pragma once

#include <cstring>

namespace lathe_cuda {

// The bits of `f` as a `To` of the same size (a half2 as a uint32_t and back): memcpy, which
// nvcc turns into a register move, instead of a type-punning cast.
template <typename To, typename From>
__device__ __forceinline__ To bits_as(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "size mismatch");
  To t;
  memcpy(&t, &f, sizeof(To));
  return t;
}

}  // namespace lathe_cuda
