"""The input checks of every op, so that each rejects the same bad input with the same words: a TypeError or
ValueError naming the argument and what was expected. The C++ CPU kernels, which torch.ops.fastdistil.* can
reach without this module, repeat the triple loss's checks word for word (csrc/triple_loss_cpu.cpp)."""

import math

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tensors(op: str, named: dict, optional: tuple[str, ...] = ()) -> None:
    """Every value a torch.Tensor (or None, for the names in optional), all on the device of the first."""
    for name, value in named.items():
        if value is None and name in optional:
            continue
        if not isinstance(value, torch.Tensor):
            alternative = " or None" if name in optional else ""
            raise TypeError(f"{op}: {name} must be a torch.Tensor{alternative}, got {type(value).__name__}")
    first, reference = next(iter(named.items()))
    for name, value in named.items():
        if value is not None and value.device != reference.device:
            raise ValueError(f"{op}: {name} is on {value.device} but {first} is on {reference.device}; expected "
                             "all inputs on one device")


def floating(op: str, named: dict, float64_like: str | None = None) -> None:
    """fp32, bf16 or fp16 each; float64 only all together, when float64_like names a float64 tensor (float64 is
    for gradient checks)."""
    float64 = float64_like is not None and named[float64_like].dtype == torch.float64
    for name, value in named.items():
        if value is None:
            continue
        if float64 and value.dtype != torch.float64:
            raise TypeError(f"{op}: {name} must be float64 like {float64_like} (float64 is for gradient checks), "
                            f"got {value.dtype}")
        if not float64 and value.dtype not in LOGIT_DTYPES:
            raise TypeError(f"{op}: {name} must be float32, bfloat16 or float16, got {value.dtype}")


def mask(op: str, name: str, value: torch.Tensor, shape: tuple) -> None:
    if value.is_floating_point() or value.is_complex():
        raise TypeError(f"{op}: {name} must be bool or integer (0 = padding), got {value.dtype}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(value.shape)}")


def labels(op: str, value: torch.Tensor, shape: tuple, vocab: int, check_values: bool = True) -> None:
    """int64 of the given shape; with check_values, in [0, vocab) or -100. Reading values synchronizes a GPU
    with the host, and torch.compile cannot trace a branch on them, so that is done on CPU tensors in eager
    mode only: the kernels take the contract as given (the C++ one checks again)."""
    if value.dtype != torch.int64:
        raise TypeError(f"{op}: labels must be int64, got {value.dtype}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{op}: labels must have shape {shape} (the rows of the logits), got {tuple(value.shape)}")
    if check_values and value.device.type == "cpu" and value.numel() > 0 and not torch.compiler.is_compiling():
        bad = (value != -100) & ((value < 0) | (value >= vocab))
        if bad.any():
            raise ValueError(f"{op}: labels must be in [0, {vocab}) or -100 (not a target), got "
                             f"{value[bad][0].item()}")


def hidden_pair(op: str, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, lead: tuple) -> None:
    if student_hidden.dim() < 1 or student_hidden.size(-1) == 0 or tuple(student_hidden.shape[:-1]) != lead:
        raise ValueError(f"{op}: student_hidden must have shape {lead + ('D',)} with D > 0, got "
                         f"{tuple(student_hidden.shape)}")
    if teacher_hidden.shape != student_hidden.shape:
        raise ValueError(f"{op}: teacher_hidden must have the shape of student_hidden {tuple(student_hidden.shape)}, "
                         f"got {tuple(teacher_hidden.shape)}")


def loss_scalars(op: str, temperature: float, alpha_ce: float, alpha_mlm: float, alpha_cos: float,
                 alpha_mse: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"{op}: temperature must be > 0 and finite, got {temperature}")
    for name, value in (("alpha_ce", alpha_ce), ("alpha_mlm", alpha_mlm), ("alpha_cos", alpha_cos),
                        ("alpha_mse", alpha_mse)):
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{op}: {name} must be >= 0 and finite, got {value}")


def triple_loss(student_logits, teacher_logits, labels_, student_hidden, teacher_hidden, attention_mask,
                temperature, alpha_ce, alpha_mlm, alpha_cos, alpha_mse, check_label_values: bool = True) -> None:
    op = "triple_loss"
    named = dict(student_logits=student_logits, teacher_logits=teacher_logits, labels=labels_,
                 student_hidden=student_hidden, teacher_hidden=teacher_hidden, attention_mask=attention_mask)
    tensors(op, named)
    floating(op, dict(student_logits=student_logits, teacher_logits=teacher_logits, student_hidden=student_hidden,
                      teacher_hidden=teacher_hidden), float64_like="student_logits")
    if student_logits.dim() < 1 or student_logits.size(-1) == 0:
        raise ValueError(f"{op}: student_logits must be [..., V] with V > 0, got shape {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"{op}: teacher_logits must have the shape of student_logits "
                         f"{tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}")
    lead = tuple(student_logits.shape[:-1])
    labels(op, labels_, lead, student_logits.size(-1), check_label_values)
    mask(op, "attention_mask", attention_mask, lead)
    hidden_pair(op, student_hidden, teacher_hidden, lead)
    loss_scalars(op, temperature, alpha_ce, alpha_mlm, alpha_cos, alpha_mse)


