"""Inputs, float64 ground truth and dtype-keyed comparisons shared by the triple-loss tests; tiny teachers and
tokenizers of each model family."""

import functools
import math

import torch

import fastdistil
from fastdistil import TripleLossArgs, TripleLossOutput

# fp32 kernel against a float64 reference: error relative to the largest reference magnitude, so that the
# many near-zero gradient entries of a 30k vocabulary do not need a per-element rtol.
FP32_LOSS_RTOL = 1e-5
FP32_GRAD_RTOL = 1e-5
# In fp16/bf16 the kernel's error may be at most this times PyTorch's error at the same dtype (the
# flash-attention rule), plus a floor at fp32 level: both compute in fp32, so their loss errors can be tiny.
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_FLOOR = 2e-6

# torch.amp.GradScaler's initial scale: the grad_output of loss.backward() in fp16 training.
LOSS_SCALE = 2.0**16
FP16_SUBNORMAL = 2.0**-24  # fp16's smallest subnormal, the spacing of its values below 2^-14

TERMS = TripleLossOutput._fields
GRADS = ("grad_student_logits", "grad_student_hidden")
TENSORS = tuple(name for name, kind in TripleLossArgs.__annotations__.items() if kind is torch.Tensor)


def make_inputs(lead=(41,), vocab=1001, dim=48, dtype=torch.float32, teacher_dtype=None, seed=0,
                pad_frac=0.25, label_frac=0.15, labels_on_padding=False, mask_dtype=torch.bool,
                logit_std=3.0):
    """A TripleLossArgs of the six tensors, the student ones as grad leaves, and the default scalars.

    [B, L] leads get right padding of random length (what a tokenizer produces), [N] leads random padding.
    The teacher is correlated with the student, as after initialization from it, so the KL is not dominated
    by two unrelated distributions.
    """
    teacher_dtype = teacher_dtype or dtype
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*lead, vocab, generator=g) * logit_std
    t = 0.6 * s + 0.8 * logit_std * torch.randn(*lead, vocab, generator=g)
    hs = torch.randn(*lead, dim, generator=g)
    ht = 0.5 * hs + torch.randn(*lead, dim, generator=g)
    n = math.prod(lead)
    if len(lead) == 2 and lead[1] > 0:
        lengths = torch.randint(1, lead[1] + 1, (lead[0],), generator=g)
        lengths = torch.where(torch.rand(lead[0], generator=g) < pad_frac, lengths, lead[1])
        real = torch.arange(lead[1]).expand(*lead) < lengths[:, None]
    else:
        real = (torch.rand(n, generator=g) >= pad_frac).reshape(lead)
    candidates = torch.ones(n, dtype=torch.bool) if labels_on_padding else real.reshape(-1)
    pool = candidates.nonzero().flatten()
    n_labels = min(len(pool), max(1, round(label_frac * len(pool)))) if label_frac > 0 else 0
    chosen = pool[torch.randperm(len(pool), generator=g)[:n_labels]]
    labels = torch.full((n,), -100, dtype=torch.long)
    labels[chosen] = torch.randint(0, vocab, (n_labels,), generator=g)
    return TripleLossArgs(
        student_logits=s.to(dtype).requires_grad_(),
        teacher_logits=t.to(teacher_dtype),
        labels=labels.reshape(lead),
        student_hidden=hs.to(dtype).requires_grad_(),
        teacher_hidden=ht.to(teacher_dtype),
        attention_mask=real.to(mask_dtype),
    )


def tensors(inputs):
    """The six tensors of a TripleLossArgs, for a callee that holds the scalars itself."""
    return tuple(getattr(inputs, name) for name in TENSORS)


def map_tensors(fn, inputs):
    """inputs with fn applied to each of its six tensors, the scalars kept."""
    return inputs._replace(**{name: fn(x) for name, x in zip(TENSORS, tensors(inputs))})


