"""AoH (Venkatesha, Kundu, Panda: *Assortment of Attention Heads*): head importance (Eq. 6)
on the client's data, Eq. 7 pruning, importance-weighted aggregation per head (Eq. 8)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedprune.client.train import length_batches, load_state
from fedprune.config import opt
from fedprune.core.update import State
from fedprune.methods.heads import HeadPruning, HeadPruningConfig
from fedprune.structure.importance import head_importance


@dataclass
class AoHConfig(HeadPruningConfig):
    _name = "method.aoh"
    importance: str = opt("before", "Compute head scores on the received global model before "
                          "local training (pruning can cut training compute) or after it.",
                          ("before", "after"))
    importance_samples: int = opt(64, "Client examples used for the importance pass (a seeded "
                                  "subsample); 0 = all.")
    eps: float = opt(1e-8, "epsilon of Eq. 8's denominator.")
    normalize_alpha: bool = opt(False, "The server divides each client's head weights by their "
                                "mean over its kept heads, so that how a client ranks heads "
                                "counts, not how confident it claims to be (with share_cap: "
                                "against importance-score poisoning).")

    def validate(self) -> None:
        super().validate()
        self.require(self.importance_samples >= 0, "importance_samples",
                     f"must be >= 0, got {self.importance_samples}")
        self.require(self.eps >= 0, "eps", f"must be >= 0, got {self.eps}")
        self.require(not (self.mode != "adapter" and self.importance == "after"),
                     "importance", f"'after' needs method.aoh.mode='adapter': {self.mode} "
                     f"pruning must know the kept heads before training")


class AoH(HeadPruning):
    """Scores = Eq. 6 importance alpha; a kept head's slices weigh its alpha (Eq. 8)."""

    name = "aoh"
    Config = AoHConfig

    def __init__(self, cfg, fed) -> None:
        super().__init__(cfg, fed)
        self.importance = self.options.importance
        self.eps = self.options.eps

    def scores(self, state: State, indices: np.ndarray, seed: int) -> dict[str, torch.Tensor]:
        fed, n = self.fed, self.options.importance_samples
        load_state(fed.params, state)
        if n and n < len(indices):
            rng = np.random.default_rng(seed)
            indices = np.sort(rng.choice(indices, size=n, replace=False))
        batches = length_batches([fed.train_rows[i] for i in indices], fed.collate,
                                 self.cfg.federation.eval_batch_size)
        return head_importance(fed.model, self.structure, batches,
                               special_ids=fed.special_ids, exclude_key_ids=fed.exclude_key_ids)

    def unit_weight(self, alpha: float, num_examples: int) -> float:
        return alpha

    def slice_weights(self, alpha: dict[str, torch.Tensor], num_examples: int):
        if self.options.normalize_alpha:
            kept = torch.cat([a[a > 0] for a in alpha.values()])
            mean = float(kept.double().mean()) if len(kept) else 1.0
            alpha = {p: a / mean for p, a in alpha.items()}
        return super().slice_weights(alpha, num_examples)
