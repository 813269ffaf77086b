"""python -m fastdistil.cache_teacher: the teacher run once, its outputs kept for any number of students.

    python -m fastdistil.cache_teacher [the trainer's teacher, data and masking flags] --top-k 8 --epochs 3 \\
        --output-dir runs/teacher-cache
    python -m fastdistil.train --teacher-cache runs/teacher-cache [the same data flags, any others] ...

For every batch of the trainer's first --epochs epochs, masked exactly as a training run masks it, the teacher
runs as in training and the cache keeps, per non-padding token, its top-k logits and their indices, the
log-sum-exps of all its logits at T = 1 and at --temperature, and with --alpha-cos > 0 its last hidden state;
for the held-out split, what the held-out metrics need (fastdistil.train.teacher_cache). It also saves the
initial student of the student flags, so that a run from the cache never loads the teacher.

Under torchrun each process writes its share of the shards. Started again with the same flags, a run keeps the
shards it finished (checked against their checksums) and makes the rest: a killed run resumes, more --epochs
extend a cache, and other --student-layers / --student-init / --vocab-transform add that initial student without
running the teacher again. It ends by printing the bytes it wrote per token.
"""

import argparse
import dataclasses
import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import fastdistil
from fastdistil.commands import add_flags, check_choices, config_from, flag, run_command
from fastdistil.train import distributed, heads
from fastdistil.train import teacher_cache as cache
from fastdistil.train.config import TrainConfig, check_values, config_file, for_family, with_default_teacher
from fastdistil.train.inputs import initial_student, load_data, load_teacher, load_tokenizer, teacher_family
from fastdistil.train.loop import AMP_DTYPES, process_group, run_device
from fastdistil.train.step import teacher_heldout_rows

# The smallest k measured (8, 32, 128) whose default run came within 1 point of the online run's held-out top-1
# agreement with the teacher (bench/test_bench_teacher_cache.py): k = 8 already did.
DEFAULT_TOP_K = 8
# The trainer's flags that decide what the teacher is given, and which initial student is saved.
TRAIN_FLAGS = ("teacher", "tokenizer", "dataset", "dataset_config", "text_column", "streaming", "max_documents",
               "num_proc", "batch_size", "max_seq_len", "temperature", "alpha_cos", "mlm_prob", "mlm_smoothing",
               "seed", "heldout_fraction", "student_layers", "student_init", "vocab_transform", "precision", "device")


@dataclass
class CacheConfig:
    output_dir: str = flag("runs/teacher-cache", "where the cache goes; a cache of the same flags there is continued")
    overwrite: bool = flag(False, "replace what --output-dir holds when it is not a cache of these flags")
    epochs: int = flag(1, "epochs of the trainer's data to cache: a run from the cache trains at most as many")
    top_k: int = flag(DEFAULT_TOP_K, "teacher logits kept per token, 1 to the vocabulary size (which keeps them all: "
                                     "exact)")
    logits_dtype: str = flag("fp16", "the kept logits' dtype", choices=("fp16", "fp32"))
    hidden_dtype: str = flag("fp16", "the teacher's last hidden state's dtype, kept when --alpha-cos > 0",
                             choices=("fp16", "bf16", "fp32"))
    shard_batches: int = flag(64, "batches per shard file")


def parse_args(argv=None) -> tuple[TrainConfig, CacheConfig]:
    """The trainer's flags of TRAIN_FLAGS (the same defaults) and CacheConfig's; --config FILE, a training run's
    config file, sets defaults for the former."""
    parser = argparse.ArgumentParser(prog="python -m fastdistil.cache_teacher", description=__doc__.split("\n")[0])
    add_flags(parser, TrainConfig, TRAIN_FLAGS)
    add_flags(parser, CacheConfig)
    parser.add_argument("--config", type=Path, help="a training run's YAML or JSON config: its keys among the "
                                                    "trainer's flags above are read, the others left out")
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config")
    from_file = config_file(config_path) if config_path is not None else {}
    train = {k: v for k, v in {**from_file, **args}.items() if k in TRAIN_FLAGS and v is not None}
    return (config_from(TrainConfig, train),
            config_from(CacheConfig, {k: v for k, v in args.items() if k not in TRAIN_FLAGS}))


def check_config(cfg: TrainConfig, cache_cfg: CacheConfig) -> None:
    """A ValueError naming the first bad setting, before anything is read or written (a --top-k beyond the
    vocabulary is found once the teacher's config is read, still before anything is written)."""
    check_values(cfg)
    check_choices(cache_cfg)
    for name in ("top_k", "epochs", "shard_batches"):
        if getattr(cache_cfg, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cache_cfg, name)}")


def main(cfg: TrainConfig, cache_cfg: CacheConfig) -> dict:
    check_config(cfg, cache_cfg)
    cfg = with_default_teacher(cfg)
    with process_group(cfg) as procs:
        return cache_teacher(cfg, cache_cfg, procs)


