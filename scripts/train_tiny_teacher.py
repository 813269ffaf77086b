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

import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from fastdistil.train import data

# tiny_pretraining.py lies beside this script: Python puts this folder on the path when the script runs, not when
# the tests load it by file.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_pretraining  # noqa: E402

HELDOUT_FRACTION = 0.02


def parse_args(argv=None):
    p = tiny_pretraining.parser(__doc__.split("\n\n")[0], hidden=128, layers=4)
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

    def loss_of(ids, mask, generator):
        masked, labels = masker(ids, mask, generator)
        hidden = model.bert(input_ids=masked, attention_mask=mask).last_hidden_state
        targets = labels != -100
        # The vocabulary projection of the masked positions only: all of [B, L, V] would be 500 MB a step.
        return torch.nn.functional.cross_entropy(model.cls(hidden[targets]), labels[targets])

    tiny_pretraining.pretrain(model, tokenizer, train, args, loss_of)
    tiny_pretraining.save(model, tokenizer, args.output_dir)


if __name__ == "__main__":
    main()
