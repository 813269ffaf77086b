// What the CPU ops (triple_loss_cpu.cpp, sparse_triple_loss_cpu.cpp) hand the per-ISA row kernels
// (triple_loss_rows_<isa>.cpp), and the host code the two share.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace fastdistil {

// The cosine term's rows, the same in both losses. Filled by aggregate initialization: the fields' order is the
// initializer's.
struct HiddenArgs {
  const void* student_hidden;
  const void* teacher_hidden;
  void* grad_hidden;
  const uint8_t* real;  // non-padding (cosine) row mask
  int64_t D;
  at::ScalarType hidden_dtype, teacher_hidden_dtype;
  at::ScalarType grad_hidden_dtype;  // hidden_dtype, or float32 for fp16 hidden states (see triple_loss_cpu.cpp)
  float cos_coef;
  double* cos_rows;
};

// Filled by aggregate initialization in triple_loss_cpu.cpp: the fields' order is the initializer's.
struct RowsArgs {
  const void* student_logits;
  const void* teacher_logits;
  const int64_t* labels;
  void* grad_logits;
  const uint8_t* selected;  // KL row mask
  int64_t V;
  at::ScalarType logits_dtype, teacher_dtype;
  float inv_temp, kl_coef, ce_coef;
  float mse_coef;  // 2 * alpha_mse / n_selected (times P, as kl_coef): 0 compiles the MSE gradient out
  int temp_pow;  // 1 or 2 when T is that integer, else 0
  double* kl_rows;
  double* ce_rows;
  double* mse_rows;
  HiddenArgs hidden;
};

// The sparse loss against a cached top-k teacher (sparse_triple_loss_cpu.cpp), filled the same way.
struct SparseRowsArgs {
  const void* student_logits;
  const void* topk_logits;   // [N, K], the teacher's raw logits at T = 1
  const void* topk_indices;  // [N, K], int16, int32 or int64, distinct within a row (checked by the caller)
  const void* logsumexp;     // [N, 2] fp32: the teacher's over all V at T = 1 and at T; only [r, 1] is read
  const int64_t* labels;
  void* grad_logits;
  const uint8_t* selected;
  int64_t V, K;
  at::ScalarType logits_dtype, topk_dtype, index_dtype;
  float inv_temp;       // of the student's exponentials, as in RowsArgs
  double temperature;   // of the teacher's q_k and the KL, which are computed in double
  double kl_coef;       // alpha_ce * T / n_selected times P: the top-k entries' gradient is computed in double
  float ce_coef;
  bool bucket;  // tail "bucket", else "renormalize"
  int temp_pow;
  double* kl_rows;
  double* ce_rows;
  HiddenArgs hidden;
};

// Per-thread scratch of the sparse row kernels, allocated by the caller (see RowsFn). in_topk is a bitmap of V
// bits and kInTopkPad bytes more, all 0 between rows: a row that has a tail marks its top-k entries there and
// clears them again; the padding lets a row's last vector load a whole word.
struct SparseScratch {
  float* es;       // V
  double* q;       // K: the teacher's top-k probabilities at T
  double* log_q;   // K
  int64_t* index;  // K
  uint8_t* in_topk;
};
constexpr int64_t kInTopkPad = 8;

// fp32 and the two 16-bit float types; the kernels compute in fp32 whatever they load.
#define FASTDISTIL_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// The rows [begin, end) of one call, once per ISA: triple_loss_rows.h compiled by triple_loss_rows_<isa>.cpp.
// scratch holds 2 * V floats. It is allocated by the caller because the ISA files must not instantiate std::
// templates: a template instantiated under an ISA pragma may be the copy the linker keeps for every caller.
using RowsFn = void (*)(const RowsArgs&, int64_t, int64_t, float*);
using SparseRowsFn = void (*)(const SparseRowsArgs&, int64_t, int64_t, const SparseScratch&);
#define FASTDISTIL_DECLARE_ROWS(ISA)                                                              \
  namespace ISA {                                                                                 \
  void rows(const RowsArgs& args, int64_t begin, int64_t end, float* scratch);                    \
  void sparse_rows(const SparseRowsArgs& args, int64_t begin, int64_t end, const SparseScratch& scratch); \
  }
FASTDISTIL_DECLARE_ROWS(avx512)
FASTDISTIL_DECLARE_ROWS(avx2)
FASTDISTIL_DECLARE_ROWS(vec128)
#undef FASTDISTIL_DECLARE_ROWS

}  // namespace fastdistil

// --- Host code shared by the two CPU losses, defined in triple_loss_cpu.cpp. `op` starts every message: the
// words are fastdistil/ops/checks.py's, which the Python API checks first.
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <tuple>
#include <utility>
#include <vector>

namespace fastdistil {

struct NamedTensor {
  const char* name;
  const at::Tensor* tensor;
};

// `others` on student_logits' device; `floating` (student_logits among them) fp32, bf16 or fp16 each, or all
// float64; student_logits [..., V] with V > 0.
void check_logit_inputs(const char* op, const at::Tensor& student_logits, c10::ArrayRef<NamedTensor> others,
                        c10::ArrayRef<NamedTensor> floating);

// labels, attention_mask and the hidden states against student_logits' rows; the temperature and the weights.
void check_row_inputs(const char* op, const at::Tensor& student_logits, const at::Tensor& labels,
                      const at::Tensor& student_hidden, const at::Tensor& teacher_hidden,
                      const at::Tensor& attention_mask, double temperature,
                      c10::ArrayRef<std::pair<const char*, double>> alphas);

// The rows of a call, before any write: the KL row mask and the normalizers, the labels checked against V.
struct RowCounts {
  std::vector<uint8_t> selected;
  int64_t n_selected = 0, n_labelled = 0, n_real = 0;
};
RowCounts count_rows(const char* op, const int64_t* labels, const uint8_t* real, int64_t N, int64_t V,
                     bool restrict_ce_to_mask);

// Per-row loss partials, each row written by the thread that owns it and summed in row order afterwards, so
// that the result does not depend on the number of threads.
struct RowPartials {
  std::vector<double> kl, ce, cos, mse;
};
RowPartials row_partials(int64_t N);

// loss, loss_ce, loss_mlm, loss_cos, loss_mse: fp32 scalars, float64 for float64 inputs.
using Terms = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
Terms loss_terms(const RowCounts& counts, const RowPartials& partials, double temperature, double alpha_ce,
                 double alpha_mlm, double alpha_cos, double alpha_mse, bool float64);

at::Tensor scalar_tensor(double v, bool float64);

// P (kernels/gradient_scale.py) for a gradient no entry of which exceeds `bound`.
double fp16_logits_grad_scale(double bound);

// An uninitialized contiguous gradient of student_hidden, in kernels/gradient_scale.hidden_grad_dtype.
at::Tensor hidden_gradient(const at::Tensor& student_hidden);

HiddenArgs hidden_args(const at::Tensor& student_hidden, const at::Tensor& teacher_hidden, at::Tensor& grad_hidden,
                       const uint8_t* real, double cos_coef, double* cos_rows);

// The float64 path's MLM and cosine terms: adds ce_coef * (softmax(s) - onehot(label)) of the labelled rows to
// grad [N, V], writes grad_hidden and the rows' partials.
void float64_mlm_and_cosine(const at::Tensor& s2, const at::Tensor& labels, const at::Tensor& student_hidden,
                            const at::Tensor& teacher_hidden, const at::Tensor& real_rows, double ce_coef,
                            double cos_coef, at::Tensor& grad, at::Tensor& grad_hidden, RowPartials& partials);

}  // namespace fastdistil
