"""Text in, masked (or shifted) batches out: the DistilBERT data pipeline, and DistilGPT2's.

- A corpus: the bundled Wikipedia sample (default), local .txt (one document a line) or .jsonl/.jsonl.gz/.json
  files or folders of them, or a Hugging Face dataset. Only the last needs the `datasets` package; everything
  else is plain Python, held in a Table of columns. A Hugging Face dataset stays a datasets.Dataset, memory-
  mapped Arrow on disk, from loading to batches (a streamed slice of one is a Table: it is read whole anyway).
- Tokenized in batches, in several processes if asked (for a datasets.Dataset by its `map`, whose result
  datasets caches on disk). Long documents are split into chunks of at most max_seq_len tokens, each wrapped in
  the family's first and last tokens ([CLS] ... [SEP] for BERT, <s> ... </s> for RoBERTa, <|endoftext|> on
  both sides for GPT-2). Sequences of 11 tokens or fewer, and those at least half [UNK], are dropped.
- Masking probabilities from token counts: count^-smoothing, zero for special tokens.
- Dynamic masking, fresh for every batch. 15 % of the batch's real tokens are drawn without replacement
  across the whole batch, with those probabilities. Of them, 80 % become [MASK], 10 % stay, and 10 % become a
  random token.
- For a causal teacher, shifting instead of masking: the label of position t is token t + 1, -100 at padding
  and at each sequence's last token (the original's shift of clm_labels).
- Batches grouped by length (buckets of width 4) to cut padding.

Every random choice comes from a generator seeded by the run's seed and the position in the data (epoch,
batch index), so a run is reproducible and can resume anywhere.
"""

import array
import bisect
import contextlib
import functools
import gzip
import hashlib
import itertools
import json
import math
import multiprocessing
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fastdistil import assets

BUNDLED_CORPUS = assets.CORPUS
BUNDLED_TOKENIZER = assets.TOKENIZER
DEFAULT_DATASET = "wiki-vital"

MIN_TOKENS = 12  # the recipe drops sequences of <= 11 tokens, [CLS] and [SEP] included
MAX_UNK_FRACTION = 0.5
BUCKET_WIDTH = 4
MASK_KEEP_RANDOM = (0.8, 0.1, 0.1)
TOKENIZE_BATCH = 1000  # documents per tokenizer call (and per task of a tokenizer process, or map batch)
COUNT_BATCH = 4096  # sequences per bincount in masking_probabilities: bounds the flat id tensor


class Table:
    """Named columns of equal length, plain lists: the pipeline's container. It offers the part of
    datasets.Dataset's interface that the pipeline and its callers use, so that each step is written once for
    both: table["column"] (the list itself, not a copy), table[row] (a dict), table[indices] and
    table.select(indices) (a Table of those rows, in that order), table.iter(batch_size) (dicts of consecutive
    column slices), len(table) and column_names."""

    def __init__(self, columns: dict[str, list]):
        lengths = {name: len(values) for name, values in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"Table: columns must have one length, got {lengths}")
        self._columns = columns

    @classmethod
    def from_rows(cls, rows: Iterable[dict]) -> "Table":
        """Rows as columns; a field missing from a row is None there, as datasets' JSON loader fills it."""
        rows = list(rows)
        names = dict.fromkeys(name for row in rows for name in row)
        return cls({name: [row.get(name) for row in rows] for name in names})

    @property
    def column_names(self) -> list[str]:
        return list(self._columns)

    def __len__(self) -> int:
        return len(next(iter(self._columns.values()), []))

    def __getitem__(self, key):
        if isinstance(key, str):
            return self._columns[key]
        if isinstance(key, (int, np.integer)):
            return {name: values[key] for name, values in self._columns.items()}
        indices = key.tolist() if isinstance(key, np.ndarray) else list(key)
        return Table({name: [values[i] for i in indices] for name, values in self._columns.items()})

    def select(self, indices) -> "Table":
        return self[indices]

    def iter(self, batch_size: int) -> Iterator[dict[str, list]]:
        for start in range(0, len(self), batch_size):
            yield {name: values[start:start + batch_size] for name, values in self._columns.items()}

    def __repr__(self) -> str:
        return f"Table(columns={self.column_names}, rows={len(self)})"


