"""The student's architecture and its initialization from the teacher, checked against transformers' models."""

import pytest
import torch
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM, DistilBertForMaskedLM

from fastdistil.train.student import make_student


def tiny_teacher(layers=12, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=40)
    return BertForMaskedLM(config).eval()


def test_twelve_layer_teacher_gives_the_original_layer_choice():
    teacher = tiny_teacher()
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
    teacher = tiny_teacher()
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


def test_a_full_copy_computes_the_teachers_logits():
    # With every layer kept and BERT's token-type embedding zeroed (DistilBERT has none), the student is the
    # teacher: the same logits from transformers' own forward passes.
    teacher = tiny_teacher(layers=3)
    with torch.no_grad():
        teacher.bert.embeddings.token_type_embeddings.weight.zero_()
    student = make_student(teacher, student_layers=(0, 1, 2)).eval()
    ids = torch.randint(0, 97, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        expected = teacher(input_ids=ids, attention_mask=mask).logits
        actual = student(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(actual[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)


def test_other_depths_take_every_other_layer():
    teacher = tiny_teacher(layers=8)
    student = make_student(teacher)
    assert student.config.n_layers == 4
    for s_index, t_index in enumerate((0, 2, 4, 6)):
        assert torch.equal(student.distilbert.transformer.layer[s_index].ffn.lin1.weight,
                           teacher.bert.encoder.layer[t_index].intermediate.dense.weight)


def test_random_init_is_the_same_shape_with_fresh_weights():
    teacher = tiny_teacher()
    student = make_student(teacher, init="random")
    distilled = make_student(teacher)
    assert [p.shape for p in student.parameters()] == [p.shape for p in distilled.parameters()]
    assert not torch.equal(student.distilbert.transformer.layer[0].ffn.lin1.weight,
                           teacher.bert.encoder.layer[0].intermediate.dense.weight)


def test_saved_student_loads_with_automodel_and_gives_the_same_logits(tmp_path):
    student = make_student(tiny_teacher()).eval()
    student.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, student(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(student_layers=(0, 12)), "student_layers"),
    (dict(student_layers=()), "student_layers"),
    (dict(init="pretrained"), "init"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_student(tiny_teacher(), **kwargs)


def test_a_teacher_that_is_not_a_bert_masked_lm_is_rejected():
    not_bert = make_student(tiny_teacher())
    with pytest.raises(ValueError, match="teacher must be a BERT masked LM"):
        make_student(not_bert)
