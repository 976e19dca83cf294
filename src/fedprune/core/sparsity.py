"""FedSpaLLM server maths (Bai et al., arXiv 2410.14852; DESIGN.md Method B): per-client layer
budgets and layer sampling, the l0-norm aggregation weight, adaptive mask expansion, N:M masks
and sparsity summaries.

Pure torch/numpy, no I/O; no function mutates its inputs. Masks are boolean (or 0/1) and
True/1 on *kept* entries, as in ``core.blocks``. Products such as 2L*r_i/sum(r) and s*d are
computed exactly on the decimal values of the floats (``Fraction(repr(x))``), so that
0.7 * 10 zeros is 7, not the 8 that float rounding (7.000000000000001) would give.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import torch

# Tags the layer-sampling random streams so they never coincide with the client-selection
# stream selection.round_rng(seed, rnd, stream) = default_rng([seed, rnd, stream]).
_SAMPLE_STREAM = 0x5A4D
_COVER_STREAM = 0xC0E5


def _exact(x: float) -> Fraction:
    """The decimal value of ``x`` as written (0.1 -> 1/10), for exact floors and ceilings."""
    return Fraction(repr(float(x)))


def _check_layers(num_layers: int) -> None:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")


def _check_seed(**parts: int) -> None:
    for name, v in parts.items():
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 0:
            raise ValueError(f"{name} must be a non-negative int (it seeds the RNG), got {v!r}")


def _check_sparsity(sparsity: float) -> None:
    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")


# --- LAYER BUDGETS AND SAMPLING -------------------------------------------------------------

def layer_budget(scores: Sequence[float], num_layers: int) -> list[int]:
    """FedSpaLLM's number of layers per client: k_i = floor(2L * r_i / sum_j r_j) + 1, capped
    at L, from the resource scores r_i (> 0, finite). The floor is exact (see module doc)."""
    _check_layers(num_layers)
    if len(scores) == 0:
        raise ValueError("layer_budget needs at least one resource score")
    for i, r in enumerate(scores):
        if not (math.isfinite(r) and r > 0):
            raise ValueError(f"resource score of client {i} must be > 0 and finite, got {r!r}")
    exact = [_exact(r) for r in scores]
    total = sum(exact)
    return [min(num_layers, math.floor(2 * num_layers * r / total) + 1) for r in exact]


def sample_layers(seed: int, rnd: int, client_id: int, k: int, num_layers: int) -> list[int]:
    """k distinct layers of L, uniformly without replacement, ascending. The generator is
    seeded by (run seed, round, client id) alone, so the draw is reproducible and independent
    of every other client and round (FedSpaLLM's per-round layer sampling)."""
    _check_layers(num_layers)
    _check_seed(seed=seed, rnd=rnd, client_id=client_id)
    if not 1 <= k <= num_layers:
        raise ValueError(f"layer budget k must be in [1, {num_layers}], got {k}")
    rng = np.random.default_rng([seed, rnd, client_id, _SAMPLE_STREAM])
    return sorted(int(i) for i in rng.choice(num_layers, size=k, replace=False))


def cover_layers(seed: int, rnd: int, budgets: Sequence[int], num_layers: int
                 ) -> list[list[int]]:
    """Layer sets that cover every layer this round (DESIGN.md: the coverage option, needs
    sum_i k_i >= L). Entry i is the ascending set of the i-th client in ``budgets``.

    Construction, from one generator seeded by (seed, round):
      1. deal a uniformly random permutation of the L layers round-robin to the clients in
         list order, skipping clients whose budget is full: every layer gets exactly one
         client and client i at most k_i layers (possible because sum_i k_i >= L);
      2. fill each client's remaining budget, in list order, uniformly without replacement
         from the layers it does not hold yet.
    Each client gets exactly k_i distinct layers, and each client's set alone is still a
    uniform k_i-subset (step 1 gives it a uniform subset, step 2 a uniform completion);
    only the sets of different clients become dependent.
    """
    _check_layers(num_layers)
    _check_seed(seed=seed, rnd=rnd)
    for i, k in enumerate(budgets):
        if not 1 <= k <= num_layers:
            raise ValueError(f"layer budget of client {i} must be in [1, {num_layers}], got {k}")
    if sum(budgets) < num_layers:
        raise ValueError(f"coverage needs sum of layer budgets >= num_layers = {num_layers}, "
                         f"got {sum(budgets)}")
    rng = np.random.default_rng([seed, rnd, _COVER_STREAM])
    held: list[list[int]] = [[] for _ in budgets]
    client = 0
    for layer in rng.permutation(num_layers).tolist():  # step 1: deal
        while len(held[client]) == budgets[client]:
            client = (client + 1) % len(budgets)
        held[client].append(layer)
        client = (client + 1) % len(budgets)
    for mine, k in zip(held, budgets, strict=True):  # step 2: fill
        rest = np.setdiff1d(np.arange(num_layers), mine)
        mine.extend(rng.choice(rest, size=k - len(mine), replace=False).tolist())
    return [sorted(mine) for mine in held]


# --- AGGREGATION WEIGHT AND MASK EXPANSION --------------------------------------------------

def l0_weights(tensor: torch.Tensor) -> torch.Tensor:
    """FedSpaLLM's l0-norm aggregation weight of one client's pruned matrix: its element mask
    M_i = 1[W_i != 0] (float32 0/1), so that the aggregated weight is
    W[j] = sum_i M_i[j] W_i[j] / sum_i M_i[j] (0 where every owner pruned j)."""
    return (tensor != 0).to(torch.float32)


def expand_mask(weight: torch.Tensor, pruned_count: torch.Tensor, num_owners: int,
                sparsity: float) -> torch.Tensor:
    """FedSpaLLM's adaptive mask expansion of one l0-aggregated weight matrix (a new tensor).

    C_j = ``pruned_count[j]`` is how many of the N = ``num_owners`` clients that sampled this
    layer pruned entry j; the l0 mean is 0 where C_j = N (checked). The target is
    k = ceil(s * d) zeros, d = numel. "Already zero" means ``weight == 0``: the C_j = N
    entries plus any that are 0 for other reasons (e.g. every owner that kept j sent 0).
    If z entries are already zero, the k - z nonzero entries with the largest C_j are zeroed,
    ties by smaller |W[j]| (our choice), then by smaller flat index. The result has exactly
    max(k, z) zeros: nothing is zeroed when z >= k. N:M patterns: `expand_nm`.
    """
    _check_sparsity(sparsity)
    if pruned_count.shape != weight.shape:
        raise ValueError(f"pruned_count shape {tuple(pruned_count.shape)} != weight shape "
                         f"{tuple(weight.shape)}")
    if pruned_count.dtype.is_floating_point or pruned_count.dtype.is_complex:
        raise ValueError(f"pruned_count must be an integer tensor, got {pruned_count.dtype}")
    if num_owners < 1:
        raise ValueError(f"num_owners must be >= 1, got {num_owners}")
    counts, flat = pruned_count.reshape(-1).long(), weight.reshape(-1)
    if counts.numel() and (counts.min() < 0 or counts.max() > num_owners):
        raise ValueError(f"pruned_count must lie in [0, num_owners = {num_owners}]")
    if bool((flat[counts == num_owners] != 0).any()):
        raise ValueError("weight is nonzero where every owner pruned it (C_j = N); "
                         "expected the l0-norm mean, which is 0 there")
    target = math.ceil(_exact(sparsity) * flat.numel())
    candidates = (flat != 0).nonzero().squeeze(1)  # ascending flat index
    extra = target - (flat.numel() - candidates.numel())
    out = flat.clone()  # row-major copy, whatever the strides of weight
    if extra > 0:
        # composite key by stable sorts: index (given), then |W| ascending, then C descending
        by_mag = candidates[torch.sort(flat[candidates].abs(), stable=True).indices]
        by_count = by_mag[torch.sort(-counts[by_mag], stable=True).indices]
        out[by_count[:extra]] = 0
    return out.reshape(weight.shape)


# --- N:M MASKS AND SUMMARIES ----------------------------------------------------------------

def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean keep mask for N:M sparsity as in SparseGPT (``prunen:prunem``): in every group
    of m consecutive entries along the last dim, the n with the lowest score are pruned
    (False), e.g. 2:4 = 2 zeros in every 4. Ties: the earlier entry is pruned. SparseGPT's
    ``mask1`` (True = pruned) is the complement of this mask."""
    if not 1 <= n < m:
        raise ValueError(f"N:M sparsity needs 1 <= n < m, got {n}:{m}")
    if scores.ndim == 0 or scores.shape[-1] % m:
        raise ValueError(f"m = {m} must divide the last dim, got shape {tuple(scores.shape)}")
    groups = scores.reshape(*scores.shape[:-1], -1, m)  # (..., cols/m, m)
    low = torch.sort(groups, dim=-1, stable=True).indices[..., :n]
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, low, False)
    return keep.reshape(scores.shape)


def expand_nm(weight: torch.Tensor, pruned_count: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask expansion for N:M sparsity (our reading; the paper defines expansion for
    unstructured masks only): the l0 mean of N:M-sparse client matrices is in general not
    N:M-sparse (owners disagree inside a group), so in every group of m consecutive entries
    along the last dim that has fewer than n zeros, zero the nonzero entries with the largest
    C_j = ``pruned_count[j]`` (prune votes), ties by smaller |W[j]|, then by position, until it
    has n. Groups that already have >= n zeros are left as they are. A new tensor; with one
    owner and C = 0 everywhere this is magnitude N:M pruning."""
    if pruned_count.shape != weight.shape:
        raise ValueError(f"pruned_count shape {tuple(pruned_count.shape)} != weight shape "
                         f"{tuple(weight.shape)}")
    if not 1 <= n < m or weight.ndim == 0 or weight.shape[-1] % m:
        raise ValueError(f"invalid N:M pattern {n}:{m} for shape {tuple(weight.shape)}")
    w = weight.reshape(*weight.shape[:-1], -1, m)  # (..., groups, m)
    counts = pruned_count.reshape(w.shape).long()
    # per group, a stable order of the entries to zero: zeros first (free), then the most
    # votes, then the smallest |W|, then position — composed from the last key to the first
    order = torch.sort(w.abs(), dim=-1, stable=True).indices
    order = order.gather(-1, torch.sort(-counts.gather(-1, order), dim=-1, stable=True).indices)
    order = order.gather(-1, torch.sort((w.gather(-1, order) != 0).to(torch.int8), dim=-1,
                                        stable=True).indices)
    out = w.clone()
    out.scatter_(-1, order[..., :n], 0.0)  # the first n are zeros already or the ones to zero
    return out.reshape(weight.shape)


def is_nm_sparse(tensor: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive entries along the last dim has >= n zeros."""
    if not 1 <= n < m or tensor.ndim == 0 or tensor.shape[-1] % m:
        raise ValueError(f"invalid N:M pattern {n}:{m} for shape {tuple(tensor.shape)}")
    zeros = (tensor.reshape(*tensor.shape[:-1], -1, m) == 0).sum(-1)
    return bool((zeros >= n).all())


def sparsity_of(tensor: torch.Tensor) -> float:
    """Fraction of exactly-zero entries (0.0 for an empty tensor)."""
    return float((tensor == 0).sum()) / tensor.numel() if tensor.numel() else 0.0


class SparsitySummary(NamedTuple):
    """Per-matrix and overall sparsity of a state dict (overall = total zeros / total size)."""

    per_matrix: dict[str, float]
    zeros: int
    total: int

    @property
    def overall(self) -> float:
        return self.zeros / self.total if self.total else 0.0


def sparsity_summary(state: Mapping[str, torch.Tensor]) -> SparsitySummary:
    """Sparsity of each tensor of ``state`` (keyed by module path) and of all of them."""
    zeros = {k: int((v == 0).sum()) for k, v in state.items()}
    return SparsitySummary(
        per_matrix={k: zeros[k] / v.numel() if v.numel() else 0.0 for k, v in state.items()},
        zeros=sum(zeros.values()), total=sum(v.numel() for v in state.values()))
