"""Analytic training OPs of a local round (nanoGPT `estimate_mfu` style), from the model
config, the LoRA targets, the kept heads and the padded batch shapes.

Counted: matmul FLOPs (2 per multiply-add) of an encoder classifier (BERT family) with LoRA.
Per layer l with H_l computing heads of size d_h, hidden d, FFN width f, and a batch B x T:

    forward  = 2BT d (3 H_l d_h) + 2BT (H_l d_h) d     q, k, v, o projections
             + 2 * 2B H_l T^2 d_h                      scores QK^T and probabilities @ V
             + 2 * 2BT d f                             FFN up and down
             + sum_lora 2BT r (in + out)               LoRA A then B on each target
    head     = 2B d d + 2B d C                         pooler (frozen), classifier (CLS)
    training = 2 * forward(frozen) + 3 * forward(trainable) - layer-0 input gradients

Backward costs one forward for the input gradients of every matmul and one more for the weight
gradients of trainable ones (LoRA, classifier). Layer 0's projections need no input gradient
(the embeddings are frozen). H_l is the number of kept heads in `structural` mode and all heads
otherwise (adapter mode still runs every head of the backbone). Non-matmul work (softmax,
LayerNorm, GELU) is left out; FlopCounterMode counts the same matmuls, which is the cross-check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class EncoderArch:
    layers: int
    hidden: int
    ffn: int
    head_dim: int
    num_labels: int
    lora_r: int
    lora_targets: str      # subset of "qkvo" with LoRA


def layer_forward(arch: EncoderArch, heads: int, b: int, t: int) -> tuple[float, float]:
    """(frozen, trainable) forward FLOPs of one layer with ``heads`` computing heads."""
    d, a = arch.hidden, heads * arch.head_dim
    frozen = 2 * b * t * d * a * 4 + 2 * 2 * b * heads * t * t * arch.head_dim
    frozen += 2 * 2 * b * t * d * arch.ffn
    trainable = sum(2 * b * t * arch.lora_r * (d + a) for _ in arch.lora_targets)
    return frozen, trainable


def train_ops(arch: EncoderArch, heads_per_layer: Sequence[int],
              batches: Sequence[tuple[int, int]]) -> float:
    """Training FLOPs of local steps over ``batches`` of (batch size, padded length)."""
    total = 0.0
    for b, t in batches:
        for layer, heads in enumerate(heads_per_layer):
            frozen, trainable = layer_forward(arch, heads, b, t)
            total += 2 * frozen + 3 * trainable
            if layer == 0:  # no input gradient into the frozen embeddings
                a = heads * arch.head_dim
                total -= 2 * b * t * arch.hidden * a * 3            # q, k, v base weights
                total -= sum(2 * b * t * arch.lora_r * arch.hidden  # LoRA A of q, k, v
                             for p in arch.lora_targets if p != "o")
        head = 2 * b * arch.hidden * arch.num_labels  # trainable classifier
        pool = 2 * b * arch.hidden * arch.hidden      # frozen pooler / pre-classifier
        total += 2 * pool + 3 * head
    return total
