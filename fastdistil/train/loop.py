"""python -m fastdistil.train: a distillation run, read top to bottom.

main(cfg) checks the config, joins torchrun's process group and distils: it reads the teacher's config, whose
family (BERT, RoBERTa or GPT-2: fastdistil/train/families/) decides the student, the special tokens and the
objective (masking or shifting), checks the flags against it, loads the teacher and builds the student from it,
tokenizes and splits the corpus, makes the optimizer, resumes from a checkpoint if asked, and runs the loop.
Each step accumulates the gradients of its micro-batches, steps the optimizer, logs, and maybe saves. At the
end rank 0 exports the student and writes the held-out metrics.

With --teacher-cache no teacher is loaded: the config and tokenizer come from the cache, the student is the
initial one cache_teacher saved, each micro-batch's teacher outputs are read from the cache (checked against
the run's flags, data and epochs, and every shard it reads against its checksum, before the first step), and
the loss is the sparse triple loss.
"""

import contextlib
import dataclasses
import json
import math
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from fastdistil.commands import atomic_write_text, device_of, run_command
from fastdistil.ops.attention import register_with_transformers
from fastdistil.ops.values import TripleLossOutput
from fastdistil.train import checkpoint, distributed, heads
from fastdistil.train.config import (DEFAULT_MAX_STEPS, TrainConfig, check_config, for_family, parse_args,
                                     with_default_teacher)
from fastdistil.train.families import Family
from fastdistil.train.inputs import (TrainingData, initial_student, load_data, load_teacher, load_tokenizer,
                                     teacher_family)
from fastdistil.train.step import heldout_metrics, make_optimizer, train_step
from fastdistil.train.teacher_cache import TeacherCache

