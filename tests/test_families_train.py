"""python -m fastdistil.train on RoBERTa and GPT-2 teachers: the families' objectives, flags and errors end to end
(tiny random teachers from configs, byte-level BPE tokenizers trained on the bundled corpus)."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, ElectraConfig, ElectraForMaskedLM

from fastdistil import evaluate, train
from fastdistil.train import checkpoint, data
from fastdistil.train.student import make_student
from helpers import TINY_POSITIONS, byte_level_tokenizer, tiny_teacher
from training_runs import args, metrics_of

SEQ_LEN = str(TINY_POSITIONS)


def run_args(teacher, corpus, out, *extra):
    return args(teacher, corpus, out, "--max-seq-len", SEQ_LEN, *extra)


def test_causal_labels_are_the_originals_shift():
    """The original's CLM loss is CE(s_logits[:, :-1], clm_labels[:, 1:]) with clm_labels the ids, -100 at
    padding (prepare_batch_clm); CausalShift's labels give the same loss on the unshifted logits."""
    ids, mask = data.collate([list(range(3, 15)), list(range(20, 27))], pad_id=0)
    inputs, labels = data.CausalShift()(ids, mask)
    assert torch.equal(inputs, ids)
    clm_labels = ids.masked_fill(~mask, -100)
    assert torch.equal(labels[:, :-1], clm_labels[:, 1:]) and (labels[:, -1] == -100).all()
    logits = torch.randn(*ids.shape, 40)
    original = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 40), clm_labels[:, 1:].reshape(-1))
    ours = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), labels.reshape(-1))
    torch.testing.assert_close(ours, original, rtol=0, atol=0)


@pytest.mark.parametrize("family, model_class", [("roberta", AutoModelForMaskedLM), ("gpt2", AutoModelForCausalLM)])
def test_each_family_trains_and_exports_a_student_of_half_depth(request, corpus, tmp_path, family, model_class):
    teacher_dir = request.getfixturevalue(f"{family}_dir")
    out = tmp_path / family
    summary = train.main(train.parse_args(run_args(teacher_dir, corpus, out, "--max-steps", "3",
                                                   "--alpha-mse", "0.5")))
    lm = "clm" if family == "gpt2" else "mlm"
    record = metrics_of(out)[-1]
    assert all(torch.isfinite(torch.tensor(record[k])) for k in ("loss", "loss_ce", f"loss_{lm}", "loss_cos",
                                                                   "loss_mse"))
    assert record["loss_mse"] > 0
    config = json.loads((out / "config.json").read_text())
    assert (config[f"alpha_{lm}"], config["alpha_mlm" if family == "gpt2" else "alpha_clm"]) == (2.0, 0.0)
    student = model_class.from_pretrained(out / "student")
    assert type(student).__name__ == type(tiny_teacher(family)).__name__
    assert student.config.num_hidden_layers == 2
    assert 0 < summary[f"student_heldout_{lm}_loss"] < 20
    if family == "gpt2":
        for who in ("teacher", "student"):
            assert summary[f"{who}_heldout_perplexity"] == pytest.approx(math.exp(summary[f"{who}_heldout_clm_loss"]))


def test_a_gpt2_run_resumes_bit_identically(gpt2_dir, corpus, tmp_path):
    out = tmp_path / "run"
    flags = run_args(gpt2_dir, corpus, out, "--max-steps", "4", "--save-every", "2")
    train.main(train.parse_args(flags))
    straight = load_file(out / "student" / "model.safetensors")
    straight_metrics = metrics_of(out)
    shutil.rmtree(out / "checkpoints" / "step-00000004")  # as if killed after step 3
    train.main(train.parse_args([*flags, "--resume"]))
    resumed = load_file(out / "student" / "model.safetensors")
    assert [m["loss"] for m in metrics_of(out)] == [m["loss"] for m in straight_metrics]
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name


@pytest.mark.parametrize("family, flags, frozen", [
    ("gpt2", ["--freeze-pos-embs"], ["transformer.wpe.weight"]),
    ("roberta", ["--freeze-pos-embs", "--freeze-token-type-embs"],
     ["roberta.embeddings.position_embeddings.weight", "roberta.embeddings.token_type_embeddings.weight"]),
])
def test_frozen_embeddings_stay_bit_identical_and_get_no_optimizer_state(request, corpus, tmp_path, family, flags,
                                                                          frozen):
    teacher_dir = request.getfixturevalue(f"{family}_dir")
    out = tmp_path / "frozen"
    train.main(train.parse_args(run_args(teacher_dir, corpus, out, "--max-steps", "2", "--save-every", "2",
                                         "--lr", "1e-2", *flags)))
    teacher = dict(tiny_teacher(family).named_parameters())
    student = load_file(out / "student" / "model.safetensors")
    for name in frozen:
        assert torch.equal(student[name], teacher[name]), name
    moved = "transformer.wte.weight" if family == "gpt2" else "roberta.embeddings.word_embeddings.weight"
    assert not torch.equal(student[moved], teacher[moved])
    optimizer = checkpoint.load(out / "checkpoints" / "step-00000002")["optimizer"]
    n_optimized = sum(len(group["params"]) for group in optimizer["param_groups"])
    assert n_optimized == len(optimizer["state"])
    trainable = [n for n, p in make_student(tiny_teacher(family)).named_parameters()]
    assert n_optimized == len(trainable) - len(frozen)


