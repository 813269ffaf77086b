"""The masked-LM models split at their vocabulary projection: what feeds it, and the projection itself.

The fused linear + triple loss takes the projection's input and weight instead of [N, V] logits, and evaluation
projects only the rows it scores (the masked positions), which at BERT's vocabulary is the difference between
milliseconds and minutes. The two model families fastdistil distills between are covered: BertForMaskedLM
(teacher) and DistilBertForMaskedLM (student).
"""

import torch
from transformers import BertForMaskedLM, DistilBertForMaskedLM


def _check(model: torch.nn.Module) -> None:
    if not isinstance(model, BertForMaskedLM | DistilBertForMaskedLM):
        raise TypeError(f"model must be a BertForMaskedLM or DistilBertForMaskedLM, got {type(model).__name__}")


def projection(model: torch.nn.Module) -> torch.nn.Linear:
    """The [V, D] vocabulary projection (tied to the word embeddings) with its bias."""
    _check(model)
    return model.cls.predictions.decoder if isinstance(model, BertForMaskedLM) else model.vocab_projector


class ProjectionInputs(torch.nn.Module):
    """A masked LM up to its vocabulary projection. A module of its own so that DistributedDataParallel can
    wrap it: the projection, applied outside by the fused loss, is not part of this forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        _check(model)
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, L, D] input of the vocabulary projection, [B, L, D] last hidden state)."""
        if isinstance(self.model, BertForMaskedLM):
            hidden = self.model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.model.cls.predictions.transform(hidden), hidden
        hidden = self.model.distilbert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = self.model
        return m.vocab_layer_norm(m.activation(m.vocab_transform(hidden))), hidden


def logits_at(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              rows: torch.Tensor) -> torch.Tensor:
    """[rows.sum(), V]: the model's MLM logits at the positions where the bool mask `rows` [B, L] is True."""
    head_input, _ = ProjectionInputs(model)(input_ids, attention_mask)
    return projection(model)(head_input[rows])
