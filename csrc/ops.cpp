// The fastdistil operator library: the schema of every op, here and nowhere else (pytorch/extension-cpp's
// layout). Each op's Python module (fastdistil/ops/) registers, in this order, its fake kernel, its autograd and
// its implementations per device; the CPU kernels of the triple loss are the C++ ones of triple_loss_cpu.cpp.
//
// The public ops (triple_loss, fused_linear_triple_loss, attention) are CompositeImplicitAutograd, in Python:
// each picks the implementation for its inputs' device and dtype and calls the private op that computes it.
// The private forwards of the two losses return their gradients too, computed in the same pass; their
// autograd (fastdistil/ops/precomputed.py) only scales them by grad_output in backward.

#include <torch/extension.h>

#include "cpu_isa.h"
#include "gradient_buffer.h"

TORCH_LIBRARY(fastdistil, m) {
  // --- the triple loss on logits (fastdistil/ops/triple_loss.py) ---
  // alpha_mse weighs the original distiller's logit MSE (--alpha_mse), a fourth term inside `loss`: the public
  // ops keep their four outputs, and the private forwards return loss_mse after loss_cos.
  m.def(
      "triple_loss(Tensor student_logits, Tensor teacher_logits, Tensor labels, Tensor student_hidden, "
      "Tensor teacher_hidden, Tensor attention_mask, float temperature=2.0, float alpha_ce=5.0, "
      "float alpha_mlm=2.0, float alpha_cos=1.0, bool restrict_ce_to_mask=False, float alpha_mse=0.0) "
      "-> (Tensor loss, Tensor loss_ce, Tensor loss_mlm, Tensor loss_cos)");
  // The gradient of `loss` with respect to student_logits (in its dtype, times logits_grad_scale, a power of
  // two that is 1 except for fp16 logits) and student_hidden (in its dtype, fp32 for fp16 hidden states): the
  // forward rounds the gradient before any loss scale reaches it, and these keep fp16's small entries
  // (kernels/gradient_scale.py says how).
  m.def(
      "_triple_loss_forward(Tensor student_logits, Tensor teacher_logits, Tensor labels, Tensor student_hidden, "
      "Tensor teacher_hidden, Tensor attention_mask, float temperature, float alpha_ce, float alpha_mlm, "
      "float alpha_cos, bool restrict_ce_to_mask, float alpha_mse=0.0) "
      "-> (Tensor loss, Tensor loss_ce, Tensor loss_mlm, Tensor loss_cos, Tensor loss_mse, "
      "Tensor grad_student_logits, Tensor grad_student_hidden, Tensor logits_grad_scale)");
  // Writes the gradient into caller-owned buffers: a training loop that reuses them every step does not pay
  // for allocating and first-touching an [N, V] tensor each time. No autograd. The logits gradient is written
  // times logits_grad_scale (a caller under a loss scale passes a power of two near it, so that fp16 keeps the
  // small entries); grad_student_hidden may be float32 instead of student_hidden's dtype.
  m.def(
      "triple_loss_out(Tensor student_logits, Tensor teacher_logits, Tensor labels, Tensor student_hidden, "
      "Tensor teacher_hidden, Tensor attention_mask, float temperature, float alpha_ce, float alpha_mlm, "
      "float alpha_cos, bool restrict_ce_to_mask, float alpha_mse=0.0, *, Tensor(a!) grad_student_logits, "
      "Tensor(b!) grad_student_hidden, float logits_grad_scale=1.0) "
      "-> (Tensor loss, Tensor loss_ce, Tensor loss_mlm, Tensor loss_cos)");
  // The backward of the precomputed gradients: grad *= scale in place (scale: a one-element fp32 tensor on
  // grad's device), in fp32 with a single rounding, and nothing at all when scale is exactly 1.
  m.def("_scale_gradient_(Tensor(a!) grad, Tensor scale) -> ()");

  // --- the triple loss against a cached top-k teacher (sparse_triple_loss.py) ---
  // The teacher is its top-k raw logits, their indices (int16, int32 or int64) and its log-sum-exp over the
  // whole vocabulary at T = 1 and at T ([..., 2] fp32): the top-k probabilities are exact, and `tail` says what
  // becomes of the rest of the teacher's mass: "bucket" (one more class, matched against the student's tail) or
  // "renormalize" (the top-k renormalized to sum to 1). No MSE term: it needs every teacher logit (loss_mse 0).
  m.def(
      "sparse_triple_loss(Tensor student_logits, Tensor teacher_topk_logits, Tensor teacher_topk_indices, "
      "Tensor teacher_logsumexp, Tensor labels, Tensor student_hidden, Tensor teacher_hidden, "
      "Tensor attention_mask, float temperature=2.0, float alpha_ce=5.0, float alpha_mlm=2.0, "
      "float alpha_cos=1.0, bool restrict_ce_to_mask=False, str tail=\"bucket\") "
      "-> (Tensor loss, Tensor loss_ce, Tensor loss_mlm, Tensor loss_cos)");
  m.def(
      "_sparse_triple_loss_forward(Tensor student_logits, Tensor teacher_topk_logits, Tensor teacher_topk_indices, "
      "Tensor teacher_logsumexp, Tensor labels, Tensor student_hidden, Tensor teacher_hidden, "
      "Tensor attention_mask, float temperature, float alpha_ce, float alpha_mlm, float alpha_cos, "
      "bool restrict_ce_to_mask, str tail) "
      "-> (Tensor loss, Tensor loss_ce, Tensor loss_mlm, Tensor loss_cos, Tensor loss_mse, "
      "Tensor grad_student_logits, Tensor grad_student_hidden, Tensor logits_grad_scale)");

  // --- the vocabulary projections and the triple loss, chunk by chunk (fused_linear_triple_loss.py) ---
  m.def(
      "fused_linear_triple_loss(Tensor student_input, Tensor student_weight, Tensor? student_bias, "
      "Tensor teacher_input, Tensor teacher_weight, Tensor? teacher_bias, Tensor labels, Tensor student_hidden, "
      "Tensor teacher_hidden, Tensor attention_mask, float temperature=2.0, float alpha_ce=5.0, "
      "float alpha_mlm=2.0, float alpha_cos=1.0, bool restrict_ce_to_mask=False, int chunk_size=0, "
      "float alpha_mse=0.0) -> (Tensor loss, Tensor loss_ce, Tensor loss_mlm, Tensor loss_cos)");
  // The gradients in the inputs' dtypes (fp32 for fp16 inputs), the input, weight and bias ones times
  // logits_grad_scale.
  m.def(
      "_fused_linear_triple_loss_forward(Tensor student_input, Tensor student_weight, Tensor? student_bias, "
      "Tensor teacher_input, Tensor teacher_weight, Tensor? teacher_bias, Tensor labels, Tensor student_hidden, "
      "Tensor teacher_hidden, Tensor attention_mask, float temperature=2.0, float alpha_ce=5.0, "
      "float alpha_mlm=2.0, float alpha_cos=1.0, bool restrict_ce_to_mask=False, int chunk_size=0, "
      "float alpha_mse=0.0) -> (Tensor loss, Tensor loss_ce, Tensor loss_mlm, Tensor loss_cos, Tensor loss_mse, "
      "Tensor grad_student_input, Tensor grad_student_weight, Tensor grad_student_bias, "
      "Tensor grad_student_hidden, Tensor logits_grad_scale)");
  // The same chunk by chunk against a cached top-k teacher (fused_linear_sparse_triple_loss.py): the student's
  // projection only, the teacher being sparse_triple_loss's.
  m.def(
      "fused_linear_sparse_triple_loss(Tensor student_input, Tensor student_weight, Tensor? student_bias, "
      "Tensor teacher_topk_logits, Tensor teacher_topk_indices, Tensor teacher_logsumexp, Tensor labels, "
      "Tensor student_hidden, Tensor teacher_hidden, Tensor attention_mask, float temperature=2.0, "
      "float alpha_ce=5.0, float alpha_mlm=2.0, float alpha_cos=1.0, bool restrict_ce_to_mask=False, "
      "str tail=\"bucket\", int chunk_size=0) -> (Tensor loss, Tensor loss_ce, Tensor loss_mlm, Tensor loss_cos)");
  m.def(
      "_fused_linear_sparse_triple_loss_forward(Tensor student_input, Tensor student_weight, Tensor? student_bias, "
      "Tensor teacher_topk_logits, Tensor teacher_topk_indices, Tensor teacher_logsumexp, Tensor labels, "
      "Tensor student_hidden, Tensor teacher_hidden, Tensor attention_mask, float temperature=2.0, "
      "float alpha_ce=5.0, float alpha_mlm=2.0, float alpha_cos=1.0, bool restrict_ce_to_mask=False, "
      "str tail=\"bucket\", int chunk_size=0) -> (Tensor loss, Tensor loss_ce, Tensor loss_mlm, Tensor loss_cos, "
      "Tensor loss_mse, Tensor grad_student_input, Tensor grad_student_weight, Tensor grad_student_bias, "
      "Tensor grad_student_hidden, Tensor logits_grad_scale)");

  // --- the student's attention (attention.py) ---
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask=None, float dropout_p=0.0, "
      "float? scale=None, bool is_causal=False) -> Tensor");
  // (out [B, H, L, Dh], logsumexp [B, H, L] fp32); seed: the [1] int64 Philox seed of the dropout.
  m.def(
      "_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool is_causal, "
      "float dropout_p, float scale, Tensor seed) -> (Tensor, Tensor)");
  m.def(
      "_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, "
      "bool is_causal, Tensor seed, Tensor out, Tensor lse, float dropout_p, float scale) "
      "-> (Tensor, Tensor, Tensor)");
}

// A real Python module, so that `import fastdistil._C` loads this library and runs the registrations above.
PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdistil CPU kernels; the operators live in torch.ops.fastdistil";
  m.def("cpu_isa", &fastdistil::cpu_isa_name, "Instruction set the CPU kernels dispatch to.");
  m.def("set_cpu_isa", &fastdistil::set_cpu_isa,
        "Force the CPU kernels onto 'avx512', 'avx2' or 'vec128' (for tests), or 'auto' for the best this CPU runs.");
  m.def("supported_cpu_isas", &fastdistil::supported_cpu_isas, "Instruction sets this CPU can run.");
  m.def("release_gradient_cache", &fastdistil::release_gradient_cache,
        "Frees the idle [N, V] gradient buffer the CPU op keeps between steps; returns its size in bytes.");
  m.def("gradient_cache_bytes", &fastdistil::gradient_cache_bytes, "Bytes held by the idle gradient buffer.");
}
