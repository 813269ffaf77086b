"""The unfused triple loss, written as the original Hugging Face distiller writes it (distiller.py, MLM mode).

This is the ground truth of every test and the baseline of every benchmark: masked_select copies of the
selected rows, log_softmax / softmax at temperature T, KLDivLoss(batchmean) times T^2, CrossEntropyLoss on the
full student logits at T = 1, CosineEmbeddingLoss on the non-padding hidden states, and --alpha_mse's
MSELoss(sum) of the selected raw logits over their number of rows. The only departures are the ones
fastdistil's contract adds: empty selections give 0 instead of NaN, each term is computed in fp32 (the recipe
ran its losses in fp32 under apex O1 too), and loss_mse is computed for logging even when alpha_mse is 0 (the
original skips it then).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdistil.ops.values import TripleLossOutput


def triple_loss_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                          student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor,
                          temperature: float = 2.0, alpha_ce: float = 5.0, alpha_mlm: float = 2.0,
                          alpha_cos: float = 1.0, restrict_ce_to_mask: bool = False,
                          alpha_mse: float = 0.0) -> TripleLossOutput:
    """Weighted DistilBERT loss and its four unweighted terms (fp32 scalars; float64 for float64 inputs)."""
    compute = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    s_logits = student_logits.to(compute)
    t_logits = teacher_logits.to(compute)
    s_hidden = student_hidden.to(compute)
    t_hidden = teacher_hidden.to(compute)
    attention_mask = attention_mask.bool()
    vocab = s_logits.size(-1)
    dim = s_hidden.size(-1)

    if restrict_ce_to_mask:
        mask = (labels > -1).unsqueeze(-1).expand_as(s_logits)
    else:
        mask = attention_mask.unsqueeze(-1).expand_as(s_logits)
    s_logits_slct = torch.masked_select(s_logits, mask).view(-1, vocab)
    t_logits_slct = torch.masked_select(t_logits, mask).view(-1, vocab)
    zero = s_logits.sum() * 0  # keeps the autograd graph (and a zero gradient) for empty selections
    if s_logits_slct.size(0) > 0:
        loss_ce = nn.KLDivLoss(reduction="batchmean")(
            F.log_softmax(s_logits_slct / temperature, dim=-1),
            F.softmax(t_logits_slct / temperature, dim=-1),
        ) * (temperature**2)
        loss_mse = nn.MSELoss(reduction="sum")(s_logits_slct, t_logits_slct) / s_logits_slct.size(0)
    else:
        loss_ce = loss_mse = zero

    flat_labels = labels.reshape(-1)
    if (flat_labels != -100).any():
        loss_mlm = nn.CrossEntropyLoss(ignore_index=-100)(s_logits.view(-1, vocab), flat_labels)
    else:
        loss_mlm = zero

    hidden_mask = attention_mask.unsqueeze(-1).expand_as(s_hidden)
    s_hidden_slct = torch.masked_select(s_hidden, hidden_mask).view(-1, dim)
    t_hidden_slct = torch.masked_select(t_hidden, hidden_mask).view(-1, dim)
    if s_hidden_slct.size(0) > 0:
        target = s_hidden_slct.new(s_hidden_slct.size(0)).fill_(1)
        loss_cos = nn.CosineEmbeddingLoss(reduction="mean")(s_hidden_slct, t_hidden_slct, target)
    else:
        loss_cos = s_hidden.sum() * 0

    loss = alpha_ce * loss_ce + alpha_mlm * loss_mlm + alpha_cos * loss_cos + alpha_mse * loss_mse
    return TripleLossOutput(loss, loss_ce, loss_mlm, loss_cos, loss_mse)


# The floor of the student's tail mass in the sparse loss: fp32's smallest normal, where every implementation
# clamps, so that a tail the kernels' fp32 sum underflows to 0 gives the same finite loss everywhere.
TAIL_FLOOR = 2.0**-126


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a teacher cache keeps of [..., V] logits: the top-k raw logits (the logits' dtype), their indices in
    the smallest integer type that holds V (int16 up to V = 32768, else int32), and [..., 2] fp32 log-sum-exps
    over all V at T = 1 and at T (float64 for float64 logits)."""
    vocab = teacher_logits.size(-1)
    values, indices = torch.topk(teacher_logits, k, dim=-1)
    compute = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    t = teacher_logits.to(compute)
    logsumexp = torch.stack([torch.logsumexp(t, -1), torch.logsumexp(t / temperature, -1)], -1)
    return values, indices.to(torch.int16 if vocab <= 2**15 else torch.int32), logsumexp


