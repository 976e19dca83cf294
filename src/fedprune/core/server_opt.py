"""Server optimizers on the aggregated pseudo-gradient (Reddi et al. 2021, *Adaptive
Federated Optimization*, Algorithm 2; Hsu et al. 2019 for FedAvgM).

The one aggregation core (`owned_mean`, with each method's weights) proposes the mean model
x̄; the pseudo-gradient is Δ = x̄ - x, per coordinate, over the coordinates some selected
client owned this round (total weight > 0: a kept head's rows, a sampled layer, a held
layer). Then, with η = ``lr``:

    fedavgm     m <- β1 m + Δ;   x <- x + η m           (Flower's FedAvgM)
    fedadagrad  m <- β1 m + (1-β1) Δ;   v <- v + Δ²
    fedyogi     m as above;   v <- v - (1-β2) Δ² sign(v - Δ²)
    fedadam     m as above;   v <- β2 v + (1-β2) Δ²
                x <- x + η_t m / (√v + τ)   (the three adaptive ones)

η_t = η, or η √(1-β2^t) / (1-β1^t) with ``bias_correction`` (Kingma & Ba; t = how many
steps this coordinate's tensor has taken). Moments start at 0 (as Flower's strategies).

Coordinates nobody owned this round are *lazy*: their weight, m and v stay exactly as
they were (no decay of m, no step), like sparse Adam: a head every client pruned, or a
layer no client sampled, does not keep moving on stale momentum. Everything is computed in
float64 and cast back to the weight's dtype; moments are stored in float32. Pure functions:
inputs are never mutated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedprune.core.update import State

OPTIMIZERS = ("fedavg", "fedavgm", "fedadagrad", "fedyogi", "fedadam")  # fedavg: owned_mean's
# own server_lr step, x + η Δ, kept on that path so that FedAvg runs stay bit-identical
ADAPTIVE = ("fedadagrad", "fedyogi", "fedadam")
PREFIX = "server_opt::"  # checkpoint keys of the optimizer state: server_opt::{m,v,t}::<key>


@dataclass(frozen=True)
class ServerOpt:
    """One server optimizer's hyper-parameters (from ``[federation]``)."""

    name: str = "fedavg"
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    bias_correction: bool = False

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS[1:]:
            raise ValueError(f"server optimizer {self.name!r}: one of {OPTIMIZERS[1:]} (fedavg "
                             f"is owned_mean's own step)")


def server_step(opt: ServerOpt, state: State, proposed: State,
                owned: Mapping[str, torch.Tensor], moments: State) -> tuple[State, State]:
    """One server step: (new global state, new optimizer state).

    ``state`` x and ``proposed`` x̄ share keys; ``owned[key]`` is a bool tensor broadcastable
    to the key's shape (absent: nobody owned the key). ``moments`` holds ``m::key``,
    ``v::key`` (float32, the key's shape) and ``t::key`` (int64 scalar) for the keys that
    have stepped before. Where a coordinate is not owned, the result is ``proposed`` there —
    equal to x for every method but FedSpaLLM, whose ℓ0 mean zeroes what all owners pruned."""
    new, out = dict(proposed), dict(moments)
    for key, mask in owned.items():
        x, mask = state[key].double(), torch.as_tensor(mask, dtype=torch.bool).expand(
            state[key].shape)
        delta = proposed[key].double() - x
        m = moments.get(f"m::{key}", torch.zeros(x.shape)).double()
        t = int(moments.get(f"t::{key}", torch.tensor(0))) + 1
        if opt.name == "fedavgm":
            m = torch.where(mask, opt.beta1 * m + delta, m)
            step = m
        else:
            m = torch.where(mask, opt.beta1 * m + (1 - opt.beta1) * delta, m)
            v = moments.get(f"v::{key}", torch.zeros(x.shape)).double()
            sq = delta * delta
            if opt.name == "fedadagrad":
                v_new = v + sq
            elif opt.name == "fedyogi":
                v_new = v - (1 - opt.beta2) * sq * torch.sign(v - sq)
            else:
                v_new = opt.beta2 * v + (1 - opt.beta2) * sq
            v = torch.where(mask, v_new, v)
            step = m / (v.sqrt() + opt.tau)
            out[f"v::{key}"] = v.float()
        lr = opt.lr
        if opt.bias_correction and opt.name in ADAPTIVE:
            lr *= (1 - opt.beta2 ** t) ** 0.5 / (1 - opt.beta1 ** t)
        new[key] = torch.where(mask, x + lr * step, proposed[key].double()).to(state[key].dtype)
        out[f"m::{key}"], out[f"t::{key}"] = m.float(), torch.tensor(t)
    return new, out
