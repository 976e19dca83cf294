"""Analytic training OPs of a local round (nanoGPT `estimate_mfu` style), from the model
config, the PEFT method, the computing heads per layer and the padded batch shapes.

Counted: matmul FLOPs (2 per multiply-add) of the encoder classifiers (BERT, RoBERTa,
DistilBERT) and the Llama-style decoders (GQA, gated MLP), as a classifier or a causal LM.
A batch B x T holds N = BT tokens (T grows by the T_p soft-prompt tokens under prompt
tuning, in every layer; prefix tuning adds T_p keys and values, not queries). Per layer with
H_l computing query heads of size d_h (and H_l KV / H KV heads under GQA), width d:

    forward  = sum_proj 2N in out                 q, k, v, o; FFN up, down (and gate)
             + 2 * 2B H_l T T_k d_h               scores QK^T and probabilities @ V
             + sum_lora 2N r (in + out)           LoRA A then B on each target
    head     = pooler 2Bdd + classifier 2BdC      encoders: the first token of each row
             | 2N d C  or  2N d V                 decoders: a score / LM head at every position

A matmul's backward computes its input gradient when its input needs one (2N in out more) and
its weight gradient when the weight trains (2N in out more); the attention products compute
dP when Q or K needs a gradient and dQ, dK, dV as each needs one. Every layer input needs a
gradient except layer 0's under LoRA, IA3 and prefix tuning (the embeddings are frozen):
there q, k, v compute no input gradient and Q, K, V need one only where something trains
(LoRA on that projection; IA3's key and value scalings; the prefix's keys and values).
Prompt tuning and full fine-tuning train the inputs. Trainable matmuls per `peft.method`:
LoRA's A and B; every projection ('full'); the task head always (a classifier; an LM head only
under 'full'). H_l is the number of kept heads in `structural` mode and all heads otherwise
(adapter mode still runs every head). Non-matmul work (softmax, norms, activations, IA3's
scalings) is left out; FlopCounterMode counts the same matmuls, which is the cross-check
(tests/test_peft.py, tests/test_bench_prufed.py). AoH's Table 6 gives these terms per method
in O() form.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Arch:
    """The numbers of a model and its PEFT method that its training FLOPs depend on."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    head_dim: int
    outputs: int                  # classifier labels, or the vocabulary of an LM head
    kv_heads: int = 0             # 0: = heads (no GQA)
    decoder: bool = False         # head at every position (else pooler + classifier on one)
    gated: bool = False           # gate/up/down MLP (else up/down)
    lm_head: bool = False         # the head is the (frozen unless 'full') LM head
    pooler_trains: bool = False   # RoBERTa's classifier.dense: part of the trained head
    method: str = "lora"          # peft.method
    lora_r: int = 0               # 0 unless method 'lora'
    lora_targets: tuple[str, ...] = ()  # of PROJECTIONS
    virtual_tokens: int = 0       # T_p of prompt / prefix tuning

    def __post_init__(self) -> None:
        if unknown := set(self.lora_targets) - set(PROJECTIONS):
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; known: {PROJECTIONS}")

    def projections(self, heads: int) -> dict[str, tuple[int, int]]:
        """(in, out) features of each Linear of one layer with ``heads`` computing heads."""
        d, f = self.hidden, self.ffn
        q = heads * self.head_dim
        kv = q * (self.kv_heads or self.heads) // self.heads
        ffn = {"gate": (d, f), "up": (d, f), "down": (f, d)} if self.gated else \
            {"up": (d, f), "down": (f, d)}
        return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), **ffn}


def layer_ops(arch: Arch, heads: int, b: int, t: int, first: bool) -> float:
    """Training FLOPs of one layer (``first``: layer 0) on a batch of b rows x t tokens."""
    proj = arch.projections(heads)
    t_q = t + (arch.virtual_tokens if arch.method == "prompt" else 0)
    t_k = t_q + (arch.virtual_tokens if arch.method == "prefix" else 0)
    n, r, full = b * t_q, arch.lora_r, arch.method == "full"
    lora = set(arch.lora_targets) if arch.method == "lora" else set()
    x_grad = not first or arch.method in ("prompt", "full")
    # which of Q, K, V, the attention output and the FFN's hidden activations carry a gradient
    qkv = {p: x_grad or full or p in lora or (p in "kv" and arch.method in ("ia3", "prefix"))
           for p in "qkv"}
    attn = any(qkv.values())
    ffn_in = x_grad or attn or full or "o" in lora
    hidden = ffn_in or arch.method == "ia3" or bool(lora & {"gate", "up"})
    needs = {"q": x_grad, "k": x_grad, "v": x_grad, "o": attn, "gate": ffn_in, "up": ffn_in,
             "down": hidden}
    total = 0.0
    for p, (i, o) in proj.items():
        mm = 2 * n * i * o
        total += mm * (1 + needs[p] + full)
        if p in lora:  # A: [i -> r], B: [r -> o]; both weights train, B's input always
            total += 2 * n * r * o * 3 + 2 * n * i * r * (2 + needs[p])
    product = 2 * b * heads * t_q * t_k * arch.head_dim  # one of QK^T, P @ V
    total += product * (2 + (qkv["q"] or qkv["k"]) + qkv["q"] + qkv["k"] + qkv["v"])
    return total


def head_ops(arch: Arch, b: int, t: int) -> float:
    """Training FLOPs of the task head on a batch of b rows x t tokens."""
    d, c = arch.hidden, arch.outputs
    if arch.decoder:  # at every position (prompt tuning's virtual ones too)
        n = b * (t + (arch.virtual_tokens if arch.method == "prompt" else 0))
        return 2 * n * d * c * (2 + (not arch.lm_head or arch.method == "full"))
    pool = 2 * b * d * d * (3 if arch.method == "full" or arch.pooler_trains else 2)
    return pool + 3 * 2 * b * d * c


def train_ops(arch: Arch, heads_per_layer: Sequence[int],
              batches: Sequence[tuple[int, int]]) -> float:
    """Training FLOPs of local steps over ``batches`` of (batch size, padded length) through
    the layers of ``heads_per_layer`` (computing heads of each: fewer layers than the model's
    for a layer-dropped view)."""
    return sum(head_ops(arch, b, t) + sum(layer_ops(arch, heads, b, t, first=layer == 0)
                                          for layer, heads in enumerate(heads_per_layer))
               for b, t in batches)
