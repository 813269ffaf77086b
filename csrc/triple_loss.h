// What the CPU op (triple_loss_cpu.cpp) hands the per-ISA row kernels (triple_loss_rows_<isa>.cpp).
#pragma once

#include <ATen/Dispatch.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace fastdistil {

// Filled by aggregate initialization in triple_loss_cpu.cpp: the fields' order is the initializer's.
struct RowsArgs {
  const void* student_logits;
  const void* teacher_logits;
  const int64_t* labels;
  const void* student_hidden;
  const void* teacher_hidden;
  void* grad_logits;
  void* grad_hidden;
  const uint8_t* selected;  // KL row mask
  const uint8_t* real;      // non-padding (cosine) row mask
  int64_t V, D;
  at::ScalarType logits_dtype, teacher_dtype, hidden_dtype, teacher_hidden_dtype;
  at::ScalarType grad_hidden_dtype;  // hidden_dtype, or float32 for fp16 hidden states (see triple_loss_cpu.cpp)
  float inv_temp, kl_coef, ce_coef, cos_coef;
  float mse_coef;  // 2 * alpha_mse / n_selected (times P, as kl_coef): 0 compiles the MSE gradient out
  int temp_pow;  // 1 or 2 when T is that integer, else 0
  double* kl_rows;
  double* ce_rows;
  double* cos_rows;
  double* mse_rows;
};

// fp32 and the two 16-bit float types; the kernels compute in fp32 whatever they load.
#define FASTDISTIL_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// The rows [begin, end) of one call, once per ISA: triple_loss_rows.h compiled by triple_loss_rows_<isa>.cpp.
// scratch holds 2 * V floats. It is allocated by the caller because the ISA files must not instantiate std::
// templates: a template instantiated under an ISA pragma may be the copy the linker keeps for every caller.
using RowsFn = void (*)(const RowsArgs&, int64_t, int64_t, float*);
namespace avx512 {
void rows(const RowsArgs& args, int64_t begin, int64_t end, float* scratch);
}
namespace avx2 {
void rows(const RowsArgs& args, int64_t begin, int64_t end, float* scratch);
}
namespace vec128 {
void rows(const RowsArgs& args, int64_t begin, int64_t end, float* scratch);
}

}  // namespace fastdistil
