"""How the fused losses store an fp16 gradient that they compute in the forward, before any loss scale exists.

A GradScaler multiplies the gradient by its scale (2^16 to start) in backward, but these ops compute and round
their gradient in the forward. Tail entries of the KL gradient, alpha_ce * T / n * p ~ 1e-9, lie below fp16's
smallest subnormal (6e-8): rounded unscaled they are 0, where the unfused reference, rounding once after the
scale, keeps them. So for fp16 logits the gradient is stored times a power of two P, the largest that keeps every
entry at most 2^15: |d loss / d s| <= kl_coef + ce_coef + mse_coef * max |s - t|, the weights of the KL, MLM and
MSE gradient terms (|q - p| and |softmax(s) - onehot| are at most 1, while the MSE term, 2 * alpha_mse / n *
(s - t), grows with the logits). With alpha_mse = 0 the bound is a constant and no logit is read for it.
Otherwise max |s - t| is bounded from the extremes of both logit tensors (max_logit_gap: one min/max reduction
of each, no temporary), the one read of the logits outside the kernel's pass, which only fp16 logits with
alpha_mse > 0 pay. A constant would not do: an fp32 teacher's logits have no bound, and fp16's own
(|s - t| <= 2 x 65504), once the MSE term dominates the bound, makes P some 2^11 smaller than logits within
+-20 allow, which loses the small entries again. Backward multiplies by grad_output / P in fp32 with one
rounding; P is exact, so that is the gradient rounded twice, within fp16's rounding of the reference's. bf16 has
fp32's exponent range and fp32 needs nothing: P = 1 there. The [N, D] hidden-state gradient is bounded by the
hidden states' norms, not by constants, so for fp16 it is kept in fp32 instead (it is small next to [N, V]).

csrc/triple_loss_cpu.cpp computes the same P on the host; this module is pure torch, so that it runs on the
device without a host synchronization and imports without Triton.
"""

import torch

# P * bound lies in (2^14, 2^15]: below fp16's largest finite value (65504) with room to spare.
GRAD_BOUND_EXPONENT = 15


def hidden_grad_dtype(student_hidden_dtype: torch.dtype) -> torch.dtype:
    """The dtype the forward keeps the hidden-state gradient in until backward scales it."""
    return torch.float32 if student_hidden_dtype == torch.float16 else student_hidden_dtype


def max_logit_gap(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """An upper bound of max |s - t| over the rows: a float64 0-dim tensor on the logits' device, from each
    tensor's minimum and maximum (csrc/triple_loss_cpu.cpp computes the same)."""
    if student_logits.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=student_logits.device)
    s_min, s_max = (x.double() for x in torch.aminmax(student_logits))
    t_min, t_max = (x.double() for x in torch.aminmax(teacher_logits))
    return torch.maximum(s_max - t_min, t_max - s_min)


def logits_grad_scale(counts: torch.Tensor, temperature: float, alpha_ce: float, alpha_mlm: float,
                      logits_dtype: torch.dtype, alpha_mse: float = 0.0,
                      logits: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """P, the factor the logits gradient is stored with: a 0-dim tensor on counts' device, fp32 (fp64 for fp64
    logits). counts: int64 [>= 2] (rows in the KL term, labelled rows) on the device, never read by the host.
    logits: (student, teacher), whose gap bounds the MSE gradient: needed, and read, only for fp16 logits with
    alpha_mse > 0."""
    loss_dtype = torch.float64 if logits_dtype == torch.float64 else torch.float32
    if logits_dtype != torch.float16:
        return torch.ones((), dtype=loss_dtype, device=counts.device)
    n_selected, n_labelled = counts[0].double(), counts[1].double()
    kl_coef = torch.where(n_selected > 0, alpha_ce * temperature / n_selected.clamp_min(1), 0.0)
    ce_coef = torch.where(n_labelled > 0, alpha_mlm / n_labelled.clamp_min(1), 0.0)
    bound = kl_coef + ce_coef
    if alpha_mse > 0:
        if logits is None:
            raise ValueError("logits_grad_scale: alpha_mse > 0 needs the logits, whose gap bounds the MSE gradient")
        mse_coef = torch.where(n_selected > 0, 2.0 * alpha_mse / n_selected.clamp_min(1), 0.0)
        bound = bound + mse_coef * max_logit_gap(*logits)
    exponent = torch.floor(torch.log2(2.0**GRAD_BOUND_EXPONENT / bound)).clamp(-126, 126)
    return torch.where(bound > 0, torch.exp2(exponent), 1.0).to(loss_dtype)
