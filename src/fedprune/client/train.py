"""Local training and evaluation on the one shared backbone.

A client never owns a model: it loads the received global trainable tensors into the shared
model's trainable parameters, trains them in place, and returns the trained values.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fedprune.core.update import State
from fedprune.data import length_grouped_order

Collate = Callable[[list[dict]], dict[str, torch.Tensor]]  # rows -> padded batch tensors


@dataclass(frozen=True)
class LocalTrainSpec:
    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    group_by_length: bool = False  # batches of similar lengths (less padding)
    prox_mu: float = 0.0  # FedProx: + mu/2 ||w - w_start||^2 on the trained tensors
    correction: State | None = None  # SCAFFOLD: c - c_i per trained tensor (client/scaffold.py)


def load_state(params: dict[str, torch.nn.Parameter], state: State) -> None:
    """Copy ``state`` into the live parameters (no new tensors, no autograd history)."""
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value)


def snapshot(params: dict[str, torch.nn.Parameter]) -> State:
    """Detached copies of the live trainable tensors, on the CPU (where updates, payloads
    and aggregation live, whatever device the backbone computes on)."""
    return {k: p.detach().to("cpu", copy=True) for k, p in params.items()}


def _optimizer(params: Sequence[torch.nn.Parameter], spec: LocalTrainSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay)


def _batches(rows: Sequence[dict], indices: torch.Tensor, spec: LocalTrainSpec,
             gen: torch.Generator) -> Iterator[list[int]]:
    """One epoch of batches: a seeded shuffle, or with ``group_by_length`` transformers'
    length-grouped order (shuffle, sort by length inside mega-batches of 50 batches)."""
    if spec.group_by_length:
        lengths = [len(rows[i]["input_ids"]) for i in indices.tolist()]
        order = indices[length_grouped_order(lengths, spec.batch_size, gen)]
    else:
        order = indices[torch.randperm(len(indices), generator=gen)]
    for start in range(0, len(order), spec.batch_size):
        yield order[start:start + spec.batch_size].tolist()


def batch_shape(batch: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """(batch size, padded length[, decoder length]) of a collated batch: what the analytic
    OPs (`core.accounting.train_ops`) take."""
    dec = batch.get("decoder_input_ids")  # seq2seq: the decoder's length too
    return (*batch["input_ids"].shape, *(dec.shape[1:] if dec is not None else ()))


class TrainStats(NamedTuple):
    loss: float                          # mean training loss per example
    shapes: list[tuple[int, ...]]        # (batch size, padded length[, decoder length])
    tokens: int                          # real (non-padding) tokens over all steps
    seconds: float                       # wall time of the local steps
    flops: float | None                  # FlopCounterMode total when counted

    @property
    def pad_fraction(self) -> float:
        """Share of the computed positions that were padding."""
        total = sum(b * n for b, n, *_ in self.shapes)
        return 1.0 - self.tokens / total if total else 0.0


@torch.no_grad()
def _add_proximal(params: dict[str, torch.nn.Parameter], anchor: State, mu: float,
                  frozen: dict[str, torch.Tensor]) -> None:
    """grad += mu (w - w_start): the gradient of mu/2 ||w - w_start||^2, 0 where frozen."""
    for key, p in params.items():
        if p.grad is None:
            continue
        pull = p - anchor[key]
        if key in frozen:
            pull.masked_fill_(frozen[key], 0.0)
        p.grad.add_(pull, alpha=mu)


@torch.no_grad()
def _correct(params: dict[str, torch.nn.Parameter], correction: State, lr: float,
             frozen: dict[str, torch.Tensor]) -> None:
    """SCAFFOLD's drift correction after a step: w <- w - lr (c - c_i), 0 where frozen."""
    for key, p in params.items():
        step = correction[key] * lr
        if key in frozen:
            step = step.masked_fill(frozen[key], 0.0)
        p.sub_(step)


def local_train(model: torch.nn.Module, params: dict[str, torch.nn.Parameter],
                rows: Sequence[dict], indices: Sequence[int], collate: Collate,
                spec: LocalTrainSpec, seed: int,
                frozen: dict[str, torch.Tensor] | None = None, count_flops: bool = False
                ) -> TrainStats:
    """Train ``params`` in place on ``rows[indices]``.

    ``seed`` fixes shuffling and dropout, so the same (start values, data, seed) always gives
    the same result. ``frozen`` maps a parameter path to a bool mask of coordinates that must
    not move (pruned heads in adapter mode): their gradients are zeroed, so Adam's moments
    and updates stay exactly zero there (decoupled weight decay still shrinks them; callers
    restore those coordinates). ``count_flops`` measures the steps with FlopCounterMode.
    ``spec.prox_mu`` > 0 adds FedProx's proximal term mu/2 ||w - w_start||^2 (Li et al.
    2020; w_start: the values at entry, the client's copy of the global model) as its
    gradient mu (w - w_start), outside the frozen coordinates; the reported loss is the task
    loss alone. ``spec.correction`` (SCAFFOLD's c - c_i per parameter) moves every step's
    result by -lr (c - c_i), outside the frozen coordinates.
    """
    model.train()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks (every device's generator)
    # masks, anchor and correction on the parameters' device (a no-op on the CPU)
    frozen = {k: m.to(params[k].device) for k, m in (frozen or {}).items()}
    correction = (None if spec.correction is None else
                  {k: c.to(params[k].device) for k, c in spec.correction.items()})
    hooks = [params[k].register_hook(lambda g, keep=~m: g * keep) for k, m in frozen.items()]
    opt = _optimizer(list(params.values()), spec)
    anchor = {k: p.detach().clone() for k, p in params.items()} if spec.prox_mu else {}
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    loss_sum, seen, tokens, shapes = 0.0, 0, 0, []
    counter = FlopCounterMode(display=False) if count_flops else nullcontext()
    t0 = time.perf_counter()
    try:
        with counter:
            for _ in range(spec.epochs):
                for batch_idx in _batches(rows, idx, spec, gen):
                    batch = collate([rows[i] for i in batch_idx])
                    loss = model(**batch).loss
                    loss.backward()
                    if anchor:
                        _add_proximal(params, anchor, spec.prox_mu, frozen)
                    opt.step()
                    if correction is not None:
                        _correct(params, correction, spec.lr, frozen)
                    opt.zero_grad(set_to_none=True)
                    loss_sum += loss.item() * len(batch_idx)
                    seen += len(batch_idx)
                    shapes.append(batch_shape(batch))
                    tokens += int(batch["attention_mask"].sum())
    finally:
        for h in hooks:
            h.remove()
    flops = float(counter.get_total_flops()) if count_flops else None
    return TrainStats(loss_sum / max(seen, 1), shapes, tokens, time.perf_counter() - t0, flops)


def length_batches(rows: Sequence[dict], collate: Collate, batch_size: int
                   ) -> Iterator[dict[str, torch.Tensor]]:
    """``rows`` collated in batches of ``batch_size``, in order of length so that padding
    stays small (evaluation and importance passes: the order does not change a sum)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        yield collate([rows[i] for i in order[start:start + batch_size]])


@torch.no_grad()
def evaluate(model: torch.nn.Module, rows: Sequence[dict], collate: Collate,
             batch_size: int) -> dict[str, float]:
    """Mean cross-entropy and accuracy of a sequence classifier on ``rows``
    (`length_batches`)."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for batch in length_batches(rows, collate, batch_size):
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
    return {"eval_loss": loss_sum / len(rows), "accuracy": correct / len(rows)}
