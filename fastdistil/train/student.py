"""The student: the teacher's family with half its layers, initialized from the teacher.

As in the original code (scripts/extract_distilbert.py, scripts/extract.py), the student keeps transformer
layers [0, 2, 4, 7, 9, 11] of a 12-layer teacher, or every other layer of any other depth, and copies the
embeddings and the LM head; which weights exactly, and the student's architecture, are the family's
(fastdistil.train.families): a DistilBertForMaskedLM for a BERT teacher, a RobertaForMaskedLM for RoBERTa, a
GPT2LMHeadModel for GPT-2.
"""

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from fastdistil.train.families import family_of

# The original code's choice for a 12-layer teacher, for every family: not strictly every other layer.
DISTILBERT_LAYERS_OF_12 = (0, 2, 4, 7, 9, 11)


def default_student_layers(n_teacher_layers: int) -> tuple[int, ...]:
    """The teacher layers the student starts from."""
    if n_teacher_layers == 12:
        return DISTILBERT_LAYERS_OF_12
    return tuple(range(0, n_teacher_layers, 2))


def make_student(teacher: PreTrainedModel, student_layers: Sequence[int] | None = None, init: str = "teacher",
                 vocab_transform: bool = True) -> PreTrainedModel:
    """The student of a teacher of any family fastdistil knows (the family of teacher.config.model_type).

    Args:
        teacher: a BertForMaskedLM, RobertaForMaskedLM or GPT2LMHeadModel.
        student_layers: teacher layer indices the student layers start from, in order. The default is
            default_student_layers(teacher depth).
        init: "teacher" copies the weights the family's weight_mapping names. "random" gives the same
            architecture with fresh weights, for the ablation.
        vocab_transform: copy the MLM head's transform (dense + LayerNorm) too. False leaves it freshly
            initialized, as the original extraction scripts do without --vocab_transform.
    """
    family = family_of(teacher)
    family.check_teacher(teacher)
    n_teacher_layers = teacher.config.num_hidden_layers
    layers = tuple(default_student_layers(n_teacher_layers) if student_layers is None else student_layers)
    if not layers or any(not 0 <= i < n_teacher_layers for i in layers):
        raise ValueError(f"student_layers must be non-empty indices in [0, {n_teacher_layers}), got {list(layers)}")
    if init not in ("teacher", "random"):
        raise ValueError(f"init must be 'teacher' or 'random', got {init!r}")
    student = family.student_class(family.student_config(teacher.config, len(layers)))
    if init == "random":
        return student
    student_params = dict(student.named_parameters())
    # A config option the family does not know (cross-attention, say) adds student weights no mapping names,
    # which would silently stay random.
    unmapped = sorted(set(student_params) - set(family.weight_mapping(layers)))
    if unmapped:
        raise ValueError(f"teacher: its config gives the {family.name} student weights that no teacher weight "
                         f"maps to: {', '.join(unmapped[:4])}{', ...' if len(unmapped) > 4 else ''}")
    teacher_params = dict(teacher.named_parameters())
    with torch.no_grad():
        for student_name, teacher_name in family.weight_mapping(layers, vocab_transform).items():
            student_params[student_name].copy_(teacher_params[teacher_name])
    return student
