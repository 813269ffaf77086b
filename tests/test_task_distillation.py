"""python -m fastdistil.evaluate --distill, the paper's DistilBERT (D) step, and extractive QA (SQuAD): the loss
against the original run_squad_w_distillation.py's, the held-out KL it lowers, SQuAD's windows and span decoding
on hand-made cases, SQuAD end to end on a tiny offline stand-in, and the one-line errors."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (AutoTokenizer, BertConfig, BertForQuestionAnswering, BertForSequenceClassification,
                          DistilBertConfig, DistilBertForQuestionAnswering, DistilBertForSequenceClassification,
                          OpenAIGPTConfig, OpenAIGPTModel)

from fastdistil import train
from fastdistil.evaluate import distill, qa, tasks
from fastdistil.evaluate import finetune as evaluate
from fastdistil.train import data
from test_evaluate import assert_one_line_errors
from training_runs import args

# A held-out KL worth measuring needs a teacher that learns the task: the built-in (pretrained) teacher does on
# 512 examples in two epochs (~0.5 accuracy); a random tiny BERT stays at the majority class.
WIKI = ["--max-train-examples", "512", "--max-eval-examples", "128", "--epochs", "2", "--batch-size", "16",
        "--max-seq-len", "32"]
QA_FLAGS = ["--epochs", "1", "--batch-size", "16", "--max-seq-len", "48"]


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory):
    """A finished fastdistil.train run of the built-in teacher, one step: config.json and student/."""
    out = tmp_path_factory.mktemp("distill") / "run"
    train.main(train.parse_args(args("tiny-bert", corpus, out, "--max-steps", "1")))
    return out


def evaluate_(*argv):
    return evaluate.main(evaluate.parse_args([str(a) for a in argv]))


# --- the loss -----------------------------------------------------------------------------------------------

def tiny_pair(kind: str):
    """A BERT teacher and a DistilBERT student of one hidden size, eval mode (no dropout: two forwards agree)."""
    torch.manual_seed(0)
    common = dict(vocab_size=97, max_position_embeddings=32, num_labels=5 if kind == tasks.CLASSIFICATION else 2)
    teacher_config = BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                **common)
    student_config = DistilBertConfig(dim=16, n_layers=1, n_heads=2, hidden_dim=32, **common)
    if kind == tasks.CLASSIFICATION:
        return BertForSequenceClassification(teacher_config).eval(), \
            DistilBertForSequenceClassification(student_config).eval()
    return BertForQuestionAnswering(teacher_config).eval(), DistilBertForQuestionAnswering(student_config).eval()


def tiny_batch(kind: str, batch=5, length=11):
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 97, (batch, length), generator=g)
    lengths = torch.tensor([11, 7, 9, 11, 4])
    attention_mask = (torch.arange(length) < lengths[:, None]).long()
    input_ids = input_ids * attention_mask
    if kind == tasks.CLASSIFICATION:
        targets = {"labels": torch.tensor([0, 3, 4, 1, 3])}
    else:  # start and end positions inside each sequence; 0 is [CLS], "no answer"
        targets = {"start_positions": torch.tensor([2, 0, 5, 9, 1]), "end_positions": torch.tensor([4, 0, 5, 10, 3])}
    return {"input_ids": input_ids, "attention_mask": attention_mask}, targets


@pytest.mark.parametrize("kind, alpha_cos", [(tasks.CLASSIFICATION, 0.0), (tasks.CLASSIFICATION, 0.4),
                                             (tasks.EXTRACTIVE_QA, 0.0), (tasks.EXTRACTIVE_QA, 0.4)])
def test_the_distillation_loss_is_the_originals(kind, alpha_cos):
    teacher, student = tiny_pair(kind)
    inputs, targets = tiny_batch(kind)
    temperature, alpha_ce, alpha_task = 3.0, 0.7, 0.2
    with torch.no_grad():
        t = teacher(**inputs, output_hidden_states=True)

    # run_squad_w_distillation.py, line for line (its classification analogue: one KL term instead of two), with
    # the cosine term as the pre-training distiller writes it.
    s = student(**inputs, **targets, output_hidden_states=True)
    loss_fct = nn.KLDivLoss(reduction="batchmean")
    heads = ["start_logits", "end_logits"] if kind == tasks.EXTRACTIVE_QA else ["logits"]
    kl = [loss_fct(F.log_softmax(s[h] / temperature, dim=-1), F.softmax(t[h] / temperature, dim=-1))
          * temperature**2 for h in heads]
    loss_ce = sum(kl) / len(kl)  # QA: (loss_start + loss_end) / 2.0
    s_cls, t_cls = s.hidden_states[-1][:, 0], t.hidden_states[-1][:, 0]
    loss_cos = nn.CosineEmbeddingLoss()(s_cls, t_cls, torch.ones(len(s_cls)))
    reference = alpha_ce * loss_ce + alpha_task * s.loss + alpha_cos * loss_cos
    reference.backward()
    reference_grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()

    fused_output = student(**inputs, output_hidden_states=True)
    fused = distill.loss(fused_output, t, targets, tasks.OUTPUTS[kind], temperature, alpha_ce, alpha_task, alpha_cos)
    fused.loss.backward()
    torch.testing.assert_close(fused.loss, reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.loss_ce, loss_ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.loss_mlm, s.loss.detach(), rtol=1e-5, atol=1e-6)  # the op's CE: the task's
    if alpha_cos > 0:
        torch.testing.assert_close(fused.loss_cos, loss_cos.detach(), rtol=1e-5, atol=1e-6)
    assert set(reference_grads) == {n for n, p in student.named_parameters() if p.grad is not None}
    # Relative to the largest gradient entry: some (the key biases) are zero up to rounding.
    scale = max(grad.abs().max() for grad in reference_grads.values())
    for name, grad in reference_grads.items():
        assert (student.get_parameter(name).grad - grad).abs().max() < 1e-5 * scale, name


# --- distillation lowers the held-out KL ----------------------------------------------------------------------

def heldout_kl(student, teacher, encoded, temperature) -> float:
    """T^2 * KL(teacher || student) per example on the held-out split, each example run alone (no padding)."""
    kls = []
    with torch.no_grad():
        for i, ids in enumerate(encoded.input_ids):
            batch = encoded.batch([i], 0, "cpu")
            s = student(**evaluate._inputs_of(student, batch)).logits
            t = teacher(**evaluate._inputs_of(teacher, batch)).logits
            kls.append(nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / temperature, -1),
                                                           F.softmax(t / temperature, -1)) * temperature**2)
    return float(torch.stack(kls).mean())


def test_distillation_lowers_the_students_kl_to_the_fine_tuned_teacher(run_dir, tmp_path, monkeypatch, capsys):
    trained = {}
    real_fine_tune = evaluate.fine_tune

    def recording(model, train_set, task, cfg, pad_id, device, name, teacher=None):
        real_fine_tune(model, train_set, task, cfg, pad_id, device, name, teacher)
        trained[name] = model, teacher

    monkeypatch.setattr(evaluate, "fine_tune", recording)
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert evaluate.cli([str(run), "--distill", *WIKI]) == 0
    report = json.loads((run / "eval_wiki-topic.json").read_text())
    teacher = trained["teacher"][0]
    assert trained["student_distilled"][1] is teacher  # taught by the teacher fine-tuned on the task
    assert all(trained[name][1] is None for name in ("teacher", "student", "random_student"))

    cfg = evaluate.parse_args([str(run), *WIKI])
    task = tasks.get_task("wiki-topic")
    _, eval_sets, _, _ = evaluate.task_data(task, cfg)
    tokenizer = AutoTokenizer.from_pretrained(run / "student")
    encoded = evaluate.encode(eval_sets["test"], task, tokenizer, cfg, training=False)
    kl = {name: heldout_kl(trained[name][0], teacher, encoded, 2.0) for name in ("student", "student_distilled")}
    # Seed 0, the same head and batches: distillation brings the held-out logits clearly closer to the teacher's.
    assert kl["student_distilled"] < 0.9 * kl["student"], kl
    for name, value in kl.items():
        assert report["models"][name]["kl_to_teacher"] == pytest.approx(value, rel=1e-4)

    assert report["student_distilled"] == report["models"]["student_distilled"]["score"]
    assert report["retention_distilled"] == pytest.approx(report["student_distilled"] / report["teacher"])
    assert report["hyperparameters"]["distill"] is True
    assert {k: report["hyperparameters"][k] for k in ("alpha_ce", "alpha_task", "alpha_cos", "temperature")} == \
        {"alpha_ce": 0.5, "alpha_task": 0.5, "alpha_cos": 0.0, "temperature": 2.0}  # run_squad_w_distillation's
    table = capsys.readouterr().out
    assert f"retention (student_distilled / teacher): {100 * report['retention_distilled']:.1f} %" in table
    assert f"{report['models']['student_distilled']['kl_to_teacher']:.4f}" in table


# --- SQuAD's windows and decoding ---------------------------------------------------------------------------

CONTEXT = ("Paris is the capital and most populous city of France, with an estimated population of two million "
           "residents.")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(data.BUNDLED_TOKENIZER)


def test_windows_step_by_doc_stride_and_label_the_gold_span(tokenizer):
    questions = ["What is the capital of France and what else is there to know?", "Population?", "Who?"]
    answers = [{"text": ["Paris"], "answer_start": [0]},
               {"text": ["two million"], "answer_start": [CONTEXT.index("two million")]},
               {"text": [], "answer_start": []}]  # SQuAD v2: no answer
    found = qa.windows(questions, [CONTEXT] * 3, tokenizer, max_seq_len=20, doc_stride=4, max_query_length=6,
                       answers=answers)
    context_tokens = tokenizer(CONTEXT, add_special_tokens=False, return_offsets_mapping=True)
    for example, question in enumerate(questions):
        ws = [w for w, e in enumerate(found.example_of) if e == example]
        query = tokenizer(question, add_special_tokens=False)["input_ids"][:6]  # cut to max_query_length
        room = 20 - 3 - len(query)  # [CLS] question [SEP] context [SEP]
        for k, w in enumerate(ws):
            ids = found.input_ids[w]
            assert ids[:len(query) + 2] == [tokenizer.cls_token_id, *query, tokenizer.sep_token_id]
            inside = [p for p, span in enumerate(found.offsets[w]) if span is not None]
            # Window k holds context tokens 4k, 4k + 1, ...: the original's doc_stride, a step between starts.
            expected = context_tokens["input_ids"][4 * k:4 * k + room]
            assert [ids[p] for p in inside] == expected
            assert [found.offsets[w][p] for p in inside] == context_tokens["offset_mapping"][4 * k:4 * k + room]
            start, end = found.start_positions[w], found.end_positions[w]
            span_text = CONTEXT[found.offsets[w][start][0]:found.offsets[w][end][1]] if start else ""
            wanted = answers[example]["text"][0] if answers[example]["text"] else ""
            answer_inside = wanted and CONTEXT.index(wanted) >= found.offsets[w][inside[0]][0] and \
                CONTEXT.index(wanted) + len(wanted) <= found.offsets[w][inside[-1]][1]
            assert (span_text == wanted) if answer_inside else (start, end) == (0, 0)
        # The windows stop at the first one that reaches the context's end.
        assert 4 * (len(ws) - 1) < len(context_tokens["input_ids"]) <= 4 * (len(ws) - 1) + room
        assert 4 * (len(ws) - 2) + room < len(context_tokens["input_ids"])
        # Each context token is scored in one window: the original's max-context rule, recomputed here in the
        # context's token positions (window k starts at 4k).
        n = len(context_tokens["input_ids"])
        for j in range(n):
            scores = [(min(j - 4 * k, min(4 * k + room, n) - 1 - j) + 0.01 * (min(4 * k + room, n) - 4 * k), k)
                      for k in range(len(ws)) if 4 * k <= j < 4 * k + room]
            best = max(scores, key=lambda score: (score[0], -score[1]))[1]
            holders = [k for k, w in enumerate(ws) for p, span in enumerate(found.offsets[w])
                       if span == tuple(context_tokens["offset_mapping"][j]) and found.max_context[w][p]]
            assert holders == [best], (example, j)
    assert sum(e == 0 for e in found.example_of) > 1  # the context really was split


def one_window(context: str, question_tokens: int = 2) -> qa.Windows:
    """[CLS] q1 .. qn [SEP] w1 .. wm [SEP] over the words of context, as decoding sees it."""
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", context)]
    offsets = [None] * (question_tokens + 2) + words + [None]
    return qa.Windows(input_ids=[[0] * len(offsets)], token_type_ids=None, example_of=[0], offsets=[offsets],
                      max_context=[np.array([span is not None for span in offsets])], start_positions=None,
                      end_positions=None)


def logits_at(length: int, **values) -> np.ndarray:
    row = np.full(length, -10.0, dtype=np.float32)
    for position, value in values.items():
        row[int(position[1:])] = value
    return row


def decode(start, end, found, context, n_best_size=20, max_answer_length=30, no_answer=False):
    rows = [np.stack([s, e]) for s, e in zip(start, end)]
    return qa.decode(rows, found, [context], n_best_size, max_answer_length, no_answer)[0]


def test_the_answer_is_the_best_valid_span():
    context = "alpha beta gamma delta epsilon"  # tokens at positions 4 to 8
    found = one_window(context)
    n = 10
    # The best start lies in the question (position 1): not a span of the context; the next best is "beta".
    start, end = logits_at(n, p1=9, p5=5, p4=1), logits_at(n, p6=4, p3=8)
    assert decode([start], [end], found, context) == "beta gamma"
    # An end before its start does not count: delta .. beta (11) loses to alpha .. beta (7).
    assert decode([logits_at(n, p7=5, p4=1)], [logits_at(n, p5=6, p4=0)], found, context) == "alpha beta"
    # max_answer_length: "alpha .. delta" (4 tokens) scores best but is too long; "beta .. delta" is 3.
    start, end = logits_at(n, p4=6, p5=5), logits_at(n, p7=6)
    assert decode([start], [end], found, context) == "alpha beta gamma delta"
    assert decode([start], [end], found, context, max_answer_length=3) == "beta gamma delta"
    # n_best_size: only the top n starts and ends pair up; with n = 1 the top pair here is invalid (end < start).
    start, end = logits_at(n, p6=6, p4=2), logits_at(n, p5=6, p8=5)
    assert decode([start], [end], found, context, n_best_size=2) == "gamma delta epsilon"
    assert decode([start], [end], found, context, n_best_size=1) == ""
    # A start outside the window's maximal context is left to the window that holds it best.
    found.max_context[0][6] = False
    assert decode([start], [end], found, context) == "alpha beta"
    # The text is the context's own characters: punctuation and case as written.
    assert decode([logits_at(7, p4=1)], [logits_at(7, p4=1)], one_window("Paris, France."), "Paris, France.") == \
        "Paris,"


def test_no_answer_when_the_cls_score_beats_the_best_span():
    context = "alpha beta gamma delta epsilon"
    found = one_window(context)
    start, end = logits_at(10, p0=3, p5=2), logits_at(10, p0=3, p6=2)  # null 6 against "beta gamma" 4
    assert decode([start], [end], found, context, no_answer=True) == ""
    assert decode([start], [end], found, context, no_answer=False) == "beta gamma"  # v1 never answers nothing
    start[0] = 1.0  # null 4 against 4: not more than the threshold 0, so the span
    assert decode([start], [end], found, context, no_answer=True) == "beta gamma"


def test_an_example_takes_its_best_span_over_its_windows_and_its_lowest_null(tokenizer):
    found = qa.windows(["Population?"], [CONTEXT], tokenizer, max_seq_len=20, doc_stride=4, max_query_length=6)
    lengths = [len(ids) for ids in found.input_ids]
    assert len(lengths) >= 3
    positions = [[p for p, (span, best) in enumerate(zip(spans, flags)) if span is not None and best]
                 for spans, flags in zip(found.offsets, found.max_context)]
    # Window 1's span scores 7, window 2's 5; window 0's null (start[0] + end[0]) is the lowest, 6.5.
    scores = {0: (positions[0][0], 1.0), 1: (positions[1][1], 3.5), 2: (positions[2][0], 2.5)}
    rows = []
    for w, length in enumerate(lengths):
        row = np.full((2, length), -10.0, dtype=np.float32)
        row[:, 0] = 3.25 if w == 0 else 8.0
        if w in scores:
            row[:, scores[w][0]] = scores[w][1]
        rows.append(row)
    w1_span = found.offsets[1][scores[1][0]]
    assert qa.decode(rows, found, [CONTEXT], 20, 30, no_answer=False) == [CONTEXT[w1_span[0]:w1_span[1]]]
    # 6.5 - 7 is not > 0: the span
    assert qa.decode(rows, found, [CONTEXT], 20, 30, no_answer=True) == [CONTEXT[w1_span[0]:w1_span[1]]]
    rows[0][:, 0] = 3.75  # null 7.5 - 7 > 0
    assert qa.decode(rows, found, [CONTEXT], 20, 30, no_answer=True) == [""]


# --- SQuAD end to end, offline ------------------------------------------------------------------------------

def squad_json(path, documents, no_answer=False):
    """A SQuAD-format file over the bundled corpus' documents: each question asks for the word after a word,
    the answer that word at its place; with no_answer, also questions about a word the context lacks."""
    articles = []
    for d, text in enumerate(documents):
        context = text[:300]
        words = [(m.start(), m.group()) for m in re.finditer(r"[A-Za-z]{4,}", context)]
        qas = [{"id": f"{d}-{k}", "question": f"Which word comes after {words[k - 1][1]}?",
                "answers": [{"text": words[k][1], "answer_start": words[k][0]}]} for k in range(2, len(words), 6)]
        if no_answer:
            qas += [{"id": f"{d}-none", "question": "Which word comes after zebra?", "answers": [],
                     "is_impossible": True}]
        articles.append({"title": f"doc {d}", "paragraphs": [{"context": context, "qas": qas}]})
    path.write_text(json.dumps({"version": "v2.0" if no_answer else "1.1", "data": articles}))
    return path


def test_squad_distills_offline_from_its_json_files(run_dir, tmp_path):
    texts = data.load_corpus()["text"]
    train_file, eval_file = squad_json(tmp_path / "train.json", texts[:12]), squad_json(tmp_path / "dev.json",
                                                                                         texts[50:54])
    report = evaluate_(run_dir, "--task", "squad", "--train-file", train_file, "--eval-file", eval_file, "--distill",
                       *QA_FLAGS, "--output", tmp_path / "squad.json")
    questions = len(qa.read_squad(str(eval_file), "--eval-file"))
    assert report["eval_examples"] == {"validation": questions}
    assert report["train_examples"] == len(qa.read_squad(str(train_file), "--train-file"))
    assert set(report["models"]) == {"teacher", "student", "random_student", "student_distilled"}
    for name, result in report["models"].items():
        assert set(result["metrics"]) == {"exact_match", "squad_f1"}
        assert 0 <= result["metrics"]["exact_match"] <= result["metrics"]["squad_f1"] <= 1
        assert result["score"] == pytest.approx(np.mean(list(result["metrics"].values())))
        assert (name == "teacher") == ("kl_to_teacher" not in result)
    assert report["models"]["student_distilled"]["kl_to_teacher"] < report["models"]["random_student"]["kl_to_teacher"]
    hyper = report["hyperparameters"]  # run_squad.py's defaults, scaled from its 384 tokens to 48
    assert (hyper["doc_stride"], hyper["max_query_length"], hyper["max_answer_length"], hyper["n_best_size"]) == \
        (16, 12, 30, 20)


def test_squad_v2_reads_the_same_from_datasets_and_from_json(run_dir, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    texts = data.load_corpus()["text"]
    files = {"train": squad_json(tmp_path / "train.json", texts[:8], no_answer=True),
             "validation": squad_json(tmp_path / "dev.json", texts[50:53], no_answer=True)}
    calls = []

    tables = {split: qa.read_squad(str(path), "test") for split, path in files.items()}

    def load_dataset(*a, **kw):  # the hub's SQuAD v2: the same questions as flat rows
        calls.append(a)
        return datasets.DatasetDict({split: datasets.Dataset.from_list([table[i] for i in range(len(table))])
                                     for split, table in tables.items()})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    hub = evaluate_("--model", run_dir / "student", "--task", "squad_v2", *QA_FLAGS, "--output", tmp_path / "a.json")
    local = evaluate_("--model", run_dir / "student", "--task", "squad_v2", "--train-file", files["train"],
                      "--eval-file", files["validation"], *QA_FLAGS, "--output", tmp_path / "b.json")
    assert calls == [("rajpurkar/squad_v2", None)]
    assert hub["models"]["model"]["metrics"] == local["models"]["model"]["metrics"]
    assert hub["eval_examples"] == local["eval_examples"] == {"validation": len(tables["validation"])}
    assert sum(not answers["text"] for answers in tables["validation"]["answers"]) == 3  # v2's unanswerable ones


# --- bad input ----------------------------------------------------------------------------------------------

def test_bad_input_is_a_one_line_error(run_dir, tmp_path, capsys):
    gpt = tmp_path / "openai-gpt"  # an architecture with a classification head and no QA head
    OpenAIGPTModel(OpenAIGPTConfig(vocab_size=30522, n_positions=64, n_embd=16, n_layer=1, n_head=2)
                   ).save_pretrained(gpt)
    AutoTokenizer.from_pretrained(data.BUNDLED_TOKENIZER).save_pretrained(gpt)
    not_squad = tmp_path / "not_squad.json"
    not_squad.write_text(json.dumps([{"question": "q", "context": "c"}]))
    good = squad_json(tmp_path / "good.json", data.load_corpus()["text"][:2])
    run, model = str(run_dir), str(run_dir / "student")
    capsys.readouterr()  # save_pretrained's progress bar
    cases = {
        (run, "--model", model, "--distill"): r"give either RUN_DIR",
        ("--model", model, "--distill"): r"--distill needs RUN_DIR: the run's teacher, fine-tuned on the task, "
                                         r"teaches the student \(--model DIR has no teacher\)",
        (run, "--distill", "--task", "glue/nope"): r"unknown task 'glue/nope'; the tasks are: wiki-topic, .*squad_v2",
        (run, "--distill", "--task", "glue/stsb"): r"--distill: --task glue/stsb is a regression",
        (run, "--distill", "--task", "perplexity"): r"--distill fine-tunes on a downstream task",
        (run, "--distill", "--alpha-ce", "-1"): r"--alpha-ce must be >= 0 and finite, got -1.0",
        (run, "--distill", "--alpha-ce", "0", "--alpha-task", "0"): r"all 0: nothing to train on",
        (run, "--distill", "--temperature", "0"): r"--temperature must be > 0 and finite, got 0.0",
        ("--model", str(gpt), "--task", "squad"): r"--model .*openai-gpt: transformers has no question-answering "
                                                   r"head for the model type 'openai-gpt', which --task squad needs",
        (run, "--doc-stride", "8"): r"--doc-stride is for the question-answering tasks \(squad, squad_v2\), not "
                                    r"--task wiki-topic",
        (run, "--task", "squad", "--doc-stride", "0"): r"--doc-stride must be > 0, got 0",
        (run, "--task", "squad", "--train-file", str(good)): r"give both --train-file and --eval-file",
        (run, "--task", "squad", "--train-file", str(tmp_path / "no.json"), "--eval-file", str(good)):
            r"--train-file .*no.json: no such file",
        (run, "--task", "squad", "--train-file", str(not_squad), "--eval-file", str(good)):
            r"--train-file .*not_squad.json: not SQuAD's JSON format",
        (run, "--task", "squad", "--train-file", str(good), "--eval-file", str(good), "--max-seq-len", "32",
         "--doc-stride", "30"): r"--doc-stride must be in \[1, 21\] \(the context tokens beside a --max-query-length "
                                r"8 question in --max-seq-len 32\), got 30",
        (run, "--task", "squad", "--train-file", str(good), "--eval-file", str(good), "--max-seq-len", "32",
         "--max-query-length", "29"): r"--max-query-length 29 leaves no room for the context in --max-seq-len 32",
    }
    assert_one_line_errors(cases, capsys)
    assert not list(run_dir.glob("eval_*.json*"))
