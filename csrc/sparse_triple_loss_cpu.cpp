// CPU implementation of fastdistil::_sparse_triple_loss_forward: the triple loss against a cached top-k teacher
// (fastdistil/ops/reference.py's sparse_triple_loss_reference; the math is sparse_triple_loss_rows.h's).
//
// Everything but the KL term is the online op's (triple_loss_cpu.cpp), and so is the host code: the same checks
// and row counts, rows in parallel with their partials summed in row order, the cosine rows, the fp16 logits
// gradient stored times P. P's bound is kl_coef + ce_coef, as online with alpha_mse = 0: every entry of the
// sparse KL gradient is at most 1 in magnitude too (a p_j - c q_j and (a - u r / S) p_j, with a <= 1 and
// p_j <= S off the top-k).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cpu_isa.h"
#include "gradient_buffer.h"
#include "triple_loss.h"

namespace fastdistil {

namespace {

constexpr const char* kOp = "sparse_triple_loss";

SparseRowsFn sparse_rows_for(CpuIsa isa) {
  if (isa == CpuIsa::Avx512) return &avx512::sparse_rows;
  if (isa == CpuIsa::Avx2) return &avx2::sparse_rows;
  return &vec128::sparse_rows;
}

bool is_index_dtype(at::ScalarType t) { return t == at::kShort || t == at::kInt || t == at::kLong; }

// Every check runs before anything is written. The words are fastdistil/ops/checks.py's.
void check_inputs(const at::Tensor& s, const at::Tensor& topk_logits, const at::Tensor& topk_indices,
                  const at::Tensor& logsumexp, const at::Tensor& labels, const at::Tensor& hs, const at::Tensor& ht,
                  const at::Tensor& mask, double temperature, double alpha_ce, double alpha_mlm, double alpha_cos,
                  c10::string_view tail) {
  check_logit_inputs(kOp, s,
                     {{"teacher_topk_logits", &topk_logits}, {"teacher_topk_indices", &topk_indices},
                      {"teacher_logsumexp", &logsumexp}, {"labels", &labels}, {"student_hidden", &hs},
                      {"teacher_hidden", &ht}, {"attention_mask", &mask}},
                     {{"student_logits", &s}, {"teacher_topk_logits", &topk_logits}, {"student_hidden", &hs},
                      {"teacher_hidden", &ht}});
  const auto lead = s.sizes().slice(0, s.dim() - 1);
  const int64_t V = s.size(-1);
  TORCH_CHECK(topk_logits.dim() >= 1 && topk_logits.sizes().slice(0, topk_logits.dim() - 1) == lead &&
                  topk_logits.size(-1) >= 1 && topk_logits.size(-1) <= V,
              kOp, ": teacher_topk_logits must have shape [", lead, ", k] with 1 <= k <= ", V, " (V), got ",
              topk_logits.sizes());
  TORCH_CHECK(is_index_dtype(topk_indices.scalar_type()), kOp,
              ": teacher_topk_indices must be int16, int32 or int64, got ", topk_indices.scalar_type());
  TORCH_CHECK(topk_indices.sizes() == topk_logits.sizes(), kOp,
              ": teacher_topk_indices must have the shape of teacher_topk_logits ", topk_logits.sizes(), ", got ",
              topk_indices.sizes());
  const bool float64 = s.scalar_type() == at::kDouble;
  TORCH_CHECK(logsumexp.scalar_type() == (float64 ? at::kDouble : at::kFloat), kOp, ": teacher_logsumexp must be ",
              float64 ? "float64" : "float32", ", got ", logsumexp.scalar_type());
  std::vector<int64_t> lse_shape(lead.begin(), lead.end());
  lse_shape.push_back(2);
  TORCH_CHECK(logsumexp.sizes() == at::IntArrayRef(lse_shape), kOp, ": teacher_logsumexp must have shape ",
              at::IntArrayRef(lse_shape), " (log-sum-exp at T = 1 and at T), got ", logsumexp.sizes());
  TORCH_CHECK(tail == "bucket" || tail == "renormalize", kOp,
              ": tail must be one of ('bucket', 'renormalize'), got '", std::string(tail), "'");
  check_row_inputs(kOp, s, labels, hs, ht, mask, temperature,
                   {{"alpha_ce", alpha_ce}, {"alpha_mlm", alpha_mlm}, {"alpha_cos", alpha_cos}});
}

// Indices in [0, V), and distinct within each row the loss reads (a repeated one would stand for two classes
// with one gradient entry). Rows outside the KL term are not read, so a cache may pad them with anything in range.
void check_indices(const at::Tensor& indices, const std::vector<uint8_t>& selected, int64_t V) {
  const int64_t N = static_cast<int64_t>(selected.size());
  const int64_t K = N ? indices.numel() / N : 0;
  const auto check = [&](const auto* p) {
    std::vector<int64_t> seen_in_row(N ? V : 0, -1);
    for (int64_t r = 0; r < N; ++r) {
      for (int64_t j = 0; j < K; ++j) {
        const int64_t v = static_cast<int64_t>(p[r * K + j]);
        TORCH_CHECK(v >= 0 && v < V, kOp, ": teacher_topk_indices must be in [0, ", V, "), got ", v,
                    " at flat position ", r * K + j);
        if (!selected[r]) continue;
        TORCH_CHECK(seen_in_row[v] != r, kOp, ": teacher_topk_indices must be distinct within a row, got ", v,
                    " twice in row ", r);
        seen_in_row[v] = r;
      }
    }
  };
  if (indices.scalar_type() == at::kShort) return check(indices.data_ptr<int16_t>());
  if (indices.scalar_type() == at::kInt) return check(indices.data_ptr<int32_t>());
  check(indices.data_ptr<int64_t>());
}

// float64 exists for torch.autograd.gradcheck: the row kernels' formulas written with ATen ops in double
// precision, as triple_loss_cpu.cpp's float64_rows.
void float64_rows(const at::Tensor& s, const at::Tensor& topk_logits, const at::Tensor& topk_indices,
                  const at::Tensor& logsumexp, const at::Tensor& labels, const at::Tensor& hs, const at::Tensor& ht,
                  const std::vector<uint8_t>& selected_rows, const at::Tensor& real_rows, double temperature,
                  bool bucket, double kl_coef, double ce_coef, double cos_coef, at::Tensor& grad_logits,
                  at::Tensor& grad_hidden, RowPartials& partials) {
  const int64_t N = labels.numel(), V = s.size(-1), K = topk_logits.size(-1);
  const auto opts = s.options();
  const auto s2 = s.reshape({N, V});
  const auto idx = topk_indices.reshape({N, K}).to(at::kLong);
  const auto selected = at::from_blob(const_cast<uint8_t*>(selected_rows.data()), {N}, at::kByte).to(at::kBool);
  const auto log_p = at::log_softmax(s2 / temperature, -1);
  const auto p = log_p.exp();
  const auto log_q = topk_logits.reshape({N, K}) / temperature - logsumexp.reshape({N, 2}).select(1, 1).unsqueeze(1);
  const auto q = log_q.exp();
  const auto mass = q.sum(-1);
  const auto c = bucket ? at::ones_like(mass) : 1.0 / mass;
  const auto r = bucket && K < V ? (1.0 - mass).clamp_min(0.0) : at::zeros_like(mass);
  auto kl = (c.unsqueeze(1) * q * (c.log().unsqueeze(1) + log_q - log_p.gather(1, idx))).sum(-1);
  // log S over the tail entries (log 0 = -inf at the top-k), clamped at the floor, where its gradient stops.
  const auto in_tail = at::ones_like(s2).scatter_(1, idx, 0.0);
  const auto log_tail = (log_p + in_tail.log()).logsumexp(-1);
  const double log_floor = std::log(static_cast<double>(std::numeric_limits<float>::min()));
  const auto u = log_tail.ge(log_floor).to(opts);
  kl += at::where(r.gt(0), r * (r.clamp_min(std::numeric_limits<float>::min()).log() - log_tail.clamp_min(log_floor)),
                  0.0);
  const auto a = c * mass + u * r;
  const auto tail_coef = at::where(u.gt(0), r * (-log_tail).exp(), 0.0);  // u r / S
  auto grad = (a.unsqueeze(1) - tail_coef.unsqueeze(1) * in_tail) * p;
  grad.scatter_add_(1, idx, -(c.unsqueeze(1) * q));
  // where, not a product: a row outside the term may hold any teacher values, NaN among them.
  grad = at::where(selected.unsqueeze(1), grad * kl_coef, 0.0);
  kl = at::where(selected, kl, 0.0);
  float64_mlm_and_cosine(s2, labels, hs, ht, real_rows, ce_coef, cos_coef, grad, grad_hidden, partials);
  grad_logits.copy_(grad.reshape(s.sizes()));
  std::memcpy(partials.kl.data(), kl.contiguous().data_ptr<double>(), N * sizeof(double));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sparse_triple_loss_forward_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_topk_logits,
                               const at::Tensor& teacher_topk_indices, const at::Tensor& teacher_logsumexp,
                               const at::Tensor& labels, const at::Tensor& student_hidden,
                               const at::Tensor& teacher_hidden, const at::Tensor& attention_mask, double temperature,
                               double alpha_ce, double alpha_mlm, double alpha_cos, bool restrict_ce_to_mask,
                               c10::string_view tail) {
  check_inputs(student_logits, teacher_topk_logits, teacher_topk_indices, teacher_logsumexp, labels, student_hidden,
               teacher_hidden, attention_mask, temperature, alpha_ce, alpha_mlm, alpha_cos, tail);
  const auto s = student_logits.contiguous();
  const auto tk = teacher_topk_logits.contiguous();
  const auto ti = teacher_topk_indices.contiguous();
  const auto lse = teacher_logsumexp.contiguous();
  const auto hs = student_hidden.contiguous();
  const auto ht = teacher_hidden.contiguous();
  const auto lab = labels.contiguous();
  const auto real = attention_mask.ne(0).to(at::kByte).contiguous();
  const int64_t V = s.size(-1), K = tk.size(-1), N = lab.numel();
  const bool bucket = tail == "bucket", float64 = s.scalar_type() == at::kDouble;

  const int64_t* lab_p = lab.data_ptr<int64_t>();
  const uint8_t* real_p = real.data_ptr<uint8_t>();
  const RowCounts counts = count_rows(kOp, lab_p, real_p, N, V, restrict_ce_to_mask);
  check_indices(ti, counts.selected, V);

  // Every element of both gradients is written by the kernel, so no zero fill.
  auto grad_logits = gradient_buffer(student_logits.sizes(), student_logits.options());
  auto grad_hidden = hidden_gradient(student_hidden);
  RowPartials partials = row_partials(N);
  const double kl_coef = counts.n_selected ? alpha_ce * temperature / counts.n_selected : 0.0;
  const double ce_coef = counts.n_labelled ? alpha_mlm / counts.n_labelled : 0.0;
  const double cos_coef = counts.n_real ? alpha_cos / counts.n_real : 0.0;
  const double grad_scale = s.scalar_type() == at::kHalf ? fp16_logits_grad_scale(kl_coef + ce_coef) : 1.0;

  if (float64) {
    float64_rows(s, tk, ti, lse, lab, hs, ht, counts.selected, real, temperature, bucket, kl_coef * grad_scale,
                 ce_coef * grad_scale, cos_coef, grad_logits, grad_hidden, partials);
  } else {
    const SparseRowsArgs args{s.data_ptr(), tk.data_ptr(), ti.data_ptr(), lse.data_ptr(), lab_p,
                              grad_logits.data_ptr(), counts.selected.data(), V, K,
                              s.scalar_type(), tk.scalar_type(), ti.scalar_type(),
                              static_cast<float>(1.0 / temperature), temperature, kl_coef * grad_scale,
                              static_cast<float>(ce_coef * grad_scale), bucket,
                              temperature == 1.0 ? 1 : (temperature == 2.0 ? 2 : 0),
                              partials.kl.data(), partials.ce.data(),
                              hidden_args(hs, ht, grad_hidden, real_p, cos_coef, partials.cos.data())};
    const SparseRowsFn rows = sparse_rows_for(cpu_isa());
    // A row is ~30k elements: a grain of 4 rows keeps both cores busy down to small N.
    at::parallel_for(0, N, 4, [&](int64_t begin, int64_t end) {
      std::vector<float> es(V);
      std::vector<double> q(2 * K);
      std::vector<int64_t> index(K);
      std::vector<uint8_t> in_topk((V + 7) / 8 + kInTopkPad, 0);
      rows(args, begin, end, SparseScratch{es.data(), q.data(), q.data() + K, index.data(), in_topk.data()});
    });
  }
  auto [loss, loss_ce, loss_mlm, loss_cos, loss_mse] =
      loss_terms(counts, partials, temperature, alpha_ce, alpha_mlm, alpha_cos, 0.0, float64);
  return {loss, loss_ce, loss_mlm, loss_cos, loss_mse, grad_logits, grad_hidden, scalar_tensor(grad_scale, float64)};
}

TORCH_LIBRARY_IMPL(fastdistil, CPU, m) { m.impl("_sparse_triple_loss_forward", &sparse_triple_loss_forward_cpu); }

}  // namespace fastdistil