RUN_FILES = ("metrics.jsonl", "summary.json", "config.json", "checkpoints", "student", "tensorboard")
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Progress:
    """Where a run is. A checkpoint stores it, and a resumed run continues from it exactly."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens: int = 0  # non-padding tokens trained on
    wall_s: float = 0.0  # training time before this process started (a resumed run adds its own)
    bad_steps: int = 0  # consecutive steps with a NaN or inf loss
    skipped_steps: int = 0


@dataclass
class StepStats:
    """One optimizer step, over its micro-batches and then over all processes."""

    terms: TripleLossOutput  # the loss and its terms (0-dim fp32), each weighted as the step's gradient is
    tokens: int  # non-padding tokens
    stopping: bool  # a process was asked to stop (SIGTERM): all stop after this step

    def over_processes(self, procs: distributed.Processes) -> "StepStats":
        """The stats of all processes, in one collective: tokens and stop flags summed, terms averaged (DDP
        averages the gradients)."""
        packed = torch.cat([torch.stack(self.terms), torch.tensor([float(self.tokens), float(self.stopping)])])
        distributed.sum_across(packed, procs)
        n = len(TripleLossOutput._fields)
        return StepStats(TripleLossOutput(*(packed[:n] / procs.world_size)), int(packed[n]), bool(packed[n + 1]))


def main(cfg: TrainConfig) -> dict:
    out = Path(cfg.output_dir)
    if distributed.restarted() and cfg.resume is None:  # torchrun brought the job back: continue it
        has_checkpoint = bool(checkpoint.checkpoints(out / "checkpoints"))
        cfg = dataclasses.replace(cfg, resume="latest" if has_checkpoint else None, overwrite=True)
    check_config(cfg)
    cfg = with_default_teacher(cfg)
    with process_group(cfg) as procs:
        return distil(cfg, procs, out)


@contextlib.contextmanager
def process_group(cfg: TrainConfig) -> Iterator[distributed.Processes]:
    """This process's place in torchrun's process group, joined for cfg's device (a plain launch is rank 0 of 1);
    the group is left at the end."""
    procs = distributed.init(device_of(cfg.device).type)
    try:
        yield procs
    finally:
        distributed.shutdown()


def distil(cfg: TrainConfig, procs: distributed.Processes, out: Path) -> dict:
    device = run_device(cfg, procs)
    torch.manual_seed(cfg.seed)  # the same initial student (random init) on every rank
    cache = None if cfg.teacher_cache is None else TeacherCache(cfg)
    if cache is not None:  # config.json names the teacher the cache was made with: evaluate fine-tunes it
        cfg = dataclasses.replace(cfg, teacher=cache.teacher["name"])
    family, teacher_config = teacher_family(cfg)
    cfg = for_family(cfg, family, teacher_config)
    tokenizer = load_tokenizer(cfg, family, teacher_config)
    if cache is None:
        teacher = load_teacher(cfg, device, family)
        student = initial_student(cfg, teacher)
        teacher_inputs = heads.ProjectionInputs(teacher)

        def teacher_of(epoch, index, batch):
            return teacher_inputs

        heldout_teacher, teacher_summary = teacher, {"teacher_params": sum(p.numel() for p in teacher.parameters())}
    else:
        student = cache.student(cfg, family, teacher_config)

        def teacher_of(epoch, index, batch):
            return cache.rows(epoch, index, batch, device)

        heldout_teacher = cache.heldout_rows
        teacher_summary = {"teacher_params": cache.teacher["parameters"], "teacher_cache": str(cache.dir),
                           "top_k": cache.params["top_k"], "tail": cfg.tail}
    student = student.to(device).train()
    # Frozen before the optimizer exists, so that it holds no state for them and they stay bit-identical.
    for param in family.frozen_embeddings(student, cfg.freeze_pos_embs, cfg.freeze_token_type_embs):
        param.requires_grad_(False)
    if cfg.attention == "fastdistil":
        register_with_transformers()
    student.set_attn_implementation(cfg.attention)  # not saved with the student: its export loads anywhere
    model = heads.ProjectionInputs(student)
    if procs.world_size > 1:  # the frozen teacher (or the cache's reader) is a plain replica on every rank
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[procs.local_rank] if device.type == "cuda" else None)
    run_data = load_data(cfg, tokenizer, procs, family)
    total_steps = cfg.max_steps if cfg.max_steps is not None else (
        run_data.steps_per_epoch * cfg.epochs if cfg.epochs is not None else DEFAULT_MAX_STEPS)
    if cache is not None:
        epochs = -(-total_steps // run_data.steps_per_epoch)  # those the steps reach into
        cache.check_data(run_data, epochs)
        cache.verify(epochs, procs)

    amp_dtype = AMP_DTYPES[cfg.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    optimizer = make_optimizer(student, cfg.lr, cfg.weight_decay, cfg.adam_eps)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(cfg.warmup * total_steps), max(total_steps, 1))
    resumed = resume(cfg, out, procs, student, optimizer, scheduler, scaler)
    progress = resumed or Progress()
    if procs.is_main:
        prepare_output_dir(cfg, out, procs, resumed, run_data.micro_per_step, total_steps)
    log = MetricsLog(cfg, out, procs, progress.step, device, family.causal)
    start = time.time()

    def save():
        """Every rank takes part (its RNG state is gathered); rank 0 writes."""
        rng_states = distributed.gather(_rng_state(), procs)
        if procs.is_main:
            saved = dataclasses.replace(progress, wall_s=progress.wall_s + time.time() - start)
            state = {"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                     "progress": dataclasses.asdict(saved), "rng": rng_states, "config": dataclasses.asdict(cfg)}
            checkpoint.save(out / "checkpoints", progress.step, state, cfg.keep_last)
        distributed.barrier(procs)

    stop = _StopOnSignal()
    stopping = False
    bar = tqdm(total=total_steps, initial=progress.step, desc="distilling",
               disable=total_steps == 0 or not procs.is_main)
    try:
        while progress.step < total_steps and not stopping:
            # Accumulate: this rank's micro-batches of the step, forward and backward; then the stats of all
            # processes, with whether any was asked to stop meanwhile.
            stats = accumulate(model, teacher_of, run_data, progress, cfg, procs, scaler, amp_dtype, device)
            stats = dataclasses.replace(stats, stopping=stop.signal is not None).over_processes(procs)
            stopping = stats.stopping
            # Step the optimizer, unless the loss is NaN or inf: then the step is skipped (no update) and the
            # data and the schedule move on.
            finite = bool(torch.isfinite(stats.terms.loss))
            grad_norm = float("nan")
            if finite:
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    [p for p in student.parameters() if p.requires_grad], cfg.max_grad_norm))
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # after a skipped first step, torch warns of a skipped LR value
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`", UserWarning)
                scheduler.step()
            advance(progress, stats.tokens, finite, run_data.steps_per_epoch)
            bar.update(1)
            if progress.bad_steps > cfg.max_bad_steps:
                save()
                raise ValueError(f"{progress.bad_steps} consecutive steps had a NaN or inf loss (more than "
                                 f"--max-bad-steps {cfg.max_bad_steps}); the last good state is in "
                                 f"{out / 'checkpoints'}")
            # Log, then maybe save.
            log.step(progress.step, stats, scheduler.get_last_lr()[0], grad_norm, final=progress.step == total_steps)
            if log.last_loss is not None:
                bar.set_postfix(loss=f"{log.last_loss:.3f}")
            if cfg.save_every and progress.step % cfg.save_every == 0:
                save()
    finally:
        bar.close()
        stop.restore()
        log.close()
    if stopping:
        if not (cfg.save_every and progress.step % cfg.save_every == 0):
            save()
        return {"stopped_by_signal": True, "steps": progress.step,
                "checkpoint": str(out / "checkpoints" / f"{checkpoint.PREFIX}{progress.step:08d}")}
    summary = {}
    if procs.is_main:
        summary = finish(cfg, out, procs, progress, progress.wall_s + time.time() - start, tokenizer,
                         heldout_teacher, teacher_summary, student, run_data, device, family)
    distributed.barrier(procs)
    return summary


def accumulate(model, teacher_of, run_data: TrainingData, progress: Progress, cfg: TrainConfig,
               procs: distributed.Processes, scaler, amp_dtype, device) -> StepStats:
    """The gradients of this rank's micro-batches of the next step, accumulated in the student (DDP syncs
    them at the last one), and what they add up to. teacher_of(epoch, index, batch) is train_step's teacher for
    micro-batch `index` of the epoch."""
    plan = run_data.plan(progress.epoch)
    batches = run_data.step_batches(progress.step_in_epoch)
    step_tokens = sum(run_data.lengths[i] for b in batches for i in plan[b])
    mine = batches[procs.rank::procs.world_size]
    terms = torch.zeros(len(TripleLossOutput._fields))
    tokens = 0
    for n, index in enumerate(mine):
        batch = run_data.micro_batch(progress.epoch, index, device)
        n_tokens = int(batch[1].sum())
        # DDP averages gradients over processes; the weights make the step the mean over micro-batches (or
        # over tokens, with --token-weighted), whatever their split over processes.
        weight = n_tokens * procs.world_size / step_tokens if cfg.token_weighted else 1 / cfg.grad_accum
        sync = n == len(mine) - 1 or procs.world_size == 1
        with contextlib.nullcontext() if sync else model.no_sync():
            out_terms = train_step(model, teacher_of(progress.epoch, index, batch), batch, cfg, amp_dtype)
            scaler.scale(out_terms.loss * weight).backward()
        terms += torch.stack([t.detach().float().cpu() for t in out_terms]) * weight
        tokens += n_tokens
    return StepStats(TripleLossOutput(*terms), tokens, stopping=False)


def advance(progress: Progress, tokens: int, finite: bool, steps_per_epoch: int) -> None:
    """progress after one step; an epoch's last, incomplete step is dropped."""
    progress.step += 1
    progress.step_in_epoch += 1
    progress.tokens += tokens
    progress.bad_steps = 0 if finite else progress.bad_steps + 1
    progress.skipped_steps += not finite
    if progress.step_in_epoch == steps_per_epoch:
        progress.epoch += 1
        progress.step_in_epoch = 0


