// CPU implementation of fastdistil::_triple_loss_forward and fastdistil::triple_loss_out.
//
// Rows are independent: at::parallel_for hands each thread a range of rows; every row writes its own gradient
// row and its own loss partials, and the partials are summed in row order afterwards, so the result does not
// depend on the number of threads. Rows that contribute nothing (padding without a label; non-target rows
// under restrict_ce_to_mask) only get their gradient row zeroed.
//
// fp16: the logits gradient is written times a power of two P, and the hidden-state gradient of fp16 hidden
// states in fp32, so that the loss scale backward applies later cannot find them underflowed.
// kernels/gradient_scale.py explains the rule and computes the same P on the device for the Triton kernel.
//
// The loss terms, in the order of the private forward's outputs: loss, loss_ce, loss_mlm, loss_cos, loss_mse.
//
// The host code that the sparse loss (sparse_triple_loss_cpu.cpp) shares is defined here too, declared in
// triple_loss.h: the input checks, the row counts, the loss terms, the float64 MLM and cosine terms.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "cpu_isa.h"
#include "gradient_buffer.h"
#include "triple_loss.h"

namespace fastdistil {

namespace {

bool is_logit_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

}  // namespace

// --- shared with sparse_triple_loss_cpu.cpp (triple_loss.h) ---

void check_logit_inputs(const char* op, const at::Tensor& s, c10::ArrayRef<NamedTensor> others,
                        c10::ArrayRef<NamedTensor> floating) {
  for (const auto& [name, tensor] : others) {
    TORCH_CHECK(tensor->device() == s.device(), op, ": ", name, " is on ", tensor->device(),
                " but student_logits is on ", s.device(), "; expected all inputs on one device");
  }
  const bool float64 = s.scalar_type() == at::kDouble;
  for (const auto& [name, tensor] : floating) {
    if (float64) {
      TORCH_CHECK(tensor->scalar_type() == at::kDouble, op, ": ", name,
                  " must be float64 like student_logits (float64 is for gradient checks), got ", tensor->scalar_type());
    } else {
      TORCH_CHECK(is_logit_dtype(tensor->scalar_type()), op, ": ", name,
                  " must be float32, bfloat16 or float16, got ", tensor->scalar_type());
    }
  }
  TORCH_CHECK(s.dim() >= 1 && s.size(-1) > 0, op, ": student_logits must be [..., V] with V > 0, got shape ",
              s.sizes());
}

void check_row_inputs(const char* op, const at::Tensor& s, const at::Tensor& labels, const at::Tensor& hs,
                      const at::Tensor& ht, const at::Tensor& mask, double temperature,
                      c10::ArrayRef<std::pair<const char*, double>> alphas) {
  const auto lead = s.sizes().slice(0, s.dim() - 1);
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.sizes() == lead, op, ": labels must have shape ", lead, " (student_logits without V), got ",
              labels.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool || at::isIntegralType(mask.scalar_type(), /*includeBool=*/false), op,
              ": attention_mask must be bool or integer, got ", mask.scalar_type());
  TORCH_CHECK(mask.sizes() == lead, op, ": attention_mask must have shape ", lead, ", got ", mask.sizes());
  TORCH_CHECK(hs.dim() >= 1 && hs.size(-1) > 0 && hs.sizes().slice(0, hs.dim() - 1) == lead, op,
              ": student_hidden must have shape [", lead, ", D] with D > 0, got ", hs.sizes());
  TORCH_CHECK(ht.sizes() == hs.sizes(), op, ": teacher_hidden must have the shape of student_hidden ", hs.sizes(),
              ", got ", ht.sizes());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be > 0 and finite, got ",
              temperature);
  for (const auto& [name, value] : alphas) {
    TORCH_CHECK(std::isfinite(value) && value >= 0, op, ": ", name, " must be >= 0 and finite, got ", value);
  }
}

RowCounts count_rows(const char* op, const int64_t* labels, const uint8_t* real, int64_t N, int64_t V,
                     bool restrict_ce_to_mask) {
  RowCounts out;
  out.selected.resize(N);
  for (int64_t r = 0; r < N; ++r) {
    const int64_t y = labels[r];
    TORCH_CHECK(y == -100 || (y >= 0 && y < V), op, ": labels must be in [0, ", V, ") or -100 (not a target), got ",
                y, " at flat position ", r);
    out.selected[r] = restrict_ce_to_mask ? (y != -100) : real[r];
    out.n_selected += out.selected[r];
    out.n_labelled += y != -100;
    out.n_real += real[r];
  }
  return out;
}

