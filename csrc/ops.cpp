// The fastdistil operator library: every schema is defined here, once.
//
// triple_loss is the public contract. It is CompositeImplicitAutograd: it calls _triple_loss_forward, which
// computes the loss terms and the gradient of the weighted loss in the same pass, and whose autograd formula
// (registered from Python, fastdistil/triple_loss.py) only scales that gradient. Device kernels register
// against _triple_loss_forward (CPU: triple_loss_cpu.cpp; CUDA: kernels/triple_loss.py through Triton).

#include <torch/extension.h>

#include "cpu_isa.h"
#include "gradient_buffer.h"

namespace fastdistil {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> triple_loss(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& labels,
    const at::Tensor& student_hidden, const at::Tensor& teacher_hidden, const at::Tensor& attention_mask,
    double temperature, double alpha_ce, double alpha_mlm, double alpha_cos, bool restrict_ce_to_mask) {
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("fastdistil::_triple_loss_forward", "")
                            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                              at::Tensor>(
                                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, double, double, double, double, bool)>();
  auto out = forward.call(student_logits, teacher_logits, labels, student_hidden, teacher_hidden, attention_mask,
                          temperature, alpha_ce, alpha_mlm, alpha_cos, restrict_ce_to_mask);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out)};
}

TORCH_LIBRARY(fastdistil, m) {
  m.def(
      "triple_loss(Tensor student_logits, Tensor teacher_logits, Tensor labels, Tensor student_hidden, "
      "Tensor teacher_hidden, Tensor attention_mask, float temperature=2.0, float alpha_ce=5.0, "
      "float alpha_mlm=2.0, float alpha_cos=1.0, bool restrict_ce_to_mask=False) "
      "-> (Tensor loss, Tensor loss_ce, Tensor loss_mlm, Tensor loss_cos)");
  // The same computation, also returning the gradient of `loss` with respect to student_logits (in its dtype,
  // times logits_grad_scale, a power of two that is 1 except for fp16 logits) and student_hidden (in its dtype,
  // fp32 for fp16 hidden states): the forward rounds the gradient before any loss scale reaches it, and these
  // keep fp16's small entries (kernels/gradient_scale.py says how). What the device kernels implement.
  m.def(
      "_triple_loss_forward(Tensor student_logits, Tensor teacher_logits, Tensor labels, Tensor student_hidden, "
      "Tensor teacher_hidden, Tensor attention_mask, float temperature, float alpha_ce, float alpha_mlm, "
      "float alpha_cos, bool restrict_ce_to_mask) "
      "-> (Tensor loss, Tensor loss_ce, Tensor loss_mlm, Tensor loss_cos, Tensor grad_student_logits, "
      "Tensor grad_student_hidden, Tensor logits_grad_scale)");
  // Writes the gradient into caller-owned buffers: a training loop that reuses them every step does not pay
  // for allocating and first-touching an [N, V] tensor each time. No autograd. The logits gradient is written
  // times logits_grad_scale (a caller under a loss scale passes a power of two near it, so that fp16 keeps the
  // small entries); grad_student_hidden may be float32 instead of student_hidden's dtype.
  m.def(
      "triple_loss_out(Tensor student_logits, Tensor teacher_logits, Tensor labels, Tensor student_hidden, "
      "Tensor teacher_hidden, Tensor attention_mask, float temperature, float alpha_ce, float alpha_mlm, "
      "float alpha_cos, bool restrict_ce_to_mask, *, Tensor(a!) grad_student_logits, "
      "Tensor(b!) grad_student_hidden, float logits_grad_scale=1.0) "
      "-> (Tensor loss, Tensor loss_ce, Tensor loss_mlm, Tensor loss_cos)");
  // Backward of _triple_loss_forward: grad *= scale in place (scale is grad_output, a 0-dim fp32 tensor), in
  // fp32 with a single rounding, and nothing at all when scale is exactly 1.
  m.def("_scale_gradient_(Tensor(a!) grad, Tensor scale) -> ()");
}

TORCH_LIBRARY_IMPL(fastdistil, CompositeImplicitAutograd, m) {
  m.impl("triple_loss", &triple_loss);
}

}  // namespace fastdistil

// A real Python module, so that `import fastdistil._C` loads this library and runs the registrations above.
PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdistil CPU kernels; the operators live in torch.ops.fastdistil";
  m.def("cpu_isa", &fastdistil::cpu_isa_name, "Instruction set the CPU kernels dispatch to.");
  m.def("set_cpu_isa", &fastdistil::set_cpu_isa,
        "Force the CPU kernels onto 'avx512', 'avx2' or 'scalar' (for tests), or 'auto' for the best this CPU runs.");
  m.def("supported_cpu_isas", &fastdistil::supported_cpu_isas, "Instruction sets this CPU can run.");
  m.def("release_gradient_cache", &fastdistil::release_gradient_cache,
        "Frees the idle [N, V] gradient buffer the CPU op keeps between steps; returns its size in bytes.");
  m.def("gradient_cache_bytes", &fastdistil::gradient_cache_bytes, "Bytes held by the idle gradient buffer.");
}
