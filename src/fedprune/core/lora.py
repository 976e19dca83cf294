"""Aggregating LoRA modules by their products (FlexLoRA-style), over the one rule `owned_mean`.

A LoRA module adds s·B A to a frozen weight (A: [r, in], B: [out, r], s = alpha / r). Averaging
A and B separately (FedAvg / FedIT, HeteAgg) gives mean(B)·mean(A), which is not the mean of the
clients' updates mean(B A). FlexLoRA (Bai, Chen, Qian, Yao, Li: *Federated Fine-tuning of Large
Language Models under Heterogeneous Tasks and Client Resources*, NeurIPS 2024, arXiv 2402.11505,
§3) has the server form each client's full-size update W_c = B_c A_c, take the data-size
weighted mean W = sum_c p_c W_c (p_c ∝ |D_c|), and hand it back in low-rank form by a truncated
SVD of W (there to each client's own rank r_c; here every client has the same r). The scale s is
the same for every client, so it factors out of the mean and of the refactorisation.

`product_mean` does exactly that per module, over the clients that hold the module: the products
are extra keyed tensors ("<A key>::product") in one `owned_mean` call, so owners, weights, the
server learning rate and "a module nobody holds keeps its value" are `owned_mean`'s; the mean
product is then refactored to rank r by `refactor`. The global state stays A / B tensors, so
clients and payloads do not change. Pure torch; inputs are never mutated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial

import torch

from fedprune.core.aggregate import owned_mean
from fedprune.core.robust import MEAN, Combine
from fedprune.core.threads import one_thread
from fedprune.core.update import ClientUpdate, State

PRODUCT = "{}::product"  # key of a module's product B A, named after its A key
A_TAG, B_TAG = ".lora_A.", ".lora_B."


def lora_pairs(keys: Iterable[str]) -> dict[str, str]:
    """A key -> B key of every LoRA module among ``keys`` (the '.lora_A.' keys whose
    '.lora_B.' twin is there too)."""
    keys = set(keys)
    return {k: k.replace(A_TAG, B_TAG) for k in sorted(keys)
            if A_TAG in k and k.replace(A_TAG, B_TAG) in keys}


def refactor(product: torch.Tensor, rank: int, a_norm: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out, rank], A [rank, in]) whose product B A is the best rank-``rank`` approximation
    of ``product`` [out, in] (Eckart–Young: the truncated SVD U_r S_r V_r^T), so B A equals
    ``product`` whenever its rank is <= ``rank``.

    Component j is split as B[:, j] = U_j S_j / a_j, A[j] = a_j V_j^T with a_j = max(sqrt(S_j),
    a_norm). a_norm = 0 is the balanced split B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T. A
    component with S_j = 0 (the product has rank < r: e.g. every B still 0 as LoRA
    initialises it) then has A[j] = 0 and B[:, j] = 0, and neither ever gets a gradient
    again; a_norm > 0 keeps every A row at least that long (a_j V_j^T, B[:, j] = 0 there, as
    LoRA's own initialisation: A random, B = 0), so the product is unchanged and the
    component stays trainable. Computed in float64, returned in ``product``'s dtype."""
    if product.dim() != 2 or not 1 <= rank:
        raise ValueError(f"product must be a matrix and rank >= 1, got {tuple(product.shape)}, "
                         f"rank {rank}")
    out, inp = product.shape
    # one thread: LAPACK's threaded SVD of a small matrix gains nothing, and on shared cores
    # it is pathological (576 x 576 float64: 10-16 s on 2 threads, 0.2 s on one, AMD EPYC)
    with one_thread():
        u, s, vh = torch.linalg.svd(product.double(), full_matrices=False)
    k = min(rank, s.numel())
    u, s, vh = u[:, :k], s[:k], vh[:k]
    a = torch.clamp(s.sqrt(), min=float(a_norm))
    b_cols = torch.where(a > 0, s / torch.where(a > 0, a, 1.0), 0.0)
    big_b = torch.zeros(out, rank, dtype=torch.float64)
    big_a = torch.zeros(rank, inp, dtype=torch.float64)
    big_b[:, :k] = u * b_cols
    big_a[:k] = a[:, None] * vh
    return big_b.to(product.dtype), big_a.to(product.dtype)


