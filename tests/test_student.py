"""The student's architecture and its initialization from the teacher, checked against transformers' models.
What differs between the families (key lists, logits, ties, export) is tested in test_families.py."""

import pytest
import torch
from helpers import tiny_teacher
from transformers import DistilBertForMaskedLM

from fastdistil.train import heads
from fastdistil.train.families import family_of
from fastdistil.train.student import default_student_layers, make_student

FAMILIES = ("bert", "roberta", "gpt2")


def test_twelve_layer_teacher_gives_the_original_layer_choice():
    teacher = tiny_teacher("bert", n_layers=12)
    student = make_student(teacher)
    assert isinstance(student, DistilBertForMaskedLM)
    assert student.config.n_layers == 6 and student.config.dim == 32 and student.config.n_heads == 4
    for s_index, t_index in enumerate((0, 2, 4, 7, 9, 11)):
        s_layer = student.distilbert.transformer.layer[s_index]
        t_layer = teacher.bert.encoder.layer[t_index]
        pairs = [
            (s_layer.attention.q_lin, t_layer.attention.self.query),
            (s_layer.attention.k_lin, t_layer.attention.self.key),
            (s_layer.attention.v_lin, t_layer.attention.self.value),
            (s_layer.attention.out_lin, t_layer.attention.output.dense),
            (s_layer.sa_layer_norm, t_layer.attention.output.LayerNorm),
            (s_layer.ffn.lin1, t_layer.intermediate.dense),
            (s_layer.ffn.lin2, t_layer.output.dense),
            (s_layer.output_layer_norm, t_layer.output.LayerNorm),
        ]
        for s_module, t_module in pairs:
            assert torch.equal(s_module.weight, t_module.weight)
            assert torch.equal(s_module.bias, t_module.bias)


def test_embeddings_and_mlm_head_are_copied_and_the_projector_stays_tied():
    teacher = tiny_teacher("bert", n_layers=12)
    student = make_student(teacher)
    emb_s, emb_t = student.distilbert.embeddings, teacher.bert.embeddings
    assert torch.equal(emb_s.word_embeddings.weight, emb_t.word_embeddings.weight)
    assert torch.equal(emb_s.position_embeddings.weight, emb_t.position_embeddings.weight)
    assert torch.equal(emb_s.LayerNorm.weight, emb_t.LayerNorm.weight)
    head = teacher.cls.predictions
    assert torch.equal(student.vocab_transform.weight, head.transform.dense.weight)
    assert torch.equal(student.vocab_layer_norm.bias, head.transform.LayerNorm.bias)
    assert torch.equal(student.vocab_projector.bias, head.bias)
    assert student.vocab_projector.weight.data_ptr() == emb_s.word_embeddings.weight.data_ptr()
    assert not hasattr(emb_s, "token_type_embeddings")


def test_other_depths_take_every_other_layer():
    assert default_student_layers(12) == (0, 2, 4, 7, 9, 11)
    assert default_student_layers(8) == (0, 2, 4, 6) and default_student_layers(3) == (0, 2)
    teacher = tiny_teacher("bert", n_layers=8)
    student = make_student(teacher)
    assert student.config.n_layers == 4
    for s_index, t_index in enumerate((0, 2, 4, 6)):
        assert torch.equal(student.distilbert.transformer.layer[s_index].ffn.lin1.weight,
                           teacher.bert.encoder.layer[t_index].intermediate.dense.weight)


@pytest.mark.parametrize("name", FAMILIES)
def test_the_student_is_the_teachers_family_at_half_its_depth(name):
    teacher = tiny_teacher(name, n_layers=12)
    student = make_student(teacher)
    family = family_of(teacher)
    assert type(student) is family.student_class and student.config.num_hidden_layers == 6
    assert student.config.hidden_size == teacher.config.hidden_size
    assert student.config.vocab_size == teacher.config.vocab_size
    assert family.max_positions(student.config) == family.max_positions(teacher.config)


def head_transform(model):
    """The MLM head's transform (dense and LayerNorm weights) of a BERT, DistilBERT or RoBERTa model."""
    if hasattr(model, "lm_head"):
        return [model.lm_head.dense.weight, model.lm_head.layer_norm.weight]
    if hasattr(model, "cls"):
        return [model.cls.predictions.transform.dense.weight, model.cls.predictions.transform.LayerNorm.weight]
    return [model.vocab_transform.weight, model.vocab_layer_norm.weight]


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_without_vocab_transform_the_heads_transform_starts_fresh(name):
    # Perturbed: a fresh LayerNorm's ones (and a fresh bias's zeros) would equal an untrained teacher's.
    teacher = tiny_teacher(name)
    with torch.no_grad():
        for w in [*head_transform(teacher), heads.projection(teacher).bias]:
            w.add_(torch.randn_like(w))
    copied, fresh = make_student(teacher), make_student(teacher, vocab_transform=False)
    for c, f, t in zip(head_transform(copied), head_transform(fresh), head_transform(teacher)):
        assert torch.equal(c, t) and not torch.equal(f, t)
    # The projection bias is copied either way.
    assert torch.equal(heads.projection(fresh).bias, heads.projection(teacher).bias)


def test_gpt2_has_no_vocab_transform_to_leave_out():
    teacher = tiny_teacher("gpt2")
    a, b = make_student(teacher), make_student(teacher, vocab_transform=False)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("name", FAMILIES)
def test_random_init_is_the_same_shape_with_fresh_weights(name):
    teacher = tiny_teacher(name, n_layers=12)
    student = make_student(teacher, init="random")
    distilled = make_student(teacher)
    assert type(student) is type(distilled)
    assert [p.shape for p in student.parameters()] == [p.shape for p in distilled.parameters()]
    assert not any(torch.equal(a, b) for a, b in zip(student.parameters(), distilled.parameters())
                   if a.dim() == 2)  # matrices; LayerNorms start at ones and zeros either way


@pytest.mark.parametrize("kwargs, match", [
    (dict(student_layers=(0, 12)), "student_layers"),
    (dict(student_layers=()), "student_layers"),
    (dict(init="pretrained"), "init"),
])
@pytest.mark.parametrize("name", FAMILIES)
def test_bad_arguments(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_student(tiny_teacher(name, n_layers=12), **kwargs)


def test_a_teacher_that_is_not_a_bert_masked_lm_is_rejected():
    not_bert = make_student(tiny_teacher("bert"))
    with pytest.raises(ValueError, match="teacher must be a BERT masked LM"):
        make_student(not_bert)
