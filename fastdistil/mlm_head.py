"""The masked-LM models split at their vocabulary projection: what feeds it, and the projection itself.

Projecting only the rows that matter (the masked positions in evaluation) instead of all [B, L, V] logits is
the difference between milliseconds and minutes at BERT's vocabulary. The two model families fastdistil
distills between are covered: BertForMaskedLM (teacher) and DistilBertForMaskedLM (student).
"""

import torch
from transformers import BertForMaskedLM, DistilBertForMaskedLM


def projection_input(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
                     ) -> torch.Tensor:
    """[B, L, D]: the input of the model's vocabulary projection (its MLM transform already applied)."""
    if isinstance(model, BertForMaskedLM):
        hidden = model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return model.cls.predictions.transform(hidden)
    if isinstance(model, DistilBertForMaskedLM):
        hidden = model.distilbert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return model.vocab_layer_norm(model.activation(model.vocab_transform(hidden)))
    raise TypeError(f"model must be a BertForMaskedLM or DistilBertForMaskedLM, got {type(model).__name__}")


def projection(model: torch.nn.Module) -> torch.nn.Linear:
    """The [V, D] vocabulary projection (tied to the word embeddings) with its bias."""
    if isinstance(model, BertForMaskedLM):
        return model.cls.predictions.decoder
    if isinstance(model, DistilBertForMaskedLM):
        return model.vocab_projector
    raise TypeError(f"model must be a BertForMaskedLM or DistilBertForMaskedLM, got {type(model).__name__}")


def logits_at(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              rows: torch.Tensor) -> torch.Tensor:
    """[rows.sum(), V]: the model's MLM logits at the positions where the bool mask `rows` [B, L] is True."""
    return projection(model)(projection_input(model, input_ids, attention_mask)[rows])
