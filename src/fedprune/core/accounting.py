"""Analytic training OPs of a local round (nanoGPT `estimate_mfu` style), from the model
config, the PEFT method, the computing heads per attention module and the padded batch shapes.

Counted: matmul FLOPs (2 per multiply-add) of the encoder classifiers (BERT, RoBERTa,
DistilBERT), the decoders (GPT-2; Llama-style: GQA, gated MLP; a classifier or a causal LM) and the
encoder-decoders (T5, BART: encoder self-attention, decoder self- and cross-attention). A
stack's batch B x T holds N = BT tokens (T grows by the T_p soft-prompt tokens under prompt
tuning, on the input the prompts are prepended to; prefix tuning adds T_p keys and values, not
queries). Per attention block with H_l computing query heads of size d_h (H_l KV / H KV heads
under GQA), width d, T_k keys (T in self-attention, the encoder's length in cross-attention):

    forward  = sum_proj 2N in out                 q, k, v, o; FFN up, down (and gate)
             + 2 * 2B H_l T T_k d_h               scores QK^T and probabilities @ V
             + sum_lora 2N r (in + out)           LoRA A then B on each target
    head     = pooler 2Bdd + classifier 2BdC      encoders: the first token of each row
             | 2N d C  or  2N d V                 decoders: a score / LM head at every position

A matmul's backward computes its input gradient when its input needs one (2N in out more) and
its weight gradient when the weight trains (2N in out more); the attention products compute dP
when Q or K needs a gradient and dQ, dK, dV as each needs one. Whether an input needs a
gradient is tracked through the residual stream: the embeddings are frozen (except under
'prompt' and 'full'), so the first layer's q, k, v compute no input gradient and its Q, K, V
need one only where something trains (LoRA on that projection, IA3's key and value scalings,
the prefix's keys and values); from there on the stream carries one. A decoder's cross-
attention keys and values read the encoder output, which carries one when anything in the
encoder trains. Prefix tuning reaches every self-attention of a one-stack model and only the
decoder self-attention of an encoder-decoder (peft 0.21's seq2seq prefix). Trainable matmuls
per `peft.method`: LoRA's A and B; every one ('full'); the task head always (a classifier; an
LM head only under 'full'). H_l is the number of kept heads in `structural` mode and all heads
otherwise (adapter mode still runs every head; `detached` mode runs every head forward, but
only the kept heads' q/k/v rows and o columns backward: ``grad_heads``). Under AoH's
`top_layers` the LoRA of the lowest ``frozen_layers`` layers computes but does not train, so
the stream carries no gradient below the first trained layer. Non-matmul work
(softmax, norms, activations, IA3's scalings, T5's position biases) is left out;
FlopCounterMode counts the same matmuls — exactly equal on tiny models of every family and
method (tests/test_peft.py, test_prefix.py, test_detached.py) — except that
it counts no attention products under the CPU's SDPA kernel. GPT-2's fused q/k/v projection
is one matmul, its LoRA one A / B pair and its IA3 scaling covers queries too. AoH's Table 6 gives these terms per method in O() form.
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
    decoder: bool = False         # head at every (decoder) position, else pooler + classifier
    gated: bool = False           # gate/up/down MLP (else up/down)
    lm_head: bool = False         # the head is the (frozen unless 'full') LM head
    pooler_trains: bool = False   # trained with the head: RoBERTa's classifier.dense,
                                  # DistilBERT's pre_classifier (peft modules_to_save)
    method: str = "lora"          # peft.method
    lora_r: int = 0               # 0 unless method 'lora'
    lora_targets: tuple[str, ...] = ()  # of PROJECTIONS
    virtual_tokens: int = 0       # T_p of prompt / prefix tuning
    # encoder-decoder (T5, BART): the first `encoder_layers` entries of heads per layer are
    # the encoder's, then self and cross attention of each decoder layer; batches are
    # (b, encoder length, decoder length); 0 = not an encoder-decoder
    encoder_layers: int = 0
    dec_head_dim: int = 0         # 0: = head_dim
    dec_ffn: int = 0              # 0: = ffn
    fused_qkv: bool = False       # one [d, 3 d] q/k/v projection (GPT-2's c_attn)

    def __post_init__(self) -> None:
        if unknown := set(self.lora_targets) - set(PROJECTIONS):
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; known: {PROJECTIONS}")


class _Count:
    """Training FLOPs of one batch, block by block, tracking whether the residual stream
    carries a gradient (it does once anything below it trains)."""

    def __init__(self, arch: Arch, b: int) -> None:
        self.arch, self.b, self.full = arch, b, arch.method == "full"
        self.targets = set(arch.lora_targets) if arch.method == "lora" else set()
        self.lora, self.frozen_lora = self.targets, set()  # the current layer's LoRA

    def layer(self, trains: bool) -> None:
        """The next layer's LoRA trains, or only computes (below AoH's ``top_layers``)."""
        self.lora, self.frozen_lora = ((self.targets, set()) if trains
                                       else (set(), self.targets))

    def linear(self, n: int, i: int, o: int, input_grad: bool, name: str,
               i_grad: int | None = None, o_grad: int | None = None) -> float:
        """Y = X W on n rows (W: [i, o]), with LoRA (A: [i, r], B: [r, o]) if targeted.
        ``i_grad`` / ``o_grad``: the input columns / output columns of W whose input gradient
        is computed (AoH's detached mode: the kept heads'; LoRA's gradients stay whole)."""
        i_grad, o_grad = i if i_grad is None else i_grad, o if o_grad is None else o_grad
        f = 2 * n * i * o * (1 + self.full) + 2 * n * i_grad * o_grad * input_grad
        if name in self.lora:  # both LoRA weights train; B's input always needs a gradient
            r = self.arch.lora_r
            f += 2 * n * r * o * 3 + 2 * n * i * r * (2 + input_grad)
        elif name in self.frozen_lora:  # forward; the input gradient if the stream needs one
            f += 2 * n * self.arch.lora_r * (i + o) * (1 + input_grad)
        return f

    def attention(self, heads: int, head_dim: int, t_q: int, t_k: int, x_grad: bool,
                  src_grad: bool, grad_heads: tuple[int, int] | None = None,
                  prefixed: bool = True) -> tuple[float, bool]:
        """Queries (and the residual) from the stream x, keys / values from src (x itself in
        self-attention); returns (FLOPs, whether the stream after it carries a gradient).
        ``grad_heads``: (query, KV) heads whose projections' input gradients are computed
        (detached mode); None: all. ``prefixed``: prefix tuning's keys and values reach this
        module (`ModelStructure.prefixed`)."""
        a, (b, full, lora) = self.arch, (self.b, self.full, self.lora)
        q = heads * head_dim
        kv = q * (a.kv_heads or a.heads) // a.heads
        q_g, kv_g = (q, kv) if grad_heads is None else (h * head_dim for h in grad_heads)
        prefix = a.method == "prefix" and prefixed
        trained_kv = a.method == "ia3" or prefix  # IA3's scalings, the prefix's keys
        if a.fused_qkv:  # one matmul; LoRA (A: [d, r], B: [r, 3d]) and IA3 cover its output
            fused = bool(lora & set("qkv")) or a.method == "ia3"
            g = {p: x_grad or full or fused or (p != "q" and trained_kv) for p in "qkv"}
            f = self.linear(b * t_q, a.hidden, q + 2 * kv, x_grad,
                            "q" if self.targets & set("qkv") else "", o_grad=q_g + 2 * kv_g)
        else:
            g = {"q": x_grad or full or "q" in lora,
                 **{p: src_grad or full or p in lora or trained_kv for p in "kv"}}
            f = self.linear(b * t_q, a.hidden, q, x_grad, "q", o_grad=q_g) + sum(
                self.linear(b * t_k, a.hidden, kv, src_grad, p, o_grad=kv_g) for p in "kv")
        attn = any(g.values())  # the attention output carries a gradient
        f += self.linear(b * t_q, q, a.hidden, attn, "o", i_grad=q_g)
        t_k += a.virtual_tokens if prefix else 0
        product = 2 * b * heads * t_q * t_k * head_dim  # one of QK^T, P @ V
        # forward both; dP when Q or K needs a gradient; dQ, dK, dV as each needs one
        f += product * (2 + (g["q"] or g["k"]) + g["q"] + g["k"] + g["v"])
        return f, x_grad or attn or full or "o" in lora

    def ffn(self, width: int, t: int, x_grad: bool) -> tuple[float, bool]:
        a, n = self.arch, self.b * t
        hidden = (x_grad or self.full or a.method == "ia3"  # IA3 scales down's input
                  or bool(self.lora & {"gate", "up"}))
        f = sum(self.linear(n, a.hidden, width, x_grad, p)
                for p in (("gate", "up") if a.gated else ("up",)))
        f += self.linear(n, width, a.hidden, hidden, "down")
        return f, x_grad or hidden or self.full or "down" in self.lora

    def stack(self, heads: Sequence[int], head_dim: int, width: int, t: int, x_grad: bool,
              t_src: int = 0, grad_heads: Sequence[tuple[int, int]] | None = None,
              frozen_layers: int = 0, prefixed: bool = True, src_grad: bool = True
              ) -> tuple[float, bool]:
        """Layers of one stack on t positions (``t_src``: an encoder output of that length
        to cross-attend to, taking ``heads`` as self, cross pairs); the LoRA of the first
        ``frozen_layers`` layers does not train; ``prefixed``: its self-attention gets
        prefix tuning's keys and values (never cross-attention); ``src_grad``: the encoder
        output carries a gradient."""
        f, per = 0.0, 2 if t_src else 1
        grads = [None] * len(heads) if grad_heads is None else grad_heads
        for i in range(0, len(heads), per):
            self.layer(i // per >= frozen_layers)
            g, x_grad = self.attention(heads[i], head_dim, t, t, x_grad, x_grad, grads[i],
                                       prefixed)
            f += g
            if t_src:
                g, x_grad = self.attention(heads[i + 1], head_dim, t, t_src, x_grad, src_grad,
                                           grads[i + 1], prefixed=False)
                f += g
            g, x_grad = self.ffn(width, t, x_grad)
            f += g
        return f, x_grad


def train_ops(arch: Arch, heads_per_layer: Sequence[int], batches: Sequence[tuple[int, ...]],
              grad_heads: Sequence[tuple[int, int]] | None = None, frozen_layers: int = 0
              ) -> float:
    """Training FLOPs of local steps over ``batches`` of (batch size, padded length[,
    decoder length]) through the layers of ``heads_per_layer`` (computing heads of each
    attention module: fewer layers than the model's for a layer-dropped view).
    ``grad_heads``: per attention module, (query heads, KV heads) whose q/k/v rows and o
    columns take part in the backward (AoH's detached mode: the others are computed without
    gradient); None: all. ``frozen_layers``: the LoRA of the lowest layers does not train (AoH's
    ``top_layers``; a single-stack model), so no gradient flows below the first trained one."""
    a, total = arch, 0.0
    if frozen_layers and a.encoder_layers:
        raise ValueError("frozen_layers: only for a single-stack (encoder or decoder) model")
    prompt = a.virtual_tokens if a.method == "prompt" else 0
    inputs_train = a.method in ("prompt", "full")  # the first layer's input needs a gradient
    d, c = a.hidden, a.outputs
    for b, t, *dec in batches:
        count, t = _Count(a, b), t + prompt
        if a.encoder_layers:
            e = a.encoder_layers
            f, src_grad = count.stack(heads_per_layer[:e], a.head_dim, a.ffn, t, inputs_train,
                                      grad_heads=None if grad_heads is None else grad_heads[:e],
                                      prefixed=False)  # peft: the decoder's prefix only
            total += f + count.stack(heads_per_layer[e:], a.dec_head_dim or a.head_dim,
                                     a.dec_ffn or a.ffn, dec[0], a.method == "full", t_src=t,
                                     grad_heads=None if grad_heads is None else grad_heads[e:],
                                     src_grad=src_grad)[0]
        else:
            total += count.stack(heads_per_layer, a.head_dim, a.ffn, t, inputs_train,
                                 grad_heads=grad_heads, frozen_layers=frozen_layers)[0]
        if a.decoder:  # a score / LM head at every (decoder) position, prompt tokens included
            n = b * (dec[0] if a.encoder_layers else t)
            total += 2 * n * d * c * (2 + (not a.lm_head or a.method == "full"))
        else:  # pooler (or RoBERTa's dense) and classifier on the first token of each row
            trains = a.method == "full" or a.pooler_trains
            total += 2 * b * d * d * (2 + trains) + 3 * 2 * b * d * c
    return total
