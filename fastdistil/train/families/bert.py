"""BERT -> DistilBERT, as the original code builds it (scripts/extract_distilbert.py).

The student, a DistilBertForMaskedLM, copies the word and position embeddings and the embedding LayerNorm (it
has no token-type embeddings and no pooler), the chosen transformer layers, and the MLM head: the transform
dense layer and its LayerNorm (unless vocab_transform=False) and the projector bias. The projector weight is
the word embedding matrix, tied as in the teacher.
"""

from collections.abc import Sequence

import torch
from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

from fastdistil.train.families.base import Family, SpecialIds, layer_mapping

# DistilBERT's LayerNorms are built with eps=1e-12, so only teachers with that eps copy over exactly.
DISTILBERT_LAYER_NORM_EPS = 1e-12

# DistilBERT sublayer -> the BERT sublayer it starts from, within one transformer layer.
_LAYER_PAIRS = {
    "attention.q_lin": "attention.self.query",
    "attention.k_lin": "attention.self.key",
    "attention.v_lin": "attention.self.value",
    "attention.out_lin": "attention.output.dense",
    "sa_layer_norm": "attention.output.LayerNorm",
    "ffn.lin1": "intermediate.dense",
    "ffn.lin2": "output.dense",
    "output_layer_norm": "output.LayerNorm",
}


class BertFamily(Family):
    name = "bert"
    model_types = ("bert", "distilbert")
    causal = False
    teacher_class = BertForMaskedLM
    student_class = DistilBertForMaskedLM
    teacher_kind = "a BERT masked LM (BertForMaskedLM)"
    special_tokens = SpecialIds(first=("cls",), last=("sep",), pad=("pad",), mask=("mask",))
    position_embeddings = "distilbert.embeddings.position_embeddings.weight"
    token_type_embeddings = None

    def check_teacher(self, teacher: BertForMaskedLM) -> None:
        # Without the base's tie check: untied BERT teachers have always been accepted (a student initialized
        # from one starts its tied projector from the teacher's word embeddings).
        self._check_teacher_class(teacher)
        config = teacher.config
        if config.hidden_act not in ("gelu", "relu"):
            raise ValueError(f"teacher hidden_act must be 'gelu' or 'relu' for a DistilBERT student, got "
                             f"{config.hidden_act!r}")
        if abs(config.layer_norm_eps - DISTILBERT_LAYER_NORM_EPS) > 1e-15:
            raise ValueError(f"teacher layer_norm_eps must be {DISTILBERT_LAYER_NORM_EPS} (DistilBERT's), got "
                             f"{config.layer_norm_eps}")

    def student_config(self, teacher_config: BertConfig, n_layers: int) -> DistilBertConfig:
        """A DistilBertConfig with the teacher's width, heads, vocabulary and positions, and n_layers layers."""
        return DistilBertConfig(
            vocab_size=teacher_config.vocab_size,
            max_position_embeddings=teacher_config.max_position_embeddings,
            sinusoidal_pos_embds=False,  # the teacher's learned positions are copied
            n_layers=n_layers,
            n_heads=teacher_config.num_attention_heads,
            dim=teacher_config.hidden_size,
            hidden_dim=teacher_config.intermediate_size,
            dropout=teacher_config.hidden_dropout_prob,
            attention_dropout=teacher_config.attention_probs_dropout_prob,
            activation=teacher_config.hidden_act,
            initializer_range=teacher_config.initializer_range,
            pad_token_id=teacher_config.pad_token_id,
            tie_word_embeddings=True,
        )

    def weight_mapping(self, student_layers: Sequence[int], vocab_transform: bool = True) -> dict[str, str]:
        mapping = {
            "distilbert.embeddings.word_embeddings.weight": "bert.embeddings.word_embeddings.weight",
            "distilbert.embeddings.position_embeddings.weight": "bert.embeddings.position_embeddings.weight",
            "distilbert.embeddings.LayerNorm.weight": "bert.embeddings.LayerNorm.weight",
            "distilbert.embeddings.LayerNorm.bias": "bert.embeddings.LayerNorm.bias",
            "vocab_projector.bias": "cls.predictions.bias",
        }
        if vocab_transform:
            mapping.update({
                "vocab_transform.weight": "cls.predictions.transform.dense.weight",
                "vocab_transform.bias": "cls.predictions.transform.dense.bias",
                "vocab_layer_norm.weight": "cls.predictions.transform.LayerNorm.weight",
                "vocab_layer_norm.bias": "cls.predictions.transform.LayerNorm.bias",
            })
        return mapping | layer_mapping(student_layers, "distilbert.transformer.layer", "bert.encoder.layer",
                                       _LAYER_PAIRS)

    def projection(self, model: BertForMaskedLM | DistilBertForMaskedLM) -> torch.nn.Linear:
        self.check_model(model)
        return model.cls.predictions.decoder if isinstance(model, BertForMaskedLM) else model.vocab_projector

    def projection_inputs(self, model: BertForMaskedLM | DistilBertForMaskedLM, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_model(model)
        if isinstance(model, BertForMaskedLM):
            hidden = model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return model.cls.predictions.transform(hidden), hidden
        hidden = model.distilbert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return model.vocab_layer_norm(model.activation(model.vocab_transform(hidden))), hidden


BERT = BertFamily()
