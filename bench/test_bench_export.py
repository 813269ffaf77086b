"""Exports (python -m fastdistil.export): size on disk, CPU latency and wiki-topic accuracy of ONNX Runtime and
torch.export models, fp32 and int8, beside the PyTorch fp32 model they come from; the paper's Table 3 (66 M vs
110 M parameters, 207 MB, 410 s vs 668 s on CPU) carried to what a deployment runs.

Models, each a 12-label sequence classifier (wiki-topic's topics) saved with its tokenizer:
  bert-base        BertForSequenceClassification with bert-base's config, seeded random weights (latency does not
                   depend on the values)
  distilbert-base  DistilBertForSequenceClassification with DistilBERT's config (6 layers, hidden 768), likewise
  tiny-teacher     the built-in teacher (fastdistil/assets/tiny-bert-teacher, 4 x 128)   } fine-tuned on wiki-topic
  tiny-student     the default run's distilled student (2 x 128)                          } as evaluate does
The tiny pair is fine-tuned here by python -m fastdistil.evaluate's own code (finetune.fine_tune) with its
defaults and seed (2 epochs, lr 1e-3, 64 tokens, batch 32), since the command keeps no fine-tuned model. The
student comes from the finished default run in FASTDISTIL_BENCH_RUN (python -m fastdistil.train --output-dir DIR)
or, without one, from a default run trained here first (minutes).

Runtimes: pytorch-fp32 (the transformers model, eager, torch.inference_mode), onnxruntime-fp32 and
onnxruntime-int8 (--format onnx, --quantize none / int8), torch-int8 (--format torch --quantize int8, a torch.export
program with torchao's int8 weights and dynamic int8 activations). Every export is made by the command, which checks
it against PyTorch fp32 first; ONNX Runtime runs on as many intra-op threads as PyTorch.

Latency inputs are the inference benchmark's: N_SEQUENCES sequences drawn from the bundled corpus, tokenized and
chunked as the trainer does (at most 128 tokens); one round runs them all, one at a time at batch 1 (no padding),
or together at batch 32, padded to the longest. Accuracy: one pass over wiki-topic's held-out split (2,063 texts,
64 tokens, batches of 32 of similar length), scored against the topics.

    FASTDISTIL_BENCH_RUN=runs/distil python -m pytest bench/test_bench_export.py --benchmark-json \\
        bench/results/export.json
    python -m pytest bench/test_bench_export.py -k "distilbert-base and b1"  # model, runtime, batch in every id
    python -m bench.report

FASTDISTIL_BENCH_ROUNDS=N sets the timed rounds of every latency case (default: the bert-base shapes 3, the tiny
ones 5; one warm-up round each). FASTDISTIL_BENCH_WORK=DIR keeps the models and exports in DIR and reuses what an
earlier run left there. The whole suite took 36 minutes on two busy cores, most of it fine-tuning and exporting;
its timings alone, with the models and exports of an earlier run reused, 5 minutes.
"""

import functools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification, DistilBertConfig,
                          DistilBertForSequenceClassification)

import fastdistil
from fastdistil import assets
from fastdistil.evaluate import finetune, tasks
from fastdistil.export import command, extra, source
from fastdistil.train import data

from bench.machine import CpuContention, load_average
from bench.test_bench_inference import benchmark_sequences, make_batches

SEED = 0
NUM_LABELS = 12  # wiki-topic's topics
MODELS = ("bert-base", "distilbert-base", "tiny-teacher", "tiny-student")
TINY_MODELS = ("tiny-teacher", "tiny-student")
# runtime: (--format, --quantize) of its export; None: the PyTorch model itself
RUNTIMES = {"pytorch-fp32": (None, "none"), "onnxruntime-fp32": ("onnx", "none"),
            "onnxruntime-int8": ("onnx", "int8"), "torch-int8": ("torch", "int8")}
BATCH_SIZES = (1, 32)
ROUNDS = dict.fromkeys(MODELS, 5) | {"bert-base": 3, "distilbert-base": 3}
if "FASTDISTIL_BENCH_ROUNDS" in os.environ:
    ROUNDS = dict.fromkeys(MODELS, int(os.environ["FASTDISTIL_BENCH_ROUNDS"]))
WARMUP_ROUNDS = 1
# The random-weight models' logits are all near zero: their check's agreement says nothing, and 32 texts keep a
# bert-base check (two forward passes per text) short. The fine-tuned ones are checked as the command's default.
CHECK_EXAMPLES = {"bert-base": 32, "distilbert-base": 32}
EVAL = finetune.EvalConfig()  # python -m fastdistil.evaluate's defaults: what the tiny pair is fine-tuned with
TASK = tasks.get_task("wiki-topic")

LATENCY = [(m, r, b) for m in MODELS for r in RUNTIMES for b in BATCH_SIZES]
ACCURACY = [(m, r) for m in TINY_MODELS for r in RUNTIMES]


# --- the models -----------------------------------------------------------------------------------------------

