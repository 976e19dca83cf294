"""Prefix tuning (P-tuning v2) for sequence classifiers, whose forward peft cannot feed.

peft 0.21 builds the prefix of a sequence classifier (`PrefixTuningConfig`, no
reparameterisation: one [T_p, L * 2 * KV * d] embedding) but hands it to the model as
``past_key_values``, which none of transformers 5's classifiers declares (BERT, RoBERTa and
DistilBERT have no cache; Llama's and GPT-2's classifiers take it only through ``**kwargs``,
so peft refuses them). Here the same embedding, in peft's layout (viewed as [T_p, L * 2, KV,
d]; layer l's keys are row 2l of the second axis, its values row 2l + 1), is prepended to each self-attention module's keys and
values inside fedprune's attention functions (`structure.compute`), and the additive mask
gains T_p zero columns in front: every token attends to the prefix, the prefix itself is never
a query — what peft's cache does for a causal LM, except that no position is shifted by T_p
(the prefix carries no position in either). The parameters, their names and their head map
stay peft's.

A forward of the wrapped model sets the per-module keys and values in a context variable for
its duration; only fedprune's attention functions read it, so prefix tuning of a classifier
needs ``model.attn_implementation = 'auto'`` (training, evaluation) and the importance pass
uses `PROBS_ATTENTION`, eager maths that return the probabilities, instead of transformers'
eager attention.
"""

from __future__ import annotations

import contextvars
import functools

import torch
from torch import Tensor

from fedprune.structure.attention import ModelStructure

FLAG = "fedprune_prefix"  # attribute set on a model whose forward carries our prefixes

# id(attention module or any of its submodules) -> (keys, values), each [KV, T_p, d]
_ACTIVE: contextvars.ContextVar[dict[int, tuple[Tensor, Tensor]] | None] = \
    contextvars.ContextVar("fedprune_prefix", default=None)


def layer_prefixes(weight: Tensor, layers: int, kv_heads: int, head_dim: int
                   ) -> list[tuple[Tensor, Tensor]]:
    """peft's [T_p, L * 2 * KV * d] prefix embedding -> per layer (keys, values), each
    [KV, T_p, d] (views of ``weight``, so gradients reach it)."""
    per = weight.view(weight.shape[0], layers * 2, kv_heads, head_dim).permute(1, 2, 0, 3)
    return [(per[2 * layer], per[2 * layer + 1]) for layer in range(layers)]


def install(model: torch.nn.Module, structure: ModelStructure) -> None:
    """Make the peft prefix-tuning classifier ``model`` run its prefixes through fedprune's
    attention (in place): its forward calls the transformers model beneath peft with every
    self-attention module's (keys, values) active."""
    from fedprune.structure.compute import ATTENTION  # (compute imports this module)

    impl = model.get_base_model().config._attn_implementation
    if impl != ATTENTION:
        raise ValueError(f"prefix tuning of a classifier runs in fedprune's attention "
                         f"({ATTENTION!r}, model.attn_implementation='auto'), not {impl!r}: "
                         f"the prefixes would be ignored")
    attention = structure.attention
    assert all(a.kind == "self" for a in attention), "prefix: self-attention only"
    first = attention[0]
    weight = model.prompt_encoder[model.active_adapter].embedding.weight
    base = model.base_model
    owners = [[id(m) for m in model.get_submodule(a.path).modules()] for a in attention]

    @functools.wraps(base.forward)
    def forward(*args, **kwargs):
        table = layer_prefixes(weight, len(attention), first.n_kv_heads, first.head_dim)
        token = _ACTIVE.set({key: kv for ids, kv in zip(owners, table, strict=True)
                             for key in ids})
        try:
            return base(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    model.forward = forward
    setattr(model, FLAG, True)


def with_prefix(module: torch.nn.Module, key: Tensor, value: Tensor,
                attention_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """key / value [b, KV, k, d] with ``module``'s active prefix prepended ([b, KV, T_p + k,
    d]), the mask [b, 1, q, k] with T_p attended columns in front; unchanged without one."""
    active = _ACTIVE.get()
    kv = active.get(id(module)) if active else None
    if kv is None:
        return key, value, attention_mask
    b = key.shape[0]
    pk, pv = (t.to(key.dtype).unsqueeze(0).expand(b, -1, -1, -1) for t in kv)
    if attention_mask is not None:
        fill = True if attention_mask.dtype == torch.bool else 0.0  # attended
        attention_mask = torch.nn.functional.pad(attention_mask[..., :key.shape[-2]],
                                                 (pk.shape[2], 0), value=fill)
    return torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2), attention_mask
