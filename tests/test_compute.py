"""Compute settings: fast dropout, the lean attention path, bf16 preparation, batching."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tests.test_structure import BUILDERS

from fedprune.client.train import LocalTrainSpec, TrainStats, _batches
from fedprune.structure.compute import (
    ATTENTION,
    FastDropout,
    fast_dropout,
    keep_mask,
    lean_attention,
    prepare_compute,
    resolve_device,
    resolve_dtype,
)
from fedprune.structure.model import apply_lora, load_backbone, trainable_parameters


def test_fast_dropout_rate_scale_and_seed() -> None:
    p, n = 0.1, 1_000_003  # odd size: the last 64-bit draw is only partly used
    x = torch.rand(n) + 0.5
    torch.manual_seed(3)
    y = fast_dropout(x, p)
    kept = y != 0
    keep_prob = 1 - round(p * 2**16) / 2**16  # p is rounded to a multiple of 2^-16
    sigma = math.sqrt(n * keep_prob * (1 - keep_prob))
    assert abs(int(kept.sum()) - n * keep_prob) < 5 * sigma
    torch.testing.assert_close(y[kept], x[kept] / keep_prob, rtol=1e-6, atol=0)
    torch.manual_seed(3)
    assert torch.equal(fast_dropout(x, p), y)  # the mask comes from torch's seeded generator
    assert fast_dropout(x, p, training=False) is x and fast_dropout(x, 0.0) is x


def test_fast_dropout_words_are_uniform() -> None:
    """All four 16-bit words of each 64-bit draw are used, each over its full range: every
    word position drops at the same rate, and rates near 0, 1/2 and 1 come out right."""
    torch.manual_seed(0)
    n = 4 * 200_000
    for p in (0.5, 0.9, 1e-3, 0.999):
        keep, scale = keep_mask(torch.Size([n]), p, torch.bfloat16)
        assert keep.dtype == torch.bfloat16 and set(keep.unique().tolist()) <= {0.0, 1.0}
        rates = 1 - keep.view(-1, 4).float().mean(0)
        sigma = math.sqrt(p * (1 - p) / (n // 4))
        assert torch.allclose(rates, torch.full((4,), p), atol=5 * sigma), (p, rates)
        assert scale == 2**16 / (2**16 - round(p * 2**16))
    keep, scale = keep_mask(torch.Size([10]), 1e-7, torch.float32)  # rounds to p = 0
    assert bool((keep == 1).all()) and scale == 1.0


def test_fast_dropout_gradient_is_the_mask() -> None:
    x = torch.randn(64, 32, requires_grad=True)
    torch.manual_seed(1)
    y = FastDropout(0.3).train()(x)
    y.sum().backward()
    keep_prob = 1 - round(0.3 * 2**16) / 2**16
    torch.testing.assert_close(x.grad, (y != 0).float() / keep_prob)


def _inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padding: the mask must reach every attention
    mask[2, 5:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = ids[:, :7]
    return inputs


def _logits(model: torch.nn.Module, impl: str, grad: bool) -> torch.Tensor:
    model.set_attn_implementation(impl)
    with torch.set_grad_enabled(grad):
        return model(**_inputs(model)).logits.detach()


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_lean_attention_equals_eager(family: str) -> None:
    """Both branches (eager maths with gradients, SDPA without) against transformers' eager
    attention, with padding, causal masks, GQA and T5's position bias."""
    torch.manual_seed(0)
    model = BUILDERS[family]().eval()
    want = _logits(model, "eager", grad=False)
    for grad in (True, False):
        got = _logits(model, ATTENTION, grad)
        real = _inputs(model)["attention_mask"].bool()
        if not model.config.is_encoder_decoder and got.dim() == 3:
            got, want_ = got[real], want[real]  # padded positions' outputs are arbitrary
        else:
            want_ = want
        torch.testing.assert_close(got, want_, atol=1e-5, rtol=1e-4)


def test_lean_attention_dropout_drops_probabilities() -> None:
    """Uniform attention over k keys with value 1: the output is (kept keys / k) / P(keep),
    with the kept keys drawn by keep_mask from the same seed."""
    module = torch.nn.Module().train()
    b, h, q, k, d, p = 2, 3, 4, 16, 8, 0.25
    query, key = torch.zeros(b, h, q, d), torch.zeros(b, h, k, d)
    value = torch.ones(b, h, k, d)
    torch.manual_seed(5)
    with torch.enable_grad():
        out, weights = lean_attention(module, query, key, value, None, dropout=p)
    torch.manual_seed(5)
    keep, scale = keep_mask(torch.Size([b, h, q, k]), p, torch.float32)
    want = keep.sum(-1, keepdim=True) / k * scale  # [b, h, q, 1]
    assert weights is None
    torch.testing.assert_close(out, want.transpose(1, 2).expand(b, q, h, d))


def test_lean_attention_refuses_variants_it_does_not_compute() -> None:
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(NotImplementedError, match="softcap.*attn_implementation='sdpa'"):
        lean_attention(torch.nn.Module(), q, q, q, None, softcap=30.0)


