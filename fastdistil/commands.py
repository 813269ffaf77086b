"""What the python -m commands (train, cache_teacher, evaluate, export) share: flags made from a config
dataclass, the device a run uses, one-line errors, and files written whole."""

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Callable, Collection
from pathlib import Path

import torch


def flag(default, text: str, **argparse_kwargs):
    """A config field, its --help text, and any argparse keywords of its own (choices, metavar, nargs, const;
    positional=True makes it the command's positional argument)."""
    return dataclasses.field(default=default, metadata={"help": text, "argparse": argparse_kwargs})


def _scalar_type(field: dataclasses.Field) -> type:
    return next((t for t in (bool, int, float) if t in (field.type, *typing.get_args(field.type))), str)


def parser_for(config_class, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of config_class (--max-steps for max_steps; booleans as
    --x/--no-x), each defaulting to None so that what the user typed can be told from the defaults."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_flags(parser, config_class)
    return parser


def add_flags(parser: argparse.ArgumentParser, config_class, names: Collection[str] | None = None) -> None:
    """parser_for's flags for the fields of config_class, or for those of them named in `names`: a command
    that takes another command's flags (cache_teacher, the trainer's data flags) reads them the same way."""
    for field in dataclasses.fields(config_class):
        if names is not None and field.name not in names:
            continue
        extra = dict(field.metadata["argparse"])
        text = field.metadata["help"]
        if field.default is not None and "default" not in text:
            text += f" (default: {field.default})"
        kind = _scalar_type(field)
        if extra.pop("positional", False):
            parser.add_argument(field.name, nargs="?", default=None, help=text, **extra)
        elif kind is bool:
            parser.add_argument("--" + field.name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                                default=None, help=text, **extra)
        else:
            extra.setdefault("type", kind)
            parser.add_argument("--" + field.name.replace("_", "-"), default=None, help=text, **extra)


def config_from(config_class, values: dict):
    """config_class with the fields given in values (None: the field's default)."""
    return config_class(**{k: v for k, v in values.items() if v is not None})


def check_choices(cfg) -> None:
    """A ValueError naming the first field whose value is not among its flag's choices (a config file or a
    Python caller can give any value; argparse checks only the command line)."""
    for field in dataclasses.fields(cfg):
        allowed = field.metadata["argparse"].get("choices")
        if allowed is not None and getattr(cfg, field.name) not in allowed:
            raise ValueError(f"--{field.name.replace('_', '-')} must be one of {', '.join(allowed)}, got "
                             f"{getattr(cfg, field.name)!r}")


def device_of(name: str) -> torch.device:
    """The device a run uses: "auto" is cuda when there is a GPU, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(name)


def atomic_write_text(path: Path, text: str) -> None:
    """path holds either its old content or all of text, never part of it, whenever the process dies."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_command(main: Callable[[], object], show: Callable[[object], None]) -> int:
    """Exit status 0 after showing main()'s result, or 2 after printing a bad setting's error on one line.
    ImportError is a missing optional package (datasets), FileNotFoundError a missing run or model."""
    try:
        result = main()
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    show(result)
    return 0
