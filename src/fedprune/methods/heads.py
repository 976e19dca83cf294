"""Head-pruned federated LoRA: AoH (importance) and B2 (random heads).

Both follow DESIGN.md Method A: per client and round a head score per attention head, Eq. 7
keeps the heads scoring at least the s-quantile (scope global or per layer), the client trains
only the kept heads' slices (mode `adapter`: pruned slices frozen; `structural`: pruned heads
removed from the forward and backward), and sends only those slices plus the per-head
weights. The server aggregates each head's slices blockwise (Eq. 8 with importance weights for
AoH; a data-size mean over the clients that kept the head for B2) and Eq. 5 elsewhere.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fedprune.client.train import load_state, local_train, snapshot
from fedprune.core.blocks import Slice, blockwise_mean
from fedprune.core.update import ClientUpdate, InvalidUpdate, State
from fedprune.methods.base import LocalResult, Method
from fedprune.structure.heads import head_units, structural_keep, structural_view, unit_mask
from fedprune.structure.importance import head_importance

ALPHA = "::head_weights"  # wire key suffix: "<attention path>::head_weights" -> [n_heads]


def eq7_keep(scores: dict[str, torch.Tensor], sparsity: float, scope: str
             ) -> dict[str, torch.Tensor]:
    """Eq. 7: keep heads whose score is >= the s-quantile of the client's scores, over all
    heads (scope 'global') or within each attention module ('layer'). bool [n_heads] each."""
    if scope == "layer":
        return {p: a >= torch.quantile(a.double(), sparsity).to(a.dtype)
                for p, a in scores.items()}
    threshold = torch.quantile(torch.cat(list(scores.values())).double(), sparsity)
    return {p: a >= threshold.to(a.dtype) for p, a in scores.items()}


def kept_index(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Indices along ``dim`` of a row (dim 0) or column (dim 1) mask that are kept."""
    return mask.any(dim=1 - dim).nonzero().flatten()