def require_datasets(what: str):
    """The `datasets` package, imported on first use: only Hugging Face hub data needs it."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(f"{what} needs the `datasets` package (pip install datasets)") from exc
    return datasets


def _local_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    usable = [p for p in files if p.name.endswith((".txt", ".jsonl", ".jsonl.gz", ".json"))]
    if not usable:
        raise ValueError(f"dataset: no .txt or .jsonl files in {path}")
    return usable


def _json_rows(path: Path) -> Iterator[dict]:
    # JSON Lines, or one JSON array of objects or of strings (a string is the row's text), as datasets' "json"
    # loader reads them; utf-8-sig because that loader skips a byte-order mark.
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8-sig") as f:
        seen_content = False
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not seen_content and line.lstrip().startswith("["):
                items, where = _parse_json(line + f.read(), path, number), f"{path}: an item of the array"
            else:
                items, where = [_parse_json(line, path, number)], f"{path} line {number}"
            seen_content = True
            for item in items:
                if isinstance(item, str):
                    item = {"text": item}
                if not isinstance(item, dict):  # bad data rather than a bad argument: a ValueError, as elsewhere
                    raise ValueError(f"dataset: {where} is {type(item).__name__}, not a JSON object")  # noqa: TRY004
                yield item


def _parse_json(text: str, path: Path, line: int):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"dataset: {path} line {line}: not JSON Lines or a JSON array ({exc})") from exc


def read_rows(files: list[Path]) -> Iterator[dict]:
    """The rows of local files, in file order, read lazily: a .txt line (universal newlines, without its line
    break) is the row {"text": line}, as datasets' "text" loader reads it; JSON files as its "json" loader."""
    for path in files:
        if path.suffix == ".txt":
            with open(path, encoding="utf-8") as f:
                yield from ({"text": line.rstrip("\n")} for line in f)
        else:
            yield from _json_rows(path)


def _hub_corpus(dataset: str, dataset_config: str | None, split: str, streaming: bool, max_documents: int | None):
    """A Hugging Face dataset as a datasets.Dataset (memory-mapped, nothing read yet), or, streamed, its first
    max_documents rows as a Table."""
    datasets = require_datasets(f"dataset: {dataset} is no local file or folder; loading it from the Hugging "
                                "Face hub")
    corpus = datasets.load_dataset(dataset, dataset_config, split=split, streaming=streaming)
    if streaming:
        return Table.from_rows(corpus.take(max_documents))
    if max_documents is not None:
        corpus = corpus.select(range(min(max_documents, len(corpus))))
    return corpus


def _non_text(corpus, column: str) -> str | None:
    """The kind of the first non-text values of the column, or None where it holds text (or nulls) only. For a
    datasets.Dataset its feature says, without reading the column."""
    if isinstance(corpus, Table):
        value = next((t for t in corpus[column] if t is not None and not isinstance(t, str)), None)
        return None if value is None else type(value).__name__
    feature = corpus.features[column]
    dtype = getattr(feature, "dtype", None)
    return None if dtype in ("string", "large_string", "null") else str(dtype or type(feature).__name__)


def _are_documents(texts: list[str | None]) -> list[bool]:
    # Module level, not a lambda: datasets' filter fingerprints it (for its cache) and may pickle it.
    return [bool(t and t.strip()) for t in texts]


