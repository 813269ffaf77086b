"""The files fastdistil ships, which the default run and the tests use offline (sources and licenses: README.md
beside this file)."""

from pathlib import Path

DIR = Path(__file__).resolve().parent
CORPUS = DIR / "wiki_vital_en.jsonl.gz"  # an English Wikipedia sample, one JSON document a line
TOKENIZER = DIR / "bert-base-uncased-tokenizer"
TEACHER = DIR / "tiny-bert-teacher"  # 4 layers x 128, pretrained on CORPUS by scripts/train_tiny_teacher.py
TINY_GPT2 = DIR / "tiny-gpt2-teacher"  # GPT-2, 6 layers x 256, pretrained on CORPUS by scripts/train_tiny_gpt2.py