class MetricsLog:
    """metrics.jsonl (and TensorBoard with --tensorboard), one record every --log-every steps and at the last,
    written by rank 0; tokens/s is over the steps since the previous record."""

    def __init__(self, cfg: TrainConfig, out: Path, procs: distributed.Processes, first_step: int, device,
                 causal: bool):
        self.every = cfg.log_every
        self.names = {"loss_mlm": "loss_clm"} if causal else {}  # the LM term is named for its objective
        self.path = out / "metrics.jsonl"
        self.enabled = procs.is_main
        self.device = device
        self.window_start, self.window_tokens = time.time(), 0
        self.last_loss = None
        self.writer = None
        if cfg.tensorboard and self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(out / "tensorboard", purge_step=first_step + 1)

    def step(self, step: int, stats: StepStats, lr: float, grad_norm: float, final: bool) -> None:
        self.window_tokens += stats.tokens
        if not self.enabled or not (step % self.every == 0 or final):
            return
        now = time.time()
        record = {"step": step, **{self.names.get(k, k): float(v) for k, v in stats.terms._asdict().items()},
                  "lr": lr,
                  "grad_norm": grad_norm, "tokens_per_s": self.window_tokens / max(now - self.window_start, 1e-9),
                  "memory_mb": _memory_mb(self.device)}
        self.window_start, self.window_tokens = now, 0
        self.last_loss = record["loss"]
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


