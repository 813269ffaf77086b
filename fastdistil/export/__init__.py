"""Export beside the recipe: python -m fastdistil.export writes a fine-tuned classifier or a masked LM as ONNX
(onnx_format) or a torch.export program (torch_format), fp32 or int8, from the model directory (source), checks it
against the PyTorch fp32 model on held-out inputs (check) and records what it made in export.json (command). The
heavy packages are an optional extra (extra)."""

from fastdistil.export.command import ExportConfig, cli, main, parse_args

__all__ = ["ExportConfig", "cli", "main", "parse_args"]
