"""How the one backbone computes: precision, attention path and dropout masks.

Measured on this project's 2-core CPU (torch 2.13, MiniLM + LoRA, one 16 x 128 training
step): float32 SDPA 0.63 s; bf16 autocast with SDPA 0.44 s, with eager attention 0.38 s, of
which torch's dropout masks are 0.19 s (CPU ``bernoulli_`` costs ~6 ns per element); without
dropout SDPA's flash backward is slower than eager maths (0.33 vs 0.19 s). With the masks
below the step takes 0.25 s. Hence:

- ``compute_dtype``: bf16 autocast where the CPU runs it fast; trainable tensors,
  optimizer state, updates and aggregation stay float32. Frozen linear weights are stored in
  the compute dtype once, since autocast would otherwise cast them again at every call.
- attention ``"auto"`` (registered in transformers' AttentionInterface as ``fedprune``): with
  gradients on a CPU, eager maths with a fast dropout mask; without gradients, or on a GPU,
  SDPA. Attention probabilities are never returned to the caller (the importance pass of Eq. 6
  switches the model to eager and reads them with hooks).
- fast dropout: 64 random bits give four 16-bit words, one per element, dropped when the word
  (read unsigned) is below round(p * 2^16); p is thus rounded to a multiple of 2^-16 and the
  kept values are scaled by the exact 1 / P(keep), so E[output] = input as with torch's
  dropout. The mask is applied as a product with a 0 / 1 tensor in the input's dtype: on this
  CPU ``masked_fill`` with a bool mask runs ~6x slower than a bf16 product, and so does every
  op that writes a bool tensor (hence the integer clamp below, not a comparison).
"""

from __future__ import annotations

import functools

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.pytorch_utils import Conv1D

from fedprune.structure.prefix import with_prefix

ATTENTION = "fedprune"  # name of the "auto" attention in transformers' registries
PROBS_ATTENTION = "fedprune_probs"  # eager maths returning the probabilities
_WORD = 1 << 16
_UNSUPPORTED = ("softcap", "sliding_window", "s_aux")  # attention variants we do not compute


def resolve_device(name: str) -> torch.device:
    """``run.device``: 'auto' -> the first CUDA device when torch sees one, else the CPU;
    'cpu', 'cuda', 'cuda:<i>' as named, once checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        from fedprune.config import ConfigError

        if not torch.cuda.is_available():
            raise ConfigError(f"`run.device` = {name!r}: torch {torch.__version__} sees no CUDA "
                              f"device (built with CUDA: {torch.version.cuda or 'no'}); use "
                              f"'auto' or 'cpu'")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"`run.device` = {name!r}: only {torch.cuda.device_count()} CUDA "
                              f"device(s) here")
    return device


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """'auto' -> bfloat16 where ``device`` runs it fast (a CPU with AVX512-BF16 or AMX, a GPU
    with bf16 support; default: the CPU), else float32; 'float32' / 'bfloat16' as named."""
    if name == "auto":
        if device is not None and device.type == "cuda":
            fast = torch.cuda.is_bf16_supported()
        else:
            fast = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return torch.bfloat16 if fast else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """(``dtype`` tensor of ``shape``: 1 where kept, 0 where dropped; 1 / P(keep)) for dropout
    at rate ``p`` (0 < p < 1) on a CPU, from torch's seeded generator."""
    drop = min(round(p * _WORD), _WORD - 1)
    if drop == 0:
        return torch.ones(shape, dtype=dtype), 1.0
    n = shape.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # all 64 bits
    words = bits.view(torch.int16)[:n].view(shape)  # uniform on [-2^15, 2^15)
    first_kept = drop - (1 << 15)  # unsigned word >= drop  <=>  signed word >= drop - 2^15
    keep = words.clamp(first_kept - 1, first_kept).sub_(first_kept - 1)  # int16 0 / 1
    return keep.to(dtype), _WORD / (_WORD - drop)


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout`` with a cheaper CPU mask (see the module docstring); torch's on GPUs."""
    if not training or p == 0.0:
        return x
    if x.is_cuda or p >= 1.0:
        return torch.nn.functional.dropout(x, p, True)
    keep, scale = keep_mask(x.shape, p, x.dtype)
    return x * keep * scale


