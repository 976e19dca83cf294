"""Analytic training FLOPs of a decoder (`core.accounting.train_ops`) and the PruFed bench's
`layer_drop_flop_ratio`: hand-computed on a tiny config, and equal to what FlopCounterMode
counts in `PruFed.local` on a tiny Llama's layer-dropped views. (Each PEFT method against
FlopCounterMode: tests/test_peft.py.)"""

from __future__ import annotations

import importlib.util
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from fedprune.config import load_config
from fedprune.core.accounting import Arch, train_ops
from fedprune.methods.prufed import PruFed

ROOT = Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location("fedprune_bench", ROOT / "bench" / "bench.py")
bench = sys.modules.setdefault("fedprune_bench", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(bench)  # registered first: its dataclasses look their module up

# d = 4, f = 8, H = 2 heads, 1 KV head, d_h = 2, V = 10, LoRA r = 1 on q, k, v, o
TINY = Arch(layers=2, hidden=4, ffn=8, heads=2, kv_heads=1, head_dim=2, outputs=10,
            decoder=True, gated=True, lm_head=True, lora_r=1, lora_targets=("q", "k", "v", "o"))


def flops(arch: Arch, layers: int, batches) -> float:
    return train_ops(arch, [arch.heads] * layers, batches)


def test_tiny_config_by_hand():
    # one batch b = 1, t = 3: N = 3 tokens. (in, out): q 4x4, k 4x2, v 4x2, o 4x4, gate 4x8,
    # up 4x8, down 8x4; sum in*out = 16 + 8 + 8 + 16 + 32 + 32 + 32 = 144
    #   frozen    2N * 144                                 =  864 -> x2 = 1728
    #   attention 2 * 2 b H t^2 d_h = 4 * 2 * 9 * 2       =  144 -> x3 =  432
    #   LoRA      2N r sum(in + out) = 6 * (8 + 6 + 6 + 8) =  168 -> x3 =  504
    #   one layer                                                        2664
    #   first layer, no input gradient into the embeddings: q, k, v frozen
    #   2N (16 + 8 + 8) = 192 and their LoRA A 2N r (4 + 4 + 4) = 72      -264
    #   LM head 2 * (2N d V) = 2 * 240                                    +480
    batches = [(1, 3)]
    assert flops(TINY, 1, batches) == 2664 - 264 + 480 == 2880
    assert flops(TINY, 2, batches) == 2 * 2664 - 264 + 480 == 5544
    ratio = bench.layer_drop_flop_ratio(TINY, 1, 2, batches)
    assert Fraction(ratio).limit_denominator(1000) == Fraction(40, 77)
    assert ratio > 1 / 2  # the LM head does not shrink with the kept layers
    # two batches add up; a longer t grows the attention term quadratically
    assert flops(TINY, 2, [(1, 3), (2, 5)]) == \
        5544 + flops(TINY, 2, [(2, 5)])
    # b = 2, t = 5: N = 10; attention 4 * 2 * 2 * 25 * 2 = 800 per layer
    assert flops(TINY, 1, [(2, 5)]) == \
        (2 * 20 * 144 + 3 * 800 + 3 * 20 * 28) - (20 * 32 + 20 * 12) + 2 * 20 * 40


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        Arch(1, 4, 8, 2, 2, 10, lora_r=1, lora_targets=("q", "fc1"))
    with pytest.raises(ValueError, match="kept must be in"):
        bench.layer_drop_flop_ratio(TINY, 3, 2, [(1, 3)])


def test_formula_equals_flop_counter_on_layer_dropped_views(tiny_llama):
    """`PruFed.local` with run.count_flops on a 4-layer Llama (LoRA on q/k/v/o): for the
    full model and the half / quarter views, FlopCounterMode's count of the local steps is
    the formula's on the batch shapes those steps used."""
    cfg = load_config(None, [
        f"model.name='{tiny_llama}'", "method.name=prufed", "federation.num_clients=3",
        "federation.clients_per_round=3", "method.prufed.tier_keep=[1.0, 0.5, 0.25]",
        "method.prufed.tier_strategy=['top', 'top-alternate', 'top-alternate']",
        "method.prufed.tier_share=[0.3, 0.3, 0.4]", "method.prufed.samples=3",
        "method.prufed.max_length=40", "method.prufed.eval_samples=1",
        "method.prufed.generate_samples=0", "federation.batch_size=2",
        "model.compute_dtype=float32", "run.count_flops=true", "run.num_threads=1",
        "peft.r=4", "peft.target_modules=['q', 'k', 'v', 'o']"])
    fed = PruFed.world(cfg)
    method = PruFed(cfg, fed)
    assert method.kept == [(0, 1, 2, 3), (0, 2), (0,)]
    assert method.arch == Arch(4, 64, 128, 4, 16, fed.model.config.vocab_size, kv_heads=2,
                               decoder=True, gated=True, lm_head=True, lora_r=4,
                               lora_targets=("q", "k", "v", "o"))
    shapes, collate = [], fed.collate

    def recording(rows):
        batch = collate(rows)
        shapes.append(tuple(batch["input_ids"].shape))
        return batch

    fed.collate = recording
    state = method.initial_state()
    for cid in range(3):
        shapes.clear()
        res = method.local(method.downlink(state, cid, 1), cid, seed=0)
        assert len(shapes) == 2  # 3 examples in batches of 2
        assert res.metrics["train_flops_measured"] == res.metrics["train_ops"] == flops(
            method.arch, len(method.kept[cid]), shapes)