def projection(op: str, student_input, student_weight, student_bias) -> None:
    """The student's side of a fused-linear op: [..., D] input, [V, D] weight, [V] bias or None."""
    tensors(op, dict(student_input=student_input, student_weight=student_weight, student_bias=student_bias),
            optional=("student_bias",))
    floating(op, dict(student_input=student_input, student_weight=student_weight, student_bias=student_bias))
    if student_input.dim() < 1:
        raise ValueError(f"{op}: student_input must be [..., D], got shape {tuple(student_input.shape)}")
    if student_weight.dim() != 2 or student_weight.size(1) != student_input.size(-1):
        raise ValueError(f"{op}: student_weight must be [V, {student_input.size(-1)}] (student_input's D), got "
                         f"{tuple(student_weight.shape)}")
    vocab = student_weight.size(0)
    if student_bias is not None and student_bias.shape != (vocab,):
        raise ValueError(f"{op}: student_bias must be [{vocab}] or None, got {tuple(student_bias.shape)}")


def fused_linear_triple_loss(student_input, student_weight, student_bias, teacher_input, teacher_weight,
                             teacher_bias, labels_, student_hidden, teacher_hidden, attention_mask, temperature,
                             alpha_ce, alpha_mlm, alpha_cos, chunk_size: int, alpha_mse: float,
                             check_label_values: bool = True) -> None:
    op = "fused_linear_triple_loss"
    named = dict(student_input=student_input, student_weight=student_weight, student_bias=student_bias,
                 teacher_input=teacher_input, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                 labels=labels_, student_hidden=student_hidden, teacher_hidden=teacher_hidden,
                 attention_mask=attention_mask)
    tensors(op, named, optional=("student_bias", "teacher_bias"))
    floating(op, {k: v for k, v in named.items() if k not in ("labels", "attention_mask")})
    for name, x in (("student_input", student_input), ("teacher_input", teacher_input)):
        if x.dim() < 1:
            raise ValueError(f"{op}: {name} must be [..., D], got shape {tuple(x.shape)}")
    for name, x in (("student_weight", student_weight), ("teacher_weight", teacher_weight)):
        if x.dim() != 2:
            raise ValueError(f"{op}: {name} must be [V, D], got shape {tuple(x.shape)}")
    vocab = student_weight.size(0)
    if student_weight.size(1) != student_input.size(-1):
        raise ValueError(f"{op}: student_weight must be [V, {student_input.size(-1)}] (student_input's D), got "
                         f"{tuple(student_weight.shape)}")
    if teacher_weight.shape != (vocab, teacher_input.size(-1)):
        raise ValueError(f"{op}: teacher_weight must be [{vocab}, {teacher_input.size(-1)}] (student_weight's V, "
                         f"teacher_input's D), got {tuple(teacher_weight.shape)}")
    for name, bias in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if bias is not None and bias.shape != (vocab,):
            raise ValueError(f"{op}: {name} must be [{vocab}] or None, got {tuple(bias.shape)}")
    lead = tuple(student_input.shape[:-1])
    if tuple(teacher_input.shape[:-1]) != lead:
        raise ValueError(f"{op}: teacher_input must have the leading shape {lead} of student_input, got "
                         f"{tuple(teacher_input.shape)}")
    labels(op, labels_, lead, vocab, check_label_values)
    mask(op, "attention_mask", attention_mask, lead)
    hidden_pair(op, student_hidden, teacher_hidden, lead)
    loss_scalars(op, temperature, alpha_ce, alpha_mlm, alpha_cos, alpha_mse)
    if chunk_size < 0:
        raise ValueError(f"{op}: chunk_size must be >= 0 (0 picks one), got {chunk_size}")


TAILS = ("bucket", "renormalize")
INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)


