"""Structural head pruning: temporary views of the one backbone that compute less for pruned heads.

`structural_view` (AoH pruning mode `structural`, DESIGN "Pruning (Eq. 7)") slices the pruned
heads out of the model for the duration of a `with` block, so the local forward and backward
really compute less; `detached_heads` (mode `detached`) keeps every head in the forward but
lets no gradient through the pruned ones, so only the backward shrinks. Both restore the
shared backbone exactly afterwards (through patch.py). Which heads are kept comes from
headmap.py (`structural_keep`).

Everything is derived from `ModelStructure` (module paths + fused offsets, asserted by
`attention.describe`); the only per-family knowledge here is `_VIEW_FAMILIES`: which head-count
attributes each family's attention module keeps, and T5's shared relative position bias.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache
from transformers.pytorch_utils import Conv1D

from fedprune.structure.attention import AttentionModule, ModelStructure
from fedprune.structure.headmap import structural_keep
from fedprune.structure.patch import Patcher, base_layer, bias_only, patched

__all__ = ["StructuralView", "detached_grad_heads", "detached_heads", "structural_view"]


# --- structural view: family table ----------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    """Head geometry of one attention module inside the view."""

    n_heads: int  # kept query heads
    n_kv_heads: int  # kept KV heads
    head_dim: int

    @property
    def width(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def groups(self) -> int:  # query heads per KV head; any positive value when nothing kept
        return self.n_heads // self.n_kv_heads if self.n_kv_heads else 1


# (core, original forward, attn, kept query-head index) -> replacement forward, or None
_ForwardAdapter = Callable[[nn.Module, Callable[..., Any], AttentionModule, Tensor],
                           Callable[..., Any] | None]


@dataclass(frozen=True)
class _ViewFamily:
    """What a family's attention module (the parent of the q projection) needs in the view.

    `attrs`: head-count attributes set from the kept geometry (transformers 5.23 reshapes with
    `-1` heads, so most are informational, but GPT-2 splits c_attn by `split_size` and Llama
    repeats KV by `num_key_value_groups`). `forward`: an optional adapter for inputs indexed
    by head that do not pass through the projections.
    """

    attrs: dict[str, Callable[[_Geometry], int]] = field(default_factory=dict)
    forward: _ForwardAdapter | None = None


def _t5_position_bias(
    core: nn.Module, original: Callable[..., Any], attn: AttentionModule, kept: Tensor
) -> Callable[..., Any]:
    """T5 computes the relative position bias (1, H, q, k) once, in the first layer of a stack,
    and passes it to every later layer. In the view each layer keeps other heads, so: compute
    the full-head bias when none is passed, give this layer only its kept heads, and hand the
    full bias on to the next layer."""
    signature = inspect.signature(original)

    def forward(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        full = bound.arguments["position_bias"]
        if full is None:
            full = _t5_full_bias(core, attn.n_heads, bound.arguments)
        bound.arguments["position_bias"] = full[:, kept]
        out, _, weights = original(*bound.args, **bound.kwargs)
        return out, full, weights

    return forward


def _t5_full_bias(core: nn.Module, n_heads: int, arguments: dict[str, Any]) -> Tensor:
    """What `T5Attention.forward` computes for position_bias=None, for all `n_heads` heads."""
    hidden = arguments["hidden_states"]
    source = arguments["key_value_states"]
    # the KV cache by type, not by keyword: transformers renamed it (past_key_values -> cache)
    cache = next((v for v in arguments.values() if isinstance(v, Cache)), None)
    past = cache.get_seq_length(core.layer_idx) if cache is not None else 0
    q_len = hidden.shape[1]
    k_len = source.shape[1] if source is not None else past + q_len
    if core.has_relative_attention_bias:
        return core.compute_bias(q_len, k_len, device=hidden.device, past_seen_tokens=past)
    bias = torch.zeros((1, n_heads, q_len, k_len), device=hidden.device, dtype=hidden.dtype)
    if core.gradient_checkpointing and core.training:
        bias.requires_grad = True
    return bias


def _gpt2_no_heads(
    core: nn.Module, original: Callable[..., Any], attn: AttentionModule, kept: Tensor
) -> Callable[..., Any] | None:
    """GPT-2 splits the fused c_attn output with `split(split_size)`, which cannot yield three
    empty blocks; with every head pruned the block's output is c_proj of an empty context
    (its bias), so skip the attention computation."""
    if kept.numel():
        return None

    def forward(hidden_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
        empty = hidden_states[..., :0]  # (B, T, 0): the context of zero heads
        return core.resid_dropout(core.c_proj(empty)), None

    return forward


_BERT_VIEW = _ViewFamily({"num_attention_heads": lambda k: k.n_heads,
                          "all_head_size": lambda k: k.width})
_VIEW_FAMILIES: dict[str, _ViewFamily] = {
    "bert": _BERT_VIEW,
    "roberta": _BERT_VIEW,
    "distilbert": _ViewFamily({"n_heads": lambda k: k.n_heads}),
    "gpt2": _ViewFamily({"num_heads": lambda k: k.n_heads, "split_size": lambda k: k.width},
                        forward=_gpt2_no_heads),
    "llama": _ViewFamily({"num_key_value_groups": lambda k: k.groups}),
    "t5": _ViewFamily({"n_heads": lambda k: k.n_heads, "inner_dim": lambda k: k.width},
                      forward=_t5_position_bias),
    "bart": _ViewFamily({"num_heads": lambda k: k.n_heads}),
}


# --- structural view: slicing --------------------------------------------------------------


@dataclass
class _Cut:
    """Kept output features (rows) and/or input features (cols) of one projection module."""

    rows: list[Tensor] = field(default_factory=list)  # per projection, ordered by offset
    cols: Tensor | None = None

    def row_index(self) -> Tensor | None:
        return torch.cat(self.rows) if self.rows else None


def _head_features(offset: int, heads: Tensor, head_dim: int) -> Tensor:
    """Feature indices `offset + h*d + j` for kept heads h (ascending) and j < d."""
    base = offset + heads.nonzero().flatten() * head_dim  # (kept,)
    return (base[:, None] + torch.arange(head_dim, device=heads.device)).flatten()  # (kept*d,)


def _cuts(structure: ModelStructure, kept: Mapping[str, Tensor]) -> dict[str, _Cut]:
    """Projection module path -> kept rows (q/k/v, fused modules in offset order) / cols (o)."""
    rows: dict[str, list[tuple[int, Tensor]]] = {}
    cuts: dict[str, _Cut] = {}
    for attn in structure.attention:
        heads = kept[attn.path]
        groups = heads.reshape(attn.n_kv_heads, attn.group_size).any(dim=1)
        for name, mask in (("q", heads), ("k", groups), ("v", groups)):
            proj = getattr(attn, name)
            index = _head_features(proj.offset, mask, attn.head_dim)
            rows.setdefault(proj.module, []).append((proj.offset, index))
        cuts.setdefault(attn.o.module, _Cut()).cols = _head_features(0, heads, attn.head_dim)
    for module, parts in rows.items():
        parts.sort(key=lambda part: part[0])
        cuts.setdefault(module, _Cut()).rows = [index for _, index in parts]
    return cuts


def _sliced(param: Tensor, dim: int, index: Tensor) -> nn.Parameter:
    """A new Parameter holding `param[index]` along `dim` (a copy; same requires_grad)."""
    data = param.detach().index_select(dim, index.to(param.device)).contiguous()
    return nn.Parameter(data, requires_grad=param.requires_grad)


class _Slicer:
    """Replaces parameters by sliced copies through a `Patcher`, remembering for each one
    its path and the (dim, index) it keeps, so trained values can be scattered back."""

    def __init__(self, patcher: Patcher, names: dict[int, str]) -> None:
        self.patcher = patcher
        self.names = names  # id(original parameter) -> parameter path
        self.kept: dict[str, tuple[int, Tensor]] = {}  # path -> (dim, kept index)
        self.new: dict[str, nn.Parameter] = {}

    def cut(self, module: nn.Module, name: str, dim: int, index: Tensor | None) -> None:
        param = getattr(module, name)
        if index is None or param is None:
            return
        new = _sliced(param, dim, index)
        path = self.names[id(param)]
        self.kept[path], self.new[path] = (dim, index), new
        self.patcher.set(module, name, new)

    def projection(self, module: nn.Module, cut: _Cut) -> None:
        """Slice base weight/bias and every LoRA adapter of one (possibly peft-wrapped) q/k/v/o
        projection: rows = output features, cols = input features."""
        rows, cols = cut.row_index(), cut.cols
        assert rows is None or cols is None, "a module is q/k/v (rows) or o (cols), not both"
        base = base_layer(module)
        conv = isinstance(base, Conv1D)  # weight [in, out] instead of Linear's [out, in]
        self.cut(base, "weight", 1 if conv else 0, rows)
        self.cut(base, "weight", 0 if conv else 1, cols)
        self.cut(base, "bias", 0, rows)
        n_in, n_out = base.weight.shape if conv else base.weight.shape[::-1]
        features = {"nx": n_in, "nf": n_out} if conv else {"in_features": n_in,
                                                           "out_features": n_out}
        for attr, value in features.items():
            self.patcher.set(base, attr, int(value))
        if conv and n_in == 0:  # Conv1D's x.view(-1, 0) fails on an empty input
            self.patcher.set(base, "forward", bias_only(base))
        if base is not module:
            self._lora(module, rows, cols, int(n_in), int(n_out))

    def _lora(self, layer: nn.Module, rows: Tensor | None, cols: Tensor | None,
              n_in: int, n_out: int) -> None:
        """LoRA B [out, r] loses rows, LoRA A [r, in] loses columns."""
        if getattr(layer, "merged", False) or getattr(layer, "lora_variant", None):
            raise NotImplementedError(
                f"structural_view supports unmerged vanilla LoRA only; {type(layer).__name__} "
                f"is merged or uses a LoRA variant (DoRA, ...)"
            )
        for adapter in layer.lora_A:
            lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
            self.cut(lora_b, "weight", 0, rows)
            self.cut(lora_b, "bias", 0, rows)
            self.cut(lora_a, "weight", 1, cols)
            self.patcher.set(lora_b, "out_features", n_out)
            self.patcher.set(lora_a, "in_features", n_in)
        self.patcher.set(layer, "in_features", n_in)
        self.patcher.set(layer, "out_features", n_out)


# --- structural view: public API ------------------------------------------------------------


class StructuralView:
    """The trainable parameters of a model with pruned heads sliced out (see `structural_view`).

    `params`: the trainable parameters during the view, keyed like `trainable_parameters`:
    new, smaller Parameters for sliced tensors (initialised from the full values at entry),
    the original Parameter objects otherwise (shared LoRA A of q/k/v, LoRA B of o, task head).
    `keep_query`: the query heads really kept, bool [n_heads] per attention module (under GQA
    whole groups; see `structural_keep`). `kept`: for each sliced key, (dim, index) of the
    full coordinates it holds.
    """

    def __init__(self, params: dict[str, nn.Parameter], keep_query: dict[str, Tensor],
                 kept: dict[str, tuple[int, Tensor]]) -> None:
        self.params = params
        self.keep_query = keep_query
        self.kept = kept

    def scatter(self, full: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Full-shaped state from the view's current values: for a sliced key, the kept
        coordinates from the view and the pruned ones from `full[key]` (unchanged); for any
        other key, the view's value. New tensors; `full` is not modified. Valid inside and
        after the `with` block."""
        out = {}
        for key, value in self.params.items():
            if key not in full:
                raise KeyError(f"scatter: `full` has no entry for trainable parameter {key!r}")
            target = full[key].detach()
            if key in self.kept:
                dim, index = self.kept[key]
                merged = target.clone()
                merged.index_copy_(dim, index.to(target.device),
                                   value.detach().to(target.device, target.dtype))
                out[key] = merged
            elif value.shape != target.shape:
                raise ValueError(f"scatter: {key!r} has shape {tuple(target.shape)} in `full`, "
                                 f"{tuple(value.shape)} in the view")
            else:
                out[key] = value.detach().to(target.device, copy=True)
        return out


