"""What the trainer's tests share: tiny model directories, a tiny corpus, the flags of a tiny run, and of a
teacher cache and the runs from it."""

import json
import subprocess
import sys

import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from fastdistil.train import data


def model_dir(path, model_class=BertForMaskedLM, vocab_size=30522, layers=4):
    """A save_pretrained directory of a tiny random BERT model beside the bundled tokenizer."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    model_class(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(data.BUNDLED_TOKENIZER).save_pretrained(path)
    return path


def write_corpus(path, n_documents=300):
    """The first documents of the bundled sample as a .txt corpus, one document a line."""
    texts = data.load_corpus()["text"][:n_documents]
    path.write_text("\n".join(t.replace("\n", " ") for t in texts))
    return path


def data_flags(corpus):
    """The data flags of a tiny run, which a teacher cache and the runs from it must share."""
    return ["--dataset", str(corpus), "--max-seq-len", "64", "--batch-size", "4"]


def args(teacher_dir, corpus, out, *extra):
    return ["--teacher", str(teacher_dir), *data_flags(corpus), "--output-dir", str(out), "--log-every", "1", *extra]


def cached_args(cache_dir, corpus, out, *extra):
    """args of a run from the teacher cache in cache_dir."""
    return ["--teacher-cache", str(cache_dir), *data_flags(corpus), "--output-dir", str(out), "--log-every", "1",
            *extra]


def cache_args(teacher_dir, corpus, out, *extra):
    """The flags of python -m fastdistil.cache_teacher for a tiny run's data, into out."""
    return ["--teacher", str(teacher_dir), *data_flags(corpus), "--output-dir", str(out), *extra]


def make_cache(teacher_dir, corpus, out, *extra) -> dict:
    """python -m fastdistil.cache_teacher of a tiny run's data into out; its summary."""
    from fastdistil import cache_teacher

    return cache_teacher.main(*cache_teacher.parse_args(cache_args(teacher_dir, corpus, out, *extra)))


def metrics_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def launch(argv, torchrun=None, module="fastdistil.train", **kwargs) -> subprocess.Popen:
    """`python -m fastdistil.train argv` (or another module) in a new process; under torchrun with the given
    launcher flags."""
    launcher = [sys.executable, "-m", "torch.distributed.run", *torchrun] if torchrun else [sys.executable]
    return subprocess.Popen([*launcher, "-m", module, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)