class FastDropout(torch.nn.Dropout):
    """``nn.Dropout`` whose mask comes from ``fast_dropout``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


def lean_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                   position_bias=None, **kwargs):
    """Attention for every family we support. query [b, h, q, d], key / value [b, h_kv, k, d],
    attention_mask additive [b, 1, q, k] or None; returns ([b, q, h, d], None). A classifier's
    prefix-tuning keys and values (`structure.prefix`) are prepended here."""
    extra = sorted(k for k in _UNSUPPORTED if kwargs.get(k) is not None)
    if extra:
        raise NotImplementedError(
            f"{type(module).__name__}: model.attn_implementation='auto' does not implement "
            f"{', '.join(extra)}; set model.attn_implementation='sdpa' or 'eager'")
    key, value, attention_mask = with_prefix(module, key, value, attention_mask)
    if query.is_cuda or not torch.is_grad_enabled():
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.to(query.dtype)  # SDPA wants the query's dtype
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask,
                                        dropout=dropout, scaling=scaling,
                                        position_bias=position_bias, **kwargs)
        return out, None
    return _eager(module, query, key, value, attention_mask, scaling, dropout,
                  position_bias)[0], None


def probs_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    position_bias=None, **kwargs):
    """Eager maths returning ([b, q, h, d], probabilities [b, h, q, k]): the importance pass of
    a model whose prefixes only fedprune's attention adds (transformers' eager would not)."""
    key, value, attention_mask = with_prefix(module, key, value, attention_mask)
    return _eager(module, query, key, value, attention_mask, scaling, dropout, position_bias)


def _eager(module, query, key, value, attention_mask, scaling, dropout, position_bias):
    """(output [b, q, h, d], probabilities [b, h, q, k]) by eager maths, dropout from a fast
    mask."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    # [b, h, q, k] is the big tensor: stay in the compute dtype (softmax accumulates in fp32
    # inside the kernel) and put the scalings on the 4x smaller query and output.
    scores = torch.matmul(query * scaling, key.transpose(2, 3))
    if position_bias is not None:  # T5's relative position bias
        scores = scores + position_bias.to(scores.dtype)
    if attention_mask is not None:
        scores = scores + attention_mask[..., :key.shape[-2]].to(scores.dtype)
    probs = torch.softmax(scores, dim=-1)
    scale, kept = 1.0, probs
    if module.training and dropout > 0.0:
        keep, scale = keep_mask(probs.shape, dropout, probs.dtype)
        kept = probs * keep
    out = torch.matmul(kept, value)
    out = out * scale if scale != 1.0 else out
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register(ATTENTION, lean_attention)
AttentionInterface.register(PROBS_ATTENTION, probs_attention)
# eager masks: additive floats, never skipped for causal attention (eager needs them)
AttentionMaskInterface.register(ATTENTION, eager_mask)
AttentionMaskInterface.register(PROBS_ATTENTION, eager_mask)


def attn_implementation(name: str) -> str:
    """Config value -> the name transformers' ``attn_implementation`` takes."""
    return ATTENTION if name == "auto" else name


def prepare_compute(model: torch.nn.Module, dtype: torch.dtype, attention: str) -> None:
    """Make ``model`` compute in ``dtype`` (in place). With attention 'auto', its dropout
    modules draw fast masks. Trainable parameters are left untouched (float32)."""
    if attention == "auto":
        for module in model.modules():
            if type(module) is torch.nn.Dropout:
                module.__class__ = FastDropout
    if dtype == torch.float32:
        return
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            for p in module.parameters(recurse=False):
                if not p.requires_grad:
                    p.data = p.data.to(dtype)
    # Every forward (training, evaluation, the importance pass) and every `generate` (whose
    # decoding loop calls the inner model, and a seq2seq model's encoder, not this forward)
    # runs under autocast; the backward runs outside it, as torch recommends.
    device = next(model.parameters()).device.type
    for name in ("forward", "generate"):
        if hasattr(model, name):
            setattr(model, name, _under_autocast(getattr(model, name), device, dtype))


def _under_autocast(fn, device: str, dtype: torch.dtype):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with torch.autocast(device, dtype=dtype):
            return fn(*args, **kwargs)
    return wrapped
