"""Text in, masked batches out: the DistilBERT data pipeline.

- A corpus: the bundled Wikipedia sample (default), local .txt (one document a line) or .jsonl files or
  folders of them, or a Hugging Face dataset.
- Tokenized with `datasets.map` (cached). Long documents are split into chunks of at most max_seq_len tokens,
  each wrapped in [CLS] ... [SEP]. Sequences of 11 tokens or fewer, and those at least half [UNK], are dropped.
- Masking probabilities from token counts: count^-smoothing, zero for special tokens.
- Dynamic masking, fresh for every batch. 15 % of the batch's real tokens are drawn without replacement
  across the whole batch, with those probabilities. Of them, 80 % become [MASK], 10 % stay, and 10 % become a
  random token.
- Batches grouped by length (buckets of width 4) to cut padding.

Every random choice comes from a generator seeded by the run's seed and the position in the data (epoch,
batch index), so a run is reproducible and can resume anywhere.
"""

import bisect
import math
from collections.abc import Iterator
from pathlib import Path

import datasets
import torch

DATA_DIR = Path(__file__).resolve().parent / "data"
BUNDLED_CORPUS = DATA_DIR / "wiki_vital_en.jsonl.gz"
BUNDLED_TOKENIZER = DATA_DIR / "bert-base-uncased-tokenizer"
DEFAULT_DATASET = "wiki-vital"

MIN_TOKENS = 12  # the recipe drops sequences of <= 11 tokens, [CLS] and [SEP] included
MAX_UNK_FRACTION = 0.5
BUCKET_WIDTH = 4
MASK_KEEP_RANDOM = (0.8, 0.1, 0.1)


def _local_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    usable = [p for p in files if p.name.endswith((".txt", ".jsonl", ".jsonl.gz", ".json"))]
    if not usable:
        raise ValueError(f"dataset: no .txt or .jsonl files in {path}")
    return usable


def load_corpus(dataset: str = DEFAULT_DATASET, dataset_config: str | None = None, split: str = "train",
                text_column: str = "text", streaming: bool = False, max_documents: int | None = None
                ) -> datasets.Dataset:
    """The corpus as a datasets.Dataset with one column, `text`, and no empty documents.

    `dataset` is "wiki-vital" (the bundled sample), a local file or folder, or a Hugging Face dataset name.
    `max_documents` keeps the first documents only. With `streaming`, documents are read one by one and only
    those first `max_documents` are ever downloaded: the way to distill on a slice of a corpus too large to
    fetch whole.
    """
    if streaming and not max_documents:
        raise ValueError("streaming needs max_documents: the number of documents to read from the stream")
    if max_documents is not None and max_documents <= 0:
        raise ValueError(f"max_documents must be > 0, got {max_documents}")
    path = Path(dataset)
    if dataset == DEFAULT_DATASET:
        args, kwargs = ("json",), {"data_files": str(BUNDLED_CORPUS)}
    elif path.exists():
        files = _local_files(path)
        kinds = {"text" if f.suffix == ".txt" else "json" for f in files}
        if len(kinds) > 1:
            raise ValueError(f"dataset: {path} mixes .txt and .jsonl files; use one kind")
        args, kwargs = (kinds.pop(),), {"data_files": [str(f) for f in files]}
    else:
        args, kwargs = (dataset, dataset_config), {}
    split = "train" if kwargs else split
    corpus = datasets.load_dataset(*args, split=split, streaming=streaming, **kwargs)
    columns = corpus.column_names if corpus.column_names is not None else list(next(iter(corpus)))
    if text_column not in columns:
        raise ValueError(f"dataset: {dataset} has no column {text_column!r} (columns: {columns}); "
                         "pass --text-column")
    if streaming:
        corpus = datasets.Dataset.from_list([{text_column: row[text_column]} for row in corpus.take(max_documents)])
    elif max_documents is not None:
        corpus = corpus.select(range(min(max_documents, len(corpus))))
    corpus = corpus.select_columns([text_column])
    if text_column != "text":
        corpus = corpus.rename_column(text_column, "text")
    corpus = corpus.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
    if len(corpus) == 0:
        raise ValueError(f"dataset: {dataset} has no non-empty documents")
    return corpus


def chunk_sequences(token_ids: list[int], max_seq_len: int, cls_id: int, sep_id: int) -> list[list[int]]:
    """[CLS] chunk [SEP] for consecutive chunks of max_seq_len - 2 tokens, as the recipe splits long text."""
    body = max_seq_len - 2
    return [[cls_id, *token_ids[i:i + body], sep_id] for i in range(0, max(len(token_ids), 1), body)]


def keep_sequence(ids: list[int], unk_id: int) -> bool:
    return len(ids) >= MIN_TOKENS and ids.count(unk_id) / len(ids) < MAX_UNK_FRACTION


def tokenize_corpus(corpus: datasets.Dataset, tokenizer, max_seq_len: int, num_proc: int | None = None
                    ) -> datasets.Dataset:
    """One row per training sequence: `input_ids`, already chunked, wrapped and filtered."""
    if max_seq_len < MIN_TOKENS or max_seq_len > tokenizer.model_max_length:
        raise ValueError(f"max_seq_len must be in [{MIN_TOKENS}, {tokenizer.model_max_length}], got {max_seq_len}")
    cls_id, sep_id, unk_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id

    def tokenize(batch):
        encoded = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        chunks = [c for ids in encoded for c in chunk_sequences(ids, max_seq_len, cls_id, sep_id)]
        return {"input_ids": [c for c in chunks if keep_sequence(c, unk_id)]}

    tokenized = corpus.map(tokenize, batched=True, remove_columns=corpus.column_names, num_proc=num_proc,
                           desc="tokenizing")
    if len(tokenized) == 0:
        raise ValueError("dataset: no sequence of at least 12 tokens with < 50 % [UNK] in the corpus")
    return tokenized


def masking_probabilities(sequences: datasets.Dataset, vocab_size: int, special_ids: list[int],
                          smoothing: float = 0.7) -> torch.Tensor:
    """[V] fp32 weights of choosing each token for MLM: max(count, 1)^-smoothing, 0 for special tokens."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for batch in sequences.iter(batch_size=4096):
        ids = torch.tensor([i for seq in batch["input_ids"] for i in seq])
        counts += torch.bincount(ids, minlength=vocab_size).double()
    probs = counts.clamp_min(1.0) ** -smoothing
    probs[list(special_ids)] = 0.0
    return probs.float()


def heldout_split(sequences: datasets.Dataset, fraction: float, seed: int
                  ) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, held-out): a fixed random split of whole sequences."""
    if not 0 < fraction < 1:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    split = sequences.train_test_split(test_size=fraction, seed=seed, shuffle=True)
    return split["train"], split["test"]


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


def batches(sequences: datasets.Dataset, batch_size: int, seed: int, epoch: int, pad_id: int
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) of each length-grouped batch of one epoch, in order."""
    lengths = [len(ids) for ids in sequences["input_ids"]]
    for indices in length_grouped_batches(lengths, batch_size, seed, epoch):
        yield collate(sequences[indices]["input_ids"], pad_id)
