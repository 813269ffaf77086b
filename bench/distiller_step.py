"""The original Hugging Face distiller's training step, ported: the baseline of test_bench_train_step.py.

A port of `Distiller.__init__` (the loss objects, the optimizer and the schedule), `Distiller.step` and
`Distiller.optimize` from `distiller.py` of huggingface/transformers examples/research_projects/distillation
(since March 2025 huggingface/transformers-research-projects, distillation/), in its two modes (MLM, the
DistilBERT/DistilRoBERTa recipe; CLM, DistilGPT2's) with gradient accumulation 1, one process and no apex. The
original no longer runs on current transformers and numpy, so its step is rewritten here to compute exactly
what it computes, in the same order and with the same torch.nn objects:

- the student forward, then the teacher forward under torch.no_grad(), both with input_ids and all hidden
  states (the original sets output_hidden_states in both configs); in MLM mode with the boolean
  attention_mask, in CLM mode with attention_mask=None (causal attention already keeps each real token of a
  right-padded batch from the padding after it; the model's default use_cache stays on, as the original
  unpacked the returned key/value cache);
- masked_select copies of both logit tensors on the non-padding rows (in both modes), nn.KLDivLoss(batchmean)
  of log_softmax(s/T) against softmax(t/T) times T^2;
- with alpha_mlm > 0, nn.CrossEntropyLoss(ignore_index=-100) on the full student logits against the MLM
  labels; with alpha_clm > 0, the same loss object on a contiguous copy of the logits without their last
  position against the labels without their first (lm_labels being prepare_batch_clm's: the token ids, -100
  at padding);
- with alpha_mse > 0, nn.MSELoss(sum) of the two selected logit copies over their row count (the original's
  "batchmean");
- with alpha_cos > 0, nn.CosineEmbeddingLoss(mean) on masked_select copies of the last hidden states, target
  all ones;
- the NaN check, the .item() calls the original makes for its logs, loss.backward(), clip_grad_norm_,
  optimizer.step(), optimizer.zero_grad(), scheduler.step();
- torch.optim.AdamW with the original's two parameter groups, betas (0.9, 0.98), torch's default (foreach)
  implementation, and transformers' linear warm-up schedule.

The loss weights default to DistilBERT's recipe (alpha_clm and alpha_mse 0, so MLM mode with the defaults is the
DistilBERT step; `mlm` is the original's --mlm, True there, False for GPT-2). Left out: restrict_ce_to_mask (off
in every recipe), multi-GPU, apex itself, tensorboard and checkpoints (every 500 and 4000 steps in the original,
not part of a step). `amp_dtype` is this port's one addition: bf16 or fp16 runs the two forwards under
torch.autocast and the loss on the logits as they come out, which is what "the same models with the reference
loss" means in mixed precision. fp16 also scales the loss with torch.amp.GradScaler, the modern equivalent of
the original's --fp16 (apex amp, opt level O1, dynamic loss scaling: both start at 2^16 and halve on overflow):
apex's scale_loss context unscaled the gradients on leaving it, before the clipping, and its patched optimizer
skipped a step whose gradients overflowed, which is what scaler.unscale_ and scaler.step do, in the same places.
In fp32 and bf16 the scaler is disabled and its calls are the plain backward and step.
"""

import math

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup


