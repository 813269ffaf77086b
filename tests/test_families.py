"""The model families: each student against the original extraction scripts' key lists and against
transformers' own models (logits, ties, export), and each family's special tokens, positions and embeddings."""

import copy

import pytest
import torch
from helpers import TINY_POSITIONS, TINY_VOCAB, byte_level_tokenizer, tiny_teacher
from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, BertConfig, DistilBertConfig,
                          ElectraConfig, GPT2Config, RobertaConfig, RobertaModel, T5Config)

from fastdistil.assets import TOKENIZER
from fastdistil.train import heads
from fastdistil.train.families import BERT, GPT2, ROBERTA, SpecialIds, family_of
from fastdistil.train.student import make_student

FAMILIES = ("bert", "roberta", "gpt2")
ORIGINAL_LAYERS = (0, 2, 4, 7, 9, 11)


def extract_py_keys(model_type, vocab_transform):
    """Student key -> teacher key, exactly as the original scripts fill their compressed state dict for a
    12-layer teacher: scripts/extract_distilbert.py for bert, scripts/extract.py for roberta and gpt2."""
    sd = {}
    if model_type == "bert":
        for w in ["word_embeddings", "position_embeddings"]:
            sd[f"distilbert.embeddings.{w}.weight"] = f"bert.embeddings.{w}.weight"
        for w in ["weight", "bias"]:
            sd[f"distilbert.embeddings.LayerNorm.{w}"] = f"bert.embeddings.LayerNorm.{w}"
        for std_idx, teacher_idx in enumerate(ORIGINAL_LAYERS):
            s, t = f"distilbert.transformer.layer.{std_idx}", f"bert.encoder.layer.{teacher_idx}"
            for w in ["weight", "bias"]:
                sd[f"{s}.attention.q_lin.{w}"] = f"{t}.attention.self.query.{w}"
                sd[f"{s}.attention.k_lin.{w}"] = f"{t}.attention.self.key.{w}"
                sd[f"{s}.attention.v_lin.{w}"] = f"{t}.attention.self.value.{w}"
                sd[f"{s}.attention.out_lin.{w}"] = f"{t}.attention.output.dense.{w}"
                sd[f"{s}.sa_layer_norm.{w}"] = f"{t}.attention.output.LayerNorm.{w}"
                sd[f"{s}.ffn.lin1.{w}"] = f"{t}.intermediate.dense.{w}"
                sd[f"{s}.ffn.lin2.{w}"] = f"{t}.output.dense.{w}"
                sd[f"{s}.output_layer_norm.{w}"] = f"{t}.output.LayerNorm.{w}"
        sd["vocab_projector.weight"] = "cls.predictions.decoder.weight"
        sd["vocab_projector.bias"] = "cls.predictions.bias"
        if vocab_transform:
            for w in ["weight", "bias"]:
                sd[f"vocab_transform.{w}"] = f"cls.predictions.transform.dense.{w}"
                sd[f"vocab_layer_norm.{w}"] = f"cls.predictions.transform.LayerNorm.{w}"
        return sd
    prefix = "roberta" if model_type == "roberta" else "transformer"
    if model_type == "gpt2":
        for param_name in ["wte.weight", "wpe.weight"]:
            sd[f"{prefix}.{param_name}"] = f"{prefix}.{param_name}"
    else:
        for w in ["word_embeddings", "position_embeddings", "token_type_embeddings"]:
            sd[f"{prefix}.embeddings.{w}.weight"] = f"{prefix}.embeddings.{w}.weight"
        for w in ["weight", "bias"]:
            sd[f"{prefix}.embeddings.LayerNorm.{w}"] = f"{prefix}.embeddings.LayerNorm.{w}"
    for std_idx, teacher_idx in enumerate(ORIGINAL_LAYERS):
        if model_type == "gpt2":
            for layer in ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"]:
                for w in ["weight", "bias"]:
                    sd[f"{prefix}.h.{std_idx}.{layer}.{w}"] = f"{prefix}.h.{teacher_idx}.{layer}.{w}"
            sd[f"{prefix}.h.{std_idx}.attn.bias"] = f"{prefix}.h.{teacher_idx}.attn.bias"
        else:
            for layer in ["attention.self.query", "attention.self.key", "attention.self.value",
                          "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
                          "output.dense", "output.LayerNorm"]:
                for w in ["weight", "bias"]:
                    sd[f"{prefix}.encoder.layer.{std_idx}.{layer}.{w}"] = \
                        f"{prefix}.encoder.layer.{teacher_idx}.{layer}.{w}"
    if model_type == "roberta":
        for layer in ["lm_head.decoder.weight", "lm_head.bias"]:
            sd[layer] = layer
        if vocab_transform:
            for w in ["weight", "bias"]:
                sd[f"lm_head.dense.{w}"] = f"lm_head.dense.{w}"
                sd[f"lm_head.layer_norm.{w}"] = f"lm_head.layer_norm.{w}"
    else:
        for w in ["weight", "bias"]:
            sd[f"{prefix}.ln_f.{w}"] = f"{prefix}.ln_f.{w}"
        sd["lm_head.weight"] = "lm_head.weight"
    return sd


