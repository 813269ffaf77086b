"""RoBERTa -> a shallower RoBERTa (DistilRoBERTa), as the original code builds it (scripts/extract.py).

The student is a RobertaForMaskedLM with the teacher's config and fewer layers. It copies the word, position
and token-type embeddings and the embedding LayerNorm, the chosen transformer layers, and the LM head: the
bias, and the transform dense layer and its LayerNorm unless vocab_transform=False (extract.py copies those
only with --vocab_transform). The decoder weight is the word embedding matrix, tied as in the teacher.
"""

from collections.abc import Sequence

import torch
from transformers import RobertaConfig, RobertaForMaskedLM
from transformers.activations import gelu

from fastdistil.train.families.base import Family, SpecialIds, layer_mapping

# Within one transformer layer: the same sublayers in teacher and student.
_LAYER_PARTS = {part: part for part in (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm")}


class RobertaFamily(Family):
    name = "roberta"
    model_types = ("roberta",)
    causal = False
    teacher_class = RobertaForMaskedLM
    student_class = RobertaForMaskedLM
    teacher_kind = "a RoBERTa masked LM (RobertaForMaskedLM)"
    # RoBERTa's tokenizers name <s> and </s> both cls/sep and bos/eos; either pair will do.
    special_tokens = SpecialIds(first=("cls", "bos"), last=("sep", "eos"), pad=("pad",), mask=("mask",))
    position_embeddings = "roberta.embeddings.position_embeddings.weight"
    token_type_embeddings = "roberta.embeddings.token_type_embeddings.weight"

    def weight_mapping(self, student_layers: Sequence[int], vocab_transform: bool = True) -> dict[str, str]:
        names = [f"roberta.embeddings.{e}.weight"
                 for e in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
        names += ["roberta.embeddings.LayerNorm.weight", "roberta.embeddings.LayerNorm.bias", "lm_head.bias"]
        if vocab_transform:
            names += [f"lm_head.{m}.{w}" for m in ("dense", "layer_norm") for w in ("weight", "bias")]
        layers = layer_mapping(student_layers, "roberta.encoder.layer", "roberta.encoder.layer", _LAYER_PARTS)
        return {name: name for name in names} | layers

    def projection(self, model: RobertaForMaskedLM) -> torch.nn.Linear:
        # transformers ties decoder.bias to lm_head.bias (the one checkpoints hold) along with the weight.
        self.check_model(model)
        return model.lm_head.decoder

    def projection_inputs(self, model: RobertaForMaskedLM, input_ids: torch.Tensor, attention_mask: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_model(model)
        hidden = model.roberta(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        head = model.lm_head
        return head.layer_norm(gelu(head.dense(hidden))), hidden  # RobertaLMHead.forward up to its decoder

    def max_positions(self, config: RobertaConfig) -> int:
        # Positions count from padding_idx + 1 (transformers derives them from the input ids), so the first
        # padding_idx + 1 rows of the position embeddings are never used by a real token.
        return config.max_position_embeddings - config.pad_token_id - 1


ROBERTA = RobertaFamily()
