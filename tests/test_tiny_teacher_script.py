"""scripts/train_tiny_teacher.py, which rebuilds the built-in teacher, runs and leaves a loadable masked LM."""

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_tiny_teacher.py"


def test_two_steps_save_a_masked_lm_with_its_tokenizer(tmp_path):
    spec = importlib.util.spec_from_file_location("train_tiny_teacher", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--output-dir", str(tmp_path), "--steps", "2", "--hidden", "32", "--layers", "2",
                 "--heads", "2", "--batch-size", "4"])
    model = AutoModelForMaskedLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == tokenizer.vocab_size == 30522
    ids = tokenizer("the cat sat on the mat", return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model.float()(**ids).logits).all()
