"""python -m fastdistil.train: distill a BERT masked-LM teacher into a DistilBERT student (Sanh et al. 2019).

Read top to bottom: the config, the data, the models, one training step, the loop, the export.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForMaskedLM, AutoTokenizer, get_linear_schedule_with_warmup

import fastdistil
from fastdistil import checkpoint, data, distributed, mlm_head
from fastdistil.attention import register_with_transformers
from fastdistil.student import make_student
from fastdistil.triple_loss_output import TripleLossOutput

BUNDLED_TEACHER = data.DATA_DIR / "tiny-bert-teacher"
# The length of a run given neither --max-steps nor --epochs: the built-in default run's, under 3 minutes
# on 2 CPU cores.
DEFAULT_MAX_STEPS = 200
DROPOUT_STREAM = 1  # data.seed_at(seed, epoch, batch, DROPOUT_STREAM) seeds dropout, apart from the masking
RUN_FILES = ("metrics.jsonl", "summary.json", "config.json", "checkpoints", "student", "tensorboard")
HELDOUT_STREAM = -1  # the held-out masks: data.rng(seed, HELDOUT_STREAM, batch), the same in every run


def _flag(default, text: str):
    """A TrainConfig field and its --help text."""
    return dataclasses.field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    teacher: str = _flag(str(BUNDLED_TEACHER), "BERT masked LM: hub name or directory (default: the built-in one)")
    tokenizer: str | None = _flag(None, "default: the teacher's")
    dataset: str = _flag(data.DEFAULT_DATASET, "wiki-vital (bundled), a .txt/.jsonl file or folder, or a HF dataset")
    dataset_config: str | None = _flag(None, "the Hugging Face dataset's config")
    text_column: str = _flag("text", "the text field of .jsonl files and datasets")
    streaming: bool = _flag(False, "read a Hugging Face dataset as a stream; needs --max-documents")
    max_documents: int | None = _flag(None, "use the first documents of the corpus only")
    num_proc: int = _flag(1, "tokenizer processes (batches of documents in parallel; fast tokenizers already use "
                             "several cores)")
    output_dir: str = _flag("runs/distil", "where the run's files go")
    overwrite: bool = _flag(False, "replace what an earlier run left in --output-dir")
    max_steps: int | None = _flag(None, f"optimizer steps (default: --epochs if given, else {DEFAULT_MAX_STEPS})")
    epochs: int | None = _flag(None, "passes over the data, when --max-steps is not given")
    batch_size: int = _flag(8, "sequences per process and micro-batch")
    grad_accum: int = _flag(1, "micro-batches per optimizer step and process")
    max_seq_len: int = _flag(128, "tokens per sequence, [CLS] and [SEP] included; longer text is chunked")
    # The recipe's 5e-4 was for batches of ~2,000 sequences; at the default batch of 8 it undoes the teacher
    # initialization within the default run.
    lr: float = _flag(1e-4, "peak learning rate (the recipe used 5e-4 with batches of ~2,000 sequences)")
    warmup: float = _flag(0.05, "linear warm-up, as a fraction of the steps")
    weight_decay: float = _flag(0.0, "AdamW weight decay (not on biases and LayerNorms)")
    adam_eps: float = _flag(1e-6, "AdamW epsilon")
    max_grad_norm: float = _flag(5.0, "gradient clipping")
    temperature: float = _flag(2.0, "softmax temperature of the KL term")
    alpha_ce: float = _flag(5.0, "weight of the KL (distillation) term")
    alpha_mlm: float = _flag(2.0, "weight of the masked-LM term")
    alpha_cos: float = _flag(1.0, "weight of the hidden-state cosine term")
    restrict_ce_to_mask: bool = _flag(False, "KL over the MLM targets only, not every token")
    mlm_prob: float = _flag(0.15, "fraction of real tokens that become MLM targets")
    mlm_smoothing: float = _flag(0.7, "targets drawn with probability count^-smoothing")
    student_layers: str | None = _flag(None, "teacher layers the student starts from, e.g. 0,2,4,7,9,11")
    student_init: str = _flag("teacher", "teacher (the recipe) or random (the ablation)")
    precision: str = _flag("fp32", "autocast of the models; the loss is always fp32")
    attention: str = _flag("sdpa", "the student's attention: sdpa (transformers' default), eager, or fastdistil "
                                   "(the fused Triton kernel on sm80+ GPUs, SDPA elsewhere)")
    loss: str = _flag("fused", "fused: projection and loss chunk by chunk, no [N, V] logits; fused-logits: "
                               "logits, then the fused loss; reference: logits, then the unfused recipe loss")
    device: str = _flag("auto", "cuda when there is a GPU, else cpu")
    save_every: int = _flag(0, "optimizer steps between checkpoints; 0: none (SIGTERM still saves one)")
    keep_last: int = _flag(3, "checkpoints kept")
    resume: str | None = _flag(None, "continue from the newest whole checkpoint in --output-dir, or this one")
    max_bad_steps: int = _flag(10, "consecutive NaN/inf-loss steps (each skipped) before the run stops")
    token_weighted: bool = _flag(False, "weight micro-batches and processes by their non-padding tokens")
    log_every: int = _flag(10, "optimizer steps between metrics.jsonl records")
    seed: int = _flag(56, "seeds batch order, masking, dropout and a random student")
    heldout_fraction: float = _flag(0.02, "sequences held out for the final evaluation")
    tensorboard: bool = _flag(False, "also log to OUTPUT_DIR/tensorboard")


CHOICES = {"precision": ("fp32", "bf16", "fp16"), "loss": ("fused", "fused-logits", "reference"),
           "device": ("auto", "cpu", "cuda"), "student_init": ("teacher", "random"),
           "attention": ("sdpa", "eager", "fastdistil")}


def check_config(cfg: TrainConfig) -> None:
    """A ValueError naming the first bad setting."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                             f"got {getattr(cfg, name)!r}")
    for name in ("alpha_ce", "alpha_mlm", "alpha_cos", "weight_decay"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {cfg.temperature}")
    if not 0 < cfg.mlm_prob < 1:
        raise ValueError(f"--mlm-prob must be in (0, 1), got {cfg.mlm_prob}")
    for name in ("batch_size", "grad_accum", "epochs", "log_every", "num_proc", "max_documents"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    if cfg.streaming and cfg.max_documents is None:
        raise ValueError("--streaming needs --max-documents: how many documents to read from the stream")
    if cfg.max_steps is not None and cfg.max_steps < 0:
        raise ValueError(f"--max-steps must be >= 0, got {cfg.max_steps}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite and cfg.resume is None:
        raise ValueError(f"--output-dir {out} is not empty; pass --overwrite to replace its contents or "
                         "--resume to continue its run")
    if cfg.keep_last < 1:
        raise ValueError(f"--keep-last must be >= 1, got {cfg.keep_last}")
    if cfg.max_bad_steps < 0:
        raise ValueError(f"--max-bad-steps must be >= 0, got {cfg.max_bad_steps}")


def parse_args(argv=None) -> TrainConfig:
    """Every TrainConfig field is a flag (--max-steps, --restrict-ce-to-mask, ...); --config FILE (YAML or
    JSON, the same keys) sets defaults that the command line overrides."""
    parser = argparse.ArgumentParser(prog="python -m fastdistil.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="YAML or JSON file with TrainConfig keys")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        text = field.metadata["help"]
        if field.name == "resume":
            parser.add_argument(flag, nargs="?", const="latest", default=None, metavar="CHECKPOINT_DIR", help=text)
        elif field.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            kind = next((t for t in (int, float) if t in (field.type, *typing.get_args(field.type))), str)
            parser.add_argument(flag, type=kind, default=None, choices=CHOICES.get(field.name), help=text)
    args = vars(parser.parse_args(argv))
    values = {}
    config_file = args.pop("config")
    if config_file is not None:
        if not config_file.exists():
            raise ValueError(f"--config {config_file} does not exist")
        text = config_file.read_text()
        if config_file.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"--config {config_file}: unknown keys {unknown}")
    values.update({k: v for k, v in args.items() if v is not None})
    return TrainConfig(**values)


def load_teacher(cfg: TrainConfig, tokenizer, device) -> torch.nn.Module:
    if cfg.teacher == str(BUNDLED_TEACHER) and not BUNDLED_TEACHER.exists():
        raise ValueError(f"the built-in teacher is not in this installation ({BUNDLED_TEACHER}); pass --teacher "
                         "(a hub name or a local directory of a BERT masked LM)")
    try:
        teacher, info = AutoModelForMaskedLM.from_pretrained(cfg.teacher, output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--teacher {cfg.teacher}: not a loadable masked LM ({exc})") from exc
    untrained_head = [k for k in info["missing_keys"] if k.startswith(("cls.", "lm_head."))]
    if untrained_head:
        raise ValueError(f"--teacher {cfg.teacher}: not a masked LM (its checkpoint has no MLM head: "
                         f"{untrained_head[0]} is missing)")
    if teacher.config.vocab_size != len(tokenizer):
        raise ValueError(f"--teacher vocabulary ({teacher.config.vocab_size}) does not match the tokenizer's "
                         f"({len(tokenizer)})")
    return teacher.float().to(device).eval().requires_grad_(False)


def device_of(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def make_optimizer(student: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """The recipe's AdamW (betas 0.9, 0.98), with no weight decay on biases and LayerNorms, as the original
    distiller meant. The fused implementation, one kernel over all parameters, where the device has one."""
    norms = {id(p) for m in student.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    decay, no_decay = [], []
    for name, param in student.named_parameters():
        (no_decay if name.endswith("bias") or id(param) in norms else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    device = next(student.parameters()).device
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=cfg.adam_eps,
                             fused=device.type in ("cpu", "cuda"))


def train_step(student: torch.nn.Module, teacher: mlm_head.ProjectionInputs, batch, cfg: TrainConfig, amp_dtype
               ) -> TripleLossOutput:
    """Both models' forward and the triple loss of one micro-batch. `student` is a ProjectionInputs, or the
    DistributedDataParallel wrapping one."""
    input_ids, attention_mask, labels = batch
    with torch.autocast(input_ids.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        with torch.no_grad():
            t_input, t_hidden = teacher(input_ids, attention_mask)
        s_input, s_hidden = student(input_ids, attention_mask)
    s_proj = mlm_head.projection(getattr(student, "module", student).model)
    t_proj = mlm_head.projection(teacher.model)
    weights = [s_proj.weight, s_proj.bias, t_proj.weight, t_proj.bias]
    if amp_dtype is not None:  # the cast autocast would apply to the projection (F.linear)
        s_input, t_input = s_input.to(amp_dtype), t_input.to(amp_dtype)
        weights = [None if w is None else w.to(amp_dtype) for w in weights]
    s_weight, s_bias, t_weight, t_bias = weights
    loss_args = (labels, s_hidden, t_hidden, attention_mask, cfg.temperature, cfg.alpha_ce, cfg.alpha_mlm,
                 cfg.alpha_cos, cfg.restrict_ce_to_mask)
    # The loss always runs in fp32 inside the kernels, whatever the inputs' dtype.
    if cfg.loss == "fused":
        return fastdistil.fused_linear_triple_loss(s_input, s_weight, s_bias, t_input.detach(), t_weight, t_bias,
                                                   *loss_args)
    s_logits = torch.nn.functional.linear(s_input, s_weight, s_bias)
    t_logits = torch.nn.functional.linear(t_input, t_weight, t_bias)
    backend = "reference" if cfg.loss == "reference" else "auto"
    return fastdistil.triple_loss(s_logits, t_logits, *loss_args, backend=backend)


@torch.no_grad()
def evaluate(teacher, student, batches_, device) -> dict:
    """Held-out MLM loss of each model and the student's top-1 agreement with the teacher on masked rows."""
    student.eval()
    totals = {"teacher": 0.0, "student": 0.0, "agree": 0, "rows": 0}
    for input_ids, attention_mask, labels in batches_:
        input_ids, attention_mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
        targets = labels != -100
        t_logits = mlm_head.logits_at(teacher, input_ids, attention_mask, targets).float()
        s_logits = mlm_head.logits_at(student, input_ids, attention_mask, targets).float()
        y = labels[targets]
        totals["teacher"] += torch.nn.functional.cross_entropy(t_logits, y, reduction="sum").item()
        totals["student"] += torch.nn.functional.cross_entropy(s_logits, y, reduction="sum").item()
        totals["agree"] += int((t_logits.argmax(-1) == s_logits.argmax(-1)).sum())
        totals["rows"] += int(targets.sum())
    student.train()
    rows = max(totals["rows"], 1)
    return {"teacher_heldout_mlm_loss": totals["teacher"] / rows, "student_heldout_mlm_loss": totals["student"] / rows,
            "student_teacher_top1_agreement": totals["agree"] / rows, "heldout_masked_rows": totals["rows"]}


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(cfg: TrainConfig) -> dict:
    out = Path(cfg.output_dir)
    if distributed.restarted() and cfg.resume is None:  # torchrun brought the job back: continue it
        has_checkpoint = bool(checkpoint.checkpoints(out / "checkpoints"))
        cfg = dataclasses.replace(cfg, resume="latest" if has_checkpoint else None, overwrite=True)
    check_config(cfg)
    procs = distributed.init(device_of(cfg).type)
    try:
        return _distill(cfg, procs, out)
    finally:
        distributed.shutdown()


def _distill(cfg: TrainConfig, procs: distributed.Processes, out: Path) -> dict:
    device = device_of(cfg)
    if device.type == "cuda":
        device = torch.device("cuda", procs.local_rank)
        if cfg.precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16; use --precision "
                             "fp16 (with its gradient scaler) or fp32")
    torch.manual_seed(cfg.seed)  # the same initial student (random init) on every rank
    tokenizer_name = cfg.tokenizer or cfg.teacher
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    except (OSError, ValueError) as exc:
        flag = "--tokenizer" if cfg.tokenizer else "--teacher (no --tokenizer given)"
        raise ValueError(f"{flag} {tokenizer_name}: cannot load a tokenizer ({exc})") from exc
    teacher = load_teacher(cfg, tokenizer, device)
    layers = None if cfg.student_layers is None else [int(i) for i in cfg.student_layers.split(",")]
    student = make_student(teacher, layers, cfg.student_init).to(device).train()
    if cfg.attention == "fastdistil":
        register_with_transformers()
    student.set_attn_implementation(cfg.attention)  # not saved with the student: its export loads anywhere
    model, teacher_inputs = mlm_head.ProjectionInputs(student), mlm_head.ProjectionInputs(teacher)
    if procs.world_size > 1:  # the frozen teacher is a plain replica on every rank
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[procs.local_rank] if device.type == "cuda" else None)

    corpus = data.load_corpus(cfg.dataset, cfg.dataset_config, text_column=cfg.text_column,
                              streaming=cfg.streaming, max_documents=cfg.max_documents)
    sequences = data.tokenize_corpus(corpus, tokenizer, cfg.max_seq_len, cfg.num_proc if cfg.num_proc > 1 else None)
    train_set, heldout = data.heldout_split(sequences, cfg.heldout_fraction, cfg.seed)
    masker = data.DynamicMasker(
        data.masking_probabilities(train_set, len(tokenizer), tokenizer.all_special_ids, cfg.mlm_smoothing),
        tokenizer.mask_token_id, len(tokenizer), cfg.mlm_prob)

    # An optimizer step takes micro_per_step consecutive micro-batches of the epoch; micro-batch j of a step
    # goes to rank j % world_size. So the order and content of every step depend on the seed, never on the
    # number of processes: 2 processes with --grad-accum 1 compute what 1 process does with --grad-accum 2.
    lengths = [len(ids) for ids in train_set["input_ids"]]
    micro_per_step = cfg.grad_accum * procs.world_size
    steps_per_epoch = len(data.length_grouped_batches(lengths, cfg.batch_size, cfg.seed, 0)) // micro_per_step
    if steps_per_epoch == 0:
        raise ValueError(f"--grad-accum {cfg.grad_accum} x {procs.world_size} processes exceeds the number of "
                         "batches in an epoch")
    if cfg.max_steps is not None:
        total_steps = cfg.max_steps
    elif cfg.epochs is not None:
        total_steps = steps_per_epoch * cfg.epochs
    else:
        total_steps = DEFAULT_MAX_STEPS

    def micro_batch(plan: list[list[int]], epoch: int, index: int):
        """Micro-batch `index` of the epoch, masked, its dropout seeded: all a function of the position."""
        ids, mask = data.collate(train_set[plan[index]]["input_ids"], tokenizer.pad_token_id)
        masked, labels = masker(ids, mask, data.rng(cfg.seed, epoch, index))
        torch.manual_seed(data.seed_at(cfg.seed, epoch, index, DROPOUT_STREAM))
        return masked.to(device), mask.to(device), labels.to(device)

    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    optimizer = make_optimizer(student, cfg)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(cfg.warmup * total_steps), max(total_steps, 1))

    progress_state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "tokens": 0, "wall_s": 0.0, "bad_steps": 0,
                      "skipped_steps": 0}
    resumed = _resume(cfg, out, procs, student, optimizer, scheduler, scaler)
    if procs.is_main:
        if resumed is not None:
            _truncate_metrics(out / "metrics.jsonl", resumed["step"])
        else:
            out.mkdir(parents=True, exist_ok=True)
            for name in RUN_FILES:  # --overwrite: what an earlier run left goes, nothing else
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        atomic_write_text(out / "config.json", json.dumps(
            {**dataclasses.asdict(cfg), "world_size": procs.world_size,
             "effective_batch": cfg.batch_size * micro_per_step}, indent=2))
        print(f"distilling {total_steps} steps of {cfg.batch_size} x {cfg.grad_accum} x {procs.world_size} = "
              f"{cfg.batch_size * micro_per_step} sequences (batch x grad-accum x processes)", file=sys.stderr)
    progress_state.update(resumed or {})
    writer = None
    if cfg.tensorboard and procs.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(out / "tensorboard", purge_step=progress_state["step"] + 1)

    def save():
        """Every rank takes part (its RNG state is gathered); rank 0 writes."""
        rng_states = distributed.gather(_rng_state(), procs)
        if procs.is_main:
            state = {"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                     "progress": {**progress_state, "wall_s": progress_state["wall_s"] + time.time() - start},
                     "rng": rng_states, "config": dataclasses.asdict(cfg)}
            checkpoint.save(out / "checkpoints", progress_state["step"], state, cfg.keep_last)
        distributed.barrier(procs)

    stop = _StopOnSignal()
    step, epoch, step_in_epoch = progress_state["step"], progress_state["epoch"], progress_state["step_in_epoch"]
    start = window_start = time.time()
    window_tokens = 0
    stopping = False
    progress = tqdm(total=total_steps, initial=step, desc="distilling", disable=total_steps == 0 or not procs.is_main)
    try:
        while step < total_steps and not stopping:
            plan = data.length_grouped_batches(lengths, cfg.batch_size, cfg.seed, epoch)
            while step_in_epoch < steps_per_epoch and step < total_steps and not stopping:
                first = step_in_epoch * micro_per_step
                step_tokens = sum(lengths[i] for b in range(first, first + micro_per_step) for i in plan[b])
                mine = range(first + procs.rank, first + micro_per_step, procs.world_size)
                stats = torch.zeros(6)  # the 4 loss terms, weighted; non-padding tokens; whether a process must stop
                for n, index in enumerate(mine):
                    batch = micro_batch(plan, epoch, index)
                    n_tokens = int(batch[1].sum())
                    # DDP averages gradients over processes; the weights make the step the mean over micro-batches
                    # (or over tokens, with --token-weighted), whatever their split over processes.
                    weight = (n_tokens * procs.world_size / step_tokens if cfg.token_weighted
                              else 1 / cfg.grad_accum)
                    sync = n == len(mine) - 1 or procs.world_size == 1
                    with contextlib.nullcontext() if sync else model.no_sync():
                        out_terms = train_step(model, teacher_inputs, batch, cfg, amp_dtype)
                        scaler.scale(out_terms.loss * weight).backward()
                    stats[:4] += torch.stack([t.detach().float().cpu() for t in out_terms]) * weight
                    stats[4] += n_tokens
                stats[5] = stop.signal is not None
                distributed.sum_across(stats, procs)
                terms, stopping = stats[:4] / procs.world_size, bool(stats[5])
                window_tokens += int(stats[4])
                progress_state["tokens"] += int(stats[4])
                if torch.isfinite(terms[0]):
                    scaler.unscale_(optimizer)
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm))
                    scaler.step(optimizer)
                    scaler.update()
                    progress_state["bad_steps"] = 0
                else:  # the step is skipped: no update; the data and the schedule move on
                    grad_norm = float("nan")
                    progress_state["bad_steps"] += 1
                    progress_state["skipped_steps"] += 1
                optimizer.zero_grad(set_to_none=True)
                with warnings.catch_warnings():  # after a skipped first step, torch warns of a skipped LR value
                    warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`", UserWarning)
                    scheduler.step()
                step, step_in_epoch = step + 1, step_in_epoch + 1
                progress.update(1)
                progress_state.update(step=step, epoch=epoch, step_in_epoch=step_in_epoch)
                if progress_state["bad_steps"] > cfg.max_bad_steps:
                    save()
                    raise ValueError(f"{progress_state['bad_steps']} consecutive steps had a NaN or inf loss (more "
                                     f"than --max-bad-steps {cfg.max_bad_steps}); the last good state is in "
                                     f"{out / 'checkpoints'}")
                if procs.is_main and (step % cfg.log_every == 0 or step == total_steps):
                    now = time.time()
                    record = {"step": step, **dict(zip(("loss", "loss_ce", "loss_mlm", "loss_cos"), terms.tolist())),
                              "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                              "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                              "memory_mb": _memory_mb(device)}
                    window_tokens, window_start = 0, now
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                    if writer:
                        for key, value in record.items():
                            if key != "step":
                                writer.add_scalar(key, value, step)
                    progress.set_postfix(loss=f"{record['loss']:.3f}")
                if cfg.save_every and step % cfg.save_every == 0:
                    save()
            if step_in_epoch == steps_per_epoch:  # an epoch's last, incomplete step is dropped
                epoch, step_in_epoch = epoch + 1, 0
                progress_state.update(epoch=epoch, step_in_epoch=0)
    finally:
        progress.close()
        stop.restore()
        if writer:
            writer.close()
    if stopping:
        if not (cfg.save_every and step % cfg.save_every == 0):
            save()
        return {"stopped_by_signal": True, "steps": step,
                "checkpoint": str(out / "checkpoints" / f"{checkpoint.PREFIX}{step:08d}")}
    wall = progress_state["wall_s"] + time.time() - start
    summary = {}
    if procs.is_main:
        export = out / "student"
        student.save_pretrained(export)
        tokenizer.save_pretrained(export)
        heldout_plan = data.length_grouped_batches([len(ids) for ids in heldout["input_ids"]], cfg.batch_size,
                                                   cfg.seed, epoch=0)
        heldout_batches = []
        for index, indices in enumerate(heldout_plan):
            ids, mask = data.collate(heldout[indices]["input_ids"], tokenizer.pad_token_id)
            masked, labels = masker(ids, mask, data.rng(cfg.seed, HELDOUT_STREAM, index))
            heldout_batches.append((masked, mask, labels))
        summary = {"steps": step, "skipped_steps": progress_state["skipped_steps"],
                   "epochs_started": epoch + (step_in_epoch > 0), "wall_s": wall, "world_size": procs.world_size,
                   "effective_batch": cfg.batch_size * micro_per_step, "train_sequences": len(train_set),
                   "heldout_sequences": len(heldout), "train_tokens": progress_state["tokens"],
                   "train_tokens_per_s": progress_state["tokens"] / max(wall, 1e-9),
                   "teacher_params": sum(p.numel() for p in teacher.parameters()),
                   "student_params": sum(p.numel() for p in student.parameters()),
                   **evaluate(teacher, student, heldout_batches, device)}
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    distributed.barrier(procs)
    return summary


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


def _resume(cfg: TrainConfig, out: Path, procs: distributed.Processes, student, optimizer, scheduler, scaler
            ) -> dict | None:
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
    if procs.is_main:
        print(f"resuming from {path} (step {state['progress']['step']})", file=sys.stderr)
    return state["progress"]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops the records a killed run logged after its last checkpoint, so the log continues seamlessly."""
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
    try:
        cfg = parse_args(argv)
        summary = main(cfg)
    except (ValueError, ImportError) as exc:  # ImportError: a hub dataset without the datasets package
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)  # one line
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
