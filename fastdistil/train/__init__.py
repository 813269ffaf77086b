"""The training recipe: python -m fastdistil.train distils a BERT or RoBERTa masked LM or a GPT-2 causal LM into a
student of half its depth (DistilBERT, DistilRoBERTa, DistilGPT2).

config (TrainConfig: every setting, its flag and its checks), loop (the run, read top to bottom), inputs (the
teacher, tokenizer and data a config names, and how a run walks the data), step (one training step, the
optimizer, the held-out metrics), data (corpus to masked or shifted batches), families (what differs between
BERT, RoBERTa and GPT-2), student (its initialization from the teacher), heads (the models split at their
vocabulary projection), checkpoint (atomic, verified training state), distributed (torchrun's process group),
teacher_cache (the teacher's top-k outputs kept on disk, written by python -m fastdistil.cache_teacher and read
in place of a teacher).
"""

from fastdistil.train.config import TrainConfig, parse_args
from fastdistil.train.loop import cli, main
from fastdistil.train.step import make_optimizer, train_step

__all__ = ["TrainConfig", "cli", "main", "make_optimizer", "parse_args", "train_step"]
