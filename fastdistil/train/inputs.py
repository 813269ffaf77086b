"""What a run is made of, read from its config: the teacher's family (checked against the flags before any
weight is read), the tokenizer, the teacher and the student it starts, and the tokenized, split corpus with the
way the run walks it. The training loop, cache_teacher and the evaluation of a causal run (which scores the run's
own held-out split) share them. A run from a teacher cache reads the teacher's config and tokenizer from the
cache (teacher_cache.TEACHER_DIR), never its weights.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from fastdistil.train import data, distributed, teacher_cache
from fastdistil.train.config import BUILT_IN_TEACHERS, TrainConfig, teacher_path
from fastdistil.train.families import Family, family_of
from fastdistil.train.student import make_student

DROPOUT_STREAM = 1  # data.seed_at(seed, epoch, batch, DROPOUT_STREAM) seeds dropout, apart from the masking
HELDOUT_STREAM = -1  # the held-out masks: data.rng(seed, HELDOUT_STREAM, batch), the same in every run


@dataclass
class TrainingData:
    """The tokenized corpus and how the run walks it: an optimizer step takes micro_per_step consecutive
    micro-batches of the epoch's length-grouped plan, and micro-batch j of a step goes to rank j % world size.
    So the order and content of every step depend on the seed, never on the number of processes: 2 processes
    with --grad-accum 1 compute what 1 process does with --grad-accum 2."""

    train_set: object  # data.Table, or datasets.Dataset for a hub corpus: an input_ids column
    heldout: object
    labeler: data.DynamicMasker | data.CausalShift  # (input_ids, attention_mask, generator) -> (inputs, labels)
    pad_id: int
    seed: int
    batch_size: int
    micro_per_step: int

    def __post_init__(self):
        self.lengths = [len(ids) for ids in self.train_set["input_ids"]]
        self._plan = (None, None)
        self.steps_per_epoch = len(self.plan(0)) // self.micro_per_step

    def plan(self, epoch: int) -> list[list[int]]:
        """The epoch's batches of sequence indices (kept while the epoch lasts: making it is O(sequences))."""
        if self._plan[0] != epoch:
            self._plan = (epoch, data.length_grouped_batches(self.lengths, self.batch_size, self.seed, epoch))
        return self._plan[1]

    def step_batches(self, step_in_epoch: int) -> range:
        """The indices in the epoch's plan of the micro-batches of the epoch's step step_in_epoch."""
        first = step_in_epoch * self.micro_per_step
        return range(first, first + self.micro_per_step)

    def micro_batch(self, epoch: int, index: int, device):
        """Micro-batch `index` of the epoch, masked (or shifted), its dropout seeded: all a function of the
        position."""
        ids, mask = data.collate(self.train_set[self.plan(epoch)[index]]["input_ids"], self.pad_id)
        masked, labels = self.labeler(ids, mask, data.rng(self.seed, epoch, index))
        torch.manual_seed(data.seed_at(self.seed, epoch, index, DROPOUT_STREAM))
        return masked.to(device), mask.to(device), labels.to(device)

    def heldout_batches(self) -> list:
        """The held-out sequences in batches, masked the same way in every run."""
        plan = data.length_grouped_batches([len(ids) for ids in self.heldout["input_ids"]], self.batch_size,
                                           self.seed, epoch=0)
        batches = []
        for index, indices in enumerate(plan):
            ids, mask = data.collate(self.heldout[indices]["input_ids"], self.pad_id)
            masked, labels = self.labeler(ids, mask, data.rng(self.seed, HELDOUT_STREAM, index))
            batches.append((masked, mask, labels))
        return batches


def _cached_teacher(cfg: TrainConfig) -> str | None:
    """Where a run from a teacher cache reads the teacher's config and tokenizer; None for other runs."""
    return None if cfg.teacher_cache is None else str(Path(cfg.teacher_cache) / teacher_cache.TEACHER_DIR)