@pytest.mark.parametrize("which, extra, match", [
    ("bert", ["--alpha-clm", "0.5"], "--alpha-clm 0.5: the teacher is a masked LM"),
    ("gpt2", ["--alpha-mlm", "2"], "--alpha-mlm 2.0: the teacher is a causal"),
    ("gpt2", ["--restrict-ce-to-mask"], "--restrict-ce-to-mask"),
    ("bert", ["--freeze-token-type-embs"], "--freeze-token-type-embs"),
    ("gpt2", ["--max-seq-len", str(TINY_POSITIONS + 1)], "--max-seq-len"),
])
def test_flags_that_do_not_fit_the_teachers_family_are_errors(request, corpus, tmp_path, capsys, which, extra,
                                                              match):
    teacher_dir = request.getfixturevalue("teacher_dir" if which == "bert" else f"{which}_dir")
    capsys.readouterr()  # what building the fixture printed
    flags = args(teacher_dir, corpus, tmp_path / "bad", *extra) if which == "bert" else \
        run_args(teacher_dir, corpus, tmp_path / "bad", *extra)
    assert train.cli(flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert not (tmp_path / "bad").exists()


def test_a_teacher_of_another_family_or_a_tokenizer_that_does_not_fit_is_an_error(roberta_dir, gpt2_dir, corpus,
                                                                                   tmp_path, capsys):
    electra = tmp_path / "electra"
    ElectraForMaskedLM(ElectraConfig(vocab_size=320, embedding_size=32, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64)).save_pretrained(electra)
    byte_level_tokenizer("roberta").save_pretrained(electra)
    capsys.readouterr()
    failures = {
        "unsupported": (run_args(electra, corpus, tmp_path / "a"), "model_type 'electra'"),
        # The same vocabulary size, but a GPT-2 tokenizer lacks the pad and mask tokens RoBERTa trains with.
        "mismatch": (run_args(roberta_dir, corpus, tmp_path / "b", "--tokenizer", str(gpt2_dir)),
                     "for a roberta teacher"),
    }
    for name, (flags, match) in failures.items():
        assert train.cli(flags) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, (name, err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_gpt2_run_is_scored_by_perplexity_against_a_random_init_student(gpt2_dir, corpus, tmp_path):
    out = tmp_path / "run"
    summary = train.main(train.parse_args(run_args(gpt2_dir, corpus, out, "--max-steps", "2")))
    report = evaluate.main(evaluate.parse_args([str(out)]))
    assert report["task"] == "perplexity"
    assert report["teacher"] == pytest.approx(summary["teacher_heldout_perplexity"], rel=1e-6)
    assert report["student"] == pytest.approx(summary["student_heldout_perplexity"], rel=1e-6)
    random_run = json.loads((out / "random-init" / "config.json").read_text())
    assert random_run["student_init"] == "random" and random_run["max_steps"] == 2
    # A student copied from a (random) teacher predicts like it; a random init does not.
    assert report["models"]["student"]["metrics"]["top1_agreement"] > \
        report["models"]["random_student"]["metrics"]["top1_agreement"]
    assert (out / "eval_perplexity.json").is_file()


def test_a_roberta_run_is_fine_tuned_on_a_classification_task(roberta_dir, corpus, tmp_path):
    out = tmp_path / "run"
    train.main(train.parse_args(run_args(roberta_dir, corpus, out, "--max-steps", "1")))
    report = evaluate.main(evaluate.parse_args([str(out), "--max-train-examples", "64", "--max-eval-examples", "32",
                                                "--epochs", "1", "--max-seq-len", SEQ_LEN]))
    assert report["task"] == "wiki-topic"
    assert {"teacher", "student", "random_student"} <= set(report["models"])
    assert all(0 <= report[name] <= 1 for name in ("teacher", "student", "random_student"))


def test_the_built_in_causal_teacher_trains_by_its_name(corpus, tmp_path):
    out = tmp_path / "run"
    summary = train.main(train.parse_args(["--teacher", "tiny-gpt2", "--dataset", str(corpus), "--output-dir",
                                           str(out), "--max-steps", "2", "--batch-size", "4"]))
    assert summary["student_params"] < 0.62 * summary["teacher_params"]  # the "about 40 % smaller"
    assert summary["student_heldout_perplexity"] < 2 * summary["teacher_heldout_perplexity"]
    assert json.loads((out / "config.json").read_text())["teacher"] == "tiny-gpt2"
