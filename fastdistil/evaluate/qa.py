"""Extractive question answering in SQuAD's form, as the original run_squad.py (and its distillation copy,
run_squad_w_distillation.py) prepares and decodes it through transformers' squad_convert_examples_to_features and
compute_predictions_logits:

- read: SQuAD's official JSON (train-v1.1.json, dev-v2.0.json, ...) as the rows the hub's SQuAD datasets hold;
- windows: each question with a window of its context, [CLS] question [SEP] context [SEP]; a long context gives
  several windows, whose starts lie doc_stride context tokens apart, questions cut to max_query_length tokens;
  each window knows its example, the characters of the context each token covers (the offsets mapping) and the
  tokens it holds with the most context around them; training windows get the gold span's token positions, or
  [CLS] (position 0) when the answer is not inside the window or there is none (SQuAD v2);
- decode: the answer of each example, the best span over its windows by start logit + end logit among the
  n_best_size highest start and end positions, inside the context, no longer than max_answer_length tokens,
  starting at a token of maximal context; for SQuAD v2 no answer ("") when the lowest [CLS] score of its windows
  beats the best span's.

Two choices differ from the original and say so where they are made: an answer's text is the context's own
characters under its tokens (the offsets mapping; the original maps word pieces back through whitespace words),
and an example with no valid span predicts "" (the original: "empty").
"""

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastdistil.train import data

NULL_SCORE_DIFF_THRESHOLD = 0.0  # the original's default: no answer when its score beats the best span's at all


def read_squad(path: str, what: str) -> data.Table:
    """The questions of an official SQuAD JSON file, one row each with the columns of the hub's SQuAD datasets:
    id, title, context, question, answers ({"text": [...], "answer_start": [...]}; empty lists when the question
    has no answer)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} {file}: no such file")
    try:
        articles = json.loads(file.read_text(encoding="utf-8"))["data"]
        rows = [{"id": qa["id"], "title": article.get("title", ""), "context": paragraph["context"],
                 "question": qa["question"],
                 "answers": {"text": [a["text"] for a in qa["answers"]],
                             "answer_start": [a["answer_start"] for a in qa["answers"]]}}
                for article in articles for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{what} {file}: not SQuAD's JSON format, {{\"data\": [{{\"paragraphs\": [{{\"context\", "
                         f"\"qas\": [{{\"id\", \"question\", \"answers\"}}]}}]}}]}} ({type(exc).__name__}: {exc})"
                         ) from exc
    return data.Table.from_rows(rows)


@dataclass
class Windows:
    """The model inputs of an example's windows (rows) and what decoding needs to map their logits back."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    example_of: list[int]  # each window's example
    offsets: list[list[tuple[int, int] | None]]  # each token's characters in its example's context; None outside it
    max_context: list[np.ndarray]  # bool per token: this window is the one with the most context around it
    start_positions: list[int] | None  # training: the gold span's token positions (0, [CLS], for none)
    end_positions: list[int] | None


def _truncated_questions(questions: list[str], tokenizer, max_query_length: int) -> list[str]:
    """Each question cut after its first max_query_length tokens, at the end of that token's characters."""
    encoded = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    return [q if len(spans) <= max_query_length else q[:spans[max_query_length - 1][1]]
            for q, spans in zip(questions, encoded["offset_mapping"])]


def _gold_positions(offsets: list[tuple[int, int] | None], answers: dict) -> tuple[int, int]:
    """The token positions of the first gold answer in this window, or (0, 0) ([CLS]) when there is no answer
    or it is not all inside the window, as squad_convert_examples_to_features labels training windows."""
    inside = [p for p, span in enumerate(offsets) if span is not None]
    if not answers["text"] or not inside:
        return 0, 0
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    first, last = inside[0], inside[-1]
    if not (offsets[first][0] <= start_char and end_char <= offsets[last][1]):
        return 0, 0
    start = next(p for p in inside if offsets[p][1] > start_char)
    end = next(p for p in reversed(inside) if offsets[p][0] < end_char)
    return start, end


def _max_context(offsets: list[list[tuple[int, int] | None]]) -> list[np.ndarray]:
    """For the windows of one example: is each token in the window where it has the most context, scored as the
    original's _new_check_is_max_context: min(tokens left of it, tokens right of it) + 0.01 * the window's context
    length, the earlier window winning a tie. A context token is known by its characters."""
    best: dict[tuple[int, int], tuple[float, int]] = {}
    for w, spans in enumerate(offsets):
        inside = [p for p, span in enumerate(spans) if span is not None]
        for p in inside:
            score = min(p - inside[0], inside[-1] - p) + 0.01 * len(inside)
            if spans[p] not in best or score > best[spans[p]][0]:
                best[spans[p]] = (score, w)
    return [np.array([span is not None and best[span][1] == w for span in spans]) for w, spans in enumerate(offsets)]


