"""nn.Module forms of the two losses, for models that hold their loss as a submodule: each keeps the
temperature, the weights (alpha_mse's too) and the KL row choice (and its op's own option) and calls the
functional op. Their arguments come in their functions' order."""

import torch.nn as nn

from fastdistil.ops.fused_linear_triple_loss import fused_linear_triple_loss
from fastdistil.ops.triple_loss import Backend, triple_loss
from fastdistil.ops.values import TripleLossOutput


class _LossSettings(nn.Module):
    def __init__(self, temperature: float, alpha_ce: float, alpha_mlm: float, alpha_cos: float,
                 restrict_ce_to_mask: bool, alpha_mse: float, **option):
        super().__init__()
        self.temperature = temperature
        self.alpha_ce = alpha_ce
        self.alpha_mlm = alpha_mlm
        self.alpha_cos = alpha_cos
        self.restrict_ce_to_mask = restrict_ce_to_mask
        self.alpha_mse = alpha_mse
        (self.option_name, value), = option.items()
        setattr(self, self.option_name, value)

    def settings(self) -> dict:
        names = ("temperature", "alpha_ce", "alpha_mlm", "alpha_cos", "restrict_ce_to_mask", "alpha_mse",
                 self.option_name)
        return {name: getattr(self, name) for name in names}

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.settings().items())


class TripleLoss(_LossSettings):
    """:func:`fastdistil.triple_loss` on the models' logits."""

    def __init__(self, temperature: float = 2.0, alpha_ce: float = 5.0, alpha_mlm: float = 2.0,
                 alpha_cos: float = 1.0, restrict_ce_to_mask: bool = False, alpha_mse: float = 0.0,
                 backend: Backend = "auto"):
        super().__init__(temperature, alpha_ce, alpha_mlm, alpha_cos, restrict_ce_to_mask, alpha_mse,
                         backend=backend)

    def forward(self, student_logits, teacher_logits, labels, student_hidden, teacher_hidden,
                attention_mask) -> TripleLossOutput:
        return triple_loss(student_logits, teacher_logits, labels, student_hidden, teacher_hidden, attention_mask,
                           **self.settings())


class FusedLinearTripleLoss(_LossSettings):
    """:func:`fastdistil.fused_linear_triple_loss` on what the models feed their vocabulary projections. The
    projections (weights and biases) come with the inputs, so that a projector tied to the word embeddings stays
    the model's own parameter."""

    def __init__(self, temperature: float = 2.0, alpha_ce: float = 5.0, alpha_mlm: float = 2.0,
                 alpha_cos: float = 1.0, restrict_ce_to_mask: bool = False, chunk_size: int = 0,
                 alpha_mse: float = 0.0):
        super().__init__(temperature, alpha_ce, alpha_mlm, alpha_cos, restrict_ce_to_mask, alpha_mse,
                         chunk_size=chunk_size)

    def forward(self, student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias,
                labels, student_hidden, teacher_hidden, attention_mask) -> TripleLossOutput:
        return fused_linear_triple_loss(student_input, student_weight, student_bias, teacher_input, teacher_weight,
                                        teacher_bias, labels, student_hidden, teacher_hidden, attention_mask,
                                        **self.settings())