def load_corpus(dataset: str = DEFAULT_DATASET, dataset_config: str | None = None, split: str = "train",
                text_column: str = "text", streaming: bool = False, max_documents: int | None = None):
    """The corpus with one column, `text`, and no empty or whitespace-only documents: a Table, or for a Hugging
    Face dataset that is not streamed a datasets.Dataset (memory-mapped; the empty documents filtered out by an
    indices mapping, cached by datasets).

    `dataset` is "wiki-vital" (the bundled sample), a local file or folder, or a Hugging Face dataset name.
    `max_documents` keeps the first documents only (counted before empty ones are dropped); local files are
    read only that far. With `streaming`, a Hugging Face dataset is read document by document and only those
    first `max_documents` are ever downloaded: the way to distill on a slice of a corpus too large to fetch
    whole.
    """
    if streaming and not max_documents:
        raise ValueError("streaming needs max_documents: the number of documents to read from the stream")
    if max_documents is not None and max_documents <= 0:
        raise ValueError(f"max_documents must be > 0, got {max_documents}")
    path = Path(dataset)
    if dataset == DEFAULT_DATASET or path.exists():
        files = [BUNDLED_CORPUS] if dataset == DEFAULT_DATASET else _local_files(path)
        if len({f.suffix == ".txt" for f in files}) > 1:
            raise ValueError(f"dataset: {path} mixes .txt and .jsonl files; use one kind")
        raw = Table.from_rows(itertools.islice(read_rows(files), max_documents))
    else:
        raw = _hub_corpus(dataset, dataset_config, split, streaming, max_documents)
    if text_column not in raw.column_names:
        raise ValueError(f"dataset: {dataset} has no column {text_column!r} (columns: {raw.column_names}); "
                         "pass --text-column")
    not_text = _non_text(raw, text_column)
    if not_text is not None:
        raise ValueError(f"dataset: column {text_column!r} of {dataset} holds {not_text} values, not text; "
                         "pass --text-column")
    if isinstance(raw, Table):
        texts = raw[text_column]
        corpus = Table({"text": [t for t, keep in zip(texts, _are_documents(texts)) if keep]})
    else:
        corpus = raw.select_columns([text_column])
        if text_column != "text":
            corpus = corpus.rename_column(text_column, "text")
        corpus = corpus.filter(_are_documents, batched=True, input_columns="text", desc="dropping empty documents")
    if len(corpus) == 0:
        raise ValueError(f"dataset: {dataset} has no non-empty documents")
    return corpus


def chunk_sequences(token_ids: list[int], max_seq_len: int, cls_id: int, sep_id: int) -> list[list[int]]:
    """first chunk last (cls_id, sep_id: [CLS] and [SEP] for BERT) for consecutive chunks of max_seq_len - 2
    tokens, as the recipe splits long text."""
    body = max_seq_len - 2
    return [[cls_id, *token_ids[i:i + body], sep_id] for i in range(0, max(len(token_ids), 1), body)]


def keep_sequence(ids: list[int], unk_id: int | None) -> bool:
    return len(ids) >= MIN_TOKENS and (unk_id is None or ids.count(unk_id) / len(ids) < MAX_UNK_FRACTION)


def _training_sequences(texts: list[str], tokenizer, max_seq_len: int, wrap: tuple[int, int] | None = None,
                        for_arrow: bool = False) -> dict[str, list]:
    # The one tokenizing function, for a batch of documents: the task of a tokenizer process for a Table and
    # (for_arrow) the map function for a datasets.Dataset. Module level, not a closure: processes receive it by
    # pickling and datasets fingerprints it for its cache. For a Table, arrays of C ints hold a token in 4 bytes
    # where a list of Python ints takes 36: the difference between a large corpus fitting or not. datasets'
    # Arrow writer takes numpy arrays (it cannot read array.array).
    cls_id, sep_id = wrap if wrap is not None else (tokenizer.cls_token_id, tokenizer.sep_token_id)
    # A byte-level tokenizer (GPT-2's) names <|endoftext|> its unknown token, but never produces one.
    unk_id = tokenizer.unk_token_id if tokenizer.unk_token_id not in (cls_id, sep_id) else None
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    chunks = [c for ids in encoded for c in chunk_sequences(ids, max_seq_len, cls_id, sep_id)]
    kept = [c for c in chunks if keep_sequence(c, unk_id)]
    return {"input_ids": [np.array(c, dtype=np.int32) for c in kept] if for_arrow else
            [array.array("i", c) for c in kept]}