RowPartials row_partials(int64_t N) {
  return {std::vector<double>(N, 0.0), std::vector<double>(N, 0.0), std::vector<double>(N, 0.0),
          std::vector<double>(N, 0.0)};
}

Terms loss_terms(const RowCounts& counts, const RowPartials& partials, double temperature, double alpha_ce,
                 double alpha_mlm, double alpha_cos, double alpha_mse, bool float64) {
  double kl = 0.0, ce = 0.0, cos = 0.0, sq = 0.0;
  for (size_t r = 0; r < partials.kl.size(); ++r) {
    kl += partials.kl[r];
    ce += partials.ce[r];
    cos += partials.cos[r];
    sq += partials.mse[r];
  }
  const int64_t n_selected = counts.n_selected, n_labelled = counts.n_labelled, n_real = counts.n_real;
  const double loss_ce = n_selected ? kl * temperature * temperature / n_selected : 0.0;
  const double loss_mlm = n_labelled ? ce / n_labelled : 0.0;
  const double loss_cos = n_real ? cos / n_real : 0.0;
  const double loss_mse = n_selected ? sq / n_selected : 0.0;
  const double loss = alpha_ce * loss_ce + alpha_mlm * loss_mlm + alpha_cos * loss_cos + alpha_mse * loss_mse;
  return {scalar_tensor(loss, float64), scalar_tensor(loss_ce, float64), scalar_tensor(loss_mlm, float64),
          scalar_tensor(loss_cos, float64), scalar_tensor(loss_mse, float64)};
}

// The loss terms are fp32 scalars, float64 for float64 inputs (gradcheck needs the extra digits).
at::Tensor scalar_tensor(double v, bool float64) {
  return at::scalar_tensor(v, at::TensorOptions().dtype(float64 ? at::kDouble : at::kFloat));
}

// 2^k with P * bound in (2^14, 2^15], 1 when no row has a gradient.
double fp16_logits_grad_scale(double bound) {
  if (!(bound > 0)) return 1.0;
  const double exponent = std::floor(std::log2(32768.0 / bound));
  return std::ldexp(1.0, static_cast<int>(std::clamp(exponent, -126.0, 126.0)));
}

at::Tensor hidden_gradient(const at::Tensor& student_hidden) {
  const auto dtype = student_hidden.scalar_type() == at::kHalf ? at::kFloat : student_hidden.scalar_type();
  return at::empty(student_hidden.sizes(),
                   student_hidden.options().dtype(dtype).memory_format(at::MemoryFormat::Contiguous));
}

HiddenArgs hidden_args(const at::Tensor& hs, const at::Tensor& ht, at::Tensor& grad_hidden, const uint8_t* real,
                       double cos_coef, double* cos_rows) {
  return {hs.data_ptr(),     ht.data_ptr(),     grad_hidden.data_ptr(),    real, hs.size(-1),
          hs.scalar_type(), ht.scalar_type(), grad_hidden.scalar_type(), static_cast<float>(cos_coef), cos_rows};
}

void float64_mlm_and_cosine(const at::Tensor& s2, const at::Tensor& labels, const at::Tensor& hs,
                            const at::Tensor& ht, const at::Tensor& real_rows, double ce_coef, double cos_coef,
                            at::Tensor& grad, at::Tensor& grad_hidden, RowPartials& partials) {
  const int64_t N = s2.size(0), D = hs.size(-1);
  const auto opts = s2.options();
  const auto lab = labels.reshape({N});
  const auto labelled = lab.ne(-100).to(opts);
  const auto target = lab.clamp_min(0).unsqueeze(1);
  const auto log_sm = at::log_softmax(s2, -1);
  const auto ce = -log_sm.gather(1, target).squeeze(1) * labelled;
  grad += (log_sm.exp() - at::zeros_like(s2).scatter_(1, target, 1.0)) * (labelled * ce_coef).unsqueeze(1);
  const auto hs2 = hs.reshape({N, D}), ht2 = ht.reshape({N, D});
  const auto real = real_rows.reshape({N}).to(opts);
  const auto ss = (hs2 * hs2).sum(-1) + 1e-12, tt = (ht2 * ht2).sum(-1) + 1e-12;
  const auto denom = (ss * tt).sqrt();
  const auto cos = (hs2 * ht2).sum(-1) / denom;
  const auto grad_h = (ht2 / denom.unsqueeze(1) - hs2 * (cos / ss).unsqueeze(1)) * (real * -cos_coef).unsqueeze(1);
  grad_hidden.copy_(grad_h.reshape(hs.sizes()));
  const auto cos_loss = (1.0 - cos) * real;
  std::memcpy(partials.ce.data(), ce.contiguous().data_ptr<double>(), N * sizeof(double));
  std::memcpy(partials.cos.data(), cos_loss.contiguous().data_ptr<double>(), N * sizeof(double));
}