def load_tokenizer(cfg: TrainConfig, family: Family, teacher_config):
    """The tokenizer, checked against the teacher before its weights are read: the family's special tokens
    (a tokenizer of another family lacks some) and the vocabulary size. From a teacher cache, the cache's copy
    of the tokenizer it was made with."""
    name = _cached_teacher(cfg) or cfg.tokenizer or teacher_path(cfg)
    flag = ("--teacher-cache" if cfg.teacher_cache else "--tokenizer" if cfg.tokenizer else
            "--teacher (no --tokenizer given)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        family.special_ids(tokenizer)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{flag} {name}: cannot load a tokenizer for a {family.name} teacher "
                         f"({' '.join(str(exc).split())})") from exc
    if teacher_config.vocab_size != len(tokenizer):
        raise ValueError(f"--teacher vocabulary ({teacher_config.vocab_size}) does not match the tokenizer's "
                         f"({len(tokenizer)})")
    return tokenizer


def teacher_family(cfg: TrainConfig) -> tuple[Family, object]:
    """(the teacher's family, its config), from its config.json alone: what the flags are checked against
    before any weight is read."""
    path = _cached_teacher(cfg) or teacher_path(cfg)
    if cfg.teacher_cache is None and cfg.teacher in BUILT_IN_TEACHERS and not Path(path).exists():
        raise ValueError(f"the built-in teacher {cfg.teacher} is not in this installation ({path}); pass --teacher "
                         "(a hub name or a local directory of a BERT or RoBERTa masked LM or a GPT-2 causal LM)")
    try:
        config = AutoConfig.from_pretrained(path)
        return family_of(config), config
    except (OSError, ValueError) as exc:
        source = f"--teacher-cache {cfg.teacher_cache}" if cfg.teacher_cache else f"--teacher {cfg.teacher}"
        raise ValueError(f"{source}: {' '.join(str(exc).split())}") from exc


def load_teacher(cfg: TrainConfig, device, family: Family) -> torch.nn.Module:
    """The teacher, frozen in fp32: a masked LM or a causal LM, as its family trains."""
    kind = "causal LM" if family.causal else "masked LM"
    try:
        model_class = AutoModelForCausalLM if family.causal else AutoModelForMaskedLM
        teacher, info = model_class.from_pretrained(teacher_path(cfg), output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--teacher {cfg.teacher}: not a loadable {kind} ({exc})") from exc
    untrained_head = [k for k in info["missing_keys"] if k.startswith(("cls.", "lm_head."))]
    if untrained_head:
        raise ValueError(f"--teacher {cfg.teacher}: not a {kind} (its checkpoint has no LM head: "
                         f"{untrained_head[0]} is missing)")
    return teacher.float().to(device).eval().requires_grad_(False)


def initial_student(cfg: TrainConfig, teacher: torch.nn.Module) -> torch.nn.Module:
    """The student the run starts from (on the CPU): --student-layers, --student-init and --vocab-transform of
    the teacher. A random init draws from torch's generator: the caller seeds it."""
    layers = None if cfg.student_layers is None else [int(i) for i in cfg.student_layers.split(",")]
    return make_student(teacher, layers, cfg.student_init, cfg.vocab_transform)


def load_data(cfg: TrainConfig, tokenizer, procs: distributed.Processes, family: Family) -> TrainingData:
    special = family.special_ids(tokenizer)
    corpus = data.load_corpus(cfg.dataset, cfg.dataset_config, text_column=cfg.text_column,
                              streaming=cfg.streaming, max_documents=cfg.max_documents)
    sequences = data.tokenize_corpus(corpus, tokenizer, cfg.max_seq_len, cfg.num_proc if cfg.num_proc > 1 else None,
                                     wrap=(special.first, special.last))
    train_set, heldout = data.heldout_split(sequences, cfg.heldout_fraction, cfg.seed)
    labeler = data.CausalShift() if family.causal else data.DynamicMasker(
        data.masking_probabilities(train_set, len(tokenizer), tokenizer.all_special_ids, cfg.mlm_smoothing),
        special.mask, len(tokenizer), cfg.mlm_prob)
    run_data = TrainingData(train_set, heldout, labeler, special.pad, cfg.seed, cfg.batch_size,
                            cfg.grad_accum * procs.world_size)
    if run_data.steps_per_epoch == 0:
        raise ValueError(f"--grad-accum {cfg.grad_accum} x {procs.world_size} processes exceeds the number of "
                         "batches in an epoch")
    return run_data
