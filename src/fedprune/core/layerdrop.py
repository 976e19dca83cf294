"""PruFed layer-dropping plans (Bhansali et al.; DESIGN.md Method C): which global decoder
layers a tier's model keeps.

A rule-based strategy maps (num_layers L, keep ratio r) -> ascending kept global indices and
keeps k = keep_count(L, r) layers. Data-driven plans take per-layer statistics of hidden
states computed by the caller on calibration text (``LayerSimilarity`` does the maths):
Gromov et al. 2024's angular distance of a block and ShortGPT's Block Influence.
Pure torch, no I/O; inputs are never mutated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction

import torch

Strategy = Callable[[int, float], list[int]]
STRATEGIES: dict[str, Strategy] = {}


def register(name: str) -> Callable[[Strategy], Strategy]:
    def wrap(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        return fn
    return wrap


def keep_count(num_layers: int, keep_ratio: float) -> int:
    """k = max(1, floor(r*L + 1/2)): r*L rounded half up (not Python's banker's round, so
    L = 30, r = 0.75 keeps 23, not 22), computed exactly on the decimal value of r, and at
    least one layer. r must be in (0, 1]."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if isinstance(keep_ratio, bool) or not (isinstance(keep_ratio, int | float)
                                            and 0 < keep_ratio <= 1):
        raise ValueError(f"keep ratio must be in (0, 1], got {keep_ratio!r}")
    return max(1, math.floor(Fraction(repr(float(keep_ratio))) * num_layers + Fraction(1, 2)))


def plan_layers(strategy: str, num_layers: int, keep_ratio: float) -> list[int]:
    """Kept layers of the rule-based ``strategy`` (a key of STRATEGIES)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown layer-drop strategy {strategy!r}; known: "
                         f"{', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[strategy](num_layers, keep_ratio)


# --- RULE-BASED STRATEGIES ------------------------------------------------------------------

@register("top")
def top(num_layers: int, keep_ratio: float) -> list[int]:
    """Drop the top (last) L - k layers: keep 0 .. k-1."""
    return list(range(keep_count(num_layers, keep_ratio)))


@register("bottom")
def bottom(num_layers: int, keep_ratio: float) -> list[int]:
    """Drop the bottom (first) L - k layers: keep L-k .. L-1."""
    return list(range(num_layers - keep_count(num_layers, keep_ratio), num_layers))


@register("symmetric")
def symmetric(num_layers: int, keep_ratio: float) -> list[int]:
    """Drop a middle block: keep the first ceil(k/2) and the last floor(k/2) layers (an odd
    k gives the extra layer to the bottom, input side)."""
    k = keep_count(num_layers, keep_ratio)
    return list(range(k - k // 2)) + list(range(num_layers - k // 2, num_layers))


@register("alternate")
def alternate(num_layers: int, keep_ratio: float) -> list[int]:
    """Evenly spaced over the whole depth: layer floor(i*(L-1)/(k-1) + 1/2) for i = 0..k-1
    (rounded half up, exact integer arithmetic), so the first and last layers are always
    kept; the spacing is >= 1, so the layers are distinct. k = 1 keeps layer 0."""
    k = keep_count(num_layers, keep_ratio)
    if k == 1:
        return [0]
    return [(2 * i * (num_layers - 1) + k - 1) // (2 * (k - 1)) for i in range(k)]


@register("top-alternate")
def top_alternate(num_layers: int, keep_ratio: float) -> list[int]:
    """Drop every other layer from the top (L-1, L-3, L-5, ...) until L - k are dropped; when
    that pass drops too few (r < 1/2), keep dropping from the top among the layers left."""
    drop_n = num_layers - keep_count(num_layers, keep_ratio)
    every_other = list(range(num_layers - 1, -1, -2))
    rest = list(range(num_layers - 2, -1, -2))  # the layers the pass leaves, from the top
    dropped = set((every_other + rest)[:drop_n])
    return [i for i in range(num_layers) if i not in dropped]


def explicit(layers: Sequence[int], num_layers: int) -> list[int]:
    """A user-given set of kept layers, validated (non-empty, ints in [0, L), no duplicates)
    and sorted."""
    if len(layers) == 0:
        raise ValueError("explicit kept layers must not be empty")
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers:
            raise ValueError(f"explicit kept layer {i!r} is not an int in [0, {num_layers})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"explicit kept layers have duplicates: {list(layers)}")
    return sorted(layers)


# --- DATA-DRIVEN STRATEGIES -----------------------------------------------------------------

class LayerSimilarity:
    """Streaming token means, for every pair (a, b) of hidden states, of the cosine
    cos(h_a, h_b) and the angular distance arccos(cos(h_a, h_b)) / pi (Gromov et al. 2024),
    over all tokens of all batches.

    A batch is the L + 1 hidden states h_0..h_L, h_l the input of layer l and h_L the output
    of the last layer, each [..., d] with every leading position a token; the caller removes
    padding and picks the tokens (Gromov et al. use the last token of each sequence, ShortGPT
    all tokens).
    """

    def __init__(self) -> None:
        self.cos_sum: torch.Tensor | None = None    # [L+1, L+1] float64
        self.angle_sum: torch.Tensor | None = None  # [L+1, L+1] float64
        self.tokens = 0

    def add_batch(self, hidden_states: Sequence[torch.Tensor]) -> None:
        # bf16/fp16 -> float32 (float64 stays): (L+1, T, d)
        h = torch.stack([x.reshape(-1, x.shape[-1]) for x in hidden_states])
        h = h.to(torch.promote_types(h.dtype, torch.float32))
        u = torch.nn.functional.normalize(h, dim=-1).transpose(0, 1)  # (T, L+1, d)
        cos = torch.bmm(u, u.transpose(1, 2)).double().clamp(-1, 1)   # (T, L+1, L+1)
        angle = torch.arccos(cos) / math.pi
        if self.cos_sum is None:
            self.cos_sum, self.angle_sum = cos.sum(0), angle.sum(0)
        elif cos.shape[1:] != self.cos_sum.shape:
            raise ValueError(f"batch has {cos.shape[1]} hidden states, expected "
                             f"{self.cos_sum.shape[0]}")
        else:
            self.cos_sum, self.angle_sum = self.cos_sum + cos.sum(0), self.angle_sum + angle.sum(0)
        self.tokens += cos.shape[0]

    def _mean(self, total: torch.Tensor | None) -> torch.Tensor:
        if total is None or self.tokens == 0:
            raise ValueError("LayerSimilarity has no tokens yet; call add_batch first")
        return total / self.tokens

    @property
    def mean_cosine(self) -> torch.Tensor:
        """[L+1, L+1]: mean over tokens of cos(h_a, h_b)."""
        return self._mean(self.cos_sum)

    @property
    def angular_distance(self) -> torch.Tensor:
        """[L+1, L+1]: d(a, b) = mean over tokens of arccos(cos(h_a, h_b)) / pi."""
        return self._mean(self.angle_sum)

    @property
    def block_influence(self) -> torch.Tensor:
        """[L]: ShortGPT's BI_l = 1 - mean over tokens of cos(h_l, h_{l+1})."""
        return 1 - self.mean_cosine.diagonal(1)


