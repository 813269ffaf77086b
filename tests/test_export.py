"""python -m fastdistil.export: ONNX files and torch.export programs that compute what the transformers model
computes (to 1e-4 in fp32; the same top class on >= 98 % of held-out texts in int8) at any batch size and length,
read back here by ONNX Runtime and torch.export.load themselves; export.json; and the bad inputs the command refuses
in one line, leaving nothing behind."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer,
                          BertForMaskedLM)

from fastdistil import assets
from fastdistil.evaluate import finetune
from fastdistil.export import check, command
from fastdistil.train.student import make_student

from bench.test_bench_export import fine_tuned_classifier

FP32_ATOL = 1e-4
INT8_AGREEMENT = 0.98
# Two shapes the export never saw (it traced 2 x 16): one short text alone, and five padded to the longest.
SHAPES = ((1, 7), (5, 40))


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    """A DistilBERT classifier whose predictions mean something: the built-in teacher's 2-layer student, fine-tuned
    on 1,024 wiki-topic texts for one epoch by python -m fastdistil.evaluate's code (seconds)."""
    work = tmp_path_factory.mktemp("classifier")
    student = make_student(BertForMaskedLM.from_pretrained(assets.TEACHER, dtype=torch.float32))
    student.save_pretrained(work / "student")
    AutoTokenizer.from_pretrained(assets.TEACHER).save_pretrained(work / "student")
    return fine_tuned_classifier(work / "student", work / "classifier",
                                 finetune.EvalConfig(epochs=1, max_train_examples=1024))


def export(model_dir: Path, out: Path, *flags: str) -> dict:
    assert command.cli([str(model_dir), "--output-dir", str(out), *flags]) == 0
    return json.loads((out / "export.json").read_text())


@pytest.fixture(scope="module")
def exports(classifier_dir, tmp_path_factory):
    """export(name): the export of the classifier (or, for "mlm", of the built-in teacher, a BERT masked LM) in the
    format and quantization its name gives, made once."""
    made = {}
    out = tmp_path_factory.mktemp("exports")
    # fp32's own check on few texts (the tests compare anew); int8's on the command's default 256.
    flags = {"onnx": ("--format", "onnx", "--check-examples", "32"),
             "onnx-int8": ("--format", "onnx", "--quantize", "int8"),
             "torch": ("--format", "torch", "--check-examples", "32"),
             "torch-int8": ("--format", "torch", "--quantize", "int8"),
             "mlm": ("--format", "onnx", "--check-examples", "16")}

    def get(name: str) -> Path:
        if name not in made:
            export(assets.TEACHER if name == "mlm" else classifier_dir, out / name, *flags[name])
            made[name] = out / name
        return made[name]

    return get


def texts_at(tokenizer, batch: int, length: int, offset: int = 0) -> dict[str, np.ndarray]:
    """`batch` held-out texts, the first cut to `length` tokens and the others shorter: padded inputs."""
    texts = check.heldout_texts(offset + batch)[offset:]
    rows = [tokenizer(text, truncation=True, max_length=length if i == 0 else length - 3 * i)["input_ids"]
            for i, text in enumerate(texts)]
    assert len(rows[0]) == length
    return {k: np.asarray(v) for k, v in tokenizer.pad({"input_ids": rows}, return_tensors="np").items()}