@contextmanager
def structural_view(
    model: nn.Module, structure: ModelStructure, keep_query: Mapping[str, Tensor]
) -> Iterator[StructuralView]:
    """Remove pruned heads from the model's forward and backward for the `with` block
    (AoH pruning mode `structural`, DESIGN "Pruning (Eq. 7)").

    `keep_query[path]`: bool [n_heads] of kept query heads for every attention module of
    `structure` (which must describe `model`). Inside the block every attention projection
    holds only the kept heads: q/k/v output rows (fused GPT-2 c_attn: per q/k/v block) and o
    input columns are sliced out of the base weight, the bias and each LoRA adapter as new,
    smaller tensors, and the family's head-count attributes follow, so the matmuls shrink with
    the kept heads. The sliced LoRA tensors are the trainable Parameters of the view
    (`StructuralView.params`), initialised from the current full values.

    Under GQA the structural granularity is the KV group: a group with any kept query head is
    kept whole (all its query heads compute and train; `StructuralView.keep_query` says which).
    A module with every head pruned computes zero heads: its context is empty, so the block
    contributes only the o bias (plus its residual path).

    On exit, also on an exception, everything is restored: the same Parameter objects with
    the same values (training inside the view changes only the view's sliced copies and the
    non-sliced trainable tensors, which are the originals), the same attributes. Write trained
    values back with `StructuralView.scatter`. The view is meant for local training (forward
    and backward); generating with a KV cache inside it is not supported.
    """
    family = _VIEW_FAMILIES.get(structure.family)
    if family is None:
        raise NotImplementedError(f"structural_view does not support family "
                                  f"{structure.family!r}")
    if getattr(model, "_fedprune_structural_view", False):
        raise RuntimeError("structural_view is already active on this model (not re-entrant)")
    kept = structural_keep(structure, keep_query)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = {id(p): n for n, p in model.named_parameters()}
    with patched() as patcher:
        patcher.set(model, "_fedprune_structural_view", True)
        slicer = _Slicer(patcher, names)
        for module, cut in _cuts(structure, kept).items():
            slicer.projection(model.get_submodule(module), cut)
        for attn in structure.attention:
            _adapt_core(patcher, model, family, attn, kept[attn.path])
        params = {n: slicer.new.get(n, p) for n, p in trainable.items()}
        kept_trainable = {n: slicer.kept[n] for n in params if n in slicer.kept}
        yield StructuralView(params, kept, kept_trainable)


