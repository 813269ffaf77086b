"""--format torch: model.pt2, a torch.export program (torch.export.save) that torch.export.load runs without
transformers; int8 through torchao's quantize_ (torch.ao.quantization.quantize_dynamic, which torch 2.13 deprecates,
names it as its replacement); and a runner that feeds it.

    program = torch.export.load("OUT/model.pt2")   # an int8 program: `import torchao` first (its ops)
    logits = program.module()(input_ids, attention_mask)   # export.json's "inputs", in that order
"""

import copy
from pathlib import Path

import torch

from fastdistil.export import extra
from fastdistil.export.source import Source, module_runner

FILE = "model.pt2"
QUANTIZATION = ("int8 dynamic: torchao.quantization.quantize_ with Int8DynamicActivationInt8WeightConfig, int8 "
                "weights per channel, activations quantized per token")


def write(source: Source, path: Path, quantize: str) -> None:
    module = source.logits_module()
    if quantize == "int8":
        quantization = extra.require("torchao.quantization", "--format torch --quantize int8")
        unwrap = extra.require("torchao.utils", "--format torch --quantize int8").unwrap_tensor_subclass
        module = copy.deepcopy(module)  # the source stays the fp32 reference of the check
        quantization.quantize_(module, quantization.Int8DynamicActivationInt8WeightConfig())
        # The quantized weights as plain int8 and fp32 tensors: torch.export.save then stores raw tensors, which
        # torch.export.load reads without unpickling (a tensor subclass would be pickled).
        unwrap(module)
    program = torch.export.export(module, source.example_inputs(), dynamic_shapes=source.dynamic_shapes())
    torch.export.save(program, path)


def runner(path: Path, input_names: tuple[str, ...], quantize: str):
    """A function of {input name: int64 array [batch, sequence]} giving the logits."""
    if quantize == "int8":
        extra.require("torchao", "running an int8 PyTorch export")  # registers the ops its graph calls
    return module_runner(torch.export.load(path).module(), input_names)