def tokenize_corpus(corpus, tokenizer, max_seq_len: int, num_proc: int | None = None,
                    wrap: tuple[int, int] | None = None):
    """One row per training sequence: `input_ids`, already chunked, wrapped in wrap = (first, last) token ids
    (default: the tokenizer's [CLS] and [SEP]) and filtered, in corpus order; with
    num_proc > 1, batches of documents are tokenized in that many processes, to the same result. For a Table
    a Table (each sequence an array.array of token ids); for a datasets.Dataset a datasets.Dataset (int32 ids),
    made by its `map`, which datasets caches: tokenizing the same corpus with the same tokenizer again reads
    the cache."""
    if max_seq_len < MIN_TOKENS or max_seq_len > tokenizer.model_max_length:
        raise ValueError(f"max_seq_len must be in [{MIN_TOKENS}, {tokenizer.model_max_length}], got {max_seq_len}")
    tokenize = functools.partial(_training_sequences, tokenizer=tokenizer, max_seq_len=max_seq_len, wrap=wrap,
                                 for_arrow=not isinstance(corpus, Table))
    num_proc = num_proc if num_proc is not None and num_proc > 1 else None
    if isinstance(corpus, Table):
        texts, ids = corpus["text"], []
        batches = [texts[i:i + TOKENIZE_BATCH] for i in range(0, len(texts), TOKENIZE_BATCH)]
        with contextlib.ExitStack() as stack:
            progress = stack.enter_context(tqdm(total=len(texts), desc="tokenizing", unit=" documents"))
            imap = stack.enter_context(multiprocessing.Pool(num_proc)).imap if num_proc else map
            for batch, tokenized in zip(batches, imap(tokenize, batches)):
                ids += tokenized["input_ids"]
                progress.update(len(batch))
        sequences = Table({"input_ids": ids})
    else:
        datasets = require_datasets("tokenizing a datasets.Dataset")
        features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
        sequences = corpus.map(tokenize, batched=True, batch_size=TOKENIZE_BATCH, input_columns="text",
                               remove_columns=corpus.column_names, features=features, num_proc=num_proc,
                               desc="tokenizing")
    if len(sequences) == 0:
        raise ValueError("dataset: no sequence of at least 12 tokens with < 50 % [UNK] in the corpus")
    return sequences


def masking_probabilities(sequences, vocab_size: int, special_ids: list[int], smoothing: float = 0.7
                          ) -> torch.Tensor:
    """[V] fp32 weights of choosing each token for MLM: max(count, 1)^-smoothing, 0 for special tokens. The
    sequences (a Table or a datasets.Dataset) are read COUNT_BATCH at a time."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for batch in sequences.iter(batch_size=COUNT_BATCH):
        ids = torch.tensor([i for seq in batch["input_ids"] for i in seq], dtype=torch.long)
        counts += torch.bincount(ids, minlength=vocab_size).double()
    probs = counts.clamp_min(1.0) ** -smoothing
    probs[list(special_ids)] = 0.0
    return probs.float()


def fingerprint(sequences) -> str:
    """SHA-256 of the sequences' token ids, in order (each sequence's length first): what tells whether two
    runs tokenized the same text the same way, read COUNT_BATCH sequences at a time."""
    digest = hashlib.sha256()
    for batch in sequences.iter(batch_size=COUNT_BATCH):
        for ids in batch["input_ids"]:
            digest.update(np.int64(len(ids)).tobytes() + np.asarray(ids, dtype=np.int32).tobytes())
    return digest.hexdigest()


def heldout_split(sequences, fraction: float, seed: int):
    """(train, held-out): a fixed random split of whole sequences, each of the input's kind (a datasets.Dataset
    selects by an indices mapping, copying nothing). It is exactly the split of datasets'
    train_test_split(test_size=fraction, seed=seed, shuffle=True), which earlier versions used, so that runs
    (and their recorded held-out figures) stay comparable."""
    if not 0 < fraction < 1:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    n_heldout = math.ceil(fraction * len(sequences))
    if n_heldout >= len(sequences):
        raise ValueError(f"held-out fraction {fraction} of {len(sequences)} sequences leaves none to train on; "
                         "use a smaller fraction or more data")
    order = np.random.default_rng(seed).permutation(len(sequences))
    return sequences.select(order[n_heldout:]), sequences.select(order[:n_heldout])


def seed_at(seed: int, *position: int) -> int:
    """A seed that depends only on the run's seed and a position in the data (epoch, batch, ...)."""
    state = seed
    for p in position:
        state = (state * 1_000_003 + p + 1) % (2**63 - 1)
    return state