def test_resolve_dtype_follows_the_cpu_flags() -> None:
    flags = set(Path("/proc/cpuinfo").read_text().split())
    fast = bool({"avx512_bf16", "amx_bf16"} & flags)  # the model runs on the CPU
    assert resolve_dtype("auto") == (torch.bfloat16 if fast else torch.float32)
    assert resolve_dtype("float32") == torch.float32
    assert resolve_dtype("bfloat16") == torch.bfloat16


def test_resolve_device() -> None:
    """'auto' is CUDA exactly when torch sees a GPU; a CUDA device that is not there is a
    ConfigError naming run.device; a bad name is refused by the config."""
    from fedprune.config import ConfigError, load_config

    cuda = torch.cuda.is_available()
    assert resolve_device("auto") == torch.device("cuda" if cuda else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not cuda:
        with pytest.raises(ConfigError, match=r"`run.device` = 'cuda': torch .* sees no CUDA"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"`run.device` = 'cuda:99': only \d+ CUDA"
                       if cuda else "sees no CUDA"):
        resolve_device("cuda:99")
    with pytest.raises(ConfigError, match="run.device"):
        load_config(None, ["run.device='gpu'"])
    for name in ("fedspallm", "prufed"):  # their worlds compute on the CPU only
        from fedprune.methods import METHODS
        with pytest.raises(ConfigError, match="computes on the CPU so far"):
            METHODS[name].check(load_config(None, [f"method.name='{name}'",
                                                   "run.device='cuda'"]))


@pytest.fixture(scope="module")
def minilm_pair(tmp_path_factory):
    """The real MiniLM + LoRA twice: float32 and bf16-prepared, same weights."""
    cache = tmp_path_factory.mktemp("cache")
    models = []
    for dtype in (torch.float32, torch.bfloat16):
        m = load_backbone("minilm", task="classification", num_labels=5,
                          attn_implementation=ATTENTION, seed=0, cache_dir=cache)
        m = apply_lora(m, task="classification", r=8, alpha=16, dropout=0.0,
                       target_modules=list("qkvo"), seed=0)
        prepare_compute(m, dtype, "auto")
        models.append(m)
    return models


def test_bf16_keeps_trainables_float32(minilm_pair) -> None:
    fp32, bf16 = minilm_pair
    frozen = {n: p.dtype for n, p in bf16.named_parameters() if not p.requires_grad}
    assert all(p.dtype == torch.float32 for p in trainable_parameters(bf16).values())
    linear = [n for n in frozen if n.endswith("base_layer.weight") or ".dense.weight" in n]
    assert linear and all(frozen[n] == torch.bfloat16 for n in linear)
    assert frozen["base_model.model.bert.embeddings.word_embeddings.weight"] == torch.float32
    assert not any(isinstance(m, torch.nn.Dropout) and type(m) is torch.nn.Dropout
                   for m in bf16.modules())  # all dropout modules draw fast masks

    ids = torch.randint(1000, 20000, (4, 32), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.tensor([0, 1, 2, 3])}
    for m in minilm_pair:
        m.train()
        torch.manual_seed(0)
        m(**batch).loss.backward()
    g32, g16 = trainable_parameters(fp32), trainable_parameters(bf16)
    for name, p in g16.items():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        if not g32[name].grad.any():  # LoRA A while B is still zero: no gradient in both
            assert not p.grad.any(), name
            continue
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), g32[name].grad.flatten(),
                                                    dim=0)
        assert cos > 0.9, (name, float(cos))  # same direction, bf16 rounding apart
    for m in minilm_pair:
        m.zero_grad(set_to_none=True)
        m.eval()
    with torch.no_grad():
        a = fp32(**batch).logits
        b = bf16(**batch).logits
    assert b.dtype == torch.bfloat16 or b.dtype == torch.float32
    torch.testing.assert_close(b.float(), a, atol=0.05, rtol=0.05)


def test_group_by_length_cuts_padding() -> None:
    lengths = [8 + (i * 37) % 120 for i in range(200)]
    rows = [{"input_ids": [1] * n} for n in lengths]
    idx = torch.arange(200)

    def padded(group: bool) -> tuple[int, list[int]]:
        spec = LocalTrainSpec(1, 16, 1e-3, group_by_length=group)
        batches = list(_batches(rows, idx, spec, torch.Generator().manual_seed(0)))
        return sum(len(b) * max(lengths[i] for i in b) for b in batches), \
            sorted(i for b in batches for i in b)

    grouped, seen_g = padded(True)
    shuffled, seen_s = padded(False)
    assert seen_g == seen_s == list(range(200))  # every example once per epoch
    assert grouped < 0.75 * shuffled, (grouped, shuffled)


def test_pad_fraction() -> None:
    stats = TrainStats(1.0, [(2, 10), (4, 5)], tokens=30, seconds=0.0, flops=None)
    assert stats.pad_fraction == pytest.approx(1 - 30 / 40)
