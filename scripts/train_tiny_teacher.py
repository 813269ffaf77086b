"""Pretrains the small BERT masked LM that fastdistil ships as its built-in teacher.

    python scripts/train_tiny_teacher.py --steps 1500 --output-dir stage1
    python scripts/train_tiny_teacher.py --init-from stage1 --steps 2000 --lr 2e-3 --output-dir stage2
    python scripts/train_tiny_teacher.py --init-from stage2 --steps 3000 --lr 1e-3 --mlm-smoothing 0.7 \
        --output-dir fastdistil/assets/tiny-bert-teacher

A 4-layer, 128-wide BERT with the bert-base-uncased vocabulary, trained with masked-LM on the bundled
Wikipedia sample (the same chunking and dynamic masking as distillation, held-out split excluded): first
masking uniformly as BERT did, then, in the last stage, favouring rare tokens as distillation masks, so that
the teacher is good at the positions its student learns from. The output is a `save_pretrained` directory
(safetensors, fp16 to stay small) with the tokenizer beside it.
"""

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from fastdistil.train import data

HELDOUT_FRACTION = 0.02


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", type=Path, help="continue pretraining this saved teacher (a second stage)")
    p.add_argument("--save-every", type=int, default=0, help="also save to OUTPUT_DIR/step-N every N steps")
    p.add_argument("--mlm-smoothing", type=float, default=0.0,
                   help="mask tokens with probability ∝ count^-s: 0 masks uniformly as BERT did, 0.7 as distillation")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(data.BUNDLED_TOKENIZER)
    sequences = data.tokenize_corpus(data.load_corpus(), tokenizer, args.max_seq_len)
    train, _ = data.heldout_split(sequences, HELDOUT_FRACTION, args.seed)
    probs = data.masking_probabilities(train, tokenizer.vocab_size, tokenizer.all_special_ids, args.mlm_smoothing)
    masker = data.DynamicMasker(probs, tokenizer.mask_token_id, tokenizer.vocab_size)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                        max_position_embeddings=args.max_seq_len, pad_token_id=tokenizer.pad_token_id)
    model = BertForMaskedLM.from_pretrained(args.init_from).float() if args.init_from else BertForMaskedLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (args.steps - s) / (args.steps - warmup))))
    step, epoch, start = 0, 0, time.time()
    model.train()
    while step < args.steps:
        for batch_index, (ids, mask) in enumerate(data.batches(train, args.batch_size, args.seed, epoch,
                                                                tokenizer.pad_token_id)):
            masked, labels = masker(ids, mask, data.rng(args.seed, epoch, batch_index))
            hidden = model.bert(input_ids=masked, attention_mask=mask).last_hidden_state
            targets = labels != -100
            # The vocabulary projection of the masked positions only: all of [B, L, V] would be 500 MB a step.
            loss = torch.nn.functional.cross_entropy(model.cls(hidden[targets]), labels[targets])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            step += 1
            if step % 100 == 0 or step == args.steps:
                print(json.dumps({"step": step, "loss": round(loss.item(), 4), "ppl": round(math.exp(loss.item()), 1),
                                  "elapsed_s": round(time.time() - start)}), flush=True)
            if args.save_every and step % args.save_every == 0 and step < args.steps:
                save(model, tokenizer, args.output_dir / f"step-{step}")
            if step == args.steps:
                break
        epoch += 1
    save(model, tokenizer, args.output_dir)


def save(model, tokenizer, directory: Path) -> None:
    """fp16 weights (half the size; the trainer loads them back in fp32) and the tokenizer. A copy is cast, so
    that saving mid-run leaves the training weights untouched."""
    directory.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).to(torch.float16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    print(f"saved to {directory}", flush=True)


if __name__ == "__main__":
    main()
