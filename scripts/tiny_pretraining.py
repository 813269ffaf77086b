"""What the scripts that pretrain fastdistil's built-in teachers share: their common flags, the training loop
(AdamW, linear warm-up and decay, length-grouped batches from the trainer's data pipeline) and saving in fp16."""

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from fastdistil.train import data


def parser(description: str, hidden: int, layers: int) -> argparse.ArgumentParser:
    """The flags of every pretraining script, with the model's default width and depth."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", type=Path, help="continue pretraining this saved teacher (a second stage)")
    p.add_argument("--save-every", type=int, default=0, help="also save to OUTPUT_DIR/step-N every N steps")
    return p


def pretrain(model, tokenizer, train, args, loss_of, after_step=None) -> None:
    """args.steps optimizer steps on length-grouped batches of the `train` sequences, epoch after epoch in the
    order args.seed gives. loss_of(input_ids, attention_mask, generator) is a batch's loss, the generator seeded
    by the batch's position, for whatever the loss draws at random (masks). Every 100 steps a JSON line of the
    loss; after_step(step), if given, after each step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (args.steps - s) / (args.steps - warmup))))
    step, epoch, start = 0, 0, time.time()
    model.train()
    while step < args.steps:
        for batch_index, (ids, mask) in enumerate(data.batches(train, args.batch_size, args.seed, epoch,
                                                                tokenizer.pad_token_id)):
            loss = loss_of(ids, mask, data.rng(args.seed, epoch, batch_index))
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
            if after_step is not None:
                after_step(step)
            if step == args.steps:
                break
        epoch += 1


def save(model, tokenizer, directory: Path) -> None:
    """fp16 weights (half the size; the trainer loads them back in fp32) and the tokenizer. A copy is cast, so
    that saving mid-run leaves the training weights untouched."""
    directory.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).to(torch.float16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    print(f"saved to {directory}", flush=True)