def sparse_teacher(op: str, topk_logits: torch.Tensor, topk_indices: torch.Tensor, logsumexp: torch.Tensor,
                   lead: tuple, vocab: int, float64: bool, tail: str, check_index_values: bool = True) -> None:
    """A cached top-k teacher: [..., k] logits and indices with 1 <= k <= V, [..., 2] log-sum-exps (T = 1, T);
    with check_index_values, indices in [0, V) (read on CPU in eager mode only, as labels' values are)."""
    if topk_logits.dim() < 1 or tuple(topk_logits.shape[:-1]) != lead or not 1 <= topk_logits.size(-1) <= vocab:
        raise ValueError(f"{op}: teacher_topk_logits must have shape {lead + ('k',)} with 1 <= k <= {vocab} (V), "
                         f"got {tuple(topk_logits.shape)}")
    if topk_indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: teacher_topk_indices must be int16, int32 or int64, got {topk_indices.dtype}")
    if topk_indices.shape != topk_logits.shape:
        raise ValueError(f"{op}: teacher_topk_indices must have the shape of teacher_topk_logits "
                         f"{tuple(topk_logits.shape)}, got {tuple(topk_indices.shape)}")
    lse_dtype = torch.float64 if float64 else torch.float32
    if logsumexp.dtype != lse_dtype:
        raise TypeError(f"{op}: teacher_logsumexp must be {lse_dtype}, got {logsumexp.dtype}")
    if tuple(logsumexp.shape) != lead + (2,):
        raise ValueError(f"{op}: teacher_logsumexp must have shape {lead + (2,)} (log-sum-exp at T = 1 and at T), "
                         f"got {tuple(logsumexp.shape)}")
    if tail not in TAILS:
        raise ValueError(f"{op}: tail must be one of {TAILS}, got {tail!r}")
    if (check_index_values and topk_indices.device.type == "cpu" and topk_indices.numel() > 0
            and not torch.compiler.is_compiling()):
        bad = (topk_indices < 0) | (topk_indices >= vocab)
        if bad.any():
            raise ValueError(f"{op}: teacher_topk_indices must be in [0, {vocab}), got {topk_indices[bad][0].item()}")


def sparse_triple_loss(student_logits, teacher_topk_logits, teacher_topk_indices, teacher_logsumexp, labels_,
                       student_hidden, teacher_hidden, attention_mask, temperature, alpha_ce, alpha_mlm, alpha_cos,
                       tail, check_values: bool = True) -> None:
    op = "sparse_triple_loss"
    named = dict(student_logits=student_logits, teacher_topk_logits=teacher_topk_logits,
                 teacher_topk_indices=teacher_topk_indices, teacher_logsumexp=teacher_logsumexp, labels=labels_,
                 student_hidden=student_hidden, teacher_hidden=teacher_hidden, attention_mask=attention_mask)
    tensors(op, named)
    floating(op, dict(student_logits=student_logits, teacher_topk_logits=teacher_topk_logits,
                      student_hidden=student_hidden, teacher_hidden=teacher_hidden), float64_like="student_logits")
    if student_logits.dim() < 1 or student_logits.size(-1) == 0:
        raise ValueError(f"{op}: student_logits must be [..., V] with V > 0, got shape {tuple(student_logits.shape)}")
    lead, vocab = tuple(student_logits.shape[:-1]), student_logits.size(-1)
    sparse_teacher(op, teacher_topk_logits, teacher_topk_indices, teacher_logsumexp, lead, vocab,
                   student_logits.dtype == torch.float64, tail, check_values)
    labels(op, labels_, lead, vocab, check_values)
    mask(op, "attention_mask", attention_mask, lead)
    hidden_pair(op, student_hidden, teacher_hidden, lead)
    loss_scalars(op, temperature, alpha_ce, alpha_mlm, alpha_cos, 0.0)


def attention(q, k, v, key_padding_mask, dropout_p: float, scale: float | None, is_causal: bool = False) -> None:
    op = "attention"
    tensors(op, dict(q=q, k=k, v=v, key_padding_mask=key_padding_mask), optional=("key_padding_mask",))
    floating(op, dict(q=q, k=k, v=v))
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{op}: {name} must be [B, H, L, Dh], got shape {tuple(x.shape)}")
        if x.dtype != q.dtype:
            raise TypeError(f"{op}: {name} is {x.dtype} but q is {q.dtype}; expected one dtype")
    if not isinstance(is_causal, bool):
        raise TypeError(f"{op}: is_causal must be a bool, got {type(is_causal).__name__}")
    # Named apart from the shape check below: with queries and keys of different lengths the diagonal would be
    # ambiguous (SDPA aligns it top-left, transformers' caches bottom-right).
    if is_causal and k.size(2) != q.size(2):
        raise ValueError(f"{op}: is_causal needs q and k of one length L (query i attends to keys j <= i), got "
                         f"{q.size(2)} and {k.size(2)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{op}: q, k and v must have one shape [B, H, L, Dh] (self-attention), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}")
    if key_padding_mask is not None:
        mask(op, "key_padding_mask", key_padding_mask, (q.size(0), q.size(2)))
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"{op}: scale must be > 0 and finite, or None (1 / sqrt(Dh)), got {scale}")
