"""The optional packages of an export (`pip install "fastdistil[export]"`), imported when an export needs them, and
the versions an export.json records."""

import importlib
import importlib.metadata
import logging

import fastdistil

EXTRA = 'pip install "fastdistil[export]"'
# What export.json names, whether or not this export used it (None: not installed).
VERSIONED = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "torchao")


def needed(fmt: str, quantize: str) -> tuple[str, ...]:
    """The optional packages a format and quantization need: torch.onnx's exporter (dynamo=True) writes through
    onnxscript and onnx; the check runs the ONNX file in ONNX Runtime, which also quantizes it; int8 PyTorch
    programs are quantized by torchao."""
    if fmt == "onnx":
        return ("onnx", "onnxscript", "onnxruntime")
    return ("torchao",) if quantize == "int8" else ()


def require(name: str, why: str):
    """The module `name`, or an ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f"{why} needs the {name} package, which is not installed: {EXTRA}") from exc


def quiet_torchao() -> None:
    """torchao's wheel carries CUDA and other-Python kernels that it tries to load on import, and logs a warning for
    each that fails; transformers imports it whenever it is installed. Harmless here, and confusing: for the
    command's own process."""
    logging.getLogger("torchao").setLevel(logging.ERROR)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    return {"fastdistil": fastdistil.__version__, **{name: _version(name) for name in VERSIONED}}