def angular_distance_block(distance: torch.Tensor, keep_ratio: float) -> list[int]:
    """Gromov et al. 2024: drop the n = L - k consecutive layers l*..l*+n-1 whose input h_l*
    and output h_{l*+n} are closest, l* = argmin_l d(l, l+n); ties: the smallest l.
    ``distance`` is the [L+1, L+1] ``LayerSimilarity.angular_distance``. Returns kept layers."""
    if distance.ndim != 2 or distance.shape[0] != distance.shape[1] or distance.shape[0] < 2:
        raise ValueError(f"distance must be [L+1, L+1] with L >= 1, got {tuple(distance.shape)}")
    num_layers = distance.shape[0] - 1
    n = num_layers - keep_count(num_layers, keep_ratio)
    if n == 0:
        return list(range(num_layers))
    block = distance.diagonal(n).tolist()  # d(l, l+n) for l = 0 .. L-n
    start = min(range(len(block)), key=lambda l: block[l])  # first minimum
    return [i for i in range(num_layers) if not start <= i < start + n]


def block_influence_drop(influence: torch.Tensor, keep_ratio: float) -> list[int]:
    """ShortGPT (Men et al. 2024): drop the L - k layers with the lowest Block Influence
    BI_l = 1 - E cos(h_l, h_{l+1}); ties: the deeper layer is dropped first. ``influence``
    is [L] (``LayerSimilarity.block_influence``). Returns kept layers."""
    if influence.ndim != 1 or influence.numel() == 0:
        raise ValueError(f"influence must be [L] with L >= 1, got {tuple(influence.shape)}")
    if not bool(torch.isfinite(influence).all()):
        raise ValueError("block influence must be finite")
    bi = influence.tolist()
    num_layers = len(bi)
    drop_n = num_layers - keep_count(num_layers, keep_ratio)
    dropped = set(sorted(range(num_layers), key=lambda l: (bi[l], -l))[:drop_n])
    return [i for i in range(num_layers) if i not in dropped]
