"""The data pipeline against the recipe: sources, chunking and filtering, masking statistics, grouped batches."""

import gzip
import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from fastdistil import data


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(data.BUNDLED_TOKENIZER)


def test_the_bundled_corpus_loads_offline():
    corpus = data.load_corpus()
    assert len(corpus) == 10033 and corpus.column_names == ["text"]
    assert "Western art music" in corpus[0]["text"]


def test_local_txt_jsonl_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n\nsecond document\n")
    folder = tmp_path / "docs"
    folder.mkdir()
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "third"}) + "\n" + json.dumps({"body": "fourth"}) + "\n")
    assert data.load_corpus(str(tmp_path / "a.txt"))["text"] == ["first document", "second document"]
    assert sorted(data.load_corpus(str(folder), text_column="body")["text"]) == ["fourth", "third"]


@pytest.mark.parametrize("content, match", [("\n \n", "no non-empty documents"), (None, "no column")])
def test_bad_corpora(tmp_path, content, match):
    if content is None:
        path = tmp_path / "c.jsonl"
        path.write_text(json.dumps({"body": "x"}) + "\n")
    else:
        path = tmp_path / "c.txt"
        path.write_text(content)
    with pytest.raises(ValueError, match=match):
        data.load_corpus(str(path))


def test_a_folder_without_text_files_is_an_error(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="no .txt or .jsonl"):
        data.load_corpus(str(tmp_path))


def test_long_documents_are_chunked_and_short_or_unknown_ones_dropped(tokenizer):
    corpus = data.datasets.Dataset.from_dict({"text": [
        " ".join(["word"] * 99),  # 99 tokens: chunks of 30, 30, 30, 9 (+ [CLS], [SEP]); 11 tokens are dropped
        "too short",
        " ".join(["\u2603\ufe0f"] * 20),  # snowmen are [UNK]
    ]})
    out = data.tokenize_corpus(corpus, tokenizer, max_seq_len=32)
    seqs = out["input_ids"]
    assert [len(s) for s in seqs] == [32, 32, 32]
    for s in seqs:
        assert s[0] == tokenizer.cls_token_id and s[-1] == tokenizer.sep_token_id
        assert tokenizer.unk_token_id not in s


def test_masking_probabilities_follow_counts(tokenizer):
    seqs = data.datasets.Dataset.from_dict({"input_ids": [[101, 2000, 2000, 2000, 2000, 2001, 102]]})
    probs = data.masking_probabilities(seqs, tokenizer.vocab_size, tokenizer.all_special_ids, smoothing=0.7)
    assert probs[2000] == pytest.approx(4 ** -0.7)
    assert probs[2001] == pytest.approx(1.0)
    assert probs[5000] == pytest.approx(1.0)  # never seen: count clamped to 1
    assert all(probs[i] == 0 for i in tokenizer.all_special_ids)


def masked_batch(seed, tokenizer, probs=None, mlm_prob=0.15):
    g = torch.Generator().manual_seed(1234)
    lengths = [60, 45, 30, 12]
    seqs = [[101] + torch.randint(1000, 1100, (n - 2,), generator=g).tolist() + [102] for n in lengths]
    ids, mask = data.collate(seqs, tokenizer.pad_token_id)
    probs = torch.ones(tokenizer.vocab_size) if probs is None else probs
    probs[tokenizer.all_special_ids] = 0
    masker = data.DynamicMasker(probs, tokenizer.mask_token_id, tokenizer.vocab_size, mlm_prob)
    masked, labels = masker(ids, mask, data.rng(seed, 0, 7))
    return ids, mask, masked, labels


def test_masking_picks_15_percent_of_real_tokens_and_never_a_special_one(tokenizer):
    ids, mask, masked, labels = masked_batch(0, tokenizer)
    targets = labels != -100
    assert int(targets.sum()) == math.ceil(0.15 * int(mask.sum()))
    assert not targets[~mask].any()
    assert not torch.isin(ids[targets], torch.tensor(tokenizer.all_special_ids)).any()
    assert torch.equal(labels[targets], ids[targets])
    assert torch.equal(masked[~targets], ids[~targets])


def test_masked_tokens_split_80_10_10(tokenizer):
    counts = torch.zeros(3)
    for seed in range(300):
        ids, _, masked, labels = masked_batch(seed, tokenizer)
        t = labels != -100
        is_mask = masked[t] == tokenizer.mask_token_id
        kept = masked[t] == ids[t]
        counts += torch.tensor([is_mask.sum(), kept.sum(), (~is_mask & ~kept).sum()])
    share = counts / counts.sum()
    # ~6900 targets: 3 standard deviations of a 10 % share are ~1 point
    assert share[0] == pytest.approx(0.8, abs=0.02)
    assert share[1] == pytest.approx(0.1, abs=0.015)
    assert share[2] == pytest.approx(0.1, abs=0.015)


def test_rare_tokens_are_favoured_as_count_to_the_minus_0_7(tokenizer):
    # Half the real tokens are one frequent id, the other half distinct rare ids: per occurrence, a rare
    # token is (count_frequent / 1)^0.7 times likelier to be drawn than a frequent one.
    probs = torch.ones(tokenizer.vocab_size)
    probs[2000] = 30 ** -0.7
    masker = data.DynamicMasker(probs, tokenizer.mask_token_id, tokenizer.vocab_size, mlm_prob=0.05)
    ids = torch.tensor([[101] + [2000] * 30 + list(range(3000, 3030)) + [102]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    frequent = rare = 0
    for seed in range(2000):
        _, labels = masker(ids, mask, data.rng(seed))
        frequent += int((labels == 2000).sum())
        rare += int(((labels >= 3000) & (labels < 3030)).sum())
    # Without replacement and with few draws (4 of 62), the ratio stays near the weights' ratio 30^0.7 = 10.8.
    assert rare / frequent == pytest.approx(30 ** 0.7, rel=0.15)


def test_masking_is_a_function_of_seed_and_position(tokenizer):
    _, _, a, la = masked_batch(5, tokenizer)
    _, _, b, lb = masked_batch(5, tokenizer)
    _, _, c, lc = masked_batch(6, tokenizer)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(la, lc)


def test_grouped_batches_cover_every_sequence_once_within_buckets():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(12, 128, (1000,), generator=g).tolist()
    batches = data.length_grouped_batches(lengths, batch_size=8, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    full_buckets = [b for b in batches[:-20] if len(b) == 8]
    assert len(full_buckets) > 80
    for b in full_buckets:
        assert max(lengths[i] for i in b) - min(lengths[i] for i in b) < 4
    assert batches == data.length_grouped_batches(lengths, batch_size=8, seed=1, epoch=0)
    assert batches != data.length_grouped_batches(lengths, batch_size=8, seed=1, epoch=1)


def test_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="mlm_prob"):
        data.DynamicMasker(torch.ones(10), 3, 10, mlm_prob=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        data.length_grouped_batches([12, 13], batch_size=0, seed=0, epoch=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        data.tokenize_corpus(data.datasets.Dataset.from_dict({"text": ["x"]}), tokenizer, max_seq_len=1000)
