"""scripts/train_tiny_teacher.py, which rebuilds the built-in teacher, runs and leaves a loadable masked LM."""

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_tiny_teacher.py"


def load_script():
    spec = importlib.util.spec_from_file_location("train_tiny_teacher", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_two_steps_save_a_masked_lm_with_its_tokenizer(tmp_path):
    script = load_script()
    script.main(["--output-dir", str(tmp_path), "--steps", "2", "--hidden", "32", "--layers", "2",
                 "--heads", "2", "--batch-size", "4"])
    model = AutoModelForMaskedLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == tokenizer.vocab_size == 30522
    ids = tokenizer("the cat sat on the mat", return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model.float()(**ids).logits).all()


def test_mlm_smoothing_chooses_uniform_or_the_distillation_masking(tmp_path, monkeypatch):
    script = load_script()
    seen = {}
    real_masker = script.data.DynamicMasker

    def recording_masker(probs, *args):
        seen["probs"] = probs
        return real_masker(probs, *args)

    monkeypatch.setattr(script.data, "DynamicMasker", recording_masker)
    tokenizer = AutoTokenizer.from_pretrained(script.data.BUNDLED_TOKENIZER)
    common = tokenizer.convert_tokens_to_ids("the")
    special = tokenizer.all_special_ids
    tiny = ["--steps", "2", "--hidden", "32", "--layers", "2", "--heads", "2", "--batch-size", "2"]

    script.main(["--output-dir", str(tmp_path / "uniform"), *tiny])
    uniform = seen["probs"]
    assert uniform[special].eq(0).all() and uniform[common] == uniform.max() == 1.0

    script.main(["--output-dir", str(tmp_path / "smoothed"), "--mlm-smoothing", "0.7", *tiny])
    smoothed = seen["probs"]
    assert smoothed[special].eq(0).all()
    assert smoothed.max() > 100 * smoothed[common]  # count^-0.7 favours the rare tokens