def fine_tuned_classifier(pretrained: Path, out: Path, cfg: finetune.EvalConfig) -> Path:
    """The model at `pretrained` with a wiki-topic head, fine-tuned as python -m fastdistil.evaluate fine-tunes
    it (its code, cfg's hyperparameters and seed), saved to `out` with its tokenizer and topic names."""
    tokenizer = finetune.load_tokenizer(pretrained)
    train, _, labels, num_labels = finetune.task_data(TASK, cfg)
    torch.manual_seed(cfg.seed)  # evaluate seeds right before building each model: the same head, the same dropout
    model = finetune.pretrained_model(str(pretrained), "the model", TASK, num_labels)
    finetune.fine_tune(model, finetune.encode(train, TASK, tokenizer, cfg, training=True), TASK, cfg,
                       tokenizer.pad_token_id, torch.device("cpu"), pretrained.name)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: i for i, label in enumerate(labels)}
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@functools.lru_cache(maxsize=1)
def default_run(work: Path) -> Path:
    """A finished default run: FASTDISTIL_BENCH_RUN's, or one trained here."""
    if "FASTDISTIL_BENCH_RUN" in os.environ:
        run = Path(os.environ["FASTDISTIL_BENCH_RUN"])
        if not (run / "student" / "config.json").is_file():
            raise FileNotFoundError(f"FASTDISTIL_BENCH_RUN={run}: no student/ in it; make one with python -m "
                                    "fastdistil.train --output-dir DIR")
        return run
    run = work / "default-run"
    subprocess.run([sys.executable, "-m", "fastdistil.train", "--output-dir", str(run)], check=True)
    return run


@functools.lru_cache(maxsize=None)
def model_dir(model: str, work: Path) -> Path:
    """The model's 12-label classifier, saved with its tokenizer."""
    out = work / model
    if (out / "tokenizer_config.json").is_file():  # saved whole (the tokenizer goes last) by an earlier run
        return out
    if model in TINY_MODELS:
        pretrained = assets.TEACHER if model == "tiny-teacher" else default_run(work) / "student"
        return fine_tuned_classifier(Path(pretrained), out, EVAL)
    torch.manual_seed(SEED)
    # Both configs' defaults are the released models' shapes (bert-base-uncased, distilbert-base-uncased).
    classifier = (BertForSequenceClassification(BertConfig(num_labels=NUM_LABELS)) if model == "bert-base"
                  else DistilBertForSequenceClassification(DistilBertConfig(num_labels=NUM_LABELS)))
    classifier.save_pretrained(out)
    AutoTokenizer.from_pretrained(data.BUNDLED_TOKENIZER).save_pretrained(out)
    return out


# Cases run grouped by model: keep only the current model's PyTorch model and runtimes alive (those of the bert-base
# shapes take gigabytes together).
@functools.lru_cache(maxsize=1)
def loaded(model: str, work: Path) -> source.Source:
    return source.load(model_dir(model, work))


@functools.lru_cache(maxsize=None)
def exported(model: str, runtime: str, work: Path) -> dict:
    """The command's export.json of the model for the runtime."""
    fmt, quantize = RUNTIMES[runtime]
    out = work / f"{model}-{runtime}"
    if (out / "export.json").is_file():  # an earlier run's: the command renames an export into place whole
        report = json.loads((out / "export.json").read_text())
        return {**report, "path": str(out / report["file"])}
    cfg = command.ExportConfig(model_dir=str(model_dir(model, work)), output_dir=str(out),
                               format=fmt, quantize=quantize,
                               check_examples=CHECK_EXAMPLES.get(model, command.ExportConfig.check_examples))
    return command.main(cfg)


@functools.lru_cache(maxsize=len(RUNTIMES))
def runner(model: str, runtime: str, work: Path):
    """The runtime's function of {input name: int64 array} giving the logits."""
    fmt, quantize = RUNTIMES[runtime]
    if fmt is None:
        return loaded(model, work).runner()
    path = Path(exported(model, runtime, work)["path"])
    return command.FORMATS[fmt].runner(path, loaded(model, work).input_names, quantize)


def size_of(model: str, runtime: str, work: Path) -> int:
    """Bytes on disk of what the runtime loads: the safetensors weights for PyTorch, else the export's file."""
    if RUNTIMES[runtime][0] is None:
        return (model_dir(model, work) / "model.safetensors").stat().st_size
    return exported(model, runtime, work)["size_bytes"]


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    """Where the models and exports go: FASTDISTIL_BENCH_WORK, kept and what it holds reused (a run cut short is
    timed again without fine-tuning and exporting anew), or a fresh temporary folder."""
    if "FASTDISTIL_BENCH_WORK" in os.environ:
        path = Path(os.environ["FASTDISTIL_BENCH_WORK"])
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("export-bench")


def feeds(batches: list[tuple[torch.Tensor, torch.Tensor]], input_names: tuple[str, ...]) -> list[dict]:
    """Padded (input_ids, attention_mask) batches as the runtimes' int64 inputs (one segment: token types 0)."""
    fed = []
    for ids, mask in batches:
        inputs = {"input_ids": ids.numpy(), "attention_mask": mask.long().numpy(), "token_type_ids":
                  np.zeros_like(ids.numpy())}
        fed.append({name: inputs[name] for name in input_names})
    return fed


