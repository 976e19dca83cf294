"""B2: FedAvg + random head pruning (AoH paper's baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedprune.core.update import State
from fedprune.methods.heads import HeadPruning, HeadPruningConfig


@dataclass
class RandomHeadsConfig(HeadPruningConfig):
    _name = "method.random_heads"


class RandomHeads(HeadPruning):
    """A random head mask per client and round at sparsity s; each head's slices are the
    data-size mean over the clients that kept it (weights |D_c| x keep flag)."""

    name = "random_heads"
    Config = RandomHeadsConfig

    def scores(self, start: State, indices: np.ndarray, seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {p: torch.rand(n, generator=gen) + 1e-6 for p, n in self.n_heads.items()}

    def unit_weight(self, alpha: float, num_examples: int) -> float:
        return float(num_examples)