# Keys of the original lists that are no parameter of their own in named_parameters(): the projections tied to
# the word embeddings, and GPT-2's causal-mask buffers (attn.bias), which transformers no longer has.
NOT_OWN_PARAMETERS = {
    "bert": {"vocab_projector.weight"},
    "roberta": {"lm_head.decoder.weight"},
    "gpt2": {"lm_head.weight"} | {f"transformer.h.{i}.attn.bias" for i in range(6)},
}


def batch(family, lengths=(11, 7), seed=0):
    """Right-padded (input_ids, attention_mask) of ordinary tokens, padded with the family's padding id."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, TINY_VOCAB, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    pad = family.special_ids(byte_level_tokenizer(family.name)).pad if family is not BERT else 0
    return ids.masked_fill(mask == 0, pad), mask


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("config, family", [
    (BertConfig(), BERT), (DistilBertConfig(), BERT), (RobertaConfig(), ROBERTA), (GPT2Config(), GPT2)])
def test_the_family_comes_from_the_model_type(config, family):
    assert family_of(config) is family


@pytest.mark.parametrize("name", FAMILIES)
def test_teacher_and_student_are_of_the_same_family(name):
    teacher = tiny_teacher(name)
    family = family_of(teacher)
    assert family.name == name and family_of(make_student(teacher)) is family
    assert family.causal == (name == "gpt2")


@pytest.mark.parametrize("config, model_type", [(ElectraConfig(), "electra"), (T5Config(), "t5")])
def test_an_unsupported_model_type_is_named(config, model_type):
    with pytest.raises(ValueError, match=rf"model_type '{model_type}'.*supported: bert, distilbert, gpt2, roberta"):
        family_of(config)


@pytest.mark.parametrize("vocab_transform", [True, False])
@pytest.mark.parametrize("name", FAMILIES)
def test_the_weight_mapping_is_the_original_scripts(name, vocab_transform):
    mapping = family_of(tiny_teacher(name, n_layers=1)).weight_mapping(ORIGINAL_LAYERS, vocab_transform)
    original = extract_py_keys(name, vocab_transform)
    expected = {s: t for s, t in original.items() if s not in NOT_OWN_PARAMETERS[name]}
    assert mapping == expected


@pytest.mark.parametrize("name", FAMILIES)
def test_the_mapping_covers_every_student_parameter_from_an_existing_teacher_one(name):
    teacher = tiny_teacher(name, n_layers=12)
    student = make_student(teacher)
    mapping = family_of(teacher).weight_mapping(ORIGINAL_LAYERS)
    student_params, teacher_params = dict(student.named_parameters()), dict(teacher.named_parameters())
    assert set(mapping) == set(student_params)
    assert set(mapping.values()) <= set(teacher_params)
    # make_student's default layers are the original choice: student layer 3 holds teacher layer 7, not 6.
    for s_name, t_name in mapping.items():
        assert torch.equal(student_params[s_name], teacher_params[t_name]), s_name


@pytest.mark.parametrize("name", FAMILIES)
def test_a_full_depth_copy_computes_the_teachers_logits(name):
    teacher = tiny_teacher(name)
    if name == "bert":  # DistilBERT has no token-type embeddings: BERT's must add nothing
        with torch.no_grad():
            teacher.bert.embeddings.token_type_embeddings.weight.zero_()
    student = make_student(teacher, student_layers=range(4)).eval()
    ids, mask = batch(family_of(teacher))
    real = mask.bool()
    torch.testing.assert_close(logits(student, ids, mask)[real], logits(teacher, ids, mask)[real], rtol=0, atol=0)


def tied_pairs(model):
    """(projection weight, word embeddings) and, where the family ties it too, (projection bias, head bias)."""
    proj = heads.projection(model)
    pairs = [(proj.weight, model.get_input_embeddings().weight)]
    if hasattr(model, "lm_head") and hasattr(model.lm_head, "bias"):
        pairs.append((proj.bias, model.lm_head.bias))
    return pairs


@pytest.mark.parametrize("name", FAMILIES)
def test_the_students_projection_is_tied(name):
    student = make_student(tiny_teacher(name))
    for a, b in tied_pairs(student):
        assert a is b
    if name == "gpt2":
        assert student.lm_head.weight is student.transformer.wte.weight and student.lm_head.bias is None
    if name == "bert":
        assert student.vocab_projector.weight is student.distilbert.embeddings.word_embeddings.weight


@pytest.mark.parametrize("role", ["teacher", "student"])
@pytest.mark.parametrize("name", FAMILIES)
def test_the_projection_of_its_inputs_is_the_models_logits(name, role):
    teacher = tiny_teacher(name)
    model = teacher if role == "teacher" else make_student(teacher).eval()
    family = family_of(model)
    ids, mask = batch(family)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        head_input, hidden = heads.ProjectionInputs(model)(ids, mask)
        assert torch.equal(heads.projection(model)(head_input), out.logits)
        assert torch.equal(hidden, out.hidden_states[-1])
        assert family.projection(model).weight.shape == (TINY_VOCAB, 32)
        rows = torch.rand(mask.shape, generator=torch.Generator().manual_seed(1)) < 0.3
        assert torch.equal(heads.logits_at(model, ids, mask, rows), out.logits[rows])


@pytest.mark.parametrize("name", FAMILIES)
def test_the_exported_student_reloads_with_the_auto_class(name, tmp_path):
    student = make_student(tiny_teacher(name)).eval()
    student.save_pretrained(tmp_path)
    auto = AutoModelForCausalLM if family_of(student).causal else AutoModelForMaskedLM
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(student)
    ids, mask = batch(family_of(student))
    torch.testing.assert_close(logits(loaded, ids, mask), logits(student, ids, mask), rtol=0, atol=0)
    for a, b in tied_pairs(loaded):
        assert a is b


@pytest.mark.parametrize("name, token_types", [
    ("bert", None),
    ("roberta", lambda s: s.roberta.embeddings.token_type_embeddings.weight),
    ("gpt2", None),
])
def test_frozen_embeddings(name, token_types):
    student = make_student(tiny_teacher(name))
    family = family_of(student)
    positions = {"bert": lambda s: s.distilbert.embeddings.position_embeddings.weight,
                 "roberta": lambda s: s.roberta.embeddings.position_embeddings.weight,
                 "gpt2": lambda s: s.transformer.wpe.weight}[name](student)
    assert family.frozen_embeddings(student, positions=False, token_types=False) == []
    (frozen,) = family.frozen_embeddings(student, positions=True, token_types=False)
    assert frozen is positions
    if token_types is None:
        with pytest.raises(ValueError, match="--freeze-token-type-embs.*no token-type embeddings"):
            family.frozen_embeddings(student, positions=True, token_types=True)
    else:
        both = family.frozen_embeddings(student, positions=True, token_types=True)
        assert len(both) == 2 and both[0] is positions and both[1] is token_types(student)


def test_special_ids_of_the_bundled_bert_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    ids = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", "[PAD]", "[MASK]"])
    assert BERT.special_ids(tokenizer) == SpecialIds(*ids) == (101, 102, 0, 103)


def test_special_ids_of_a_roberta_tokenizer():
    tokenizer = byte_level_tokenizer("roberta")
    assert ROBERTA.special_ids(tokenizer) == SpecialIds(*tokenizer.convert_tokens_to_ids(
        ["<s>", "</s>", "<pad>", "<mask>"])) == (0, 2, 1, 4)
    # What RoBERTa's tokenizer itself wraps a text in: the chunks' first and last ids.
    encoded = tokenizer("a sentence")["input_ids"]
    assert (encoded[0], encoded[-1]) == ROBERTA.special_ids(tokenizer)[:2]


def test_special_ids_of_a_gpt2_tokenizer_pad_with_the_end_of_text_unless_it_has_a_pad_token():
    tokenizer = byte_level_tokenizer("gpt2")
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert GPT2.special_ids(tokenizer) == (endoftext, endoftext, endoftext, None)
    with_pad = copy.deepcopy(tokenizer)
    with_pad.add_special_tokens({"pad_token": "<pad>"})
    assert GPT2.special_ids(with_pad).pad == with_pad.convert_tokens_to_ids("<pad>") != endoftext


def test_a_tokenizer_without_a_needed_token_is_named():
    with pytest.raises(ValueError, match="bert model needs a cls_token for its first id"):
        BERT.special_ids(byte_level_tokenizer("gpt2"))
    with pytest.raises(ValueError, match="roberta model needs a pad_token for its pad id"):
        ROBERTA.special_ids(byte_level_tokenizer("gpt2"))


@pytest.mark.parametrize("name", FAMILIES)
def test_max_positions_is_the_longest_sequence_the_model_takes(name):
    teacher = tiny_teacher(name)
    family = family_of(teacher)
    n = family.max_positions(teacher.config)
    assert n == TINY_POSITIONS
    ids, mask = batch(family, lengths=(n,))
    assert logits(teacher, ids, mask).shape[1] == n
    ids, mask = batch(family, lengths=(n + 1,))
    with pytest.raises((IndexError, RuntimeError)):
        logits(teacher, ids, mask)


def untied(teacher):
    teacher.config.tie_word_embeddings = False
    proj = heads.projection(teacher)
    proj.weight = torch.nn.Parameter(proj.weight.detach().clone())
    return teacher


@pytest.mark.parametrize("name, change, match", [
    ("bert", lambda t: setattr(t.config, "layer_norm_eps", 1e-5), "layer_norm_eps must be 1e-12"),
    ("bert", lambda t: setattr(t.config, "hidden_act", "tanh"), "hidden_act must be 'gelu' or 'relu'"),
    ("roberta", untied, "tie_word_embeddings=True"),
    ("gpt2", untied, "tie_word_embeddings=True"),
    ("gpt2", lambda t: setattr(t.config, "scale_attn_by_inverse_layer_idx", True),
     "scale_attn_by_inverse_layer_idx must be False"),
])
def test_a_teacher_the_student_cannot_copy_exactly_is_rejected(name, change, match):
    teacher = tiny_teacher(name)
    change(teacher)
    with pytest.raises(ValueError, match=match):
        make_student(teacher)


def test_a_teacher_without_its_lm_head_is_rejected():
    body = RobertaModel(tiny_teacher("roberta").config)
    with pytest.raises(ValueError, match=r"teacher must be a RoBERTa masked LM \(RobertaForMaskedLM\), got "
                                         r"RobertaModel"):
        make_student(body)
    with pytest.raises(TypeError, match="model must be a RobertaForMaskedLM .roberta family., got RobertaModel"):
        heads.ProjectionInputs(body)


def test_teacher_weights_the_family_does_not_know_are_an_error_not_a_random_start():
    config = tiny_teacher("gpt2").config
    config.add_cross_attention = True
    teacher = type(tiny_teacher("gpt2"))(config)
    with pytest.raises(ValueError, match=r"no teacher weight maps to: transformer\.h\.0\.crossattention"):
        make_student(teacher)
    assert make_student(teacher, init="random").config.add_cross_attention  # nothing to copy, nothing lost
