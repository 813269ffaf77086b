"""What every model family answers, and the answers most families share."""

import abc
import copy
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from transformers import PretrainedConfig, PreTrainedModel


class SpecialIds(NamedTuple):
    """Token ids the data pipeline needs: every training chunk is first + chunk + last, batches are padded
    with pad, and masked-LM targets are replaced by mask (None for a causal LM, which masks nothing)."""

    first: int
    last: int
    pad: int
    mask: int | None


def layer_mapping(student_layers: Sequence[int], student_prefix: str, teacher_prefix: str,
                  parts: Mapping[str, str]) -> dict[str, str]:
    """The weight and bias of each student sublayer -> those of the teacher sublayer it starts from: for student
    layer i, f"{student_prefix}.{i}.{part}" from f"{teacher_prefix}.{student_layers[i]}.{parts[part]}"."""
    return {f"{student_prefix}.{s}.{sp}.{w}": f"{teacher_prefix}.{t}.{tp}.{w}"
            for s, t in enumerate(student_layers) for sp, tp in parts.items() for w in ("weight", "bias")}


class Family(abc.ABC):
    """One model family: how its teacher becomes a student and where its models split for the fused loss.

    Subclasses set the class attributes and implement the abstract methods; one instance of each is all there
    ever is (fastdistil.train.families.family_of).
    """

    name: str
    model_types: tuple[str, ...]  # config.model_type of the teachers and students of this family
    causal: bool  # causal-LM training (labels are the next tokens) instead of masked-LM
    teacher_class: type[PreTrainedModel]
    student_class: type[PreTrainedModel]
    teacher_kind: str  # how the error for a teacher of the wrong class names the expected one
    # For each field of SpecialIds, the tokenizer's special tokens that may fill it, in order of preference
    # (none: the field is None).
    special_tokens: SpecialIds
    # Student parameter names of the embeddings --freeze-pos-embs / --freeze-token-type-embs freeze (None:
    # the student has none).
    position_embeddings: str | None
    token_type_embeddings: str | None

    def check_teacher(self, teacher: PreTrainedModel) -> None:
        """ValueError unless the student this family builds from `teacher` copies it exactly."""
        self._check_teacher_class(teacher)
        # The student's projection is its word embedding matrix; an untied teacher's projection has no
        # place in it.
        if self.projection(teacher).weight is not teacher.get_input_embeddings().weight:
            raise ValueError(f"teacher: its vocabulary projection must be tied to its word embeddings "
                             f"(tie_word_embeddings=True) for a {self.name} student, and it is not")

    def student_config(self, teacher_config: PretrainedConfig, n_layers: int) -> PretrainedConfig:
        """The teacher's own config with n_layers layers: the student is the teacher's architecture."""
        config = copy.deepcopy(teacher_config)
        config.num_hidden_layers = n_layers
        config.name_or_path = ""  # the student is not the teacher's checkpoint
        return config

    @abc.abstractmethod
    def weight_mapping(self, student_layers: Sequence[int], vocab_transform: bool = True) -> dict[str, str]:
        """Student parameter name -> teacher parameter name (named_parameters(), so a tied weight appears once,
        under its first name). Student layer i starts from teacher layer student_layers[i]. With
        vocab_transform=False the MLM head's transform (dense + LayerNorm) is left out and stays freshly
        initialized, as in the original extraction scripts without --vocab_transform."""

    @abc.abstractmethod
    def projection(self, model: torch.nn.Module) -> torch.nn.Linear:
        """The [V, D] vocabulary projection of a teacher or student of this family, with its bias (or None)."""

    @abc.abstractmethod
    def projection_inputs(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, L, D] input of the vocabulary projection, [B, L, D] last hidden state for the cosine loss)."""

    def max_positions(self, config: PretrainedConfig) -> int:
        """The longest sequence the model's position embeddings take."""
        return config.max_position_embeddings

    def special_ids(self, tokenizer) -> SpecialIds:
        """The tokenizer's SpecialIds for this family; ValueError naming a token the tokenizer lacks."""
        return SpecialIds(*(self._token_id(tokenizer, field, names) if names else None
                            for field, names in zip(SpecialIds._fields, self.special_tokens)))

    def frozen_embeddings(self, student: PreTrainedModel, positions: bool, token_types: bool
                          ) -> list[torch.nn.Parameter]:
        """The student's parameters that --freeze-pos-embs (positions) and --freeze-token-type-embs
        (token_types) freeze."""
        self.check_model(student)
        params = dict(student.named_parameters())
        wanted = [(positions, self.position_embeddings, "--freeze-pos-embs", "position"),
                  (token_types, self.token_type_embeddings, "--freeze-token-type-embs", "token-type")]
        frozen = []
        for asked, name, flag, kind in wanted:
            if not asked:
                continue
            if name is None:
                raise ValueError(f"{flag}: a {type(student).__name__} student ({self.name} family) has no "
                                 f"{kind} embeddings to freeze")
            frozen.append(params[name])
        return frozen

    def _check_teacher_class(self, teacher: torch.nn.Module) -> None:
        if not isinstance(teacher, self.teacher_class):
            raise ValueError(f"teacher must be {self.teacher_kind}, got {type(teacher).__name__} "
                             f"(model_type {teacher.config.model_type!r})")

    def check_model(self, model: torch.nn.Module) -> None:
        """TypeError unless model is a teacher or student of this family, whose head the methods know."""
        classes = dict.fromkeys((self.teacher_class, self.student_class))
        if not isinstance(model, tuple(classes)):
            expected = " or ".join(c.__name__ for c in classes)
            raise TypeError(f"model must be a {expected} ({self.name} family), got {type(model).__name__}")

    def _token_id(self, tokenizer, field: str, names: tuple[str, ...]) -> int:
        for name in names:
            token_id = getattr(tokenizer, f"{name}_token_id", None)
            if token_id is not None:
                return token_id
        tokens = " or ".join(f"a {name}_token" for name in names)
        raise ValueError(f"tokenizer: a {self.name} model needs {tokens} for its {field} id, and the "
                         f"{type(tokenizer).__name__} has none")
