"""The model families fastdistil distills, one module each: BERT -> DistilBERT (bert), RoBERTa -> RoBERTa
(roberta), GPT-2 -> GPT-2 (gpt2).

A family holds all that differs between them: the student's config and class, which teacher weight each
student weight starts from, where the models split at their vocabulary projection for the fused loss, the
special tokens, the position limit, and whether training is masked-LM or causal-LM. The teacher's
config.model_type picks the family.
"""

from fastdistil.train.families.base import Family, SpecialIds
from fastdistil.train.families.bert import BERT
from fastdistil.train.families.gpt2 import GPT2
from fastdistil.train.families.roberta import ROBERTA

FAMILIES = (BERT, ROBERTA, GPT2)
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}

__all__ = ["BERT", "FAMILIES", "GPT2", "ROBERTA", "Family", "SpecialIds", "family_of"]


def family_of(model_or_config) -> Family:
    """The family of a model (teacher or student) or of its config, by config.model_type."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(f"model_type {model_type!r} ({type(model_or_config).__name__}) is not supported; "
                         f"supported: {', '.join(sorted(_BY_MODEL_TYPE))}")
    return _BY_MODEL_TYPE[model_type]
