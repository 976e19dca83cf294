"""Tests for fedprune.structure.layers: layer views of the one backbone (PruFed) and layer_io.

A view over the kept layers of a tiny random Llama must compute exactly what a fresh
k-layer model holding copies of those layers computes (logits and KV-cached generation), and
leave the shared model exactly as it was. The real SmolLM2 shows the layer-drop signal.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model

from fedprune.structure.layers import decoder_layers, layer_io, layer_key_map, layer_view
from fedprune.structure.patch import patched

L = 6  # layers of the tiny model
TEXT = " ".join((Path(__file__).parent / "data" / "emma_excerpt.txt").read_text().split())


def config(n_layers: int = L) -> tf.LlamaConfig:
    return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                          pad_token_id=0)


def tiny(seed: int = 0) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(config()).eval()


def reference(model: tf.LlamaForCausalLM, kept: tuple[int, ...]) -> tf.LlamaForCausalLM:
    """A fresh len(kept)-layer model holding copies of the kept layers, renamed by hand."""
    ref = tf.LlamaForCausalLM(config(len(kept))).eval()
    state = {}
    for key, value in model.state_dict().items():
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
        if match is None:
            state[key] = value.clone()
        elif int(match[1]) in kept:
            state[f"model.layers.{kept.index(int(match[1]))}.{match[2]}"] = value.clone()
    ref.load_state_dict(state, strict=True)
    return ref


def batch() -> dict[str, torch.Tensor]:
    """Two sequences of 9 tokens, the second right-padded after 5."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ids[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def snapshot(model: tf.LlamaForCausalLM) -> dict:
    """Everything a layer view patches, by object identity and value."""
    layers = model.model.layers
    return {"list": layers, "layers": list(layers),
            "idx": [layer.self_attn.layer_idx for layer in layers],
            "config": model.config.to_dict()}


# --- the view equals the layer-dropped model -------------------------------------------------


@pytest.mark.parametrize("kept", [(0, 2, 5), (3,), (1, 2, 3, 4), tuple(range(L))])
def test_view_logits_equal_reference_model(kept):
    model, b = tiny(), batch()
    ref = reference(model, kept)
    with torch.no_grad(), layer_view(model, kept) as view:
        assert view.kept == kept and view.path == "model.layers"
        assert len(model.model.layers) == model.config.num_hidden_layers == len(kept)
        got = model(**b).logits
    want = ref(**b).logits
    mask = b["attention_mask"].bool()
    assert torch.allclose(got[mask], want[mask], atol=1e-6, rtol=0)


def test_generate_with_kv_cache_inside_view_equals_reference():
    model, kept = tiny(), (0, 3, 4)
    ref = reference(model, kept)
    prompt = batch()["input_ids"][:1, :5]
    args = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with layer_view(model, kept):
        cached = model.generate(prompt, **args)
        uncached = model.generate(prompt, use_cache=False, **args)
    want = ref.generate(prompt, **args)
    assert cached.shape == (1, 13)
    assert torch.equal(cached, want) and torch.equal(uncached, want)


# --- restored exactly ------------------------------------------------------------------------


def test_full_model_restored_exactly_also_after_an_error():
    model, b = tiny(), batch()
    with torch.no_grad():
        before_logits = model(**b).logits
    before = snapshot(model)
    with layer_view(model, (1, 4)):
        assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
        assert model.model.layers[1] is before["layers"][4]  # the same module, no copy
    with pytest.raises(RuntimeError, match="boom"), layer_view(model, (0, 5)):
        raise RuntimeError("boom")
    after = snapshot(model)
    assert after["list"] is before["list"]
    assert all(a is b for a, b in zip(after["layers"], before["layers"], strict=True))
    assert after["idx"] == before["idx"] == list(range(L))
    assert after["config"] == before["config"]
    assert not hasattr(model.model, "_fedprune_layer_view")
    with torch.no_grad():
        assert torch.equal(model(**b).logits, before_logits)


def test_not_reentrant_and_kept_validated():
    model = tiny()
    with layer_view(model, (0, 1)), pytest.raises(RuntimeError, match="already active"), \
            layer_view(model, (0,)):
        pass
    for kept, message in [((), "at least one"), ((2, 1), "ascending"), ((1, 1), "unique"),
                          ((0, L), r"0\.\.5"), ((-1, 2), r"0\.\.5")]:
        with pytest.raises(ValueError, match=message), layer_view(model, kept):
            pass
    assert len(model.model.layers) == L


def test_config_layer_types_follow_the_kept_layers():
    """Configs with `layer_types` (not Llama's) keep the kept layers' entries, restored after."""
    model = tiny()
    types = [f"type{i}" for i in range(L)]  # stand-ins; forward does not read them for Llama
    with patched() as patcher:
        patcher.set(model.config, "layer_types", types)
        with layer_view(model, (1, 3)):
            assert model.config.layer_types == ["type1", "type3"]
        assert model.config.layer_types is types
    assert not hasattr(model.config, "layer_types")


