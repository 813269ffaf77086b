"""--format onnx: model.onnx through torch.onnx's exporter (dynamo=True, the current one; the TorchScript exporter
is deprecated), int8 through ONNX Runtime's dynamic quantization, and a runner that feeds it with ONNX Runtime."""

import contextlib
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from fastdistil.export import extra
from fastdistil.export.source import Source

FILE = "model.onnx"
# The opset torch.onnx's exporter translates to natively (its torchlib is written against it; any other goes
# through ONNX's version converter afterwards). ONNX Runtime runs it from 1.14 on.
OPSET = 18
OUTPUT = "logits"
QUANTIZATION = "int8 dynamic: onnxruntime.quantization.quantize_dynamic, QInt8 weights, activations quantized per batch"
# ONNX keeps a model in one protobuf of at most 2 GB; larger ones need external data files, not written here.
MAX_BYTES = 2 ** 31


@contextlib.contextmanager
def _quiet_exporter():
    """Silences what the exporter says that asks nothing of the user: that it has no torchvision ops to register,
    that it does not keep the names of dimensions sharing a constraint (all inputs share batch and sequence; the
    graph's inputs still get them) and that its own code calls a deprecated pytree API."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def write(source: Source, path: Path, quantize: str) -> None:
    n_bytes = sum(p.numel() * p.element_size() for p in source.model.parameters())
    if n_bytes >= MAX_BYTES:
        raise ValueError(f"MODEL_DIR {source.model_dir}: {n_bytes / 1e9:.1f} GB of weights, more than one ONNX "
                         "file holds (2 GB); --format torch has no such limit")
    with _quiet_exporter():
        program = torch.onnx.export(source.logits_module(), source.example_inputs(), dynamo=True,
                                    opset_version=OPSET, input_names=list(source.input_names),
                                    output_names=[OUTPUT], dynamic_shapes=source.dynamic_shapes(),
                                    external_data=False, verbose=False)
    if quantize == "int8":
        quantization = extra.require("onnxruntime.quantization", "--quantize int8")
        quantization.quantize_dynamic(program.model_proto, path, weight_type=quantization.QuantType.QInt8)
    else:
        program.save(path)


def runner(path: Path, input_names: tuple[str, ...], quantize: str):
    """A function of {input name: int64 array [batch, sequence]} giving the logits, from ONNX Runtime's CPU
    provider on as many threads as PyTorch uses, so that the two compare like for like."""
    del quantize  # the graph says how it is quantized
    ort = extra.require("onnxruntime", "running an ONNX export")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda inputs: session.run([OUTPUT], {n: np.asarray(inputs[n], dtype=np.int64) for n in input_names})[0]