def on_device(inputs, device):
    """inputs moved to device, the student tensors as grad leaves there."""
    return map_tensors(lambda x: x.detach().to(device).requires_grad_(x.requires_grad), inputs)


def loss_and_grads(fn, inputs, grad_output=1.7, **kwargs):
    """(the four detached loss terms, (d/d student_logits, d/d student_hidden)) of grad_output * loss, with
    kwargs replacing inputs' scalars."""
    out = fn(*inputs._replace(**kwargs))
    grads = torch.autograd.grad(out.loss, (inputs.student_logits, inputs.student_hidden),
                                grad_outputs=torch.tensor(grad_output, dtype=out.loss.dtype))
    return TripleLossOutput(*(x.detach() for x in out)), grads


def upcast(inputs, dtype=torch.float64):
    """The same (already rounded) values in a wider dtype, student tensors as fresh grad leaves."""
    out = map_tensors(lambda x: x.detach().to(dtype) if x.is_floating_point() else x, inputs)
    out.student_logits.requires_grad_()
    out.student_hidden.requires_grad_()
    return out


def reference64(inputs, grad_output=1.7, **kwargs):
    return loss_and_grads(fastdistil.triple_loss_reference, upcast(inputs), grad_output, **kwargs)


def _errors(actual, expected):
    err = (actual.double() - expected.double()).abs()
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    return (err.max().item() if err.numel() else 0.0), scale


