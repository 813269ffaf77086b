"""The training recipe: python -m fastdistil.train distils a BERT masked-LM teacher into a DistilBERT student.

config (TrainConfig: every setting, its flag and its checks), loop (the run, read top to bottom), step (one
training step, the optimizer, the held-out metrics), data (corpus to masked batches), student (its config and
its initialization from the teacher), heads (the models split at their vocabulary projection), checkpoint
(atomic, verified training state), distributed (torchrun's process group).
"""

from fastdistil.train.config import TrainConfig, parse_args
from fastdistil.train.loop import cli, main
from fastdistil.train.step import make_optimizer, train_step

__all__ = ["TrainConfig", "cli", "main", "make_optimizer", "parse_args", "train_step"]
