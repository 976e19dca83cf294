"""Head map: which coordinates of the trainable PEFT tensors belong to which attention head.

AoH (Venkatesha, Kundu, Panda: *Assortment of Attention Heads*) prunes attention heads per
client (Eq. 7) and aggregates head slices with importance weights (Eq. 8). Both need to know
which coordinates of the trainable tensors Φ belong to which head:

* `head_units` maps every head of every attention module to its slices of the trainable
  tensors (DESIGN.md "Head map"): the *output rows* `offset + h*d : offset + (h+1)*d` of q/k/v
  and the *input columns* `h*d : (h+1)*d` of o. Per PEFT method (`fedprune.structure.model.
  apply_peft`): LoRA — rows of **B** of q/k/v (B is [out, r], and its bias), columns of **A**
  of o (A is [r, in]); IA3 — rows of the [out, 1] scalings of k/v; full fine-tuning — rows of
  the q/k/v weights and biases, columns of the o weight (GPT-2's Conv1D stores [in, out]: the
  other dim); prompt tuning — only on request (`prompt_chunks`), column chunk h of the [T_p, d]
  prompt embeddings to query head h of the first attention module; prefix tuning — each KV
  head's key and value prefix columns of every layer. Everything else (LoRA A of
  q/k/v, B of o, biases of o, FFN scalings, embeddings, the task head) is shared by all heads
  and not head-mapped. Under GQA a query unit holds q rows + o columns of query head h and a
  KV unit holds k and v rows of KV head g.
* `unit_mask` turns per-client kept query heads into boolean masks over those tensors.
* `structural_keep` says which query heads the structural view (headview.py) really keeps
  under GQA (whole KV groups).

Everything is derived from `ModelStructure` (module paths + fused offsets, asserted by
`attention.describe`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fedprune.structure.attention import AttentionModule, ModelStructure

__all__ = ["HeadSlice", "HeadUnit", "head_units", "structural_keep", "unit_mask"]


# --- head map -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadSlice:
    """Coordinates `start:stop` along `dim` of trainable tensor `key` (a parameter path):
    e.g. dim 0 of LoRA B of q/k/v ([out, r]), dim 1 of LoRA A of o ([r, in])."""

    key: str
    dim: int
    start: int
    stop: int


@dataclass(frozen=True)
class HeadUnit:
    """The trainable coordinates owned by one head of one attention module.

    kind "query": q's output rows and o's input columns of query head `index` (and its
    prompt chunk, when mapped). kind "kv": k's and v's output rows of KV head `index` (MHA: one per query head; GQA:
    one per group). `query_heads` are the query heads the unit serves: `(index,)` for a query
    unit, the group `g*G .. (g+1)*G - 1` for a KV unit (G = group size); a KV unit is kept
    when any of them is kept, and its importance is their max (DESIGN "Head map").
    """

    path: str
    index: int
    kind: str
    slices: tuple[HeadSlice, ...]
    query_heads: tuple[int, ...]


_LORA_PART = re.compile(r"(?P<part>lora_[AB])\.[^.]+\.(?P<leaf>weight|bias)")
_IA3 = re.compile(r"ia3_l\.[^.]+")
_PROMPT = re.compile(r"prompt_encoder\.[^.]+\.embedding\.weight")


def head_units(params: Mapping[str, Tensor], structure: ModelStructure,
               parts: str = "AB", prompt_chunks: bool = False,
               prefix: bool = False) -> list[HeadUnit]:
    """Every head's slices of the trainable tensors in `params` (keys as
    `trainable_parameters`). ``parts`` = "B" maps output rows only (LoRA: AoH's P = {B},
    Sect. 3.1): o's input columns are then shared by all heads. ``prompt_chunks``: map prompt
    tuning's embeddings by column chunks (module docstring); without it they are shared.
    ``prefix``: the embeddings are prefix tuning's per-layer keys and values
    (`_with_prefix_heads`).

    Only tensors present in `params` are mapped (LoRA on q and v only -> units hold only
    those). Order: attention modules as in `structure`, then query units 0..H-1, then KV units
    0..KV-1; units with no slice are left out. Asserts that every slice is in bounds, that no
    two units overlap, and that the units tile the mapped dimension of every tensor exactly
    (each mapped row of q/k/v and each mapped column of o belongs to exactly one head).
    """
    index = _projection_index(params, structure)
    units: list[HeadUnit] = []
    for attn in structure.attention:
        units += _units_of(attn, index, with_cols=parts == "AB")
    if prompt_chunks:
        units = _with_prompt_chunks(units, params, structure)
    if prefix:
        units = _with_prefix_heads(units, params, structure)
    _check_units(units, params)
    return units


def unit_mask(
    units: list[HeadUnit], keep_query: Mapping[str, Tensor], params: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Boolean masks, one per head-mapped tensor, True where a kept unit owns the coordinate.

    `keep_query[path]` is a bool [n_heads] of kept query heads per attention module. A KV unit
    is kept when any query head of its group is kept (GQA). Coordinates of shared,
    non-head-mapped tensors (LoRA A of q/k/v, LoRA B of o, task head) are not in the result;
    callers handle them.
    """
    n_heads = _heads_per_path(units)
    masks = {s.key: torch.zeros(params[s.key].shape, dtype=torch.bool,
                                device=params[s.key].device)
             for u in units for s in u.slices}
    for path, n in n_heads.items():
        _check_keep_vector(path, keep_query.get(path), n)
    for unit in units:
        if bool(keep_query[unit.path][list(unit.query_heads)].any()):
            for s in unit.slices:
                masks[s.key].narrow(s.dim, s.start, s.stop - s.start).fill_(True)
    return masks


