"""Held-out perplexity of a causal distillation run, DistilGPT2's measure: its teacher, its student, and a
random-init student trained identically, all on the run's own held-out sequences.

    python -m fastdistil.evaluate RUN_DIR --task perplexity      -> RUN_DIR/eval_perplexity.json

The random-init student is a second `python -m fastdistil.train` of the run's config with --student-init random,
in RUN_DIR/random-init; a finished one with that config is reused. Only the batch per process may differ from the
original run's: one process with --grad-accum times the run's processes takes the same optimizer steps.
"""

import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from fastdistil.commands import atomic_write_text
from fastdistil.train import inputs
from fastdistil.train.config import TrainConfig, for_family
from fastdistil.train.distributed import Processes
from fastdistil.train.step import heldout_metrics

TASK = "perplexity"
RANDOM_RUN = "random-init"


def run_config(run: Path) -> TrainConfig:
    """The TrainConfig a run recorded in its config.json (which also holds the process count)."""
    values = json.loads((run / "config.json").read_text())
    names = {field.name for field in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{key: value for key, value in values.items() if key in names})


def random_init_run(run: Path, cfg: TrainConfig, world_size: int) -> Path:
    """RUN_DIR/random-init: the run repeated from a random-init student, trained unless already there."""
    out = run / RANDOM_RUN
    # A run from a teacher cache is repeated online: the cache holds the initial students it was made for, and
    # the recorded teacher is the cache's.
    wanted = dataclasses.replace(cfg, student_init="random", output_dir=str(out), overwrite=True, resume=None,
                                 grad_accum=cfg.grad_accum * world_size, teacher_cache=None)
    if (out / "summary.json").is_file() and (out / "config.json").is_file():
        if dataclasses.asdict(run_config(out)) == dataclasses.asdict(wanted):
            return out
    # The training command, not its loop: evaluation sits beside the recipe and runs it as a user would.
    with tempfile.NamedTemporaryFile("w", suffix=".json") as config:
        json.dump(dataclasses.asdict(wanted), config)
        config.flush()
        done = subprocess.run([sys.executable, "-m", "fastdistil.train", "--config", config.name])
    if done.returncode != 0:
        raise RuntimeError(f"training the random-init student into {out} failed (exit status {done.returncode}); "
                           "its error is printed above")
    return out


def evaluate(run: Path, device: torch.device, out_path: Path) -> dict:
    """The three models' held-out perplexities and top-1 agreements with the teacher; written to out_path."""
    cfg = run_config(run)
    family, teacher_config = inputs.teacher_family(cfg)
    if not family.causal:
        raise ValueError(f"--task {TASK}: the run's teacher is a {family.name} masked LM; score it on a "
                         "downstream task instead (e.g. --task wiki-topic)")
    cfg = for_family(cfg, family, teacher_config)
    tokenizer = inputs.load_tokenizer(cfg, family, teacher_config)
    teacher = inputs.load_teacher(cfg, device, family)
    world_size = json.loads((run / "config.json").read_text()).get("world_size", 1)
    sources = {"student": run / "student", "random_student": random_init_run(run, cfg, world_size) / "student"}
    batches = inputs.load_data(cfg, tokenizer, Processes(), family).heldout_batches()
    models = {}
    for name, source in sources.items():
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device)
        found = heldout_metrics(teacher, model, batches, device, causal=True)
        models[name] = {"source": str(source), "params": sum(p.numel() for p in model.parameters()),
                        "metrics": {"perplexity": found["student_heldout_perplexity"],
                                    "top1_agreement": found["student_teacher_top1_agreement"]},
                        "score": found["student_heldout_perplexity"]}
    teacher_ppl = found["teacher_heldout_perplexity"]
    models = {"teacher": {"source": cfg.teacher, "params": sum(p.numel() for p in teacher.parameters()),
                          "metrics": {"perplexity": teacher_ppl, "top1_agreement": 1.0}, "score": teacher_ppl},
              **models}
    report = {name: result["score"] for name, result in models.items()}
    report.update(task=TASK, models=models, heldout_sequences=sum(len(ids) for ids, _, _ in batches),
                  heldout_predicted_rows=found["heldout_predicted_rows"])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, json.dumps(report, indent=2))
    return report
