"""One training step of the recipe (both forwards and the triple loss, or the student's forward and the sparse
triple loss against a teacher cache), the recipe's optimizer, and the held-out metrics a run ends with."""

import math

import torch
import torch.nn.functional as F

import fastdistil
from fastdistil.ops.reference import sparse_triple_loss_reference
from fastdistil.ops.values import TripleLossOutput
from fastdistil.train import heads
from fastdistil.train.config import TrainConfig
from fastdistil.train.teacher_cache import TeacherRows


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


def train_step(student: torch.nn.Module, teacher: heads.ProjectionInputs | TeacherRows, batch, cfg: TrainConfig,
               amp_dtype) -> TripleLossOutput:
    """Both models' forward and the triple loss of one micro-batch. `student` is a ProjectionInputs, or the
    DistributedDataParallel wrapping one; `teacher` a ProjectionInputs, or in a run from a teacher cache the
    micro-batch's TeacherRows, against which the loss is the sparse one."""
    input_ids, attention_mask, labels = batch
    cached = isinstance(teacher, TeacherRows)
    with torch.autocast(input_ids.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        if not cached:
            with torch.no_grad():
                t_input, t_hidden = teacher(input_ids, attention_mask)
        s_input, s_hidden = student(input_ids, attention_mask)
    s_weight, s_bias = _projection(getattr(student, "module", student).model, amp_dtype)
    if cached:
        return _sparse_loss(s_input, s_weight, s_bias, s_hidden, teacher, labels, attention_mask, cfg, amp_dtype)
    t_weight, t_bias = _projection(teacher.model, amp_dtype)
    if amp_dtype is not None:  # the cast autocast would apply to the projection (F.linear)
        s_input, t_input = s_input.to(amp_dtype), t_input.to(amp_dtype)
    loss_args = (labels, s_hidden, t_hidden, attention_mask, cfg.temperature, cfg.alpha_ce, cfg.alpha_lm,
                 cfg.alpha_cos, cfg.restrict_ce_to_mask)
    # The loss always runs in fp32 inside the kernels, whatever the inputs' dtype.
    if cfg.loss == "fused":
        return fastdistil.fused_linear_triple_loss(s_input, s_weight, s_bias, t_input.detach(), t_weight, t_bias,
                                                   *loss_args, alpha_mse=cfg.alpha_mse)
    s_logits = F.linear(s_input, s_weight, s_bias)
    t_logits = F.linear(t_input, t_weight, t_bias)
    backend = "reference" if cfg.loss == "reference" else "auto"
    return fastdistil.triple_loss(s_logits, t_logits, *loss_args, alpha_mse=cfg.alpha_mse, backend=backend)


def _projection(model: torch.nn.Module, amp_dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's vocabulary projection (weight, bias), cast as autocast would cast them for F.linear."""
    projection = heads.projection(model)
    weight, bias = projection.weight, projection.bias
    if amp_dtype is None:
        return weight, bias
    return weight.to(amp_dtype), None if bias is None else bias.to(amp_dtype)


def _sparse_loss(s_input, s_weight, s_bias, s_hidden, teacher: TeacherRows, labels, attention_mask, cfg: TrainConfig,
                 amp_dtype) -> TripleLossOutput:
    """The triple loss against a cached top-k teacher. The cache holds the non-padding rows only; they are laid
    out on the batch's [B, L] grid (zeros at padding, which the loss never reads) rather than the student's
    rows gathered to meet them: the teacher's rows are the smaller, and the student's then need no copy in the
    forward and no scatter of their gradient in the backward."""
    real = attention_mask.bool()

    def on_grid(rows: torch.Tensor, dtype=None) -> torch.Tensor:
        grid = rows.new_zeros((*real.shape, *rows.shape[1:]), dtype=dtype)
        grid[real] = rows.to(grid.dtype)
        return grid

    if amp_dtype is not None:
        s_input = s_input.to(amp_dtype)
    # A cache made without the cosine term holds no hidden states: the student's own stand in, weighted 0.
    t_hidden = s_hidden.detach() if teacher.hidden is None else on_grid(teacher.hidden, s_hidden.dtype)
    sparse = (on_grid(teacher.topk_logits), on_grid(teacher.topk_indices), on_grid(teacher.logsumexp))
    loss_args = (labels, s_hidden, t_hidden, attention_mask, cfg.temperature, cfg.alpha_ce, cfg.alpha_lm,
                 cfg.alpha_cos, cfg.restrict_ce_to_mask)
    if cfg.loss == "fused":
        return fastdistil.fused_linear_sparse_triple_loss(s_input, s_weight, s_bias, *sparse, *loss_args,
                                                          tail=cfg.tail)
    s_logits = F.linear(s_input, s_weight, s_bias)
    loss = sparse_triple_loss_reference if cfg.loss == "reference" else fastdistil.sparse_triple_loss
    return loss(s_logits, *sparse, *loss_args, tail=cfg.tail)


def teacher_heldout_rows(teacher: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the teacher's log-probability of each label, its top-1) at the labelled rows: all the held-out metrics
    need of the teacher, and what a teacher cache keeps of the held-out split."""
    targets = labels != -100
    logits = heads.logits_at(teacher, input_ids, attention_mask, targets).float()
    return -F.cross_entropy(logits, labels[targets], reduction="none"), logits.argmax(-1)


@torch.no_grad()
def heldout_metrics(teacher, student, batches, device, causal: bool = False) -> dict:
    """Held-out LM loss of each model on the labelled rows (masked, or every next token for a causal teacher),
    the student's top-1 agreement with the teacher there, and for a causal teacher the perplexities. `teacher`
    is the teacher model, or, for a run from a teacher cache, a function of (batch index, input_ids,
    attention_mask, labels) that returns teacher_heldout_rows' pair (TeacherCache.heldout_rows)."""
    teacher_rows = (lambda index, *batch: teacher_heldout_rows(teacher, *batch)
                    ) if isinstance(teacher, torch.nn.Module) else teacher
    student.eval()
    totals = {"teacher": 0.0, "student": 0.0, "agree": 0, "rows": 0}
    for index, batch in enumerate(batches):
        input_ids, attention_mask, labels = (t.to(device) for t in batch)
        targets = labels != -100
        t_logprob, t_top1 = teacher_rows(index, input_ids, attention_mask, labels)
        s_logits = heads.logits_at(student, input_ids, attention_mask, targets).float()
        totals["teacher"] -= t_logprob.sum().item()
        totals["student"] += F.cross_entropy(s_logits, labels[targets], reduction="sum").item()
        totals["agree"] += int((t_top1 == s_logits.argmax(-1)).sum())
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