class _Extended(Mapping):
    """``base`` plus the keys of ``extra``, whose tensors are computed on access (one
    [out, in] product in memory at a time)."""

    def __init__(self, base: Mapping[str, torch.Tensor],
                 extra: dict[str, Callable[[], torch.Tensor]]) -> None:
        self.base, self.extra = base, extra

    def __iter__(self) -> Iterator[str]:
        yield from self.base
        yield from self.extra

    def __len__(self) -> int:
        return len(self.base) + len(self.extra)

    def __contains__(self, key: object) -> bool:
        return key in self.base or key in self.extra

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self.base:
            return self.base[key]
        return self.extra[key]()


def _product_delta(delta: State, state: Mapping[str, torch.Tensor], local_a: str, local_b: str,
                   global_a: str, global_b: str) -> torch.Tensor:
    """A client's product delta (B_g + dB)(A_g + dA) - B_g A_g, in float64."""
    a, b = state[global_a].double(), state[global_b].double()
    mine = (b + delta[local_b].double()) @ (a + delta[local_a].double())
    return mine - b @ a


def product_mean(state: State, updates: Sequence[ClientUpdate], server_lr: float = 1.0,
                 a_norm: float | Mapping[str, float] = 0.0, combine: Combine = MEAN) -> State:
    """FlexLoRA-style aggregation of the LoRA modules of ``state`` (pairs by `lora_pairs`);
    every other key as `owned_mean`.

    For each module (A, B) held by at least one update, over those updates (weights |D_c|,
    keys renamed by their keymaps):

        W <- B_g A_g + eta * sum_c |D_c| (B_c A_c - B_g A_g) / sum_c |D_c|,
        B_c = B_g + dB_c, A_c = A_g + dA_c        (eta = 1: the weighted mean of the B_c A_c)

    computed by `owned_mean` on the products as extra keys, then (B, A) <- refactor(W, r,
    a_norm) with r = A's rows; ``a_norm`` is one number or one per A key (missing: 0). A
    module no update holds keeps its A and B. An update holding only one of a module's two
    tensors is an error (ValueError). ``combine``: `owned_mean`'s robust rule."""
    pairs = lora_pairs(state)
    paired = {*pairs, *pairs.values()}
    views = []
    for u in updates:
        local_of = u.local_keys()
        local_pairs = {}
        for ga, gb in pairs.items():
            if (ga in local_of) != (gb in local_of):
                raise ValueError(f"client {u.client_id}: holds only one of the LoRA pair "
                                 f"{ga!r} / {gb!r}")
            if ga in local_of:
                local_pairs[local_of[ga]] = (local_of[ga], local_of[gb], ga, gb)
        plain = [k for k in u.delta if u.global_key(k) not in paired]
        keymap = {k: u.global_key(k) for k in plain}
        keymap.update({PRODUCT.format(la): PRODUCT.format(ga)
                       for la, (_, _, ga, _) in local_pairs.items()})
        weights = {k: w for k, w in u.weights.items() if k in plain}
        products = {PRODUCT.format(la): partial(_product_delta, u.delta, state, *names)
                    for la, names in local_pairs.items()}
        view = _Extended({k: u.delta[k] for k in plain}, products)
        views.append(ClientUpdate(u.client_id, view, u.num_examples, u.loss, u.metrics,
                                  weights, keymap))
    held = {PRODUCT.format(ga) for u in updates for k in u.delta
            if (ga := u.global_key(k)) in pairs}
    current = {PRODUCT.format(a): partial(torch.matmul, state[b], state[a])  # B_g A_g
               for a, b in pairs.items() if PRODUCT.format(a) in held}
    clash = set(current) & set(state)
    if clash:
        raise ValueError(f"state already holds product keys {sorted(clash)[:2]}")
    extended = _Extended(state, current)
    new = owned_mean(extended, views, server_lr, combine=combine)
    for ga, gb in pairs.items():
        product = new.pop(PRODUCT.format(ga), None)
        if product is None:
            continue
        norm = a_norm.get(ga, 0.0) if isinstance(a_norm, Mapping) else a_norm
        new[gb], new[ga] = refactor(product, state[ga].shape[0], norm)
    return new