def windows(questions: list[str], contexts: list[str], tokenizer, max_seq_len: int, doc_stride: int,
            max_query_length: int, answers: list[dict] | None = None) -> Windows:
    """The windows of every example, in example order; with answers (training), their gold positions."""
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    room = max_seq_len - specials - max_query_length
    if room < 1:
        raise ValueError(f"--max-query-length {max_query_length} leaves no room for the context in --max-seq-len "
                         f"{max_seq_len} ({specials} special tokens)")
    if not 1 <= doc_stride <= room:
        raise ValueError(f"--doc-stride must be in [1, {room}] (the context tokens beside a --max-query-length "
                         f"{max_query_length} question in --max-seq-len {max_seq_len}), got {doc_stride}")
    questions = _truncated_questions(questions, tokenizer, max_query_length)
    lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    # The tokenizer's stride is the overlap of consecutive windows; the original's doc_stride is the step between
    # their starts: the overlap is the window's context length less the step, which depends on the question's
    # length, so questions of one length are tokenized together. (A cut question that tokenizes longer than
    # max_query_length, which a tokenizer may rarely do, gets windows without overlap.)
    found = []
    for length in sorted(set(lengths)):
        group = [i for i, n in enumerate(lengths) if n == length]
        encoded = tokenizer([questions[i] for i in group], [contexts[i] for i in group], truncation="only_second",
                            max_length=max_seq_len, stride=max(0, max_seq_len - specials - length - doc_stride),
                            return_overflowing_tokens=True, return_offsets_mapping=True)
        for w, sample in enumerate(encoded["overflow_to_sample_mapping"]):
            spans = [tuple(span) if sequence == 1 else None
                     for span, sequence in zip(encoded["offset_mapping"][w], encoded.sequence_ids(w))]
            found.append((group[sample], w, encoded["input_ids"][w],
                          encoded["token_type_ids"][w] if "token_type_ids" in encoded else None, spans))
    found.sort(key=lambda window: window[:2])  # examples in order, each one's windows in context order
    example_of = [window[0] for window in found]
    offsets = [window[4] for window in found]
    max_context = [flags for _, group in itertools.groupby(zip(example_of, offsets), key=lambda window: window[0])
                   for flags in _max_context([spans for _, spans in group])]
    positions = None if answers is None else [_gold_positions(spans, answers[e])
                                              for e, spans in zip(example_of, offsets)]
    return Windows(input_ids=[window[2] for window in found],
                   token_type_ids=None if found and found[0][3] is None else [window[3] for window in found],
                   example_of=example_of, offsets=offsets, max_context=max_context,
                   start_positions=None if positions is None else [s for s, _ in positions],
                   end_positions=None if positions is None else [e for _, e in positions])


def _top(logits: np.ndarray, n: int) -> np.ndarray:
    # The n highest, ties in position order: the original sorts (index, logit) pairs by logit, stably.
    return np.argsort(-logits, kind="stable")[:n]


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, offsets: list[tuple[int, int] | None],
              max_context: np.ndarray, n_best_size: int, max_answer_length: int) -> tuple[float, int, int] | None:
    """(score, start, end) of a window's best span, or None when no span qualifies."""
    starts, ends = _top(start_logits, n_best_size), _top(end_logits, n_best_size)
    inside = np.array([span is not None for span in offsets])
    valid = ((inside[starts] & max_context[starts])[:, None] & inside[ends][None, :]
             & (ends[None, :] >= starts[:, None]) & (ends[None, :] - starts[:, None] + 1 <= max_answer_length))
    if not valid.any():
        return None
    scores = np.where(valid, start_logits[starts][:, None] + end_logits[ends][None, :], -np.inf)
    i, j = np.unravel_index(np.argmax(scores), scores.shape)  # the first best, in the original's order
    return float(scores[i, j]), int(starts[i]), int(ends[j])


def decode(rows: list[np.ndarray], found: Windows, contexts: list[str], n_best_size: int, max_answer_length: int,
           no_answer: bool) -> list[str]:
    """Each example's answer from its windows' logits (rows[w]: [2, window length], start then end)."""
    best: list[tuple[float, str] | None] = [None] * len(contexts)
    null = [np.inf] * len(contexts)
    for w, (row, example) in enumerate(zip(rows, found.example_of)):
        start_logits, end_logits = row
        null[example] = min(null[example], float(start_logits[0] + end_logits[0]))
        span = best_span(start_logits, end_logits, found.offsets[w], found.max_context[w], n_best_size,
                         max_answer_length)
        if span is not None and (best[example] is None or span[0] > best[example][0]):
            score, start, end = span
            best[example] = score, contexts[example][found.offsets[w][start][0]:found.offsets[w][end][1]]
    answers = []
    for example, candidate in enumerate(best):
        if candidate is None or (no_answer and null[example] - candidate[0] > NULL_SCORE_DIFF_THRESHOLD):
            answers.append("")  # the original predicts "empty" where no span qualifies
        else:
            answers.append(candidate[1])
    return answers