def _projection_index(params: Mapping[str, Tensor], structure: ModelStructure
                      ) -> dict[tuple[str, str], list[tuple[str, int]]]:
    """(projection module path, "rows" | "cols") -> [(parameter path, dim)] of the trainable
    tensors indexed by that projection's output features (rows) or input features (cols)."""
    modules = {getattr(a, p).module for a in structure.attention for p in "qkvo"}
    weight_dims = (1, 0) if structure.transposed else (0, 1)  # (rows, cols)
    index: dict[tuple[str, str], list[tuple[str, int]]] = {}
    for key, tensor in params.items():
        module, _, leaf = key.rpartition(".")
        while module and module not in modules:  # the longest projection path that is a prefix
            module, _, rest = module.rpartition(".")
            leaf = f"{rest}.{leaf}"
        if not module:
            continue
        if lora := _LORA_PART.fullmatch(leaf):
            role, dim = ("rows", 0) if lora["part"] == "lora_B" else ("cols", 1)
            if lora["part"] == "lora_A" and lora["leaf"] == "bias":
                continue
        elif _IA3.fullmatch(leaf):  # [out, 1] scales the output, [1, in] the input
            role, dim = ("rows", 0) if tensor.shape[-1] == 1 else ("cols", 1)
        elif leaf == "weight":  # full fine-tuning
            index.setdefault((module, "cols"), []).append((key, weight_dims[1]))
            role, dim = "rows", weight_dims[0]
        elif leaf == "bias":
            role, dim = "rows", 0
        else:
            continue
        index.setdefault((module, role), []).append((key, dim))
    return index


def _units_of(attn: AttentionModule, index: dict[tuple[str, str], list[tuple[str, int]]],
              with_cols: bool = True) -> list[HeadUnit]:
    """Query units then KV units of one attention module (``with_cols``: o's input columns
    too)."""
    d = attn.head_dim

    def rows(name: str, head: int) -> list[HeadSlice]:  # output rows of q/k/v
        proj = getattr(attn, name)
        start = proj.offset + head * d
        return [HeadSlice(key, dim, start, start + d)
                for key, dim in index.get((proj.module, "rows"), [])]

    def cols(head: int) -> list[HeadSlice]:  # input columns of o: in = H*d
        keys = index.get((attn.o.module, "cols"), []) if with_cols else []
        return [HeadSlice(key, dim, head * d, (head + 1) * d) for key, dim in keys]

    units = [
        HeadUnit(attn.path, h, "query", tuple(rows("q", h) + cols(h)), (h,))
        for h in range(attn.n_heads)
    ]
    g_size = attn.group_size
    units += [
        HeadUnit(attn.path, g, "kv", tuple(rows("k", g) + rows("v", g)),
                 tuple(range(g * g_size, (g + 1) * g_size)))
        for g in range(attn.n_kv_heads)
    ]
    return [u for u in units if u.slices]


def _with_prompt_chunks(units: list[HeadUnit], params: Mapping[str, Tensor],
                        structure: ModelStructure) -> list[HeadUnit]:
    """Column chunk h of each prompt-embedding tensor [T_p, d], as query unit h of the first
    attention module (d = H * head_dim there), before ``units``. A prompt-tuned model trains
    nothing else that is head-mapped (peft holds one adapter kind), so ``units`` is empty."""
    first = structure.attention[0]
    keys = [k for k in params if _PROMPT.fullmatch(k)]
    if not keys:
        raise ValueError("prompt_chunks: no prompt-tuning embeddings among the trainables")
    assert not units, "prompt_chunks: other head-mapped tensors beside the prompt embeddings"
    d = first.head_dim
    for key in keys:
        assert params[key].shape[1] == first.n_heads * d, \
            f"{key}: width {params[key].shape[1]} != {first.n_heads} heads x {d}"
    return [HeadUnit(first.path, h, "query", tuple(HeadSlice(k, 1, h * d, (h + 1) * d)
                                                   for k in keys), (h,))
            for h in range(first.n_heads)]


