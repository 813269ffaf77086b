"""The unfused triple loss, written as the original Hugging Face distiller writes it (distiller.py, MLM mode).

This is the ground truth of every test and the baseline of every benchmark: masked_select copies of the
selected rows, log_softmax / softmax at temperature T, KLDivLoss(batchmean) times T^2, CrossEntropyLoss on the
full student logits at T = 1, CosineEmbeddingLoss on the non-padding hidden states, and --alpha_mse's
MSELoss(sum) of the selected raw logits over their number of rows. The only departures are the ones
fastdistil's contract adds: empty selections give 0 instead of NaN, each term is computed in fp32 (the recipe
ran its losses in fp32 under apex O1 too), and loss_mse is computed for logging even when alpha_mse is 0 (the
original skips it then).
"""

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
