"""An export's self-check: the exported file, loaded back from disk, against the PyTorch fp32 model it came from,
on held-out wiki-topic texts (the documents python -m fastdistil.evaluate never fine-tunes on), tokenized by the
model's tokenizer and padded per batch as a user's inputs are."""

import numpy as np
from tqdm.auto import tqdm

from fastdistil.evaluate import tasks
from fastdistil.evaluate.finetune import load_splits
from fastdistil.export.source import Source

SEED = 0  # which held-out texts: the same for every export, so exports compare on one set
BATCH_SIZE = 8  # a masked LM's logits are [batch, sequence, vocabulary]: 8 x 128 x 30,522 fp32 is 125 MB
# An fp32 export computes what PyTorch does, to rounding: its largest logit difference must stay below this
# fraction of the largest logit (at least 1). A wrong input order or a dropped attention mask costs O(1).
FP32_TOLERANCE = 1e-3


def heldout_texts(n: int) -> list[str]:
    """n texts of wiki-topic's held-out split, drawn with a fixed seed (the split comes sorted by topic)."""
    splits, _ = load_splits(tasks.get_task("wiki-topic"))
    texts = splits["test"]["text"]
    return [texts[i] for i in np.random.default_rng(SEED).permutation(len(texts))[:n].tolist()]


def batches(source: Source, n: int, max_len: int) -> list[dict[str, np.ndarray]]:
    """The inputs of n held-out texts, at most max_len tokens each, in batches padded to their longest."""
    texts = heldout_texts(n)
    lengths = [len(ids) for ids in source.tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]]
    texts = [texts[i] for i in np.argsort(lengths, kind="stable")]  # similar lengths share a batch: less padding
    padded = []
    for start in range(0, len(texts), BATCH_SIZE):
        encoded = source.tokenizer(texts[start:start + BATCH_SIZE], truncation=True, max_length=max_len,
                                   padding=True, return_tensors="np")
        padded.append({name: encoded[name] for name in source.input_names})
    return padded


def compare(source: Source, run, inputs: list[dict[str, np.ndarray]]) -> dict:
    """The export's logits (`run` of a batch) against the fp32 model's: the largest and mean absolute difference
    and how often both rank the same class (token, for a masked LM) first. A masked LM is compared at every real
    token; padding is left out."""
    reference_run = source.runner()
    max_diff = max_logit = diff_sum = 0.0
    agree = rows = elements = 0
    for batch in tqdm(inputs, desc="checking the export", leave=False):
        reference, exported = reference_run(batch), run(batch)
        if source.task == "fill-mask":
            real = batch["attention_mask"].astype(bool)
            reference, exported = reference[real], exported[real]
        diff = np.abs(exported - reference)
        max_diff, diff_sum = max(max_diff, float(diff.max())), diff_sum + float(diff.sum(dtype=np.float64))
        max_logit = max(max_logit, float(np.abs(reference).max()))
        agree += int((exported.argmax(-1) == reference.argmax(-1)).sum())
        rows, elements = rows + len(reference), elements + diff.size
    return {"inputs": "held-out wiki-topic texts", "examples": sum(len(b["input_ids"]) for b in inputs),
            "compared": "tokens" if source.task == "fill-mask" else "examples", "rows": rows,
            "max_len": max(b["input_ids"].shape[1] for b in inputs), "max_abs_logit_diff": max_diff,
            "mean_abs_logit_diff": diff_sum / elements, "max_abs_logit": max_logit,
            "top1_agreement": agree / rows}


def fp32_error(figures: dict) -> str | None:
    """Why an fp32 export's figures fail the check, or None when they pass."""
    bound = FP32_TOLERANCE * max(1.0, figures["max_abs_logit"])
    if figures["max_abs_logit_diff"] <= bound:
        return None
    return (f"the export's logits differ from PyTorch's by up to {figures['max_abs_logit_diff']:.3g} on "
            f"{figures['examples']} held-out texts (allowed: {bound:.3g}); nothing was written")
