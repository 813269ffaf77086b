// The row kernels compiled for AVX512; cpu_isa.cpp decides at run time whether this CPU may run them.
#include "triple_loss.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(FASTDISTIL_GENERIC_ONLY)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define FASTDISTIL_VECTOR_BYTES 64
namespace fastdistil::avx512 {
#include "triple_loss_rows.h"
#include "sparse_triple_loss_rows.h"
}  // namespace fastdistil::avx512
#else
namespace fastdistil::avx512 {
void rows(const RowsArgs&, int64_t, int64_t, float*) { TORCH_CHECK(false, "fastdistil: avx512 kernels exist on x86-64 only (this build has none)"); }
void sparse_rows(const SparseRowsArgs&, int64_t, int64_t, const SparseScratch&) { TORCH_CHECK(false, "fastdistil: avx512 kernels exist on x86-64 only (this build has none)"); }
}  // namespace fastdistil::avx512
#endif