def rng(seed: int, *position: int) -> torch.Generator:
    """A generator seeded by seed_at(seed, *position)."""
    return torch.Generator().manual_seed(seed_at(seed, *position))


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of sequence indices that share a length bucket of width 4, as the recipe's GroupedBatchSampler:
    indices in a random order (a function of seed and epoch) fill per-bucket buffers, a full buffer is a batch,
    and at the end the leftovers, in bucket order, are cut into batches."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    order = torch.randperm(len(lengths), generator=rng(seed, epoch)).tolist()
    bins = list(range(3, max(lengths, default=0) + BUCKET_WIDTH, BUCKET_WIDTH))
    buffers: dict[int, list[int]] = {}
    batches = []
    for i in order:
        bucket = bisect.bisect_right(bins, lengths[i])
        buffer = buffers.setdefault(bucket, [])
        buffer.append(i)
        if len(buffer) == batch_size:
            batches.append(buffer)
            buffers[bucket] = []
    leftovers = [i for bucket in sorted(buffers) for i in buffers[bucket]]
    batches += [leftovers[j:j + batch_size] for j in range(0, len(leftovers), batch_size)]
    return batches


def collate(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, L], attention_mask [B, L] bool), right-padded to the longest sequence."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq)
    lengths = torch.tensor([len(s) for s in sequences])
    return ids, torch.arange(longest) < lengths[:, None]


class DynamicMasker:
    """The recipe's prepare_batch_mlm: a fresh MLM mask for every batch."""

    def __init__(self, token_probs: torch.Tensor, mask_id: int, vocab_size: int, mlm_prob: float = 0.15):
        if not 0 < mlm_prob < 1:
            raise ValueError(f"mlm_prob must be in (0, 1), got {mlm_prob}")
        self.token_probs = token_probs
        self.mask_id = mask_id
        self.vocab_size = vocab_size
        self.mlm_prob = mlm_prob
        self.pred_probs = torch.tensor(MASK_KEEP_RANDOM)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input_ids, labels with -100 where a position is not a target)."""
        flat = input_ids.flatten()
        weights = self.token_probs[flat] * attention_mask.flatten()
        candidates = int((weights > 0).sum())
        n_targets = min(math.ceil(self.mlm_prob * int(attention_mask.sum())), candidates)
        pred_mask = torch.zeros_like(flat, dtype=torch.bool)
        if n_targets > 0:
            chosen = torch.multinomial(weights / weights.sum(), n_targets, replacement=False, generator=generator)
            pred_mask[chosen] = True
        real_ids = flat[pred_mask]
        action = torch.multinomial(self.pred_probs, len(real_ids), replacement=True, generator=generator)
        random_ids = torch.randint(self.vocab_size, real_ids.shape, generator=generator)
        new_ids = torch.where(action == 0, self.mask_id, torch.where(action == 1, real_ids, random_ids))
        masked = flat.clone()
        masked[pred_mask] = new_ids
        labels = torch.where(pred_mask, flat, -100)
        return masked.view_as(input_ids), labels.view_as(input_ids)


class CausalShift:
    """The original's causal-LM labels (prepare_batch_clm, then the shift in the loss): the label of position t is
    token t + 1, -100 where t + 1 is padding or past the end. The inputs stay as they are; the signature is the
    masker's, so that the loop does not tell the two apart."""

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels [B, L])."""
        labels = torch.full_like(input_ids, -100)
        labels[:, :-1] = torch.where(attention_mask[:, 1:].bool(), input_ids[:, 1:], -100)
        return input_ids, labels


def batches(sequences, batch_size: int, seed: int, epoch: int, pad_id: int
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) of each length-grouped batch of one epoch, in order."""
    lengths = [len(ids) for ids in sequences["input_ids"]]
    for indices in length_grouped_batches(lengths, batch_size, seed, epoch):
        yield collate(sequences[indices]["input_ids"], pad_id)
