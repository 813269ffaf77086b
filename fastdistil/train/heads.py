"""The language models split at their vocabulary projection: what feeds it, and the projection itself.

The fused linear + triple loss takes the projection's input and weight instead of [N, V] logits, and evaluation
projects only the rows it scores (the masked positions), which at BERT's vocabulary is the difference between
milliseconds and minutes. Where each family's models split is the family's (fastdistil.train.families); these
are the same calls for a teacher or a student of any of them.
"""

import torch

from fastdistil.train.families import family_of


def projection(model: torch.nn.Module) -> torch.nn.Linear:
    """The [V, D] vocabulary projection of a teacher or student of any family, with its bias (None for GPT-2)."""
    return family_of(model).projection(model)


class ProjectionInputs(torch.nn.Module):
    """A language model up to its vocabulary projection. A module of its own so that DistributedDataParallel
    can wrap it: the projection, applied outside by the fused loss, is not part of this forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.family = family_of(model)
        self.family.check_model(model)
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, L, D] input of the vocabulary projection, [B, L, D] last hidden state)."""
        return self.family.projection_inputs(self.model, input_ids, attention_mask)


def logits_at(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              rows: torch.Tensor) -> torch.Tensor:
    """[rows.sum(), V]: the model's logits at the positions where the bool mask `rows` [B, L] is True."""
    head_input, _ = ProjectionInputs(model)(input_ids, attention_mask)
    return projection(model)(head_input[rows])