class Distiller:
    """The state the original keeps across steps (models, loss objects, optimizer, schedule, log counters)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, num_train_optimization_steps: int, *,
                 mlm: bool = True, temperature: float = 2.0, alpha_ce: float = 5.0, alpha_mlm: float = 2.0,
                 alpha_clm: float = 0.0, alpha_mse: float = 0.0, alpha_cos: float = 1.0,
                 learning_rate: float = 5e-4, adam_epsilon: float = 1e-6, weight_decay: float = 0.0,
                 warmup_prop: float = 0.05, max_grad_norm: float = 5.0,
                 amp_dtype: torch.dtype | None = None):
        self.student = student
        self.teacher = teacher
        self.mlm = mlm
        self.temperature = temperature
        self.alpha_ce, self.alpha_mlm, self.alpha_cos = alpha_ce, alpha_mlm, alpha_cos
        self.alpha_clm, self.alpha_mse = alpha_clm, alpha_mse
        self.max_grad_norm = max_grad_norm
        self.amp_dtype = amp_dtype

        self.ce_loss_fct = nn.KLDivLoss(reduction="batchmean")
        self.lm_loss_fct = nn.CrossEntropyLoss(ignore_index=-100)
        if self.alpha_mse > 0.0:
            self.mse_loss_fct = nn.MSELoss(reduction="sum")
        self.cosine_loss_fct = nn.CosineEmbeddingLoss(reduction="mean")

        # Substring matches, as in the original: of DistilBERT's norms only embeddings.LayerNorm.weight does.
        no_decay = ["bias", "LayerNorm.weight"]
        params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]

        def decays(name: str) -> bool:
            return not any(nd in name for nd in no_decay)

        groups = [
            {"params": [p for n, p in params if decays(n)], "weight_decay": weight_decay},
            {"params": [p for n, p in params if not decays(n)], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=learning_rate, eps=adam_epsilon, betas=(0.9, 0.98))
        self.scaler = torch.amp.GradScaler(next(student.parameters()).device.type,
                                           enabled=amp_dtype == torch.float16)
        warmup_steps = math.ceil(num_train_optimization_steps * warmup_prop)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, num_warmup_steps=warmup_steps, num_training_steps=num_train_optimization_steps)

        self.n_iter = 0
        self.n_sequences_epoch = 0
        self.total_loss_epoch = 0.0
        self.last_loss = self.last_loss_ce = self.last_loss_mlm = self.last_loss_cos = 0.0
        self.last_loss_clm = self.last_loss_mse = 0.0

    @staticmethod
    def prepare_batch_clm(token_ids: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """The original's CLM labels (prepare_batch_clm, without its fp16-only rounding of the batch): the token
        ids themselves, -100 at padding; step shifts them by one."""
        clm_labels = token_ids.new(token_ids.size()).copy_(token_ids)
        clm_labels[~attn_mask] = -100
        return clm_labels

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, lm_labels: torch.Tensor) -> None:
        """Forward of student and teacher, the loss, and (gradient accumulation 1) an optimizer step. lm_labels:
        prepare_batch_mlm's labels in MLM mode, prepare_batch_clm's in CLM mode."""
        model_mask = attention_mask if self.mlm else None  # the original's CLM forwards take no mask
        with torch.autocast(input_ids.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            student_outputs = self.student(input_ids=input_ids, attention_mask=model_mask,
                                           output_hidden_states=True)
            with torch.no_grad():
                teacher_outputs = self.teacher(input_ids=input_ids, attention_mask=model_mask,
                                               output_hidden_states=True)
        s_logits, s_hidden_states = student_outputs["logits"], student_outputs["hidden_states"]
        t_logits, t_hidden_states = teacher_outputs["logits"], teacher_outputs["hidden_states"]
        assert s_logits.size() == t_logits.size()

        # KL on every non-padding row (restrict_ce_to_mask is off in the recipe).
        mask = attention_mask.unsqueeze(-1).expand_as(s_logits)
        s_logits_slct = torch.masked_select(s_logits, mask).view(-1, s_logits.size(-1))
        t_logits_slct = torch.masked_select(t_logits, mask).view(-1, s_logits.size(-1))
        loss_ce = self.ce_loss_fct(
            nn.functional.log_softmax(s_logits_slct / self.temperature, dim=-1),
            nn.functional.softmax(t_logits_slct / self.temperature, dim=-1),
        ) * self.temperature**2
        loss = self.alpha_ce * loss_ce

        if self.alpha_mlm > 0.0:
            loss_mlm = self.lm_loss_fct(s_logits.view(-1, s_logits.size(-1)), lm_labels.view(-1))
            loss += self.alpha_mlm * loss_mlm
        if self.alpha_clm > 0.0:
            shift_logits = s_logits[..., :-1, :].contiguous()
            shift_labels = lm_labels[..., 1:].contiguous()
            loss_clm = self.lm_loss_fct(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
            loss += self.alpha_clm * loss_clm
        if self.alpha_mse > 0.0:
            loss_mse = self.mse_loss_fct(s_logits_slct, t_logits_slct) / s_logits_slct.size(0)
            loss += self.alpha_mse * loss_mse
        if self.alpha_cos > 0.0:
            s_hidden, t_hidden = s_hidden_states[-1], t_hidden_states[-1]
            mask = attention_mask.unsqueeze(-1).expand_as(s_hidden)
            dim = s_hidden.size(-1)
            s_hidden_slct = torch.masked_select(s_hidden, mask).view(-1, dim)
            t_hidden_slct = torch.masked_select(t_hidden, mask).view(-1, dim)
            target = s_hidden_slct.new(s_hidden_slct.size(0)).fill_(1)
            loss_cos = self.cosine_loss_fct(s_hidden_slct, t_hidden_slct, target)
            loss += self.alpha_cos * loss_cos

        # The original reads every term back for its logs: one host sync each.
        self.total_loss_epoch += loss.item()
        self.last_loss = loss.item()
        self.last_loss_ce = loss_ce.item()
        if self.alpha_mlm > 0.0:
            self.last_loss_mlm = loss_mlm.item()
        if self.alpha_clm > 0.0:
            self.last_loss_clm = loss_clm.item()
        if self.alpha_mse > 0.0:
            self.last_loss_mse = loss_mse.item()
        if self.alpha_cos > 0.0:
            self.last_loss_cos = loss_cos.item()

        self.optimize(loss)
        self.n_sequences_epoch += input_ids.size(0)

    def optimize(self, loss: torch.Tensor) -> None:
        """The NaN check, backward, clipping and the update (every step at gradient accumulation 1), through the
        loss scaler (a pass-through unless fp16)."""
        if (loss != loss).data.any():
            raise FloatingPointError("NaN detected")  # the original logs and calls exit()
        self.scaler.scale(loss).backward()
        self.n_iter += 1
        self.scaler.unscale_(self.optimizer)
        nn.utils.clip_grad_norm_(self.student.parameters(), self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        self.scheduler.step()