def cache_teacher(cfg: TrainConfig, cache_cfg: CacheConfig, procs: distributed.Processes) -> dict:
    start = time.time()
    device = run_device(cfg, procs)
    torch.manual_seed(cfg.seed)  # as the trainer seeds before it builds the student: a random one is the same
    family, teacher_config = teacher_family(cfg)
    cfg = for_family(cfg, family, teacher_config)
    if cache_cfg.top_k > teacher_config.vocab_size:
        raise ValueError(f"--top-k {cache_cfg.top_k} exceeds the teacher's vocabulary (V = {teacher_config.vocab_size}"
                         "); --top-k V keeps every logit")
    tokenizer = load_tokenizer(cfg, family, teacher_config)
    teacher = load_teacher(cfg, device, family)
    student = initial_student(cfg, teacher)
    # Every batch of the plan is cached, whichever way a run splits them into steps and over processes.
    run_data = load_data(dataclasses.replace(cfg, grad_accum=1), tokenizer, distributed.Processes(), family)
    batches_per_epoch = [len(run_data.plan(epoch)) for epoch in range(cache_cfg.epochs)]
    keep_hidden = cfg.alpha_cos > 0
    params = {"run": cache.run_flags(cfg), "data": cache.data_fingerprint(run_data),
              "teacher": {"name": cfg.teacher, "family": family.name, **cache.model_sha256(teacher),
                          "parameters": sum(p.numel() for p in teacher.parameters()), "precision": cfg.precision},
              "vocab_size": teacher_config.vocab_size, "hidden_size": teacher_config.hidden_size,
              "top_k": cache_cfg.top_k, "logits_dtype": cache_cfg.logits_dtype,
              "hidden_dtype": cache_cfg.hidden_dtype if keep_hidden else None, "shard_batches": cache_cfg.shard_batches}
    out = Path(cache_cfg.output_dir)
    writer = cache.CacheWriter(out, {"format": cache.FORMAT, "fastdistil_version": fastdistil.__version__,
                                     "torch_version": torch.__version__, "complete": False, "params": params,
                                     "epochs": cache_cfg.epochs, "batches_per_epoch": batches_per_epoch,
                                     "shards": []}, procs, cache_cfg.overwrite)
    key = cache.student_key(cfg, teacher_config.num_hidden_layers)
    if procs.is_main:
        cache.save_whole(out / cache.TEACHER_DIR, teacher.config, tokenizer)
        (out / cache.STUDENTS_DIR).mkdir(exist_ok=True)
        cache.save_whole(out / cache.STUDENTS_DIR / key, student)

    plan = cache.shard_plan(batches_per_epoch, cache_cfg.shard_batches)
    shards = {s["name"]: s for s in plan}
    heldout = run_data.heldout_batches()
    todo = [name for name in writer.mine(plan) if not writer.is_done(name)]
    bar = tqdm(total=sum(shards[name]["batches"] if name in shards else len(heldout) for name in todo),
               desc="caching the teacher", unit=" batches", disable=not procs.is_main)
    train_rows = functools.partial(_train_rows, heads.ProjectionInputs(teacher), cache_cfg.top_k, cfg.temperature,
                                   AMP_DTYPES[cfg.precision], cache.STORAGE_DTYPES[cache_cfg.logits_dtype],
                                   cache.STORAGE_DTYPES[cache_cfg.hidden_dtype] if keep_hidden else None)
    for name in todo:
        spec = shards.get(name)
        if spec is None:
            batches = (tuple(t.to(device) for t in batch) for batch in heldout)
            rows_of, details = functools.partial(_heldout_rows, teacher), {}
        else:
            first = spec["first_batch"]
            batches = (run_data.micro_batch(spec["epoch"], index, device)
                       for index in range(first, first + spec["batches"]))
            rows_of, details = train_rows, {k: spec[k] for k in ("epoch", "first_batch", "batches")}
        rows, digests = [], []
        for batch in batches:
            rows.append({k: v.cpu() for k, v in rows_of(batch).items()})
            digests.append(cache.batch_digest(*batch))
            bar.update()
        tensors = cache.pack(rows, digests)
        writer.write(name, tensors, **details, rows=int(tensors["offsets"][-1]))
    bar.close()
    manifest = writer.finish(plan)
    if not procs.is_main:
        return {}
    print(f"cached {manifest['tokens']:,} tokens in {manifest['bytes']:,} bytes: {manifest['bytes_per_token']:.1f} "
          f"bytes per token (k = {cache_cfg.top_k})", file=sys.stderr)
    return {"output_dir": str(out), "epochs": cache_cfg.epochs, "top_k": cache_cfg.top_k, "shards": len(plan),
            "shards_written": writer.written, "tokens": manifest["tokens"], "bytes": manifest["bytes"],
            "bytes_per_token": manifest["bytes_per_token"], "student": str(out / cache.STUDENTS_DIR / key),
            "wall_s": time.time() - start}


def _train_rows(teacher: heads.ProjectionInputs, k: int, temperature: float, amp_dtype, logits_dtype, hidden_dtype,
                batch) -> dict[str, torch.Tensor]:
    rows = cache.teacher_rows(teacher, batch[0], batch[1], k, temperature, amp_dtype, logits_dtype, hidden_dtype)
    return {name: tensor for name, tensor in rows._asdict().items() if tensor is not None}


def _heldout_rows(teacher: torch.nn.Module, batch) -> dict[str, torch.Tensor]:
    return dict(zip(cache.HELDOUT_COLUMNS, teacher_heldout_rows(teacher, *batch)))


def cli(argv=None) -> int:
    return run_command(lambda: main(*parse_args(argv)), lambda summary: print(json.dumps(summary, indent=2)))
