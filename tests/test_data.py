"""The data pipeline against the recipe: sources, chunking and filtering, masking statistics, grouped batches."""

import gzip
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from fastdistil.train import data


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
    corpus = data.Table({"text": [
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
    seqs = data.Table({"input_ids": [[101, 2000, 2000, 2000, 2000, 2001, 102]]})
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
        data.tokenize_corpus(data.Table({"text": ["x"]}), tokenizer, max_seq_len=1000)
    with pytest.raises(ValueError, match="leaves none to train on"):
        data.heldout_split(data.Table({"input_ids": [[1] * 12] * 3}), 0.9, seed=0)
    with pytest.raises(ValueError, match="one length"):
        data.Table({"text": ["a", "b"], "input_ids": [[1]]})


def test_a_table_indexes_like_a_dataset():
    table = data.Table({"text": ["a", "b", "c"], "n": [1, 2, 3]})
    assert len(table) == 3 and table.column_names == ["text", "n"]
    assert table["n"] == [1, 2, 3] and table[1] == {"text": "b", "n": 2}
    picked = table[[2, 0, 2]]
    assert picked["text"] == ["c", "a", "c"] and picked["n"] == [3, 1, 3]
    assert table.select(np.array([1, 0]))["n"] == [2, 1]
    assert list(table.iter(batch_size=2)) == [{"text": ["a", "b"], "n": [1, 2]}, {"text": ["c"], "n": [3]}]
    rows = data.Table.from_rows([{"text": "x"}, {"n": 5, "text": "y"}])
    assert rows.column_names == ["text", "n"] and rows["n"] == [None, 5]


def test_a_hub_dataset_without_the_datasets_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # what `import datasets` sees where it is not installed
    with pytest.raises(ImportError) as info:
        data.load_corpus("someone/some-hub-dataset")
    message = str(info.value)
    assert "\n" not in message and "`datasets` package" in message and "pip install datasets" in message
    assert "someone/some-hub-dataset is no local file or folder" in message


# --- the same data as the datasets-based pipeline of earlier versions -------------------------------------

def awkward_local_corpora(root):
    """Files of every kind the loader reads, with what trips readers up: CRLF and lone CR line ends, a
    byte-order mark, form feeds and Unicode line separators inside a line, blank and whitespace-only documents,
    JSON nulls, rows without the text field, JSON arrays of objects and of strings, gzip."""
    (root / "a.txt").write_bytes("\ufefffirst doc\r\nsecond\rthird\n\n   \n\tfourth \x0c x\u2028y\ncaf\u00e9".encode())
    (root / "b.jsonl").write_text('{"text": "x1", "id": 1}\n\n{"id": 2}\n{"text": null}\n{"text": "  "}\n'
                                  '{"text": "x2\\nwith a newline", "id": 3}\n')
    folder = root / "folder"
    (folder / "sub").mkdir(parents=True)
    with gzip.open(folder / "c.jsonl.gz", "wt") as f:
        f.write('{"text": "g1"}\n{"text": "g2"}')
    (folder / "sub" / "d.json").write_text(json.dumps([{"text": "array 1"}, {"text": "array 2"}], indent=2))
    (folder / "e.jsonl").write_text('\ufeff{"text": "bom"}\r\n{"text": "crlf"}\r\n')
    (root / "strings.json").write_text('["s1", "s2", " "]')
    return [root / "a.txt", root / "b.jsonl", folder, root / "strings.json"]


@pytest.mark.parametrize("max_documents", [None, 3])
def test_local_corpora_read_as_datasets_reads_them(tmp_path, max_documents):
    datasets = pytest.importorskip("datasets")
    for path in awkward_local_corpora(tmp_path):
        files = [str(f) for f in data._local_files(path)]
        loader = "text" if path.suffix == ".txt" else "json"
        expected = datasets.load_dataset(loader, data_files=files, split="train", cache_dir=str(tmp_path / "cache"))
        if max_documents is not None:
            expected = expected.select(range(max_documents))
        texts = [t for t in expected["text"] if t and t.strip()]
        assert data.load_corpus(str(path), max_documents=max_documents)["text"] == texts, path.name


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 3, 2**40])
def test_the_heldout_split_is_datasets_train_test_split(n, fraction, seed):
    datasets = pytest.importorskip("datasets")
    rows = [[i, i + 1] for i in range(n)]  # each row names its position
    try:
        expected = datasets.Dataset.from_dict({"input_ids": rows}).train_test_split(
            test_size=fraction, seed=seed, shuffle=True)
    except ValueError:  # datasets refuses an empty train set, and so must the split
        with pytest.raises(ValueError, match="leaves none to train on"):
            data.heldout_split(data.Table({"input_ids": rows}), fraction, seed)
        return
    train_set, heldout = data.heldout_split(data.Table({"input_ids": rows}), fraction, seed)
    assert train_set["input_ids"] == lists(expected["train"])
    assert heldout["input_ids"] == lists(expected["test"])


MAX_SEQ_LEN = 128
HELDOUT = (0.05, 7)  # fraction, seed


def lists(sequences) -> list[list[int]]:
    return [list(ids) for ids in sequences["input_ids"]]


def digest(values) -> str:
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()


def pipeline_outputs(num_proc=None) -> dict:
    """Every stage's output on the bundled corpus, as JSON-able values (long ones as digests)."""
    tokenizer = AutoTokenizer.from_pretrained(data.BUNDLED_TOKENIZER)
    corpus = data.load_corpus()
    sequences = data.tokenize_corpus(corpus, tokenizer, MAX_SEQ_LEN, num_proc)
    train_set, heldout = data.heldout_split(sequences, *HELDOUT)
    probs = data.masking_probabilities(train_set, len(tokenizer), tokenizer.all_special_ids)
    first = [[t.tolist() for t in batch] for _, batch in zip(range(3), data.batches(train_set, 8, 0, 0, 0))]
    return {"texts": digest(corpus["text"]), "documents": len(corpus), "sequences": digest(lists(sequences)),
            "train": digest(lists(train_set)), "heldout": digest(lists(heldout)),
            "train_sequences": len(train_set), "probs": digest(probs.tolist()), "first_batches": digest(first)}


@pytest.fixture(scope="module")
def pipeline():
    return pipeline_outputs()


def test_the_pipeline_gives_what_the_datasets_pipeline_gave(pipeline, tmp_path):
    datasets = pytest.importorskip("datasets")
    tokenizer = AutoTokenizer.from_pretrained(data.BUNDLED_TOKENIZER)
    cls_id, sep_id, unk_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id

    def tokenize(batch):  # the earlier versions' datasets.map function
        encoded = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        chunks = [c for ids in encoded for c in data.chunk_sequences(ids, MAX_SEQ_LEN, cls_id, sep_id)]
        return {"input_ids": [c for c in chunks if data.keep_sequence(c, unk_id)]}

    corpus = datasets.load_dataset("json", data_files=str(data.BUNDLED_CORPUS), split="train",
                                   cache_dir=str(tmp_path)).select_columns(["text"])
    corpus = corpus.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
    sequences = corpus.map(tokenize, batched=True, remove_columns=["text"])
    split = sequences.train_test_split(test_size=HELDOUT[0], seed=HELDOUT[1], shuffle=True)
    assert pipeline["documents"] == len(corpus) == 10033
    assert pipeline["texts"] == digest(list(corpus["text"]))
    assert pipeline["sequences"] == digest(lists(sequences))
    assert pipeline["train"] == digest(lists(split["train"]))
    assert pipeline["heldout"] == digest(lists(split["test"]))
    counts = torch.bincount(torch.tensor([i for ids in split["train"]["input_ids"] for i in ids]),
                            minlength=len(tokenizer)).double()
    probs = counts.clamp_min(1) ** -0.7
    probs[tokenizer.all_special_ids] = 0
    assert pipeline["probs"] == digest(probs.float().tolist())


WITHOUT_DATASETS = """
import json, sys
sys.modules["datasets"] = None  # what `import datasets` sees where it is not installed
sys.path.insert(0, sys.argv[1])
import test_data
print(json.dumps(test_data.pipeline_outputs(num_proc=2)))
"""


def test_the_pipeline_runs_without_the_datasets_package(pipeline):
    proc = subprocess.run([sys.executable, "-c", WITHOUT_DATASETS, str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Two tokenizer processes, and no datasets: the same output, stage by stage.
    assert json.loads(proc.stdout.splitlines()[-1]) == pipeline


# --- Hugging Face hub datasets: datasets.Dataset end to end, the same data as the local path ---------------

def hub_stand_in(tmp_path, monkeypatch, rows: list[dict]):
    """Patches datasets.load_dataset to serve `rows` as a hub dataset would be served: an Arrow dataset with
    cache files (read by datasets' own json loader from a file under tmp_path), or streamed. Returns the calls."""
    datasets = pytest.importorskip("datasets")
    source = tmp_path / "hub.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    real_load_dataset, calls = datasets.load_dataset, []

    def load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        corpus = real_load_dataset("json", data_files=str(source), split="train", cache_dir=str(tmp_path / "hub"))
        return corpus.to_iterable_dataset() if streaming else corpus

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return source, calls


def hub_rows(n: int = 120) -> list[dict]:
    """n documents of the bundled corpus under the field "article", with empty, whitespace-only, null and
    missing texts among them, and another field."""
    texts = [row["text"] for _, row in zip(range(n), data.read_rows([data.BUNDLED_CORPUS]))]
    rows = [{"article": t, "id": i} for i, t in enumerate(texts)]
    for at, row in [(0, {"article": "", "id": -1}), (5, {"article": " \n\t", "id": -2}),
                    (50, {"article": None, "id": -3}), (90, {"id": -4})]:
        rows.insert(at, row)
    return rows


@pytest.mark.parametrize("streaming, max_documents, num_proc", [(False, None, None), (False, 70, None),
                                                              (True, 70, None), (False, None, 2)])
def test_a_hub_corpus_gives_what_the_same_documents_give_locally(tokenizer, tmp_path, monkeypatch, streaming,
                                                                   max_documents, num_proc):
    datasets = pytest.importorskip("datasets")
    source, calls = hub_stand_in(tmp_path, monkeypatch, hub_rows())
    results = {}
    for where, name in [("local", str(source)), ("hub", "someone/corpus")]:
        corpus = data.load_corpus(name, "some-config", split="train", text_column="article",
                                  streaming=streaming, max_documents=max_documents)
        sequences = data.tokenize_corpus(corpus, tokenizer, 64, num_proc)
        train_set, heldout = data.heldout_split(sequences, 0.1, seed=3)
        probs = data.masking_probabilities(train_set, tokenizer.vocab_size, tokenizer.all_special_ids)
        first = [[t.tolist() for t in b] for _, b in zip(range(3), data.batches(train_set, 8, 0, 0, 0))]
        kinds = {type(x) for x in (corpus, sequences, train_set, heldout)}
        results[where] = kinds, list(corpus["text"]), lists(sequences), lists(train_set), lists(heldout), probs, first
    assert calls == [("someone/corpus", "some-config", "train", streaming)]
    assert results["local"][0] == {data.Table}
    assert results["hub"][0] == ({data.Table} if streaming else {datasets.Dataset})  # a stream is read whole
    local, hub = results["local"][1:], results["hub"][1:]
    assert len(local[0]) == (67 if max_documents else 120)  # 3 (of the first 70) or 4 rows are no documents
    assert len(local[2]) > 20 and len(local[3]) > 2
    for got, expected in zip(hub, local):
        assert torch.equal(got, expected) if isinstance(got, torch.Tensor) else got == expected


def test_a_hub_corpus_stays_memory_mapped_and_its_tokenization_cached(tokenizer, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    assert datasets.is_caching_enabled()
    hub_stand_in(tmp_path, monkeypatch, hub_rows(60))
    corpus = data.load_corpus("someone/corpus", text_column="article")
    chunked = []

    def counting_chunk_sequences(*args):  # what the map function calls for every document it tokenizes
        chunked.append(args[0])
        return chunk_sequences(*args)

    chunk_sequences = data.chunk_sequences
    monkeypatch.setattr(data, "chunk_sequences", counting_chunk_sequences)
    first = data.tokenize_corpus(corpus, tokenizer, 64)
    assert len(chunked) == len(corpus) == 60
    files = [Path(f["filename"]) for f in first.cache_files]
    assert files and all(f.is_relative_to(tmp_path / "hub") for f in files)
    stamps = [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files]

    again = data.tokenize_corpus(data.load_corpus("someone/corpus", text_column="article"), tokenizer, 64)
    assert len(chunked) == 60  # served from datasets' cache: the map function did not run again
    assert again.cache_files == first.cache_files
    assert [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files] == stamps
    for sequences in (first, again, *data.heldout_split(again, 0.1, seed=0)):
        assert isinstance(sequences, datasets.Dataset)  # Arrow on disk, not lists in memory
        assert isinstance(sequences.data, datasets.table.MemoryMappedTable)
        assert sequences.features["input_ids"].feature.dtype == "int32"
    assert lists(again) == lists(first)
    assert data.tokenize_corpus(corpus, tokenizer, 32).cache_files != first.cache_files  # another max_seq_len
    assert len(chunked) == 120


def test_bad_hub_corpora(tmp_path, monkeypatch):
    hub_stand_in(tmp_path, monkeypatch, [{"article": " ", "n": 1}, {"article": "a document", "n": 2}])
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['article', 'n'\]\)"):
        data.load_corpus("someone/corpus")
    with pytest.raises(ValueError, match="column 'n' of someone/corpus holds int64 values, not text"):
        data.load_corpus("someone/corpus", text_column="n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        data.load_corpus("someone/corpus", text_column="article", max_documents=1)