# --- LoRA training and the key map ------------------------------------------------------------


def lora_model() -> torch.nn.Module:
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False)  # random B, so A gets gradients too
    return get_peft_model(tiny(), lora)


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_lora_training_inside_view_updates_only_kept_layers():
    model, kept, b = lora_model(), (1, 4), batch()
    path, _ = decoder_layers(model)
    assert path == "base_model.model.model.layers"
    full = trainable(model)
    start = {n: p.detach().clone() for n, p in full.items()}
    with layer_view(model, kept) as view:
        local = trainable(model)
        # named_parameters inside the view: local indices, only the kept layers
        assert {int(n.split(".")[4]) for n in local} == {0, 1}
        assert set(local) == set(view.to_local(full))
        assert all(p is full[g] for g, p in view.to_global(local).items())
        opt = torch.optim.SGD(local.values(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            model(**b, labels=b["input_ids"]).loss.backward()
            opt.step()
    for name, p in trainable(model).items():
        layer = int(name.split(".")[4])
        assert torch.equal(p, start[name]) != (layer in kept), name
    assert set(trainable(model)) == set(full)


def test_layer_key_map_round_trips():
    path, kept = "base_model.model.model.layers", (0, 2, 5)
    local = [f"{path}.{i}.self_attn.q_proj.lora_A.default.weight" for i in range(3)]
    local += ["base_model.model.lm_head.weight", f"{path}s.1.x", f"{path}.1"]
    names = layer_key_map(local, kept, path)
    assert names[local[1]] == f"{path}.2.self_attn.q_proj.lora_A.default.weight"
    assert names[local[2]] == f"{path}.5.self_attn.q_proj.lora_A.default.weight"
    assert all(names[k] == k for k in local[3:])  # outside the layer list: unchanged
    assert len(set(names.values())) == len(local)
    inverse = {g: k for k, g in names.items()}
    assert [inverse[names[k]] for k in local] == local
    with pytest.raises(ValueError, match="not in a view of 3 layers"):
        layer_key_map([f"{path}.3.mlp.weight"], kept, path)


def test_layer_view_to_local_drops_dropped_layers():
    model = lora_model()
    with layer_view(model, (2, 3)) as view:
        local = dict(model.named_parameters())
        state = {k: torch.zeros(1) for k in view.to_global(local)}
        assert set(view.to_global(view.to_local(state))) == set(state)
    full = dict(model.named_parameters())
    assert set(view.to_local(full)) == set(local)  # dropped layers left out


# --- hidden states between layers ------------------------------------------------------------


def test_layer_io_inputs_and_last_output_before_norm():
    model, b = tiny(), batch()
    mask = b["attention_mask"].bool()
    hs = layer_io(model, [b])
    assert len(hs) == L + 1 and all(h.shape == (int(mask.sum()), 64) for h in hs)
    with torch.no_grad():
        out = model.model(**b, output_hidden_states=True)
        assert torch.equal(hs[0], model.model.embed_tokens(b["input_ids"])[mask])
        for i in range(L):  # hidden_states[i] is layer i's input (the last entry is normed)
            assert torch.equal(hs[i], out.hidden_states[i][mask])
        with patched() as patcher:  # manual: the decoder without its final norm
            patcher.set(model.model, "norm", torch.nn.Identity())
            last = model.model(**b).last_hidden_state
    assert torch.equal(hs[L], last[mask])
    assert not torch.allclose(hs[L], out.last_hidden_state[mask])


def test_layer_io_bounded_and_inside_a_view():
    model, b = tiny(), batch()
    n = int(b["attention_mask"].sum())
    assert all(h.shape[0] == 5 for h in layer_io(model, [b, b], max_tokens=5))
    assert all(h.shape[0] == 2 * n for h in layer_io(model, [b, b]))
    with layer_view(model, (0, 4)):
        hs = layer_io(model, [b])
    assert len(hs) == 3
    with pytest.raises(ValueError, match="empty"):
        layer_io(model, [])


# --- the real SmolLM2 --------------------------------------------------------------------------


def test_smollm2_perplexity_full_lt_middle_dropped_lt_first_dropped():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedprune.structure.model import smollm2_path

    path = smollm2_path(Path.home() / ".cache" / "fedprune")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(path)(TEXT, return_tensors="pt").input_ids[:, :256]
    n = model.config.num_hidden_layers

    def perplexity(kept: list[int]) -> float:
        with torch.no_grad(), layer_view(model, kept):
            return torch.exp(model(ids, labels=ids).loss).item()

    full = perplexity(list(range(n)))
    middle = perplexity([i for i in range(n) if i != n // 2])
    first = perplexity(list(range(1, n)))
    assert full < middle < first, (full, middle, first)
    assert 10 < full < 60 and first > 2 * middle