def sparse_triple_loss_reference(student_logits: torch.Tensor, teacher_topk_logits: torch.Tensor,
                                 teacher_topk_indices: torch.Tensor, teacher_logsumexp: torch.Tensor,
                                 labels: torch.Tensor, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                                 attention_mask: torch.Tensor, temperature: float = 2.0, alpha_ce: float = 5.0,
                                 alpha_mlm: float = 2.0, alpha_cos: float = 1.0, restrict_ce_to_mask: bool = False,
                                 tail: str = "bucket") -> TripleLossOutput:
    """The triple loss against a top-k teacher, written plainly: the KL of the selected rows is that of the
    teacher's exact top-k probabilities q_k = exp(t_k / T - logsumexp(t / T)) plus, with tail="bucket", its
    remaining mass r = 1 - sum q_k as one more class matched against the student's mass off the top-k,
    r * log(r / S); with tail="renormalize", of q_k / sum q_k alone. The student's tail S is summed over the tail
    entries (never 1 - sum p_k) and floored at TAIL_FLOOR; with k = V there is no tail. L_mlm and L_cos are the
    online recipe's (triple_loss_reference); there is no MSE term (loss_mse is 0)."""
    if tail not in ("bucket", "renormalize"):
        raise ValueError(f"sparse_triple_loss: tail must be 'bucket' or 'renormalize', got {tail!r}")
    compute = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    s_logits = student_logits.to(compute)
    vocab, k = s_logits.size(-1), teacher_topk_logits.size(-1)
    rows = (labels > -1) if restrict_ce_to_mask else attention_mask.bool()
    s = s_logits[rows]  # [n, V]
    idx = teacher_topk_indices[rows].long()  # [n, k]
    log_q = teacher_topk_logits[rows].to(compute) / temperature - teacher_logsumexp[rows][:, 1:2].to(compute)
    log_p = F.log_softmax(s / temperature, dim=-1)
    log_p_k = log_p.gather(-1, idx)
    q = log_q.exp()
    mass = q.sum(-1)
    if tail == "renormalize":
        log_target = log_q - mass.log().unsqueeze(-1)
        kl = (log_target.exp() * (log_target - log_p_k)).sum(-1)
    else:
        kl = (q * (log_q - log_p_k)).sum(-1)
        if k < vocab:
            r = (1 - mass).clamp_min(0)
            log_s = log_p.scatter(-1, idx, float("-inf")).logsumexp(-1)
            log_s = log_s.clamp_min(math.log(TAIL_FLOOR))
            kl = kl + torch.where(r > 0, r * (r.clamp_min(TAIL_FLOOR).log() - log_s), 0.0)
    zero = s_logits.sum() * 0
    loss_ce = kl.sum() / kl.numel() * temperature**2 if kl.numel() else zero
    # L_mlm and L_cos: the online reference's, with the KL and MSE terms weighted out (its teacher logits unused).
    online = triple_loss_reference(student_logits, student_logits.detach(), labels, student_hidden, teacher_hidden,
                                   attention_mask, temperature, 0.0, alpha_mlm, alpha_cos, restrict_ce_to_mask)
    loss = alpha_ce * loss_ce + online.loss
    return TripleLossOutput(loss, loss_ce, online.loss_mlm, online.loss_cos, torch.zeros_like(online.loss_mse))
