"""scripts/train_tiny_gpt2.py, which rebuilds the built-in causal teacher, runs and leaves a loadable causal LM
with its tokenizer and record; and the shipped teacher is what the task asks and what its record says."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from fastdistil import assets
from fastdistil.train.config import TrainConfig

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_tiny_gpt2.py"
TINY = ["--hidden", "32", "--layers", "2", "--heads", "2", "--batch-size", "4", "--vocab-size", "512"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models gain little from a second thread, and where the cores are busy (tests run side by side) two
    threads waiting for each other run these tests 3x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_script():
    spec = importlib.util.spec_from_file_location("train_tiny_gpt2", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_two_stages_save_a_causal_lm_with_its_tokenizer_and_their_record(tmp_path):
    script = load_script()
    first, second = tmp_path / "first", tmp_path / "second"
    script.main(["--output-dir", str(first), "--steps", "20", "--eval-every", "10", *TINY])
    model = AutoModelForCausalLM.from_pretrained(first)
    tokenizer = AutoTokenizer.from_pretrained(first)
    assert isinstance(model, GPT2LMHeadModel) and model.config.n_layer == 2
    assert model.config.vocab_size == len(tokenizer) == 512
    assert model.config.n_positions == tokenizer.model_max_length == 128
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == tokenizer.unk_token_id == tokenizer.pad_token_id == eos
    assert tokenizer.decode(tokenizer("Café au lait, 1901.")["input_ids"]) == "Café au lait, 1901."  # byte-level
    record = json.loads((first / "pretraining.json").read_text())
    (stage,) = record["stages"]
    assert stage["command"].startswith("python scripts/train_tiny_gpt2.py --output-dir") and stage["steps"] == 20
    (step_a, ppl_a), (step_b, ppl_b) = stage["heldout_ppl"]
    # From about the vocabulary size (a random model) down: it learns.
    assert (step_a, step_b) == (10, 20) and ppl_b < ppl_a < 1.5 * 512
    assert record["heldout_ppl"] == pytest.approx(ppl_b, rel=1e-2)  # the fp16 weights saved, as loaded back

    script.main(["--output-dir", str(second), "--init-from", str(first), "--steps", "2", "--eval-every", "2",
                 *TINY])
    assert AutoTokenizer.from_pretrained(second).get_vocab() == tokenizer.get_vocab()  # not retrained
    stages = json.loads((second / "pretraining.json").read_text())["stages"]
    assert stages[0] == stage and "--init-from" in stages[1]["command"] and stages[1]["steps"] == 2


def test_the_shipped_teacher_is_small_offline_and_what_its_record_says():
    script = load_script()
    model = AutoModelForCausalLM.from_pretrained(assets.TINY_GPT2, local_files_only=True).float()
    tokenizer = AutoTokenizer.from_pretrained(assets.TINY_GPT2, local_files_only=True)
    config = model.config
    assert isinstance(model, GPT2LMHeadModel) and config.vocab_size == len(tokenizer) == 4096
    assert config.n_positions == tokenizer.model_max_length and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert sum(f.stat().st_size for f in assets.TINY_GPT2.iterdir()) <= 25 * 2**20

    # Its half-depth student (embeddings, every other block, ln_f; the LM head tied) is about 40 % smaller.
    teacher_params = sum(p.numel() for p in model.parameters())
    student = GPT2LMHeadModel(GPT2Config(**{**config.to_dict(), "n_layer": config.n_layer // 2}))
    assert 0.37 <= 1 - sum(p.numel() for p in student.parameters()) / teacher_params <= 0.45

    # Its held-out split is a default distillation run's, and the recorded perplexity the shipped weights'.
    record = json.loads((assets.TINY_GPT2 / "pretraining.json").read_text())
    defaults = TrainConfig()
    assert (record["heldout"]["fraction"], record["heldout"]["seed"]) == (defaults.heldout_fraction, defaults.seed)
    _, heldout = script.split(tokenizer, record["heldout"]["max_seq_len"])
    assert len(heldout) == record["heldout"]["sequences"]
    assert script.heldout_perplexity(model, heldout, tokenizer.pad_token_id) == pytest.approx(
        record["heldout_ppl"], rel=1e-3)