namespace {

RowsFn rows_for(CpuIsa isa) {
  if (isa == CpuIsa::Avx512) return &avx512::rows;
  if (isa == CpuIsa::Avx2) return &avx2::rows;
  return &vec128::rows;
}

// float64 exists for torch.autograd.gradcheck: the row kernels' formulas (same normalizers, same gradient,
// same zero rows) written with ATen ops in double precision. Fills the per-row partials and both gradients.
void float64_rows(const at::Tensor& s, const at::Tensor& t, const at::Tensor& labels, const at::Tensor& hs,
                  const at::Tensor& ht, const std::vector<uint8_t>& selected_rows, const at::Tensor& real_rows,
                  double temperature, double kl_coef, double ce_coef, double cos_coef, double mse_coef,
                  at::Tensor& grad_logits, at::Tensor& grad_hidden, RowPartials& partials) {
  const int64_t N = labels.numel(), V = s.size(-1);
  const auto opts = s.options();
  const auto s2 = s.reshape({N, V}), t2 = t.reshape({N, V});
  const auto selected = at::from_blob(const_cast<uint8_t*>(selected_rows.data()), {N}, at::kByte).to(opts);
  const auto log_q = at::log_softmax(s2 / temperature, -1), log_p = at::log_softmax(t2 / temperature, -1);
  const auto p = log_p.exp();
  const auto kl = (p * (log_p - log_q)).sum(-1) * selected;
  auto grad = (log_q.exp() - p) * (selected * kl_coef).unsqueeze(1);
  const auto diff = s2 - t2;
  const auto mse = (diff * diff).sum(-1) * selected;
  grad += diff * (selected * mse_coef).unsqueeze(1);
  float64_mlm_and_cosine(s2, labels, hs, ht, real_rows, ce_coef, cos_coef, grad, grad_hidden, partials);
  grad_logits.copy_(grad.reshape(s.sizes()));
  std::memcpy(partials.kl.data(), kl.contiguous().data_ptr<double>(), N * sizeof(double));
  std::memcpy(partials.mse.data(), mse.contiguous().data_ptr<double>(), N * sizeof(double));
}

// Every check runs before anything is written, so a bad call leaves the output buffers as they were.
void check_inputs(const at::Tensor& s, const at::Tensor& t, const at::Tensor& labels, const at::Tensor& hs,
                  const at::Tensor& ht, const at::Tensor& mask, double temperature, double alpha_ce,
                  double alpha_mlm, double alpha_cos, double alpha_mse) {
  constexpr const char* op = "triple_loss";
  check_logit_inputs(op, s,
                     {{"teacher_logits", &t}, {"labels", &labels}, {"student_hidden", &hs}, {"teacher_hidden", &ht},
                      {"attention_mask", &mask}},
                     {{"student_logits", &s}, {"teacher_logits", &t}, {"student_hidden", &hs},
                      {"teacher_hidden", &ht}});
  TORCH_CHECK(t.sizes() == s.sizes(), op, ": teacher_logits must have the shape of student_logits ", s.sizes(),
              ", got ", t.sizes());
  check_row_inputs(op, s, labels, hs, ht, mask, temperature,
                   {{"alpha_ce", alpha_ce}, {"alpha_mlm", alpha_mlm}, {"alpha_cos", alpha_cos},
                    {"alpha_mse", alpha_mse}});
}

// max |s - t| over all rows is at most this (kernels/gradient_scale.py's max_logit_gap): one min/max reduction
// of each tensor.
double max_logit_gap(const at::Tensor& s, const at::Tensor& t) {
  if (s.numel() == 0) return 0.0;
  const auto [s_min, s_max] = at::aminmax(s);
  const auto [t_min, t_max] = at::aminmax(t);
  return std::max(s_max.item<double>() - t_min.item<double>(), t_max.item<double>() - s_min.item<double>());
}

// The loss terms of one call, and the factor its logits gradient was written with.
struct Result {
  Terms terms;
  double logits_grad_scale;
};

// logits_grad_scale: what the written logits gradient is multiplied by; nullopt picks P
// for fp16 logits and 1 otherwise.
Result run(const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& labels,
           const at::Tensor& student_hidden, const at::Tensor& teacher_hidden, const at::Tensor& attention_mask,
           double temperature, double alpha_ce, double alpha_mlm, double alpha_cos, bool restrict_ce_to_mask,
           double alpha_mse, at::Tensor& grad_student_logits, at::Tensor& grad_student_hidden,
           std::optional<double> logits_grad_scale) {
  check_inputs(student_logits, teacher_logits, labels, student_hidden, teacher_hidden, attention_mask, temperature,
               alpha_ce, alpha_mlm, alpha_cos, alpha_mse);
  TORCH_CHECK(grad_student_logits.sizes() == student_logits.sizes() &&
                  grad_student_logits.scalar_type() == student_logits.scalar_type() &&
                  grad_student_logits.is_contiguous() && grad_student_logits.device() == student_logits.device(),
              "triple_loss_out: grad_student_logits must be a contiguous ", student_logits.scalar_type(),
              " tensor of shape ", student_logits.sizes(), " on ", student_logits.device());
  const bool hidden_grad_dtype_ok = grad_student_hidden.scalar_type() == student_hidden.scalar_type() ||
                                    (grad_student_hidden.scalar_type() == at::kFloat &&
                                     student_hidden.scalar_type() != at::kDouble);
  TORCH_CHECK(grad_student_hidden.sizes() == student_hidden.sizes() && hidden_grad_dtype_ok &&
                  grad_student_hidden.is_contiguous() && grad_student_hidden.device() == student_hidden.device(),
              "triple_loss_out: grad_student_hidden must be a contiguous ", student_hidden.scalar_type(),
              " (or float32) tensor of shape ", student_hidden.sizes(), " on ", student_hidden.device());
  TORCH_CHECK(!grad_student_logits.is_same(student_logits) && !grad_student_logits.is_same(teacher_logits),
              "triple_loss_out: grad_student_logits must not be one of the logit inputs");
  TORCH_CHECK(!logits_grad_scale || (std::isfinite(*logits_grad_scale) && *logits_grad_scale > 0),
              "triple_loss_out: logits_grad_scale must be a positive finite number, got ",
              logits_grad_scale.value_or(0.0));

  const auto s = student_logits.contiguous();
  const auto t = teacher_logits.contiguous();
  const auto hs = student_hidden.contiguous();
  const auto ht = teacher_hidden.contiguous();
  const auto lab = labels.contiguous();
  const auto real = attention_mask.ne(0).to(at::kByte).contiguous();
  const int64_t V = s.size(-1), N = lab.numel();

  // Row masks, normalizers and the label range check, before any write.
  const int64_t* lab_p = lab.data_ptr<int64_t>();
  const uint8_t* real_p = real.data_ptr<uint8_t>();
  const RowCounts counts = count_rows("triple_loss", lab_p, real_p, N, V, restrict_ce_to_mask);
  const std::vector<uint8_t>& selected = counts.selected;
  const int64_t n_selected = counts.n_selected, n_labelled = counts.n_labelled, n_real = counts.n_real;

  RowPartials partials = row_partials(N);
  // Weights of the gradient terms: d loss / d s = kl_coef * (q - p) + ce_coef * (softmax(s) - onehot) +
  // mse_coef * (s - t).
  const double kl_coef = n_selected ? alpha_ce * temperature / n_selected : 0.0;
  const double ce_coef = n_labelled ? alpha_mlm / n_labelled : 0.0;
  const double cos_coef = n_real ? alpha_cos / n_real : 0.0;
  const double mse_coef = n_selected ? 2.0 * alpha_mse / n_selected : 0.0;
  const auto fp16_scale = [&] {
    return fp16_logits_grad_scale(kl_coef + ce_coef + (mse_coef > 0 ? mse_coef * max_logit_gap(s, t) : 0.0));
  };
  const double grad_scale = logits_grad_scale ? *logits_grad_scale
                                              : (s.scalar_type() == at::kHalf ? fp16_scale() : 1.0);
  const RowsArgs args{s.data_ptr(), t.data_ptr(), lab_p, grad_student_logits.data_ptr(), selected.data(), V,
                      s.scalar_type(), t.scalar_type(),
                      static_cast<float>(1.0 / temperature), static_cast<float>(kl_coef * grad_scale),
                      static_cast<float>(ce_coef * grad_scale), static_cast<float>(mse_coef * grad_scale),
                      temperature == 1.0 ? 1 : (temperature == 2.0 ? 2 : 0),
                      partials.kl.data(), partials.ce.data(), partials.mse.data(),
                      hidden_args(hs, ht, grad_student_hidden, real_p, cos_coef, partials.cos.data())};

  if (s.scalar_type() == at::kDouble) {
    float64_rows(s, t, lab, hs, ht, selected, real, temperature, kl_coef * grad_scale, ce_coef * grad_scale, cos_coef,
                 mse_coef * grad_scale, grad_student_logits, grad_student_hidden, partials);
  } else {
    const RowsFn rows = rows_for(cpu_isa());
    // A row is ~30k elements: a grain of 4 rows keeps both cores busy down to small N.
    at::parallel_for(0, N, 4, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(2 * V);
      rows(args, begin, end, scratch.data());
    });
  }
  return {loss_terms(counts, partials, temperature, alpha_ce, alpha_mlm, alpha_cos, alpha_mse,
                     s.scalar_type() == at::kDouble),
          grad_scale};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> triple_loss_out_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& labels,
    const at::Tensor& student_hidden, const at::Tensor& teacher_hidden, const at::Tensor& attention_mask,
    double temperature, double alpha_ce, double alpha_mlm, double alpha_cos, bool restrict_ce_to_mask,
    double alpha_mse, at::Tensor& grad_student_logits, at::Tensor& grad_student_hidden, double logits_grad_scale) {
  // The public op's four outputs: loss_mse is in loss, and out of the schema that callers unpack.
  auto [loss, loss_ce, loss_mlm, loss_cos, loss_mse] =
      run(student_logits, teacher_logits, labels, student_hidden, teacher_hidden, attention_mask, temperature,
          alpha_ce, alpha_mlm, alpha_cos, restrict_ce_to_mask, alpha_mse, grad_student_logits, grad_student_hidden,
          logits_grad_scale)
          .terms;
  return {loss, loss_ce, loss_mlm, loss_cos};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
triple_loss_forward_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& labels,
                        const at::Tensor& student_hidden, const at::Tensor& teacher_hidden,
                        const at::Tensor& attention_mask, double temperature, double alpha_ce, double alpha_mlm,
                        double alpha_cos, bool restrict_ce_to_mask, double alpha_mse) {
  // Every element of both gradients is written by the kernel, so no zero fill.
  auto grad_logits = gradient_buffer(student_logits.sizes(), student_logits.options());
  auto grad_hidden = hidden_gradient(student_hidden);
  auto result = run(student_logits, teacher_logits, labels, student_hidden, teacher_hidden, attention_mask,
                    temperature, alpha_ce, alpha_mlm, alpha_cos, restrict_ce_to_mask, alpha_mse, grad_logits,
                    grad_hidden, std::nullopt);
  auto [loss, loss_ce, loss_mlm, loss_cos, loss_mse] = result.terms;
  return {loss, loss_ce, loss_mlm, loss_cos, loss_mse, grad_logits, grad_hidden,
          scalar_tensor(result.logits_grad_scale, student_logits.scalar_type() == at::kDouble)};
}

void scale_gradient_cpu(at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK(scale.numel() == 1, "_scale_gradient_: scale must have one element, got shape ", scale.sizes());
  TORCH_CHECK(grad.is_contiguous(), "_scale_gradient_: grad must be contiguous");
  const double value = scale.item<double>();  // a CPU scalar: reading it costs nothing
  if (value == 1.0) return;
  if (!at::isReducedFloatingType(grad.scalar_type())) {
    grad.mul_(value);
    return;
  }
  // ATen would round the scale to the 16-bit dtype first (1.7 -> 1.703125 in bf16): multiply in fp32.
  const float factor = static_cast<float>(value);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(grad.scalar_type(), "scale_gradient", [&] {
    scalar_t* data = grad.data_ptr<scalar_t>();
    at::parallel_for(0, grad.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) data[i] = static_cast<scalar_t>(static_cast<float>(data[i]) * factor);
    });
  });
}

TORCH_LIBRARY_IMPL(fastdistil, CPU, m) {
  m.impl("_scale_gradient_", &scale_gradient_cpu);
  m.impl("_triple_loss_forward", &triple_loss_forward_cpu);
  m.impl("triple_loss_out", &triple_loss_out_cpu);
}

}  // namespace fastdistil