def transformers_model(model_dir: Path, mlm: bool):
    """The logits of the model as transformers runs it, a function of the inputs."""
    auto = AutoModelForMaskedLM if mlm else AutoModelForSequenceClassification
    model = auto.from_pretrained(model_dir, dtype=torch.float32).eval()

    def logits(inputs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()

    return logits


def exported_model(out: Path):
    """The logits of the export as ONNX Runtime or torch.export.load runs it, a function of the inputs."""
    meta = json.loads((out / "export.json").read_text())
    if meta["format"] == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        return lambda inputs: session.run(["logits"], {n: inputs[n] for n in meta["inputs"]})[0]
    import torchao  # noqa: F401  (registers the ops an int8 program calls)

    module = torch.export.load(out / "model.pt2").module()

    def logits(inputs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return module(*(torch.from_numpy(inputs[n]) for n in meta["inputs"])).numpy()

    return logits


@pytest.mark.parametrize("name", ["onnx", "mlm", "torch"])
def test_fp32_export_matches_transformers_at_any_batch_and_length(exports, classifier_dir, name):
    out = exports(name)
    model_dir = assets.TEACHER if name == "mlm" else classifier_dir
    meta = json.loads((out / "export.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out)
    reference, exported = transformers_model(model_dir, mlm=name == "mlm"), exported_model(out)
    for batch, length in SHAPES:
        inputs = texts_at(tokenizer, batch, length)
        inputs = {n: inputs.get(n, np.zeros_like(inputs["input_ids"])) for n in meta["inputs"]}
        expected, got = reference(inputs), exported(inputs)
        assert got.shape == expected.shape
        real = inputs["attention_mask"].astype(bool) if name == "mlm" else slice(None)  # padding's logits: noise
        np.testing.assert_allclose(got[real], expected[real], rtol=0, atol=FP32_ATOL)


def test_onnx_graph_has_optimum_layout(exports):
    import onnx

    for name, inputs, logits in (("onnx", ["input_ids", "attention_mask"], ["batch", 12]),
                                 ("mlm", ["input_ids", "attention_mask", "token_type_ids"],
                                  ["batch", "sequence", 30522])):
        graph = onnx.load(exports(name) / "model.onnx")
        assert [(i.name, [d.dim_param for d in i.type.tensor_type.shape.dim]) for i in graph.graph.input] == [
            (n, ["batch", "sequence"]) for n in inputs]
        assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in graph.graph.input)
        [output] = graph.graph.output
        assert output.name == "logits"
        assert [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim] == logits
        assert {o.domain: o.version for o in graph.opset_import}[""] == 18


def test_export_json_and_files(exports, classifier_dir):
    out = exports("onnx")
    meta = json.loads((out / "export.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir)
    assert {p.name for p in out.iterdir()} == {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json",
                                                "export.json"}
    assert not [p for p in out.parent.iterdir() if ".partial" in p.name]
    assert meta["format"] == "onnx" and meta["file"] == "model.onnx" and meta["opset"] == 18
    assert meta["task"] == "text-classification" and meta["architecture"] == "DistilBertForSequenceClassification"
    assert meta["inputs"] == ["input_ids", "attention_mask"] and meta["outputs"] == ["logits"]
    assert meta["quantize"] == "none" and meta["quantization"] is None
    assert meta["size_bytes"] == (out / "model.onnx").stat().st_size
    assert meta["params"] == sum(p.numel() for p in model.parameters())
    figures = meta["check"]
    assert figures["examples"] == figures["rows"] == 32 and figures["compared"] == "examples"
    assert figures["max_abs_logit_diff"] <= FP32_ATOL and figures["top1_agreement"] == 1.0
    assert figures["max_len"] <= 128 and figures["max_abs_logit"] > 0.5  # fine-tuned: logits of some size
    for package in ("torch", "transformers", "onnx", "onnxruntime", "fastdistil"):
        assert meta["versions"][package]
    # What is beside the model loads as what it was.
    assert AutoTokenizer.from_pretrained(out)("a test")["input_ids"] == AutoTokenizer.from_pretrained(
        classifier_dir)("a test")["input_ids"]
    assert AutoConfig.from_pretrained(out).id2label == model.config.id2label


@pytest.mark.parametrize("name", ["onnx-int8", "torch-int8"])
def test_int8_keeps_the_top_class(exports, classifier_dir, name):
    out = exports(name)
    meta = json.loads((out / "export.json").read_text())
    fp32_size = (classifier_dir / "model.safetensors").stat().st_size
    assert meta["quantize"] == "int8" and meta["size_bytes"] < fp32_size
    tokenizer = AutoTokenizer.from_pretrained(out)
    reference, exported = transformers_model(classifier_dir, mlm=False), exported_model(out)
    agree = total = 0
    heldout = check.heldout_texts(256)  # the texts of the command's own check, its figure counted here anew
    for offset in range(0, len(heldout), 32):
        texts = heldout[offset:offset + 32]
        inputs = {k: v for k, v in tokenizer(texts, truncation=True, max_length=128, padding=True,
                                             return_tensors="np").items() if k in meta["inputs"]}
        got, expected = exported(inputs), reference(inputs)
        agree, total = agree + int((got.argmax(-1) == expected.argmax(-1)).sum()), total + len(texts)
    assert agree / total >= INT8_AGREEMENT
    assert meta["check"]["top1_agreement"] >= INT8_AGREEMENT


def error_lines(capsys) -> list[str]:
    """The command's error lines (transformers' loading bar may share stderr)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]


def bad_dir(kind: str, tmp_path: Path) -> Path:
    if kind == "empty":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty"
    return {"missing": tmp_path / "nowhere", "gpt2": assets.TINY_GPT2, "mlm": assets.TEACHER}[kind]


@pytest.mark.parametrize("kind, flags, message", [
    ("missing", (), "MODEL_DIR {dir}: no such directory"),
    ("empty", (), "MODEL_DIR {dir} has no config.json"),
    ("gpt2", (), "its architecture (GPT2LMHeadModel) is neither a sequence classifier"),
    ("mlm", ("--task", "text-classification"), "--task text-classification: MODEL_DIR {dir} holds a fill-mask "
                                              "model (BertForMaskedLM)"),
    ("mlm", ("--check-max-len", "200"), "--check-max-len 200: the model has 128 positions"),
    ("mlm", ("--check-examples", "1"), "--check-examples must be > 1, got 1"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, kind, flags, message):
    model_dir = bad_dir(kind, tmp_path)
    out = tmp_path / "out" / "export"
    assert command.cli([str(model_dir), "--output-dir", str(out), *flags]) == 2
    [error] = error_lines(capsys)
    assert message.format(dir=model_dir) in error
    assert not (tmp_path / "out").exists()


def test_nonempty_output_dir_is_refused(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert command.cli([str(assets.TEACHER), "--output-dir", str(tmp_path / "out")]) == 2
    [error] = error_lines(capsys)
    assert f"--output-dir {tmp_path / 'out'} exists and is not an empty directory" in error
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_unknown_format_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage, then the error naming the choices
        command.cli([str(assets.TEACHER), "--output-dir", str(tmp_path / "out"), "--format", "tflite"])
    assert exit_info.value.code == 2
    assert "argument --format: invalid choice: 'tflite'" in capsys.readouterr().err
    # From Python, where argparse checks nothing: the same refusal, one line.
    cfg = command.ExportConfig(model_dir=str(assets.TEACHER), output_dir=str(tmp_path / "out"), format="tflite")
    with pytest.raises(ValueError, match="--format must be one of onnx, torch, got 'tflite'"):
        command.main(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, package", [((), "onnxruntime"), ((), "onnxscript"),
                                            (("--format", "torch", "--quantize", "int8"), "torchao")])
def test_missing_extra_names_it(tmp_path, capsys, monkeypatch, flags, package):
    monkeypatch.setitem(sys.modules, package, None)  # what an environment without the package imports: nothing
    assert command.cli([str(assets.TEACHER), "--output-dir", str(tmp_path / "out"), *flags]) == 2
    [error] = error_lines(capsys)
    assert f"needs the {package} package, which is not installed: pip install \"fastdistil[export]\"" in error
    assert not (tmp_path / "out").exists()