def _with_prefix_heads(units: list[HeadUnit], params: Mapping[str, Tensor],
                       structure: ModelStructure) -> list[HeadUnit]:
    """KV unit g of the l-th prefixed attention module (`ModelStructure.prefixed`: a
    decoder-only model's, an encoder classifier's (`structure.prefix`) or an encoder-decoder's
    decoder self-attention): its key and its value prefix columns in prefix tuning's
    [T_p, L * 2 * KV * d] embedding. peft views the embedding as [T_p, L * 2, KV, d] and
    hands layer l rows 2l (keys) and 2l + 1 (values) of the second axis as its cache, so the
    columns of (l, j, g) are (2l + j) * KV * d + g * d onward. The prefix is each KV head's own: a unit serves its query group (GQA)."""
    keys = [k for k in params if _PROMPT.fullmatch(k)]
    if not keys:
        raise ValueError("prefix: no prefix-tuning embeddings among the trainables")
    assert not units, "prefix: other head-mapped tensors beside the prefix embeddings"
    attns = structure.prefixed
    width = attns[0].n_kv_heads * attns[0].head_dim  # one layer's keys (or values)
    for key in keys:
        assert params[key].shape[1] == len(attns) * 2 * width, \
            f"{key}: width {params[key].shape[1]} != {len(attns)} layers x 2 x {width}"
    out = []
    for layer, a in enumerate(attns):
        d = a.head_dim
        for g in range(a.n_kv_heads):
            cols = tuple(HeadSlice(k, 1, (2 * layer + j) * width + g * d,
                                   (2 * layer + j) * width + (g + 1) * d)
                         for j in (0, 1) for k in keys)
            out.append(HeadUnit(a.path, g, "kv", cols,
                                tuple(range(g * a.group_size, (g + 1) * a.group_size))))
    return out


def _check_units(units: list[HeadUnit], params: Mapping[str, Tensor]) -> None:
    """Assert bounds, one dim per tensor, no overlap, and exact tiling of the mapped dim."""
    spans: dict[str, list[tuple[int, int, int]]] = {}  # key -> [(start, stop, dim)]
    for unit in units:
        for s in unit.slices:
            size = params[s.key].shape[s.dim]
            assert 0 <= s.start < s.stop <= size, f"{s} out of bounds (size {size})"
            spans.setdefault(s.key, []).append((s.start, s.stop, s.dim))
    for key, parts in spans.items():
        parts.sort()
        dims = {dim for _, _, dim in parts}
        assert len(dims) == 1, f"{key}: head-mapped along several dims {sorted(dims)}"
        covered = 0
        for start, stop, _ in parts:
            assert start == covered, f"{key}: head slices overlap or leave a gap at {covered}"
            covered = stop
        size = params[key].shape[parts[0][2]]
        assert covered == size, f"{key}: head slices cover {covered} of {size}"


def _heads_per_path(units: list[HeadUnit]) -> dict[str, int]:
    """Number of query heads per attention path, from the units (they cover every head)."""
    n: dict[str, int] = {}
    for unit in units:
        n[unit.path] = max(n.get(unit.path, 0), max(unit.query_heads) + 1)
    return n


def _check_keep_vector(path: str, keep: Tensor | None, n_heads: int) -> None:
    if keep is None:
        raise KeyError(f"keep_query has no entry for attention module {path!r}")
    if keep.dtype != torch.bool or keep.shape != (n_heads,):
        raise ValueError(f"keep_query[{path!r}] must be a bool tensor of shape ({n_heads},); "
                         f"got {keep.dtype} {tuple(keep.shape)}")


# --- kept heads under GQA -------------------------------------------------------------------


def structural_keep(
    structure: ModelStructure, keep_query: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The query heads `structural_view` actually keeps: bool [n_heads] per attention module.

    Under GQA the structural granularity is the KV group: a group is kept when any of its query
    heads is kept, and then all its query heads are kept (the family forwards pair query head
    h with KV head h // G by a uniform `repeat_kv`, so a kept group cannot drop some of its
    query heads without a custom attention kernel). Without GQA this is `keep_query` itself.
    """
    out = {}
    for attn in structure.attention:
        keep = keep_query.get(attn.path)
        _check_keep_vector(attn.path, keep, attn.n_heads)
        groups = keep.reshape(attn.n_kv_heads, attn.group_size).any(dim=1)  # (KV,)
        out[attn.path] = groups.repeat_interleave(attn.group_size)
    return out
