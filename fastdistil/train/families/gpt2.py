"""GPT-2 -> a shallower GPT-2 (DistilGPT2), as the original code builds it (scripts/extract.py), trained as a
causal LM.

The student is a GPT2LMHeadModel with the teacher's config and fewer layers. It copies the token and position
embeddings, the chosen blocks and the final LayerNorm; the LM head is the token embedding matrix, tied as in
the teacher, without a bias. GPT-2's head has no transform, so vocab_transform changes nothing here.
"""

from collections.abc import Sequence

import torch
from transformers import GPT2LMHeadModel

from fastdistil.train.families.base import Family, SpecialIds, layer_mapping

# Within one block: the same sublayers in teacher and student.
_BLOCK_PARTS = {part: part for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")}


class GPT2Family(Family):
    name = "gpt2"
    model_types = ("gpt2",)
    causal = True
    teacher_class = GPT2LMHeadModel
    student_class = GPT2LMHeadModel
    teacher_kind = "a GPT-2 causal LM (GPT2LMHeadModel)"
    # <|endoftext|> is GPT-2's bos and eos, and wraps each chunk as in the original's binarized_data.py. GPT-2
    # has no padding token; the eos pads (the attention mask hides it), as the original pads its CLM batches.
    special_tokens = SpecialIds(first=("bos", "eos"), last=("eos", "bos"), pad=("pad", "eos"), mask=())
    position_embeddings = "transformer.wpe.weight"
    token_type_embeddings = None

    def check_teacher(self, teacher: GPT2LMHeadModel) -> None:
        super().check_teacher(teacher)
        if teacher.config.scale_attn_by_inverse_layer_idx:
            raise ValueError("teacher scale_attn_by_inverse_layer_idx must be False for a GPT-2 student: it "
                             "scales each block's attention by its depth, which changes when a block is copied to "
                             "another depth")

    def weight_mapping(self, student_layers: Sequence[int], vocab_transform: bool = True) -> dict[str, str]:
        names = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                 "transformer.ln_f.bias"]
        return {name: name for name in names} | layer_mapping(student_layers, "transformer.h", "transformer.h",
                                                              _BLOCK_PARTS)

    def projection(self, model: GPT2LMHeadModel) -> torch.nn.Linear:
        self.check_model(model)
        return model.lm_head

    def projection_inputs(self, model: GPT2LMHeadModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        # The original passes GPT-2 no attention mask: with right padding, causal attention alone keeps each
        # real token from the padding after it, so real rows come out the same. The mask keeps them right
        # under any other padding too, as far as attention goes: positions count from column 0 whatever the
        # mask, so batches must be right-padded all the same. No cache: training never decodes.
        self.check_model(model)
        hidden = model.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                   use_cache=False).last_hidden_state
        return hidden, hidden  # last_hidden_state is after ln_f: the LM head's input itself


GPT2 = GPT2Family()
