"""Analytic training OPs of a local round (nanoGPT `estimate_mfu` style), from the model
config, the PEFT method, the kept heads and the padded batch shapes.

Counted: matmul FLOPs (2 per multiply-add) of an encoder classifier (BERT family). Per layer l
with H_l computing heads of size d_h, hidden d, FFN width f, and a batch B x T (T grows by the
T_p soft-prompt tokens under prompt tuning, in every layer):

    forward  = 2BT d (3 H_l d_h) + 2BT (H_l d_h) d     q, k, v, o projections
             + 2 * 2B H_l T^2 d_h                      scores QK^T and probabilities @ V
             + 2 * 2BT d f                             FFN up and down
             + sum_lora 2BT r (in + out)               LoRA A then B on each target
    head     = 2B d d + 2B d C                         pooler, classifier (CLS)
    training = 2 * forward(frozen) + 3 * forward(trainable) - layer-0 input gradients

Backward costs one forward for the input gradients of every matmul and one more for the weight
gradients of trainable ones. Trainable matmuls per `peft.method`: LoRA's A and B and the
classifier ('lora'); the classifier only ('ia3': its scalings are elementwise; 'prompt'); every
one, pooler included ('full'). Layer 0's projections need no input gradient when nothing before
them trains ('lora', 'ia3'); prompt tuning and full fine-tuning train the inputs. H_l is the
number of kept heads in `structural` mode and all heads otherwise (adapter mode still runs
every head of the backbone). Non-matmul work (softmax, LayerNorm, GELU, IA3's scalings) is
left out; FlopCounterMode counts the same matmuls, which is the cross-check. (AoH's Table 6
gives the same terms per method in O() form.)
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
    lora_r: int            # 0 unless method 'lora'
    lora_targets: str      # subset of "qkvo" with LoRA
    method: str = "lora"   # peft.method
    prompt_tokens: int = 0  # T_p of prompt tuning


def layer_forward(arch: EncoderArch, heads: int, b: int, t: int) -> tuple[float, float]:
    """(frozen, trainable) forward FLOPs of one layer with ``heads`` computing heads."""
    d, a, t = arch.hidden, heads * arch.head_dim, t + arch.prompt_tokens
    base = 2 * b * t * d * a * 4 + 2 * 2 * b * heads * t * t * arch.head_dim
    base += 2 * 2 * b * t * d * arch.ffn
    lora = sum(2 * b * t * arch.lora_r * (d + a) for _ in arch.lora_targets)
    return (0.0, base + lora) if arch.method == "full" else (base, lora)


def train_ops(arch: EncoderArch, heads_per_layer: Sequence[int],
              batches: Sequence[tuple[int, int]]) -> float:
    """Training FLOPs of local steps over ``batches`` of (batch size, padded length)."""
    total = 0.0
    inputs_frozen = arch.method in ("lora", "ia3")
    for b, t in batches:
        for layer, heads in enumerate(heads_per_layer):
            frozen, trainable = layer_forward(arch, heads, b, t)
            total += 2 * frozen + 3 * trainable
            if layer == 0 and inputs_frozen:  # no input gradient into the frozen embeddings
                a = heads * arch.head_dim
                total -= 2 * b * t * arch.hidden * a * 3            # q, k, v base weights
                total -= sum(2 * b * t * arch.lora_r * arch.hidden  # LoRA A of q, k, v
                             for p in arch.lora_targets if p != "o")
        head = 2 * b * arch.hidden * arch.num_labels  # trainable classifier
        pool = 2 * b * arch.hidden * arch.hidden      # pooler / pre-classifier
        total += (3 if arch.method == "full" else 2) * pool + 3 * head
    return total
