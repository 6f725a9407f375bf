// The target attribute of the AVX512-BF16 bodies (VDPBF16PS, VCVTNE2PS2BF16): no -march
// flags, each body carries it and the dispatcher picks it at run time.
#pragma once

#define LATHE_TBF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,fma")))