class HeadPruning(Method):
    """Shared machinery; subclasses define ``scores`` and the aggregation weights."""

    def __init__(self, cfg, fed) -> None:
        super().__init__(cfg, fed)
        self.units = head_units(fed.initial, self.structure)
        self.blocks = [tuple(Slice(s.key, s.dim, s.start, s.stop) for s in u.slices)
                       for u in self.units]
        self.key_dim = {s.key: s.dim for u in self.units for s in u.slices}
        self.n_heads = {a.path: a.n_heads for a in self.structure.attention}

    # --- client side ---
    def scores(self, start: State, indices: np.ndarray, seed: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def local(self, start: State, indices: np.ndarray, seed: int) -> LocalResult:
        m, fed = self.cfg.method, self.fed
        load_state(fed.params, start)
        t0 = time.perf_counter()
        scores = self.scores(start, indices, seed) if m.importance == "before" else None
        score_s = time.perf_counter() - t0
        if m.mode == "structural":
            keep = structural_keep(self.structure, eq7_keep(scores, m.sparsity, m.scope))
            with structural_view(fed.model, self.structure, keep) as view:
                stats = local_train(fed.model, view.params, fed.train_rows, indices,
                                    fed.collate, self.spec, seed, count_flops=self.count_flops)
                local = view.scatter(start)
        elif scores is not None:  # adapter mode: pruned slices frozen
            keep = eq7_keep(scores, m.sparsity, m.scope)
            frozen = {k: ~v for k, v in unit_mask(self.units, keep, start).items()}
            stats = local_train(fed.model, fed.params, fed.train_rows, indices, fed.collate,
                                self.spec, seed, frozen=frozen, count_flops=self.count_flops)
            local = snapshot(fed.params)
        else:  # importance after training: train everything, prune the upload
            stats = local_train(fed.model, fed.params, fed.train_rows, indices, fed.collate,
                                self.spec, seed, count_flops=self.count_flops)
            local = snapshot(fed.params)
            t0 = time.perf_counter()
            scores = self.scores(local, indices, seed)
            score_s = time.perf_counter() - t0
            keep = eq7_keep(scores, m.sparsity, m.scope)
        masks = unit_mask(self.units, keep, start)
        delta = {}
        for key, value in local.items():
            d = value - start[key]
            delta[key] = d * masks[key] if key in masks else d  # pruned slices send nothing
        weights = {p: torch.where(keep[p], scores[p], 0.0).float() for p in scores}
        computing = [int(keep[a.path].sum()) if m.mode == "structural" else a.n_heads
                     for a in self.structure.attention]
        metrics = {"score_s": score_s, **self.ops(computing, stats),
                   "kept_heads": float(sum(int(k.sum()) for k in keep.values()))}
        return LocalResult(delta, stats.loss, len(indices), weights, metrics)

    def wire_tensors(self, result: LocalResult) -> State:
        """Non-head tensors whole; head-mapped tensors only their kept rows / columns (the
        server recovers which from the weights: kept <=> weight > 0); the head weights."""
        masks = unit_mask(self.units, {p: w > 0 for p, w in result.head_weights.items()},
                          result.delta)
        out = {}
        for key, d in result.delta.items():
            dim = self.key_dim.get(key)
            out[key] = d if dim is None else d.index_select(dim, kept_index(masks[key], dim))
        out.update({p + ALPHA: w for p, w in result.head_weights.items()})
        return out

    # --- server side ---
    def from_wire(self, update: ClientUpdate) -> ClientUpdate:
        cid, tensors = update.client_id, dict(update.delta)
        weights = {}
        for path, n in self.n_heads.items():
            w = tensors.pop(path + ALPHA, None)
            if w is None or w.shape != (n,) or w.dtype != torch.float32:
                raise InvalidUpdate(f"client {cid}: head weights of {path!r} missing or not "
                                    f"float32 [{n}]")
            weights[path] = w
        if not all(torch.isfinite(w).all() and (w >= 0).all() for w in weights.values()):
            raise InvalidUpdate(f"client {cid}: head weights must be finite and >= 0")
        reference = self.fed.initial
        masks = unit_mask(self.units, {p: w > 0 for p, w in weights.items()}, reference)
        for key, dim in self.key_dim.items():
            if key not in tensors:
                raise InvalidUpdate(f"client {cid}: head-mapped tensor {key!r} missing")
            idx = kept_index(masks[key], dim)
            compact, shape = tensors[key], reference[key].shape
            want = tuple(len(idx) if i == dim else n for i, n in enumerate(shape))
            if tuple(compact.shape) != want:
                raise InvalidUpdate(f"client {cid}: {key!r} has shape {tuple(compact.shape)}, "
                                    f"expected {want} for its kept heads")
            tensors[key] = torch.zeros(shape, dtype=compact.dtype).index_copy_(dim, idx, compact)
        update.delta, update.head_weights = tensors, weights
        return update

    def block_weights(self, updates: list[ClientUpdate]) -> torch.Tensor:
        """[n_clients, n_blocks]: each unit's weight = max of the head weights of the query
        heads it serves (a KV unit under GQA: its group's max, DESIGN 'Head map')."""
        return torch.tensor([[float(u.head_weights[unit.path][list(unit.query_heads)].max())
                              for unit in self.units] for u in updates], dtype=torch.float64)

    def aggregate(self, state: State, updates: list[ClientUpdate], server_lr: float) -> State:
        raise NotImplementedError


class RandomHeads(HeadPruning):
    """B2: FedAvg + random head pruning (a random mask per client and round at sparsity s;
    a masked data-size mean over the clients that kept each head)."""

    name = "random_heads"

    def scores(self, start: State, indices: np.ndarray, seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {p: torch.rand(n, generator=gen) + 1e-6 for p, n in self.n_heads.items()}

    def aggregate(self, state: State, updates: list[ClientUpdate], server_lr: float) -> State:
        kept = (self.block_weights(updates) > 0).double()
        sizes = torch.tensor([[u.num_examples] for u in updates], dtype=torch.float64)
        return blockwise_mean(state, updates, server_lr, self.blocks, kept * sizes, eps=0.0)


class AoH(HeadPruning):
    """AoH: head importance (Eq. 6) on the client's data, Eq. 7 pruning, Eq. 8 aggregation."""

    name = "aoh"

    def scores(self, state: State, indices: np.ndarray, seed: int) -> dict[str, torch.Tensor]:
        fed, n = self.fed, self.cfg.method.importance_samples
        load_state(fed.params, state)
        if n and n < len(indices):
            rng = np.random.default_rng(seed)
            indices = np.sort(rng.choice(indices, size=n, replace=False))
        rows = [fed.train_rows[i] for i in indices]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
        bs = self.cfg.federation.eval_batch_size
        batches = (fed.collate([rows[i] for i in order[s:s + bs]])
                   for s in range(0, len(order), bs))
        return head_importance(fed.model, self.structure, batches,
                               special_ids=fed.special_ids, exclude_key_ids=fed.exclude_key_ids)

    def aggregate(self, state: State, updates: list[ClientUpdate], server_lr: float) -> State:
        return blockwise_mean(state, updates, server_lr, self.blocks,
                              self.block_weights(updates), eps=self.cfg.method.eps)