def _adapt_core(patcher: Patcher, model: nn.Module, family: _ViewFamily,
                attn: AttentionModule, heads: Tensor) -> None:
    """Set the attention module's head-count attributes (and forward adapter) for its kept
    heads. The attention module is the parent of the q projection (BERT: `attention.self`)."""
    core = model.get_submodule(attn.q.module.rpartition(".")[0])
    n_heads = int(heads.sum())
    geometry = _Geometry(n_heads, n_heads // attn.group_size, attn.head_dim)
    for attr, value in family.attrs.items():
        if not hasattr(core, attr):
            raise AttributeError(f"{attn.path}: {type(core).__name__} has no attribute {attr!r} "
                                 f"(headview.py _VIEW_FAMILIES is out of date for this version)")
        patcher.set(core, attr, value(geometry))
    if family.forward is not None:
        forward = family.forward(core, core.forward, attn, heads.nonzero().flatten())
        if forward is not None:
            patcher.set(core, "forward", forward)


# --- detached heads: every head forward, the kept ones backward ----------------------------


class _KeptGrad(torch.autograd.Function):
    """y = forward(x) in full; dL/dx = dL/dy through the kept output rows (q/k/v: dy[..., kept]
    @ W[kept]) or into the kept input columns only (o: dy @ W[:, kept], zero elsewhere). The
    weight is frozen, so nothing else needs a gradient and x is not saved."""

    @staticmethod
    def forward(ctx, x: Tensor, forward: Callable[[Tensor], Tensor], kept_weight: Tensor,
                kept: Tensor, rows: bool) -> Tensor:
        ctx.kept_weight, ctx.kept, ctx.rows, ctx.width = kept_weight, kept, rows, x.shape[-1]
        return forward(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w = ctx.kept_weight.to(grad.dtype)
        if ctx.rows:  # w: [kept out, in]
            dx = grad.index_select(-1, ctx.kept) @ w
        else:  # w: [out, kept in]
            dx = grad.new_zeros(*grad.shape[:-1], ctx.width).index_copy_(-1, ctx.kept, grad @ w)
        return dx, None, None, None, None


class _MaskGrad(torch.autograd.Function):
    """Identity forward; the gradient zeroed outside the kept input columns."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor) -> Tensor:
        ctx.keep = keep
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.keep.to(grad.dtype), None


def detached_grad_heads(structure: ModelStructure, keep_query: Mapping[str, Tensor]
                        ) -> list[tuple[int, int]]:
    """Per attention module, the (query, KV) heads whose projections take part in the backward
    under `detached_heads` (`core.accounting.train_ops`' ``grad_heads``): the kept query heads,
    and the KV heads with any kept query head in their group."""
    return [(int(keep_query[a.path].sum()),
             int(keep_query[a.path].view(a.n_kv_heads, a.group_size).any(dim=1).sum()))
            for a in structure.attention]


@contextmanager
def detached_heads(model: nn.Module, structure: ModelStructure,
                   keep_query: Mapping[str, Tensor]) -> Iterator[None]:
    """Pruned heads computed in the forward but without gradient, for the `with` block (AoH
    pruning mode `detached`). ``keep_query[path]``: bool [n_heads] of kept query heads; a KV
    head (GQA) takes part in the backward when any head of its group is kept.

    The forward is the full model's. o's input gradient is zero on the pruned heads' columns,
    so no gradient reaches their attention, queries, keys or values (exactly zero there), and
    the frozen base weights of q/k/v / o compute their input gradients only for the kept
    heads' rows / columns — the backward's projection matmuls shrink with the kept heads
    (attention's own backward still runs for every head, on zeros for the pruned ones). The
    trainables are untouched: the caller freezes the pruned heads' slices (adapter mode's
    masks), and they receive zero gradient anyway.
    """
    with patched() as patcher:
        for path, cut in _cuts(structure, keep_query).items():
            module = model.get_submodule(path)
            base = base_layer(module)
            conv = isinstance(base, Conv1D)  # weight [in, out] instead of Linear's [out, in]
            rows = cut.cols is None
            index = (cut.row_index() if rows else cut.cols).to(base.weight.device)
            w = base.weight.detach()
            w = w.T if conv else w  # [out, in]
            kept_weight = w.index_select(0 if rows else 1, index).contiguous()
            forward = base.forward

            def partial(x: Tensor, *args: Any, _f=forward, _w=kept_weight, _i=index,
                        _r=rows, **kwargs: Any) -> Tensor:
                return _KeptGrad.apply(x, _f, _w, _i, _r)

            patcher.set(base, "forward", partial)
            if not rows and base is not module:  # o's LoRA path: no gradient into pruned heads
                mask = torch.zeros(w.shape[1], dtype=torch.bool, device=index.device)
                mask[index] = True
                outer = module.forward

                def masked(x: Tensor, *args: Any, _f=outer, _m=mask, **kwargs: Any) -> Tensor:
                    return _f(_MaskGrad.apply(x, _m), *args, **kwargs)

                patcher.set(module, "forward", masked)
        yield
