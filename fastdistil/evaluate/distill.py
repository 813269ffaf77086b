"""Task-specific distillation, the paper's DistilBERT (D): the student fine-tuned on a task against the task
logits of the teacher fine-tuned on it, as run_squad_w_distillation.py does for SQuAD (and, by the same code
path here, for classification).

    loss = alpha_ce * L_ce + alpha_task * L_task + alpha_cos * L_cos

- L_ce = KL(softmax(t / T) || softmax(s / T)) * T^2, summed over a row's logits and averaged over the rows
  (KLDivLoss(reduction="batchmean")). A row is an example's class logits, or for QA a window's start logits and,
  as a second row, its end logits: the average over the 2B rows is the original's
  (loss_start + loss_end) / 2 of two batchmean KL terms over B windows each. A QA row spans every position of
  the padded batch, as the model's own loss does and the original's (its windows padded to max_seq_length).
- L_task = the model's own task loss: cross-entropy at T = 1 against the gold class, or for QA against the gold
  start and end positions, averaged over the same rows: transformers' (start_loss + end_loss) / 2, the original's
  `loss` that alpha_squad weighs.
- L_cos = 1 - cos(h_s, h_t) of the first token's ([CLS]) last hidden states (optional: alpha_cos is 0 by default,
  as in the original, which has no such term).

One call of the fused op computes all three: its KL term on the task logits, its cross-entropy term (the MLM term
of pre-training) with the task's targets as the labels, its cosine term on the [CLS] states; every row is
selected (a task's logits have no padding rows).
"""

import torch
import torch.nn.functional as F

from fastdistil.ops.triple_loss import triple_loss
from fastdistil.ops.values import TripleLossOutput


def first_token_hidden(output) -> torch.Tensor:
    """[B, D]: the last hidden state of each sequence's first token ([CLS]); the model ran with
    output_hidden_states=True."""
    return output.hidden_states[-1][:, 0]


def loss(student_output, teacher_output, targets: dict[str, torch.Tensor], outputs: tuple[tuple[str, str], ...],
         temperature: float, alpha_ce: float, alpha_task: float, alpha_cos: float) -> TripleLossOutput:
    """The distillation loss of one batch from both models' outputs (with hidden states when alpha_cos > 0);
    `outputs` pairs each logits output with its target (tasks.OUTPUTS). loss_mlm of the result is L_task."""
    student_rows = torch.cat([student_output[name] for name, _ in outputs])
    teacher_rows = torch.cat([teacher_output[name] for name, _ in outputs])
    labels = torch.cat([targets[target] for _, target in outputs])
    if alpha_cos > 0:
        # The same [CLS] pair stands beside each of an example's rows: the mean over rows is the mean over examples.
        student_hidden = first_token_hidden(student_output).repeat(len(outputs), 1)
        teacher_hidden = first_token_hidden(teacher_output).repeat(len(outputs), 1)
    else:  # the op takes hidden states whatever alpha_cos is: equal dummies, their L_cos 0 and never weighed
        student_hidden = teacher_hidden = student_rows.new_ones(student_rows.size(0), 1)
    selected = torch.ones(student_rows.size(0), dtype=torch.bool, device=student_rows.device)
    return triple_loss(student_rows, teacher_rows, labels, student_hidden, teacher_hidden, selected,
                       temperature=temperature, alpha_ce=alpha_ce, alpha_mlm=alpha_task, alpha_cos=alpha_cos)


def kl_to_teacher(student_rows: list[torch.Tensor], teacher_rows: list[torch.Tensor], temperature: float) -> float:
    """L_ce of held-out predictions: the mean over all rows of T^2 * KL(softmax(t / T) || softmax(s / T)). Each
    list item holds one example's (or QA window's) rows, [outputs, width]; items may differ in width."""
    total, rows = 0.0, 0
    for width in sorted({row.shape[-1] for row in student_rows}):
        same = [i for i, row in enumerate(student_rows) if row.shape[-1] == width]
        s = torch.cat([torch.as_tensor(student_rows[i], dtype=torch.float64) for i in same])
        t = torch.cat([torch.as_tensor(teacher_rows[i], dtype=torch.float64) for i in same])
        total += F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                          reduction="sum").item() * temperature**2
        rows += s.size(0)
    return total / rows