# --- what the loop is built from --------------------------------------------------------------------------

def run_device(cfg: TrainConfig, procs: distributed.Processes) -> torch.device:
    device = device_of(cfg.device)
    if device.type != "cuda":
        return device
    device = torch.device("cuda", procs.local_rank)
    if cfg.precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16; use --precision "
                         "fp16 (with its gradient scaler) or fp32")
    return device


def prepare_output_dir(cfg: TrainConfig, out: Path, procs: distributed.Processes, resumed: Progress | None,
                       micro_per_step: int, total_steps: int) -> None:
    """A fresh run clears what an earlier run left (--overwrite); a resumed one drops the records its
    predecessor logged after the checkpoint, so that the log continues seamlessly."""
    if resumed is not None:
        _truncate_metrics(out / "metrics.jsonl", resumed.step)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    atomic_write_text(out / "config.json", json.dumps(
        {**dataclasses.asdict(cfg), "world_size": procs.world_size, "effective_batch": cfg.batch_size * micro_per_step},
        indent=2))
    print(f"distilling {total_steps} steps of {cfg.batch_size} x {cfg.grad_accum} x {procs.world_size} = "
          f"{cfg.batch_size * micro_per_step} sequences (batch x grad-accum x processes)", file=sys.stderr)


def finish(cfg: TrainConfig, out: Path, procs: distributed.Processes, progress: Progress, wall: float, tokenizer,
           heldout_teacher, teacher_summary: dict, student, run_data: TrainingData, device, family: Family) -> dict:
    """Exports the student with its tokenizer and writes summary.json with the held-out metrics
    (heldout_teacher: heldout_metrics' teacher)."""
    export = out / "student"
    student.save_pretrained(export)
    tokenizer.save_pretrained(export)
    summary = {"steps": progress.step, "skipped_steps": progress.skipped_steps,
               "epochs_started": progress.epoch + (progress.step_in_epoch > 0), "wall_s": wall,
               "world_size": procs.world_size, "effective_batch": cfg.batch_size * run_data.micro_per_step,
               "train_sequences": len(run_data.train_set), "heldout_sequences": len(run_data.heldout),
               "train_tokens": progress.tokens, "train_tokens_per_s": progress.tokens / max(wall, 1e-9),
               **teacher_summary, "student_params": sum(p.numel() for p in student.parameters()),
               **heldout_metrics(heldout_teacher, student, run_data.heldout_batches(), device, family.causal)}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def resume(cfg: TrainConfig, out: Path, procs: distributed.Processes, student, optimizer, scheduler, scaler
           ) -> Progress | None:
    """Loads the checkpoint --resume names into the training objects; returns its progress, or None."""
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        found = checkpoint.load_latest(out / "checkpoints")
        if found is None:
            raise ValueError(f"--resume: no whole checkpoint in {out / 'checkpoints'}")
        path, state = found
    else:
        path = Path(cfg.resume)
        if not path.is_dir():
            raise ValueError(f"--resume {path}: not a checkpoint directory")
        state = checkpoint.load(path)
    student.load_state_dict(state["student"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    if len(state["rng"]) == procs.world_size:  # with another number of processes, the seed alone decides
        rng = state["rng"][procs.rank]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    progress = Progress(**state["progress"])
    if procs.is_main:
        print(f"resuming from {path} (step {progress.step})", file=sys.stderr)
    return progress


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _truncate_metrics(path: Path, step: int) -> None:
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))


class _StopOnSignal:
    """SIGTERM (a preemption, torchrun stopping the job) or SIGINT: finish the current step, checkpoint, stop."""

    def __init__(self):
        self.signal = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def cli(argv=None) -> int:
    return run_command(lambda: main(parse_args(argv)), lambda summary: print(json.dumps(summary, indent=2)))
