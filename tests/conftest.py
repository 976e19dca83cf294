"""Test-wide settings: no test may reach outside this machine."""

import os

import pytest

# Flower's processes POST an update check and telemetry at start-up unless told not to.
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray: Flower's simulation backend
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core: one torch thread each, and
    os.environ["OMP_NUM_THREADS"] = "1"    # the same for the processes a test starts



@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A folder holding a 4-layer random Llama (hidden 64, GQA 4 / 2 heads, tied embeddings)
    with the real SmolLM2 tokenizer: a decoder-only model that loads by path in seconds."""
    from pathlib import Path

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedprune.structure.model import smollm2_path

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(smollm2_path(Path.home() / ".cache" / "fedprune"))
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def minilm_world(tmp_path_factory):
    """(config, federation) of the real MiniLM with LoRA on 120 BBC articles of 32 tokens among
    3 clients: a world that builds in seconds (one per test module: tests train on it)."""
    from fedprune.client.world import build
    from fedprune.config import load_config

    cfg = load_config(None, ["model.name='minilm'", "data.max_samples=120",
                             "data.max_length=32", "federation.num_clients=3",
                             f"data.cache_dir='{tmp_path_factory.mktemp('cache')}'"])
    return cfg, build(cfg)