def common_info(model: str, runtime: str, work: Path) -> dict:
    """What every result of the model and runtime records: its sizes, its export and the software."""
    fmt, quantize = RUNTIMES[runtime]
    report = exported(model, runtime, work) if fmt else None
    src = loaded(model, work)
    return dict(model=model, runtime=runtime, format=fmt or "pytorch", quantize=quantize,
                architecture=src.architecture, params=sum(p.numel() for p in src.model.parameters()),
                layers=src.model.config.num_hidden_layers, hidden_size=src.model.config.hidden_size,
                size_bytes=size_of(model, runtime, work), opset=report and report["opset"],
                export_check=report and report["check"], export_wall_s=report and report["wall_s"],
                quantization=report and report["quantization"], torch_threads=torch.get_num_threads(),
                onnxruntime_threads=torch.get_num_threads() if fmt == "onnx" else None,
                versions=extra.versions(), cpu_isa=fastdistil.extension.cpu_isa())


# --- the cases ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model,runtime,batch_size", LATENCY, ids=[f"{m}-{r}-b{b}" for m, r, b in LATENCY])
def test_export_latency(benchmark, work, model, runtime, batch_size):
    run = runner(model, runtime, work)
    sequences = benchmark_sequences()
    batches = make_batches(sequences, batch_size)
    fed = feeds(batches, loaded(model, work).input_names)

    def run_all():
        for inputs in fed:
            run(inputs)

    benchmark.group = f"export latency {model} b{batch_size}"
    with CpuContention() as contention:
        benchmark.pedantic(run_all, rounds=ROUNDS[model], warmup_rounds=WARMUP_ROUNDS, iterations=1)
    lengths = [len(s) for s in sequences]
    stats = benchmark.stats.stats if benchmark.stats else None  # None under --benchmark-disable
    benchmark.extra_info.update(
        **common_info(model, runtime, work), case="latency", batch_size=batch_size, n_sequences=len(sequences),
        tokens=sum(lengths), padded_tokens=sum(ids.numel() for ids, _ in batches), seq_len_min=min(lengths),
        seq_len_median=statistics.median(lengths), seq_len_mean=statistics.mean(lengths), seq_len_max=max(lengths),
        seconds_per_sequence=stats.median / len(sequences) if stats else None,
        tokens_per_s=sum(lengths) / stats.median if stats else None,
        other_cpu_fraction=contention.other_fraction, load_average=load_average())


@functools.lru_cache(maxsize=None)
def heldout(model: str, work: Path) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """wiki-topic's held-out split at evaluate's 64 tokens: (batches of similar length, each example's place in
    the split, the topics)."""
    _, eval_sets, _, _ = finetune.task_data(TASK, EVAL)
    split = eval_sets["test"]
    tokenizer = loaded(model, work).tokenizer
    encoded = tokenizer(split["text"], truncation=True, max_length=EVAL.max_seq_len)["input_ids"]
    order = np.argsort([len(ids) for ids in encoded], kind="stable")
    batches = [data.collate([encoded[i] for i in order[start:start + EVAL.batch_size]], tokenizer.pad_token_id)
               for start in range(0, len(order), EVAL.batch_size)]
    return feeds(batches, loaded(model, work).input_names), order, np.asarray(split["label"])


@functools.lru_cache(maxsize=None)  # PyTorch fp32's: every runtime's reference
def predictions(model: str, runtime: str, work: Path) -> np.ndarray:
    batches, order, _ = heldout(model, work)
    run = runner(model, runtime, work)
    predicted = np.empty(len(order), dtype=np.int64)
    predicted[order] = np.concatenate([run(inputs).argmax(-1) for inputs in batches])
    return predicted


@pytest.mark.parametrize("model,runtime", ACCURACY, ids=[f"{m}-{r}-accuracy" for m, r in ACCURACY])
def test_export_accuracy(benchmark, work, model, runtime):
    _, order, labels = heldout(model, work)
    result = {}
    benchmark.group = f"export accuracy {model}"
    with CpuContention() as contention:
        # One timed pass: the held-out split's prediction time, the paper's "pass over a dev set".
        benchmark.pedantic(lambda: result.update(predicted=predictions(model, runtime, work)), rounds=1,
                           iterations=1)
    reference = predictions(model, "pytorch-fp32", work) if runtime != "pytorch-fp32" else result["predicted"]
    benchmark.extra_info.update(
        **common_info(model, runtime, work), case="accuracy", task=TASK.name, eval_examples=len(order),
        max_seq_len=EVAL.max_seq_len, batch_size=EVAL.batch_size, fine_tuning={
            k: getattr(EVAL, k) for k in ("epochs", "lr", "batch_size", "max_seq_len", "warmup", "seed")},
        accuracy=float((result["predicted"] == labels).mean()),
        agreement_with_pytorch_fp32=float((result["predicted"] == reference).mean()),
        other_cpu_fraction=contention.other_fraction, load_average=load_average())
