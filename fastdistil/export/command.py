"""python -m fastdistil.export: a fine-tuned sequence classifier or a masked LM, to ONNX or a torch.export program,
in fp32 or int8, checked against the PyTorch fp32 model before it is handed over.

    python -m fastdistil.export MODEL_DIR --output-dir OUT [--format onnx|torch] [--quantize none|int8]

OUT gets the model (model.onnx or model.pt2), the tokenizer and config.json beside it, and export.json: format,
opset, quantization, size on disk, parameters, the check's figures and the versions that made it. OUT is written
under a temporary name and renamed into place once the check has passed: a failed export leaves nothing.
"""

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from fastdistil.commands import atomic_write_text, check_choices, config_from, flag, parser_for, run_command
from fastdistil.export import check, extra, onnx_format, source, torch_format

FORMATS = {"onnx": onnx_format, "torch": torch_format}
QUANTIZE = ("none", "int8")


@dataclass
class ExportConfig:
    model_dir: str | None = flag(None, "a saved sequence classifier or masked LM (save_pretrained), its tokenizer "
                                       "beside it", positional=True, metavar="MODEL_DIR")
    output_dir: str | None = flag(None, "where the export goes; must not exist or be empty", metavar="OUT")
    format: str = flag("onnx", "onnx (model.onnx, for ONNX Runtime) or torch (model.pt2, a torch.export program)",
                       choices=tuple(FORMATS))
    quantize: str = flag("none", "int8: dynamic quantization, int8 weights (ONNX Runtime's for onnx, torchao's "
                                 "for torch)", choices=QUANTIZE)
    task: str = flag("auto", "the head MODEL_DIR must have (auto: the one its config names)",
                     choices=("auto", *source.TASKS))
    check_examples: int = flag(256, "held-out wiki-topic texts the export is checked on")
    check_max_len: int = flag(128, "tokens per check text, longer ones truncated")


def parse_args(argv=None) -> ExportConfig:
    parser = parser_for(ExportConfig, "python -m fastdistil.export", __doc__.split("\n\n")[0])
    return config_from(ExportConfig, vars(parser.parse_args(argv)))


def check_config(cfg: ExportConfig) -> None:
    """A ValueError (FileNotFoundError, ImportError) naming the first bad setting; reads MODEL_DIR's config.json,
    writes nothing."""
    if cfg.model_dir is None:
        raise ValueError("give MODEL_DIR, the saved model to export")
    if cfg.output_dir is None:
        raise ValueError("give --output-dir, where the export goes")
    check_choices(cfg)
    for name in ("check_examples", "check_max_len"):
        if getattr(cfg, name) <= 1:
            raise ValueError(f"--{name.replace('_', '-')} must be > 1, got {getattr(cfg, name)}")
    out = Path(cfg.output_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ValueError(f"--output-dir {out} exists and is not an empty directory; choose another or remove it")
    source.task_of(Path(cfg.model_dir), cfg.task)
    for name in extra.needed(cfg.format, cfg.quantize):
        extra.require(name, f"--format {cfg.format}" + (f" --quantize {cfg.quantize}" if cfg.quantize != "none"
                                                        else ""))


def main(cfg: ExportConfig) -> dict:
    """Writes the export and its export.json, checked; returns what export.json holds and the export's path."""
    start = time.time()
    check_config(cfg)
    model = source.load(Path(cfg.model_dir), cfg.task)
    if model.max_positions and cfg.check_max_len > model.max_positions:
        raise ValueError(f"--check-max-len {cfg.check_max_len}: the model has {model.max_positions} positions")
    fmt = FORMATS[cfg.format]
    out = Path(cfg.output_dir)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True)
    try:
        fmt.write(model, partial / fmt.FILE, cfg.quantize)
        model.tokenizer.save_pretrained(partial)
        model.model.config.save_pretrained(partial)
        run = fmt.runner(partial / fmt.FILE, model.input_names, cfg.quantize)
        figures = check.compare(model, run, check.batches(model, cfg.check_examples, cfg.check_max_len))
        if cfg.quantize == "none" and (error := check.fp32_error(figures)):
            raise ValueError(error)
        report = {
            "format": cfg.format, "file": fmt.FILE, "task": model.task, "architecture": model.architecture,
            "source": str(model.model_dir), "inputs": list(model.input_names), "input_axes": ["batch", "sequence"],
            "outputs": ["logits"], "opset": onnx_format.OPSET if cfg.format == "onnx" else None,
            "quantize": cfg.quantize, "quantization": fmt.QUANTIZATION if cfg.quantize == "int8" else None,
            "size_bytes": (partial / fmt.FILE).stat().st_size,
            "params": sum(p.numel() for p in model.model.parameters()), "check": figures,
            "versions": extra.versions(), "config": dataclasses.asdict(cfg), "wall_s": time.time() - start}
        atomic_write_text(partial / "export.json", json.dumps(report, indent=2))
        os.replace(partial, out)  # an empty OUT is replaced whole
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {**report, "path": str(out / fmt.FILE)}


def show(report: dict) -> None:
    figures = report["check"]
    print(f"wrote {report['path']}: {report['format']}, {report['quantize']}, {report['size_bytes'] / 1e6:.1f} MB, "
          f"{report['params'] / 1e6:.2f} M parameters")
    print(f"check against PyTorch fp32 on {figures['examples']} held-out wiki-topic texts ({figures['rows']:,} "
          f"{figures['compared']}): max |logit difference| {figures['max_abs_logit_diff']:.3g} (largest logit "
          f"{figures['max_abs_logit']:.3g}), top-1 agreement {100 * figures['top1_agreement']:.2f} %")


def cli(argv=None) -> int:
    extra.quiet_torchao()
    return run_command(lambda: main(parse_args(argv)), show)
