"""Head map: which coordinates of the trainable LoRA tensors belong to which attention head.

AoH (Venkatesha, Kundu, Panda: *Assortment of Attention Heads*) prunes attention heads per
client (Eq. 7) and aggregates head slices with importance weights (Eq. 8). Both need to know
which coordinates of the trainable tensors Φ belong to which head:

* `head_units` maps every head of every attention module to its slices of the LoRA tensors:
  rows `offset + h*d : offset + (h+1)*d` of LoRA **B** of q/k/v (B is [out, r]) and columns
  `h*d : (h+1)*d` of LoRA **A** of o (A is [r, in]). LoRA A of q/k/v and LoRA B of o are shared
  by all heads and not head-mapped. Under GQA a query unit holds q rows + o columns of query
  head h and a KV unit holds k and v rows of KV head g.
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
    """Coordinates `start:stop` along `dim` of trainable tensor `key` (a parameter path).

    dim 0: rows (LoRA B of q/k/v, [out, r]); dim 1: columns (LoRA A of o, [r, in]).
    """

    key: str
    dim: int
    start: int
    stop: int


@dataclass(frozen=True)
class HeadUnit:
    """The trainable coordinates owned by one head of one attention module.

    kind "query": rows of q's LoRA B and columns of o's LoRA A of query head `index`.
    kind "kv": rows of k's and v's LoRA B of KV head `index` (MHA: one per query head; GQA:
    one per group). `query_heads` are the query heads the unit serves: `(index,)` for a query
    unit, the group `g*G .. (g+1)*G - 1` for a KV unit (G = group size); a KV unit is kept
    when any of them is kept, and its importance is their max (DESIGN "Head map").
    """

    path: str
    index: int
    kind: str
    slices: tuple[HeadSlice, ...]
    query_heads: tuple[int, ...]


# parameter path -> (module path, "lora_A" | "lora_B", adapter name, "weight" | "bias")
_LORA_KEY = re.compile(
    r"(?P<module>.+)\.(?P<part>lora_[AB])\.(?P<adapter>[^.]+)\.(?P<leaf>weight|bias)"
)


def head_units(params: Mapping[str, Tensor], structure: ModelStructure,
               parts: str = "AB") -> list[HeadUnit]:
    """Every head's slices of the LoRA tensors in `params` (keys as `trainable_parameters`).
    ``parts`` = "B" maps LoRA B rows only (AoH's P = {B}, Sect. 3.1): o's LoRA A is then
    shared by all heads like q/k/v's A.

    Only tensors present in `params` are mapped (LoRA on q and v only -> units hold only
    those). Order: attention modules as in `structure`, then query units 0..H-1, then KV units
    0..KV-1; units with no slice are left out. Asserts that every slice is in bounds, that no
    two units overlap, and that the units tile the mapped dimension of every tensor exactly
    (each LoRA B row of q/k/v and each LoRA A column of o belongs to exactly one head).
    """
    lora = _lora_index(params)
    units: list[HeadUnit] = []
    for attn in structure.attention:
        units += _units_of(attn, lora, with_a=parts == "AB")
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


def _lora_index(params: Mapping[str, Tensor]) -> dict[tuple[str, str], list[str]]:
    """(module path, "lora_A" | "lora_B") -> LoRA parameter paths in `params`, in order."""
    index: dict[tuple[str, str], list[str]] = {}
    for key in params:
        match = _LORA_KEY.fullmatch(key)
        if match is not None:
            index.setdefault((match["module"], match["part"]), []).append(key)
    return index


def _units_of(attn: AttentionModule, lora: dict[tuple[str, str], list[str]],
              with_a: bool = True) -> list[HeadUnit]:
    """Query units then KV units of one attention module (``with_a``: o's LoRA A columns
    too)."""
    d = attn.head_dim

    def rows(name: str, head: int) -> list[HeadSlice]:  # LoRA B (and its bias) of q/k/v
        proj = getattr(attn, name)
        start = proj.offset + head * d
        keys = lora.get((proj.module, "lora_B"), [])
        return [HeadSlice(key, 0, start, start + d) for key in keys]

    def cols(head: int) -> list[HeadSlice]:  # LoRA A of o: [r, in], in = H*d
        keys = [k for k in lora.get((attn.o.module, "lora_A"), []) if k.endswith(".weight")
                and with_a]
        return [HeadSlice(key, 1, head * d, (head + 1) * d) for key in keys]

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
