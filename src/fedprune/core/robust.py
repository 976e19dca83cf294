"""Byzantine-robust aggregation over each coordinate's owners (issue 15).

Two kinds, both composable with every method's weights (head importance, ℓ0 masks, the layer
map), because ownership — weight > 0 — is all they read of them:

- *combine rules* (a `Combine`) replace `owned_mean`'s weighted mean per coordinate by a
  statistic of the owners' deltas, unweighted as in Flower's `aggregate_median` /
  `aggregate_trimmed_avg`: ``median`` (the mean of the two middle values for an even count,
  as numpy's) and ``trimmed_mean`` (drop floor(trim · k) of the k owners' values at each end);
- *filters* choose which updates `owned_mean` then averages with the method's own weights:
  ``krum`` (the one update with the smallest Krum score, Blanchard et al. 2017) and
  ``multikrum`` (the ``keep`` smallest). Distances are squared L2 over the coordinates both
  clients own; a score sums a client's n - f - 2 smallest distances (at least 1), as Flower's
  `aggregate_krum`;
- ``bulyan`` (El Mhamdi et al. 2018, as Flower's `aggregate_bulyan` with Krum) is both: a
  filter that picks θ = n - 2f updates by Krum, one at a time, each over those not yet picked,
  then the combine rule that averages, per coordinate, the k - 2f of its k owners' values
  closest to their median (θ - 2f where all own it; at least 1).

``clip`` scales one client's update to an L2 norm of at most ``max_norm`` (server side,
before any rule). Pure functions: inputs are never mutated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from fedprune.core.update import ClientUpdate

COMBINE = ("median", "trimmed_mean", "bulyan")
FILTERS = ("krum", "multikrum", "bulyan")


@dataclass(frozen=True)
class Combine:
    """How `owned_mean` combines a coordinate's owners' deltas: ``rule`` "mean" (the
    method's weighted mean) or one of `COMBINE`; ``trim`` for trimmed_mean, ``f`` for
    bulyan."""

    rule: str = "mean"
    trim: float = 0.0
    f: int = 0

    def __post_init__(self) -> None:
        if self.rule not in ("mean", *COMBINE):
            raise ValueError(f"combine rule {self.rule!r}: 'mean' or one of {COMBINE}")


MEAN = Combine()


def owner_statistic(deltas: torch.Tensor, owned: torch.Tensor,
                    combine: Combine) -> torch.Tensor:
    """``combine``'s rule over dim 0 of ``deltas`` [n, ...] among the entries where ``owned``
    (bool, same shape) is True; 0 where no one owns the coordinate."""
    k = owned.sum(0)                                     # owners per coordinate
    values = deltas.masked_fill(~owned, float("nan")).sort(dim=0).values  # NaN sort last
    values = values.nan_to_num(0.0)
    rank = torch.arange(deltas.shape[0]).view(-1, *([1] * (deltas.dim() - 1)))
    if combine.rule in ("median", "bulyan"):
        lo = ((k - 1) // 2).clamp(min=0).unsqueeze(0)
        hi = (k // 2).clamp(max=deltas.shape[0] - 1).unsqueeze(0)
        median = (values.gather(0, lo) + values.gather(0, hi)).squeeze(0) / 2
    if combine.rule == "median":
        out = median
    elif combine.rule == "trimmed_mean":
        cut = torch.floor(combine.trim * k).to(torch.int64)
        kept = (rank >= cut) & (rank < k - cut)
        out = (values * kept).sum(0) / (k - 2 * cut).clamp(min=1)
    elif combine.rule == "bulyan":                       # the beta owners' values nearest
        beta = (k - 2 * combine.f).clamp(min=1)          # the median, averaged
        far = (values - median).abs().masked_fill(rank >= k, float("inf"))
        nearest = values.gather(0, far.argsort(dim=0, stable=True))
        out = (nearest * (rank < beta)).sum(0) / beta
    else:
        raise ValueError(f"combine rule {combine.rule!r}: one of {COMBINE}")
    return torch.where(k > 0, out, torch.zeros_like(out))


def _owned(update: ClientUpdate, key: str) -> torch.Tensor:
    w = torch.as_tensor(update.weight(key), dtype=torch.float64)
    return (w > 0).expand(update.delta[key].shape)


def distances(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """[n, n] squared L2 distances between updates over the coordinates both own (global
    keys), float64."""
    n = len(updates)
    held = [u.local_keys() for u in updates]
    dist = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            total = 0.0
            for key in held[i].keys() & held[j].keys():
                a, b = held[i][key], held[j][key]
                both = _owned(updates[i], a) & _owned(updates[j], b)
                diff = updates[i].delta[a].double() - updates[j].delta[b].double()
                total += float((diff * diff * both).sum())
            dist[i, j] = dist[j, i] = total
    return dist


def _scores(dist: torch.Tensor, f: int) -> list[float]:
    n = dist.shape[0]
    closest = max(1, n - f - 2)
    return [float(torch.cat([dist[i, :i], dist[i, i + 1:]]).sort().values[:closest].sum())
            for i in range(n)]


def krum_scores(updates: Sequence[ClientUpdate], f: int) -> list[float]:
    """Each update's Krum score: the sum of its n - f - 2 (at least 1) smallest squared
    distances to the others, over the coordinates both own (global keys)."""
    return _scores(distances(updates), f)


def krum_select(updates: Sequence[ClientUpdate], f: int, keep: int = 1) -> list[ClientUpdate]:
    """The ``keep`` updates with the smallest Krum scores (ties: smaller client id), in
    client-id order."""
    ordered = sorted(updates, key=lambda u: u.client_id)
    if len(ordered) <= keep:
        return ordered
    scores = krum_scores(ordered, f)
    best = sorted(range(len(ordered)), key=lambda i: (scores[i], ordered[i].client_id))[:keep]
    return [ordered[i] for i in sorted(best)]


def bulyan_select(updates: Sequence[ClientUpdate], f: int) -> list[ClientUpdate]:
    """Bulyan's first stage: θ = n - 2f (at least 1) Krum picks, each the smallest score
    (ties: smaller client id) among the updates not yet picked, scores recomputed over those;
    in client-id order."""
    ordered = sorted(updates, key=lambda u: u.client_id)
    dist = distances(ordered)
    rest, picked = list(range(len(ordered))), []
    for _ in range(max(1, len(ordered) - 2 * f)):
        scores = _scores(dist[rest][:, rest], f)
        best = min(range(len(rest)), key=lambda i: (scores[i], ordered[rest[i]].client_id))
        picked.append(rest.pop(best))
    return [ordered[i] for i in sorted(picked)]


def update_norm(update: ClientUpdate) -> float:
    """L2 norm of an update's deltas over the coordinates it owns."""
    return sum(float((d.double() ** 2 * _owned(update, k)).sum())
               for k, d in update.delta.items()) ** 0.5


def clip(update: ClientUpdate, max_norm: float) -> ClientUpdate:
    """The update scaled by min(1, max_norm / ||Δ||) (a new ClientUpdate; Δ's dtype kept)."""
    norm = update_norm(update)
    if norm <= max_norm:
        return update
    scale = max_norm / norm
    return replace(update, delta={k: (d.double() * scale).to(d.dtype)
                                  for k, d in update.delta.items()})


def cap_shares(weights: torch.Tensor, cap: float) -> torch.Tensor:
    """Weights [n, ...] lowered (water-filling, per coordinate over dim 0) so that no entry
    exceeds ``cap`` of its coordinate's total: the largest are cut to a common level t with
    t = cap · (new total), the others unchanged. Where fewer than 1 / cap entries are > 0 the
    cap cannot hold; there every owner weighs the same (share 1 / owners)."""
    w = weights.double()
    n = w.shape[0]
    desc = w.sort(dim=0, descending=True).values
    rest = desc.flip(0).cumsum(0).flip(0)                 # rest[k] = sum of desc[k:]
    owners = (w > 0).sum(0)
    out, done = w.clone(), owners == 0
    for k in range(n):                                    # k largest capped
        if k * cap >= 1:
            break
        level = cap * rest[k] / (1 - k * cap)             # t = cap · T, T = rest / (1 - k cap)
        fits = (desc[k] <= level) & (k < owners) & ~done  # the first uncapped owner is below t
        out = torch.where(fits, torch.minimum(w, level), out)
        done |= fits
    return torch.where(done, out, (w > 0).double()).to(weights.dtype)