def assert_close(actual, expected, rtol, name):
    """max |actual - expected| <= rtol * max |expected|, where a loss term's scale is at least 1: 1 - cos of
    nearly parallel vectors is ~1e-12 in float64 but only ~1e-8 in any fp32 computation."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err, scale = _errors(actual, expected)
    if expected.dim() == 0:
        scale = max(scale, 1.0)
    assert err <= rtol * scale, (
        f"{name}: max abs error {err:.3e}, max rel error {err / max(scale, 1e-300):.3e} "
        f"(allowed {rtol:.1e} of max |expected| = {scale:.3e})")


def assert_within_pytorch_error(actual, pytorch, truth, name, floor=LOW_PRECISION_FLOOR, slack=0.0):
    """The flash-attention rule: actual's error against truth <= 2x PyTorch's own error + a small floor (relative
    to truth's scale) + slack (absolute)."""
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err, scale = _errors(actual, truth)
    err_pt, _ = _errors(pytorch, truth)
    allowed = LOW_PRECISION_FACTOR * err_pt + floor * max(scale, 1.0 if actual.dim() == 0 else 0) + slack
    assert err <= allowed, (
        f"{name}: max abs error {err:.3e} (rel {err / max(scale, 1e-300):.3e}) vs PyTorch's {err_pt:.3e} at "
        f"the same dtype; allowed {allowed:.3e}")


def check_against_reference(fn, inputs, grad_output=1.7, **kwargs):
    """Loss terms and both gradients of fn against the float64 reference, with the student dtype's rule.

    fp32: within FP32_*_RTOL of the largest magnitude, or else (cancellation: the cosine gradient of nearly
    parallel vectors is ~1e-13 in float64 and ~1e-8 in fp32) within the 2x rule against PyTorch in fp32.
    """
    terms, grads = loss_and_grads(fn, inputs, grad_output, **kwargs)
    terms64, grads64 = reference64(inputs, grad_output, **kwargs)
    for name, term in zip(TERMS, terms):
        assert term.dtype == torch.float32 and term.dim() == 0, f"{name}: {term.dtype}, shape {term.shape}"
    for grad, x in zip(grads, (inputs.student_logits, inputs.student_hidden)):
        assert grad.dtype == x.dtype and grad.shape == x.shape, f"grad {grad.dtype} {grad.shape} of {x.dtype}"
    names = TERMS + GRADS
    pytorch = None
    for i, (name, a, e) in enumerate(zip(names, terms + grads, terms64 + grads64)):
        if inputs.student_logits.dtype == torch.float32:
            try:
                assert_close(a, e, FP32_LOSS_RTOL if a.dim() == 0 else FP32_GRAD_RTOL, name)
                continue
            except AssertionError:
                floor = 0.0
        else:
            floor = LOW_PRECISION_FLOOR
        if pytorch is None:
            pytorch = sum(loss_and_grads(fastdistil.triple_loss_reference, inputs, grad_output, **kwargs), ())
        slack = _cosine_cancellation(inputs, grad_output, **kwargs) if name == "grad_student_hidden" else 0.0
        assert_within_pytorch_error(a, pytorch[i], e, name, floor, slack)
    return terms, grads


def _cosine_cancellation(inputs, grad_output, alpha_cos=1.0, **_):
    """The fp32 rounding of the cosine gradient's two summands, t / (|s| |t|) and cos s / |s|^2, each up to
    grad_output * alpha_cos / (rows * |s|) an entry: when they cancel (parallel rows, or D = 1, where the
    gradient is 0), what is left is their rounding, which PyTorch's own fp32 may happen to round to 0."""
    rows = inputs.attention_mask.bool()
    if not rows.any():
        return 0.0
    norms = inputs.student_hidden.detach().double()[rows].norm(dim=-1)
    summand = abs(grad_output * alpha_cos) / (int(rows.sum()) * norms.min().item())
    return 8 * torch.finfo(torch.float32).eps * summand


def fp16_storage_floor(args):
    """The subnormal spacing of an fp16 logits gradient stored times P (kernels/gradient_scale.py, here from its
    closed form) and scaled by LOSS_SCALE in backward: FP16_SUBNORMAL, or LOSS_SCALE / P times it when P is the
    smaller (few rows: the largest possible entry then exceeds fp16's range at this loss scale)."""
    labelled = args.labels != -100
    n_sel = int((labelled if args.restrict_ce_to_mask else args.attention_mask.bool()).sum())
    n_lab = int(labelled.sum())
    bound = (args.alpha_ce * args.temperature / n_sel if n_sel else 0.0) + (args.alpha_mlm / n_lab if n_lab else 0.0)
    scale = 2.0 ** math.floor(math.log2(2.0**15 / bound))
    return FP16_SUBNORMAL * max(1.0, LOSS_SCALE / scale)


def check_fp16_under_loss_scale(fn, inputs, **kwargs):
    """fp16 gradients backpropagated from LOSS_SCALE * loss, as a GradScaler does, element by element against
    the float64 reference: each entry within two fp16 roundings of the exact value (the op rounds once in the
    forward and once more applying the scale), plus twice the fp32 arithmetic error there of the unfused
    reference and of fn itself (fn on the same values in fp32: q - p cancels in the KL gradient's small
    entries), down to the spacing of fp16's subnormals (fp16_storage_floor). The inputs must hold entries that
    fp16 represents after the scale but not before, which a gradient rounded before the scale returns as 0: an
    error of 100 %."""
    unit_roundoff = torch.finfo(torch.float16).eps / 2
    _, grads = loss_and_grads(fn, inputs, LOSS_SCALE, **kwargs)
    _, grads32 = loss_and_grads(fn, upcast(inputs, torch.float32), LOSS_SCALE, **kwargs)
    _, grads_pt = loss_and_grads(fastdistil.triple_loss_reference, inputs, LOSS_SCALE, **kwargs)
    _, grads64 = reference64(inputs, LOSS_SCALE, **kwargs)
    floors = (fp16_storage_floor(inputs._replace(**kwargs)), FP16_SUBNORMAL)  # the hidden one is fp32
    for name, grad, fp32, pytorch, exact, floor in zip(GRADS, grads, grads32, grads_pt, grads64, floors):
        assert grad.dtype == torch.float16, f"{name}: {grad.dtype}"
        represented = exact.abs() >= 2**-14  # normal fp16 values
        assert not ((pytorch == 0) & represented).any(), f"{name}: the reference itself lost entries"
        arithmetic = torch.maximum((pytorch.double() - exact).abs(), (fp32.double() - exact).abs())
        bound = 2 * unit_roundoff * exact.abs() + 2 * arithmetic + floor
        worst = ((grad.double() - exact).abs() / bound).max().item()
        lost = ((grad == 0) & represented).sum().item()
        assert worst <= 1.0, (f"{name}: error reaches {worst:.2f}x the bound under a loss scale of "
                              f"{LOSS_SCALE:g}; {lost} entries that fp16 holds after the scale came back 0")
    underflow_unscaled = (grads64[0].abs() / LOSS_SCALE < FP16_SUBNORMAL / 2) & (grads64[0].abs() >= 2**-14)
    assert underflow_unscaled.any(), "no logits-gradient entry that rounding before the scale would lose"


# The tiny models' vocabulary: byte-level BPE needs its 256 bytes and the special tokens before any merge.
TINY_VOCAB = 320
TINY_POSITIONS = 40  # the longest sequence every tiny teacher takes (max_positions)
_BYTE_LEVEL_SPECIALS = {"roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "gpt2": ["<|endoftext|>"]}


@functools.cache
def byte_level_tokenizer(kind: str, vocab_size: int = TINY_VOCAB):
    """A RoBERTa-style (kind "roberta": <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4, the ids RobertaConfig
    expects) or GPT-2-style (kind "gpt2": <|endoftext|>=0) byte-level BPE tokenizer trained on 300 documents of
    the bundled corpus. Built once per session and shared: copy.deepcopy it before changing it."""
    # Imported on use: the op tests import this module too and need neither transformers nor tokenizers.
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast, RobertaTokenizerFast

    from fastdistil.train import data

    if kind not in _BYTE_LEVEL_SPECIALS:
        raise ValueError(f"kind must be one of {sorted(_BYTE_LEVEL_SPECIALS)}, got {kind!r}")
    specials = _BYTE_LEVEL_SPECIALS[kind]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(data.load_corpus(max_documents=300)["text"], vocab_size=vocab_size, min_frequency=2,
                            special_tokens=specials, show_progress=False)
    if kind == "roberta":
        return RobertaTokenizerFast(tokenizer_object=bpe, bos_token="<s>", cls_token="<s>", eos_token="</s>",
                                    sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    (endoftext,) = specials
    return GPT2TokenizerFast(tokenizer_object=bpe, bos_token=endoftext, eos_token=endoftext, unk_token=endoftext)


def tiny_teacher(family: str, n_layers: int = 4, vocab_size: int = TINY_VOCAB, seed: int = 0):
    """A random tiny teacher of a family ("bert", "roberta", "gpt2"), hidden size 32, 4 heads, TINY_POSITIONS
    positions, in eval mode; its special-token ids are byte_level_tokenizer(family)'s."""
    from transformers import (BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, RobertaConfig,
                              RobertaForMaskedLM)

    torch.manual_seed(seed)
    shape = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4)
    if family == "bert":
        return BertForMaskedLM(BertConfig(**shape, intermediate_size=64,
                                          max_position_embeddings=TINY_POSITIONS)).eval()
    if family == "roberta":
        # Positions start after the padding id, as in roberta-base (514 = 512 + pad_token_id 1 + 1).
        config = RobertaConfig(**shape, intermediate_size=64, max_position_embeddings=TINY_POSITIONS + 2,
                               type_vocab_size=1, layer_norm_eps=1e-5)
        return RobertaForMaskedLM(config).eval()
    if family == "gpt2":
        config = GPT2Config(**shape, n_positions=TINY_POSITIONS, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(config).eval()
    raise ValueError(f"family must be 'bert', 'roberta' or 'gpt2', got {family!r}")
