"""python -m fastdistil.train end to end on a tiny teacher and a tiny corpus."""

import math
import shutil

import pytest
import torch
from transformers import AutoModelForMaskedLM, BertModel

from fastdistil import train
from fastdistil.train import checkpoint, data
from training_runs import args, metrics_of, model_dir


def test_a_short_run_lowers_the_loss_and_leaves_a_loadable_student(teacher_dir, corpus, tmp_path):
    out = tmp_path / "run"
    summary = train.main(train.parse_args(args(teacher_dir, corpus, out, "--max-steps", "12", "--lr", "2e-3")))
    metrics = metrics_of(out)
    assert [m["step"] for m in metrics] == list(range(1, 13))
    first, last = metrics[0]["loss"], sum(m["loss"] for m in metrics[-3:]) / 3
    assert last < first
    assert summary["steps"] == 12 and summary["student_params"] < summary["teacher_params"]
    assert 0 <= summary["student_teacher_top1_agreement"] <= 1
    student = AutoModelForMaskedLM.from_pretrained(out / "student")
    assert student.config.n_layers == 2


def test_fused_and_reference_losses_give_the_same_first_steps(teacher_dir, corpus, tmp_path):
    runs = {}
    for loss in ("fused", "fused-logits", "reference"):
        out = tmp_path / loss
        train.main(train.parse_args(args(teacher_dir, corpus, out, "--max-steps", "3", "--loss", loss)))
        runs[loss] = metrics_of(out)
    for fused in ("fused", "fused-logits"):
        for a, b in zip(runs[fused], runs["reference"], strict=True):
            for key in ("loss", "loss_ce", "loss_mlm", "loss_cos"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (fused, key)


def test_the_student_attention_is_a_choice_that_leaves_the_export_portable(teacher_dir, corpus, tmp_path):
    """On CPU fastdistil's attention is SDPA behind transformers' registry (same dropout draws): the same run.
    Eager draws its attention dropout differently, so its losses only come close."""
    runs = {}
    for attention in ("sdpa", "fastdistil", "eager"):
        out = tmp_path / attention
        train.main(train.parse_args(args(teacher_dir, corpus, out, "--max-steps", "2", "--attention", attention)))
        runs[attention] = metrics_of(out)
        assert "fastdistil" not in (out / "student" / "config.json").read_text()
    for a, b in zip(runs["fastdistil"], runs["sdpa"], strict=True):
        for key in ("loss", "loss_ce", "loss_mlm", "loss_cos", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert runs["eager"][0]["loss_cos"] == pytest.approx(runs["sdpa"][0]["loss_cos"], rel=0.2)
    assert AutoModelForMaskedLM.from_pretrained(tmp_path / "fastdistil" / "student").config.model_type == "distilbert"


def test_a_run_is_a_function_of_its_seed(teacher_dir, corpus, tmp_path):
    """Batch order, masking and dropout all derive from the seed: two runs log the same losses."""
    runs = []
    for name in ("a", "b"):
        train.main(train.parse_args(args(teacher_dir, corpus, tmp_path / name, "--max-steps", "3")))
        runs.append([{k: m[k] for k in ("loss", "loss_ce", "loss_mlm", "loss_cos", "grad_norm")}
                     for m in metrics_of(tmp_path / name)])
    assert runs[0] == runs[1]
    train.main(train.parse_args(args(teacher_dir, corpus, tmp_path / "c", "--max-steps", "3", "--seed", "7")))
    assert metrics_of(tmp_path / "c")[0]["loss"] != runs[0][0]["loss"]


def test_the_exported_student_gives_the_logits_it_was_trained_to(teacher_dir, corpus, tmp_path):
    out = tmp_path / "run"
    train.main(train.parse_args(args(teacher_dir, corpus, out, "--max-steps", "2", "--save-every", "2")))
    exported = AutoModelForMaskedLM.from_pretrained(out / "student").eval()
    trained = type(exported)(exported.config).eval()
    state = checkpoint.load(out / "checkpoints" / "step-00000002")["student"]
    trained.load_state_dict(state)
    assert not torch.equal(state["distilbert.transformer.layer.0.ffn.lin1.weight"],
                           AutoModelForMaskedLM.from_pretrained(teacher_dir).bert.encoder.layer[0]
                           .intermediate.dense.weight)  # it did train
    ids = torch.randint(1000, 2000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=0)


def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(teacher_dir, corpus, tmp_path):
    out = tmp_path / "run"
    flags = args(teacher_dir, corpus, out, "--max-steps", "4", "--save-every", "2", "--grad-accum", "2")
    train.main(train.parse_args(flags))
    straight_metrics = metrics_of(out)
    straight = AutoModelForMaskedLM.from_pretrained(out / "student").state_dict()
    # As if killed after step 3: the step-4 checkpoint and the export never happened, step 3 was logged.
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    shutil.rmtree(out / "student")
    summary = train.main(train.parse_args([*flags, "--resume"]))
    assert summary["steps"] == 4
    assert metrics_of(out) == straight_metrics[:2] + [
        {**m, "tokens_per_s": r["tokens_per_s"], "memory_mb": r["memory_mb"]}
        for m, r in zip(straight_metrics[2:], metrics_of(out)[2:])]
    resumed = AutoModelForMaskedLM.from_pretrained(out / "student").state_dict()
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name


def test_resume_skips_a_damaged_checkpoint_with_a_warning(teacher_dir, corpus, tmp_path):
    out = tmp_path / "run"
    flags = args(teacher_dir, corpus, out, "--max-steps", "4", "--save-every", "2")
    train.main(train.parse_args(flags))
    state = out / "checkpoints" / "step-00000004" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # a write cut short
    with pytest.warns(UserWarning, match="step-00000004"):
        summary = train.main(train.parse_args([*flags, "--resume"]))
    assert summary["steps"] == 4 and [m["step"] for m in metrics_of(out)] == [1, 2, 3, 4]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_close_to_fp32(teacher_dir, corpus, tmp_path, precision):
    logged = {}
    for name in ("fp32", precision):
        train.main(train.parse_args(args(teacher_dir, corpus, tmp_path / name, "--max-steps", "2",
                                         "--precision", name)))
        logged[name] = metrics_of(tmp_path / name)
    for low, full in zip(logged[precision], logged["fp32"]):
        assert math.isfinite(low["loss"]) and low["loss"] == pytest.approx(full["loss"], rel=0.05)


def test_tensorboard_gets_every_logged_scalar(teacher_dir, corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train.main(train.parse_args(args(teacher_dir, corpus, out, "--max-steps", "2", "--tensorboard")))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"loss", "loss_ce", "loss_mlm", "loss_cos", "lr", "grad_norm", "tokens_per_s"} <= set(
        events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([m["loss"] for m in metrics_of(out)])


def test_streaming_a_slice_of_the_corpus_with_several_tokenizer_processes(teacher_dir, corpus, tmp_path):
    summary = train.main(train.parse_args(args(teacher_dir, corpus, tmp_path / "run", "--max-steps", "1",
                                               "--streaming", "--max-documents", "40", "--num-proc", "2")))
    whole = train.main(train.parse_args(args(teacher_dir, corpus, tmp_path / "whole", "--max-steps", "0")))
    assert 0 < summary["train_sequences"] + summary["heldout_sequences"] < whole["train_sequences"]


def test_a_config_file_sets_defaults_that_the_command_line_overrides(teacher_dir, corpus, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 5\nlog_every: 2\nstudent_layers: '1,3'\n")
    cfg = train.parse_args(["--config", str(config), "--max-steps", "4"])
    assert (cfg.max_steps, cfg.log_every, cfg.student_layers) == (4, 2, "1,3")
    (tmp_path / "bad.json").write_text('{"max_stepz": 5}')
    with pytest.raises(ValueError, match="max_stepz"):
        train.parse_args(["--config", str(tmp_path / "bad.json")])


def test_student_layers_and_random_init(teacher_dir, corpus, tmp_path):
    teacher = AutoModelForMaskedLM.from_pretrained(teacher_dir)
    train.main(train.parse_args(args(teacher_dir, corpus, tmp_path / "a", "--max-steps", "0",
                                     "--student-layers", "0,1,3")))
    picked = AutoModelForMaskedLM.from_pretrained(tmp_path / "a" / "student")
    assert picked.config.n_layers == 3
    assert torch.equal(picked.distilbert.transformer.layer[2].attention.q_lin.weight,
                       teacher.bert.encoder.layer[3].attention.self.query.weight)
    train.main(train.parse_args(args(teacher_dir, corpus, tmp_path / "b", "--max-steps", "0",
                                     "--student-init", "random")))
    fresh = AutoModelForMaskedLM.from_pretrained(tmp_path / "b" / "student")
    assert not torch.equal(fresh.distilbert.transformer.layer[1].attention.q_lin.weight,
                           teacher.bert.encoder.layer[2].attention.self.query.weight)


def test_epochs_run_every_batch_once_per_epoch(teacher_dir, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("\n".join(t.replace("\n", " ") for t in data.load_corpus()["text"][:12]))
    summary = train.main(train.parse_args(args(teacher_dir, small, tmp_path / "run", "--epochs", "2",
                                               "--heldout-fraction", "0.2")))
    per_epoch = math.ceil(summary["train_sequences"] / 4)
    assert summary["steps"] == 2 * per_epoch


def test_max_steps_zero_exports_the_initialized_student(teacher_dir, corpus, tmp_path):
    out = tmp_path / "zero"
    train.main(train.parse_args(args(teacher_dir, corpus, out, "--max-steps", "0")))
    student = AutoModelForMaskedLM.from_pretrained(out / "student")
    teacher = AutoModelForMaskedLM.from_pretrained(teacher_dir)
    assert torch.equal(student.distilbert.transformer.layer[1].ffn.lin1.weight,
                       teacher.bert.encoder.layer[2].intermediate.dense.weight)


@pytest.mark.parametrize("extra, match", [
    (["--alpha-ce", "-1"], "alpha-ce"),
    (["--temperature", "0"], "temperature"),
    (["--mlm-prob", "1.5"], "mlm-prob"),
    (["--batch-size", "0"], "batch-size"),
    (["--max-steps", "-1"], "max-steps"),
    (["--streaming"], "max-documents"),
])
def test_bad_settings_exit_with_one_line_and_write_nothing(teacher_dir, corpus, tmp_path, capsys, extra, match):
    out = tmp_path / "bad"
    assert train.cli(args(teacher_dir, corpus, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err
    assert not out.exists()


def test_a_non_empty_output_dir_needs_overwrite(teacher_dir, corpus, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert train.cli(args(teacher_dir, corpus, out, "--max-steps", "0")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_an_empty_corpus_or_a_teacher_without_mlm_head_is_an_error(teacher_dir, corpus, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert train.cli(args(teacher_dir, empty, tmp_path / "a")) == 2
    assert "no non-empty documents" in capsys.readouterr().err
    encoder_only = model_dir(tmp_path / "encoder", model_class=BertModel)
    assert train.cli(args(encoder_only, corpus, tmp_path / "b")) == 2
    assert "not a masked LM" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_teacher_whose_vocabulary_differs_from_the_tokenizer_is_an_error(corpus, tmp_path, capsys):
    small = model_dir(tmp_path / "small", vocab_size=1000)
    assert train.cli(args(small, corpus, tmp_path / "c")) == 2
    assert "does not match the tokenizer" in capsys.readouterr().err
