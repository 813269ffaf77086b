"""Pretrains the small GPT-2 causal LM that fastdistil ships as its built-in causal teacher.

    OMP_NUM_THREADS=1 python scripts/train_tiny_gpt2.py --bf16 --steps 1200 --eval-every 200 --save-every 400 \
        --output-dir runs/tiny-gpt2-stage1

made the shipped teacher (copied, less its step-N saves, to fastdistil/assets/tiny-gpt2-teacher; its record:
pretraining.json there), a 6-layer, 256-wide GPT2LMHeadModel with a byte-level BPE vocabulary of 4,096 tokens,
both trained from scratch on the bundled Wikipedia sample. One thread, because the 2 cores were shared: two
threads that wait for each other on busy cores ran 4x slower.

- The tokenizer is GPT-2's kind: every byte a token, so nothing is unknown, and <|endoftext|> as bos, eos, unk
  and pad (the attention mask hides padding). It is trained on the whole corpus: the held-out split is one of
  tokenized sequences, which exist only once there is a tokenizer. What that leaks is immaterial: text held out
  from a tokenizer's training costs it 0.2-0.4 % more tokens than text it saw (measured on random 2 % document
  splits).
- The LM learns with causal LM on the trainer's sequences (each chunk of a document wrapped in <|endoftext|> ...
  <|endoftext|>, max_seq_len tokens at most) less the trainer's default held-out split (TrainConfig's
  heldout_fraction and seed, not this script's --seed): the held-out figures of a default distillation run are
  then on text the teacher never learned from. Its held-out perplexity (per predicted token, padding excluded)
  is logged every --eval-every steps and recorded.

The output is a `save_pretrained` directory (safetensors, fp16 to stay small) with the tokenizer and
pretraining.json beside it: the command lines of every stage (--init-from continues a saved teacher), their
held-out curves, and the held-out perplexity of the saved fp16 weights as the trainer loads them (in fp32).
"""

import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

from fastdistil.train import data
from fastdistil.train.config import TrainConfig

# tiny_pretraining.py lies beside this script: Python puts this folder on the path when the script runs, not when
# the tests load it by file.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_pretraining  # noqa: E402

EOS = "<|endoftext|>"
RECORD = "pretraining.json"
TRAINER_DEFAULTS = TrainConfig()
EVAL_BATCH = 64


def parse_args(argv=None):
    p = tiny_pretraining.parser(__doc__.split("\n\n")[0], hidden=256, layers=6)
    p.add_argument("--vocab-size", type=int, default=4096, help="of the tokenizer trained in a first stage")
    p.add_argument("--eval-every", type=int, default=200, help="steps between held-out perplexities")
    p.add_argument("--bf16", action="store_true",
                   help="autocast the forward to bf16 (fast on CPUs with AMX); weights and optimizer stay fp32")
    return p.parse_args(argv)


def train_tokenizer(texts: list[str], vocab_size: int, max_seq_len: int) -> GPT2Tokenizer:
    """A byte-level BPE tokenizer trained on the texts, as GPT-2's was built (module docstring)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    trained = json.loads(bpe.to_str())["model"]
    return GPT2Tokenizer(vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]], pad_token=EOS,
                         model_max_length=max_seq_len)


def split(tokenizer, max_seq_len: int):
    """(train, held-out) sequences of the bundled corpus, as a default run of the trainer has them."""
    sequences = data.tokenize_corpus(data.load_corpus(), tokenizer, max_seq_len,
                                     wrap=(tokenizer.eos_token_id, tokenizer.eos_token_id))
    return data.heldout_split(sequences, TRAINER_DEFAULTS.heldout_fraction, TRAINER_DEFAULTS.seed)


def heldout_perplexity(model, heldout, pad_id: int) -> float:
    """exp(mean NLL) of every next token of the held-out sequences (the first token of each is given), in fp32."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in data.batches(heldout, EVAL_BATCH, 0, 0, pad_id):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
            nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            count += int(mask[:, 1:].sum())
    model.train(was_training)
    return math.exp(nll / count)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.init_from:
        tokenizer = AutoTokenizer.from_pretrained(args.init_from)
        model = GPT2LMHeadModel.from_pretrained(args.init_from).float()
    else:
        tokenizer = train_tokenizer(data.load_corpus()["text"], args.vocab_size, args.max_seq_len)
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tokenizer), n_positions=args.max_seq_len, n_embd=args.hidden, n_layer=args.layers,
            n_head=args.heads, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    train, heldout = split(tokenizer, args.max_seq_len)

    def loss_of(ids, mask, _generator):
        with torch.autocast("cpu", torch.bfloat16, enabled=args.bf16):
            return model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(~mask, -100)).loss

    curve = []

    def evaluate(step):
        if step % args.eval_every == 0 or step == args.steps:
            curve.append([step, round(heldout_perplexity(model, heldout, tokenizer.pad_token_id), 2)])
            print(json.dumps({"step": step, "heldout_ppl": curve[-1][1]}), flush=True)

    start = time.time()
    tiny_pretraining.pretrain(model, tokenizer, train, args, loss_of, evaluate)
    wall = time.time() - start
    tiny_pretraining.save(model, tokenizer, args.output_dir)
    saved = GPT2LMHeadModel.from_pretrained(args.output_dir).float()
    # A stage continuing one saved mid-run (OUTPUT_DIR/step-N) has no record to continue.
    earlier = args.init_from / RECORD if args.init_from else None
    stages = json.loads(earlier.read_text())["stages"] if earlier and earlier.exists() else []
    record = {
        "stages": [*stages, {"command": shlex.join(["python", "scripts/train_tiny_gpt2.py", *argv]),
                             "steps": args.steps, "threads": torch.get_num_threads(), "wall_s": round(wall),
                             "heldout_ppl": curve}],
        "heldout": {"fraction": TRAINER_DEFAULTS.heldout_fraction, "seed": TRAINER_DEFAULTS.seed,
                    "max_seq_len": args.max_seq_len, "sequences": len(heldout),
                    "predicted_tokens": sum(len(s) - 1 for s in heldout["input_ids"])},
        "heldout_ppl": round(heldout_perplexity(saved, heldout, tokenizer.pad_token_id), 2),
    }
    (args.output_dir / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"saved_heldout_ppl": record["heldout_ppl"]}), flush=True)


if __name__ == "__main__":
    main()
