"""The student of DistilBERT: half the teacher's layers, initialized from the teacher.

As in the original code (scripts/extract_distilbert.py), the student copies:
- the word and position embeddings and the embedding LayerNorm (no token-type embeddings, no pooler);
- transformer layers [0, 2, 4, 7, 9, 11] of a 12-layer teacher, or every other layer of any other depth;
- the whole MLM head: the transform dense layer and its LayerNorm, and the projector bias. The projector
  weight is the word embedding matrix, tied as in the teacher.
"""

from collections.abc import Sequence

import torch
from transformers import DistilBertConfig, DistilBertForMaskedLM, PreTrainedModel

# The original code's choice for a 12-layer teacher: not strictly every other layer.
DISTILBERT_LAYERS_OF_12 = (0, 2, 4, 7, 9, 11)

# DistilBERT's LayerNorms are built with eps=1e-12, so only teachers with that eps copy over exactly.
DISTILBERT_LAYER_NORM_EPS = 1e-12


def default_student_layers(n_teacher_layers: int) -> tuple[int, ...]:
    """The teacher layers the student starts from."""
    if n_teacher_layers == 12:
        return DISTILBERT_LAYERS_OF_12
    return tuple(range(0, n_teacher_layers, 2))


def _check_teacher(teacher: PreTrainedModel) -> None:
    config = teacher.config
    if getattr(teacher, "base_model_prefix", None) != "bert" or not hasattr(teacher, "cls"):
        raise ValueError(
            f"teacher must be a BERT masked LM (BertForMaskedLM), got {type(teacher).__name__} "
            f"(model_type {config.model_type!r})"
        )
    if config.hidden_act not in ("gelu", "relu"):
        raise ValueError(f"teacher hidden_act must be 'gelu' or 'relu' for a DistilBERT student, got "
                         f"{config.hidden_act!r}")
    if abs(config.layer_norm_eps - DISTILBERT_LAYER_NORM_EPS) > 1e-15:
        raise ValueError(f"teacher layer_norm_eps must be {DISTILBERT_LAYER_NORM_EPS} (DistilBERT's), got "
                         f"{config.layer_norm_eps}")


def student_config(teacher_config, n_layers: int) -> DistilBertConfig:
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


def _layer_mapping(teacher_index: int, student_index: int) -> dict[str, str]:
    t = f"bert.encoder.layer.{teacher_index}."
    s = f"distilbert.transformer.layer.{student_index}."
    pairs = {
        "attention.q_lin": "attention.self.query",
        "attention.k_lin": "attention.self.key",
        "attention.v_lin": "attention.self.value",
        "attention.out_lin": "attention.output.dense",
        "sa_layer_norm": "attention.output.LayerNorm",
        "ffn.lin1": "intermediate.dense",
        "ffn.lin2": "output.dense",
        "output_layer_norm": "output.LayerNorm",
    }
    return {f"{s}{sp}.{w}": f"{t}{tp}.{w}" for sp, tp in pairs.items() for w in ("weight", "bias")}


def weight_mapping(student_layers: Sequence[int]) -> dict[str, str]:
    """Student parameter name -> teacher parameter name, for every student parameter."""
    mapping = {
        "distilbert.embeddings.word_embeddings.weight": "bert.embeddings.word_embeddings.weight",
        "distilbert.embeddings.position_embeddings.weight": "bert.embeddings.position_embeddings.weight",
        "distilbert.embeddings.LayerNorm.weight": "bert.embeddings.LayerNorm.weight",
        "distilbert.embeddings.LayerNorm.bias": "bert.embeddings.LayerNorm.bias",
        "vocab_transform.weight": "cls.predictions.transform.dense.weight",
        "vocab_transform.bias": "cls.predictions.transform.dense.bias",
        "vocab_layer_norm.weight": "cls.predictions.transform.LayerNorm.weight",
        "vocab_layer_norm.bias": "cls.predictions.transform.LayerNorm.bias",
        "vocab_projector.bias": "cls.predictions.bias",
    }
    for student_index, teacher_index in enumerate(student_layers):
        mapping.update(_layer_mapping(teacher_index, student_index))
    return mapping


def make_student(
    teacher: PreTrainedModel, student_layers: Sequence[int] | None = None, init: str = "teacher"
) -> DistilBertForMaskedLM:
    """The DistilBertForMaskedLM student of a BERT masked-LM teacher.

    Args:
        teacher: a BertForMaskedLM.
        student_layers: teacher layer indices the student layers start from, in order. The default is
            default_student_layers(teacher depth).
        init: "teacher" copies the weights named in the module docstring. "random" gives the same
            architecture with fresh weights, for the ablation.
    """
    _check_teacher(teacher)
    n_teacher_layers = teacher.config.num_hidden_layers
    layers = tuple(default_student_layers(n_teacher_layers) if student_layers is None else student_layers)
    if not layers or any(not 0 <= i < n_teacher_layers for i in layers):
        raise ValueError(f"student_layers must be non-empty indices in [0, {n_teacher_layers}), got {list(layers)}")
    if init not in ("teacher", "random"):
        raise ValueError(f"init must be 'teacher' or 'random', got {init!r}")
    student = DistilBertForMaskedLM(student_config(teacher.config, len(layers)))
    if init == "random":
        return student
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    mapping = weight_mapping(layers)
    with torch.no_grad():
        for student_name, param in student_params.items():
            param.copy_(teacher_params[mapping[student_name]])
    return student
