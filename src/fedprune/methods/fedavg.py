"""B1: federated LoRA with FedAvg (no pruning)."""

from __future__ import annotations

from dataclasses import dataclass

from fedprune.client.train import load_state, local_train, snapshot
from fedprune.config import MethodOptions
from fedprune.core.aggregate import owned_mean
from fedprune.core.update import ClientUpdate, State
from fedprune.methods.base import LocalResult, Method


@dataclass
class FedAvgConfig(MethodOptions):
    _name = "method.fedavg"


class FedAvg(Method):
    """Every trainable tensor is trained and sent; the server applies Eq. 5 (every tensor
    weighs |D_c|)."""

    name = "fedavg"
    Config = FedAvgConfig

    def local(self, start: State, client_id: int, seed: int) -> LocalResult:
        fed = self.fed
        indices = fed.client_indices[client_id]
        load_state(fed.params, start)
        stats = local_train(fed.model, fed.params, fed.train_rows, indices, fed.collate,
                            self.spec, seed, count_flops=self.count_flops)
        local = snapshot(fed.params)
        heads = [a.n_heads for a in self.structure.attention]
        return LocalResult({k: local[k] - start[k] for k in local}, stats.loss, len(indices),
                           metrics=self.ops(heads, stats))

    def aggregate(self, state: State, updates: list[ClientUpdate], server_lr: float) -> State:
        return owned_mean(state, updates, server_lr, combine=self.combine)
