"""The method protocol, the wire format of client updates, and the registry."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from safetensors.torch import load, save

from fedprune.client.train import LocalTrainSpec, TrainStats
from fedprune.core.accounting import train_ops
from fedprune.core.update import ClientUpdate, InvalidUpdate, State
from fedprune.structure.attention import describe
from fedprune.structure.model import encoder_arch

if TYPE_CHECKING:
    from fedprune.config import ExperimentConfig
    from fedprune.sim.setup import Federation

METHODS: dict[str, type[Method]] = {}


@dataclass
class LocalResult:
    """What a client computed in a round, before encoding."""

    delta: State                      # local - global, full-shaped
    loss: float                       # mean local training loss L_c
    num_examples: int                 # |D_c|
    head_weights: dict[str, torch.Tensor] | None = None  # attention path -> alpha [n_heads]
    metrics: dict[str, float] = field(default_factory=dict)


def _metadata(blob: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__ (8-byte little-endian length, then JSON)."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]).get("__metadata__") or {}


class Method:
    """A federated method. Subclasses register themselves under their ``name``."""

    name: ClassVar[str] = ""

    def __init_subclass__(cls) -> None:
        METHODS[cls.name] = cls

    def __init__(self, cfg: ExperimentConfig, fed: Federation) -> None:
        self.cfg = cfg
        self.fed = fed
        f = cfg.federation
        self.spec = LocalTrainSpec(f.local_epochs, f.batch_size, f.lr, f.optimizer,
                                   f.weight_decay, f.group_by_length)
        self.structure = describe(fed.model)
        self.arch = encoder_arch(fed.model, r=cfg.peft.r, target_modules=cfg.peft.target_modules)

        self.count_flops = cfg.run.count_flops

    def ops(self, heads_per_layer: list[int], stats: TrainStats) -> dict[str, float]:
        """Client metrics of the local steps: wall time, padding share, analytic training OPs
        (where a formula exists) and the FlopCounterMode measurement (when run.count_flops)."""
        out = {"train_s": stats.seconds, "pad_fraction": stats.pad_fraction}
        if self.arch:
            out["train_ops"] = train_ops(self.arch, heads_per_layer, stats.shapes)
        if stats.flops is not None:
            out["train_flops_measured"] = stats.flops
        return out

    # --- client side ---
    def local(self, start: State, indices: np.ndarray, seed: int) -> LocalResult:
        """Train from the received global state ``start`` on the client's ``indices``."""
        raise NotImplementedError

    def encode(self, result: LocalResult) -> bytes:
        """The payload on the wire: tensors plus |D_c|, L_c and metrics as safetensors
        metadata, so measured bytes are everything a client sends."""
        meta = {"num_examples": str(result.num_examples), "loss": repr(result.loss),
                "metrics": json.dumps(result.metrics)}
        tensors = {k: v.contiguous() for k, v in self.wire_tensors(result).items()}
        return save(tensors, metadata=meta)

    def wire_tensors(self, result: LocalResult) -> State:
        return result.delta

    # --- server side ---
    def decode(self, blob: bytes, client_id: int) -> ClientUpdate:
        """Parse a payload; a malformed one raises InvalidUpdate naming the client."""
        try:
            tensors = load(blob)
            meta = _metadata(blob)
            update = ClientUpdate(client_id, tensors, int(meta["num_examples"]),
                                  float(meta["loss"]), json.loads(meta.get("metrics", "{}")))
        except Exception as e:  # noqa: BLE001 - any parse failure is the client's fault
            raise InvalidUpdate(f"client {client_id}: malformed payload ({e!r})") from None
        return self.from_wire(update)

    def from_wire(self, update: ClientUpdate) -> ClientUpdate:
        """Turn wire tensors into full-shaped deltas (identity for dense methods)."""
        return update

    def aggregate(self, state: State, updates: list[ClientUpdate], server_lr: float) -> State:
        raise NotImplementedError


def build_method(cfg: ExperimentConfig, fed: Federation) -> Method:
    return METHODS[cfg.method.name](cfg, fed)
