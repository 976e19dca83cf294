"""B1: federated LoRA with FedAvg (no pruning)."""

from __future__ import annotations

import numpy as np

from fedprune.client.train import load_state, local_train, snapshot
from fedprune.core.aggregate import fedavg
from fedprune.core.update import ClientUpdate, State
from fedprune.methods.base import LocalResult, Method


class FedAvg(Method):
    """Every trainable tensor is trained and sent; the server applies Eq. 5."""

    name = "fedavg"

    def local(self, start: State, indices: np.ndarray, seed: int) -> LocalResult:
        fed = self.fed
        load_state(fed.params, start)
        stats = local_train(fed.model, fed.params, fed.train_rows, indices, fed.collate,
                            self.spec, seed, count_flops=self.count_flops)
        local = snapshot(fed.params)
        heads = [a.n_heads for a in self.structure.attention]
        return LocalResult({k: local[k] - start[k] for k in local}, stats.loss, len(indices),
                           metrics=self.ops(heads, stats))

    def aggregate(self, state: State, updates: list[ClientUpdate], server_lr: float) -> State:
        return fedavg(state, updates, server_lr)
