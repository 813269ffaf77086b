"""One training step of the recipe (both forwards and the triple loss), the recipe's optimizer, and the
held-out metrics a run ends with."""

import math

import torch

import fastdistil
from fastdistil.ops.values import TripleLossOutput
from fastdistil.train import heads
from fastdistil.train.config import TrainConfig


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, eps: float) -> torch.optim.AdamW:
    """The recipe's AdamW (betas 0.9, 0.98), with no weight decay on biases and LayerNorms, as the original
    distiller meant. The fused implementation, one kernel over all parameters, where the device has one. Frozen
    parameters (requires_grad False) are left out: no state, no update."""
    norms = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith("bias") or id(param) in norms else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    device = next(model.parameters()).device
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=eps, fused=device.type in ("cpu", "cuda"))


def train_step(student: torch.nn.Module, teacher: heads.ProjectionInputs, batch, cfg: TrainConfig, amp_dtype
               ) -> TripleLossOutput:
    """Both models' forward and the triple loss of one micro-batch. `student` is a ProjectionInputs, or the
    DistributedDataParallel wrapping one."""
    input_ids, attention_mask, labels = batch
    with torch.autocast(input_ids.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        with torch.no_grad():
            t_input, t_hidden = teacher(input_ids, attention_mask)
        s_input, s_hidden = student(input_ids, attention_mask)
    s_proj = heads.projection(getattr(student, "module", student).model)
    t_proj = heads.projection(teacher.model)
    weights = [s_proj.weight, s_proj.bias, t_proj.weight, t_proj.bias]
    if amp_dtype is not None:  # the cast autocast would apply to the projection (F.linear)
        s_input, t_input = s_input.to(amp_dtype), t_input.to(amp_dtype)
        weights = [None if w is None else w.to(amp_dtype) for w in weights]
    s_weight, s_bias, t_weight, t_bias = weights
    loss_args = (labels, s_hidden, t_hidden, attention_mask, cfg.temperature, cfg.alpha_ce, cfg.alpha_lm,
                 cfg.alpha_cos, cfg.restrict_ce_to_mask)
    # The loss always runs in fp32 inside the kernels, whatever the inputs' dtype.
    if cfg.loss == "fused":
        return fastdistil.fused_linear_triple_loss(s_input, s_weight, s_bias, t_input.detach(), t_weight, t_bias,
                                                   *loss_args, alpha_mse=cfg.alpha_mse)
    s_logits = torch.nn.functional.linear(s_input, s_weight, s_bias)
    t_logits = torch.nn.functional.linear(t_input, t_weight, t_bias)
    backend = "reference" if cfg.loss == "reference" else "auto"
    return fastdistil.triple_loss(s_logits, t_logits, *loss_args, alpha_mse=cfg.alpha_mse, backend=backend)


@torch.no_grad()
def heldout_metrics(teacher, student, batches, device, causal: bool = False) -> dict:
    """Held-out LM loss of each model on the labelled rows (masked, or every next token for a causal teacher),
    the student's top-1 agreement with the teacher there, and for a causal teacher the perplexities."""
    student.eval()
    totals = {"teacher": 0.0, "student": 0.0, "agree": 0, "rows": 0}
    for input_ids, attention_mask, labels in batches:
        input_ids, attention_mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
        targets = labels != -100
        t_logits = heads.logits_at(teacher, input_ids, attention_mask, targets).float()
        s_logits = heads.logits_at(student, input_ids, attention_mask, targets).float()
        y = labels[targets]
        totals["teacher"] += torch.nn.functional.cross_entropy(t_logits, y, reduction="sum").item()
        totals["student"] += torch.nn.functional.cross_entropy(s_logits, y, reduction="sum").item()
        totals["agree"] += int((t_logits.argmax(-1) == s_logits.argmax(-1)).sum())
        totals["rows"] += int(targets.sum())
    student.train()
    rows = max(totals["rows"], 1)
    lm = "clm" if causal else "mlm"
    metrics = {f"teacher_heldout_{lm}_loss": totals["teacher"] / rows,
               f"student_heldout_{lm}_loss": totals["student"] / rows,
               "student_teacher_top1_agreement": totals["agree"] / rows,
               "heldout_predicted_rows" if causal else "heldout_masked_rows": totals["rows"]}
    if causal:
        metrics |= {f"{who}_heldout_perplexity": math.exp(metrics[f"{who}_heldout_clm_loss"])
                    for who in ("teacher", "student")}
    return metrics
