"""fedprune export: short real runs exported, then loaded by peft's and transformers' own
loaders and compared with fedprune's evaluation of the same global state (logits) and with
the run's metrics.jsonl (accuracy, perplexity); bad input is a clear error."""

import json
import math
import os
import shutil
import stat

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from typer.testing import CliRunner

from fedprune.cli import app
from fedprune.client.train import evaluate, load_state
from fedprune.config import load_config
from fedprune.data.tasks import response_perplexity
from fedprune.export import ExportError, export_run
from fedprune.methods.aoh import AoH
from fedprune.methods.fedspallm import FedSpaLLM
from fedprune.methods.prufed import PruFed
from fedprune.sim import runner
from fedprune.structure import describe
from fedprune.structure.layers import layer_view
from fedprune.structure.model import minilm_path
from fedprune.structure.prefix import install

FLOAT32 = "model.compute_dtype='float32'"  # the same numbers on every CPU


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def aoh_run(tmp_path_factory):
    """One round of AoH in structural mode (pruned heads removed from the local forward)."""
    tmp = tmp_path_factory.mktemp("aoh")
    cfg = load_config(None, [
        "method.name=aoh", "method.aoh.mode='structural'", "method.aoh.sparsity=0.5",
        "method.aoh.importance_samples=8", "data.max_samples=80", "data.max_length=32",
        "federation.num_clients=2", "federation.clients_per_round=2", "federation.rounds=1",
        "federation.lr=0.005", f"data.cache_dir='{tmp / 'cache'}'", FLOAT32])
    return cfg, runner.run(cfg, tmp / "run", progress=False)


def test_peft_adapter_loads_and_computes_the_global_model(aoh_run, tmp_path):
    cfg, run_dir = aoh_run
    (out,) = export_run(run_dir, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {
        p.name for p in out.iterdir()}
    # reference: fedprune's own evaluation model with the global state loaded
    fed = AoH.world(cfg)
    load_state(fed.params, load_file(run_dir / "global.safetensors"))
    fed.model.eval()
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=5)
    model = PeftModel.from_pretrained(base, out).eval()
    batch = fed.collate(fed.val_rows[:8])
    batch.pop("labels")
    with torch.no_grad():
        got, want = model(**batch).logits, fed.model(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the run's own final figures, recomputed on the peft-loaded model
    last = records(run_dir)[-1]
    scores = evaluate(model, fed.val_rows, fed.collate, 64)
    assert scores["accuracy"] == last["accuracy"]
    assert scores["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-5)
    # not a no-op adapter: the untrained state gives other logits
    load_state(fed.params, fed.initial)
    with torch.no_grad():
        assert not torch.allclose(fed.model(**batch).logits, want, atol=1e-4)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((out / "adapter_model.safetensors").stat().st_mode) == 0o666 & ~umask
    card = (out / "README.md").read_text()
    for text in ("**aoh**", "structural", "bbc_news", f"accuracy {last['accuracy']:.4f}",
                 "PeftModel.from_pretrained", "[federation]", "adapter_model.safetensors"):
        assert text in card, text


@pytest.mark.parametrize("peft", ["ia3", "prompt", "prefix", "full"])
def test_other_peft_methods_export_and_load(peft, tmp_path):
    """One FedAvg round with IA3 / prompt / prefix tuning (a peft adapter folder; the encoder's
    prefix run by fedprune's attention, as its card says) and full fine-tuning (a whole
    transformers model): loaded by peft / transformers, the logits are fedprune's."""
    from fedprune.methods.fedavg import FedAvg

    cfg = load_config(None, [f"peft.method='{peft}'", "peft.num_virtual_tokens=4",
                             "data.max_samples=48", "data.max_length=32",
                             "federation.num_clients=2", "federation.clients_per_round=2",
                             "federation.rounds=1", f"data.cache_dir='{tmp_path / 'cache'}'",
                             FLOAT32])
    run_dir = runner.run(cfg, tmp_path / "run", progress=False)
    (out,) = export_run(run_dir, tmp_path / "out")
    fed = FedAvg.world(cfg)
    load_state(fed.params, load_file(run_dir / "global.safetensors"))
    fed.model.eval()
    if peft == "full":
        model = AutoModelForSequenceClassification.from_pretrained(out).eval()
        assert model.config.id2label[0] == fed.label_names[0]
    else:
        attention = {"attn_implementation": "fedprune"} if peft == "prefix" else {}
        base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=5,
                                                                  **attention)
        model = PeftModel.from_pretrained(base, out).eval()
        if peft == "prefix":
            install(model, describe(model))
            assert "install(model, describe(model))" in (out / "README.md").read_text()
        assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == \
            {"ia3": "IA3", "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}[peft]
    batch = fed.collate(fed.val_rows[:8])
    batch.pop("labels")
    with torch.no_grad():
        got, want = model(**batch).logits, fed.model(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    load_state(fed.params, fed.initial)  # not the untrained model
    with torch.no_grad():
        assert not torch.allclose(fed.model(**batch).logits, want, atol=1e-5)


def test_fedspallm_full_model_keeps_sparsity_and_logits(tiny_llama, tmp_path):
    cfg = load_config(None, [
        f"model.name='{tiny_llama}'", "method.name=fedspallm", "federation.num_clients=2",
        "federation.clients_per_round=2", "federation.rounds=1", "method.fedspallm.samples=4",
        "method.fedspallm.seq_len=32", "method.fedspallm.eval_samples=4", FLOAT32])
    run_dir = runner.run(cfg, tmp_path / "run", progress=False)
    result = CliRunner().invoke(app, ["export", str(run_dir), str(tmp_path / "pruned")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "pruned"
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    final = load_file(run_dir / "global.safetensors")
    params = dict(loaded.named_parameters())
    pruned = 0
    for key, w in final.items():  # every matrix exactly, so its zeros too
        assert torch.equal(params[key], w), key
        zeros = int((params[key] == 0).sum())
        if zeros:
            assert zeros == math.ceil(0.5 * w.numel()), key  # mask expansion: exactly s
            pruned += 1
    assert pruned > 0
    fed = FedSpaLLM.world(cfg)
    load_state(fed.params, final)
    ids = torch.stack([r["input_ids"] for r in fed.val_rows])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, fed.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    ppl = response_perplexity(loaded, [{"input_ids": ids, "labels": ids}])
    assert ppl == pytest.approx(records(run_dir)[-1]["perplexity"], rel=1e-5)
    card = (out / "README.md").read_text()
    assert "**fedspallm**" in card and "sparsegpt" in card and "AutoModelForCausalLM" in card

    # a global state that does not fit the configured model is a clear error
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    save_file(dict(list(final.items())[:-1]), bad / "global.safetensors")
    with pytest.raises(ExportError, match=r"bad/global.safetensors does not fit.*1 tensors "
                                          r"missing"):
        export_run(bad, tmp_path / "never")
    assert not (tmp_path / "never").exists()  # a failed export leaves nothing behind


def test_prufed_tiers_are_layer_dropped_models_with_merged_lora(tiny_llama, tmp_path):
    cfg = load_config(None, [
        f"model.name='{tiny_llama}'", "federation.num_clients=2",
        "federation.clients_per_round=2", "federation.rounds=1", "method.name=prufed",
        "method.prufed.samples=2", "method.prufed.max_length=48", "method.prufed.eval_samples=2",
        "method.prufed.generate_samples=1", "method.prufed.max_new_tokens=2",
        "federation.batch_size=2", "federation.lr=0.01", "method.prufed.tier_keep=[0.75, 0.25]",
        "method.prufed.tier_strategy=['top', 'top-alternate']", FLOAT32])
    run_dir = runner.run(cfg, tmp_path / "run", progress=False)
    folders = export_run(run_dir, tmp_path / "tiers")
    assert [f.name for f in folders] == ["tier0", "tier1", "full"]  # no tier keeps all 4
    last = records(run_dir)[-1]
    fed = PruFed.world(cfg)
    method = PruFed(cfg, fed)
    state = load_file(run_dir / "global.safetensors")
    for tier, kept in enumerate(method.kept):
        loaded = AutoModelForCausalLM.from_pretrained(folders[tier]).eval()
        assert loaded.config.num_hidden_layers == len(kept) == len(loaded.model.layers)
        assert not any("lora" in k for k in loaded.state_dict())  # merged, plain model
        # fedprune's evaluation of the tier: its adapters on its layer view (PruFed.score)
        load_state(fed.params, {key: state[method.state_keys[tier][local]]
                                for local, key in method.local_keys[tier].items()})
        batch = {k: v for k, v in method.val_batches[0].items() if k != "labels"}
        with torch.no_grad(), layer_view(fed.model, kept):
            want = fed.model(**batch).logits
        with torch.no_grad():
            torch.testing.assert_close(loaded(**batch).logits, want, rtol=1e-4, atol=1e-4)
        ppl = response_perplexity(loaded, method.val_batches)
        assert ppl == pytest.approx(last[f"perplexity_tier{tier}"], rel=1e-4)
        card = (folders[tier] / "README.md").read_text()
        assert f"Decoder layers {list(kept)}" in card
        assert f"perplexity {last[f'perplexity_tier{tier}']:.4f}" in card
    full = AutoModelForCausalLM.from_pretrained(folders[2]).eval()
    assert full.config.num_hidden_layers == 4
    assert response_perplexity(full, method.val_batches) == pytest.approx(last["perplexity"],
                                                                           rel=1e-4)


def test_bad_input_is_a_clear_error_naming_the_path(tmp_path):
    cli = CliRunner()

    def squash(text):  # rich wraps long lines wherever it likes
        return "".join(str(text).split())

    def fails(*args):
        result = cli.invoke(app, ["export", *map(str, args)])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert result.output.startswith("error:")
        return squash(result.output)

    assert squash(f"run directory {tmp_path / 'nope'} does not exist") in fails(
        tmp_path / "nope", tmp_path / "o")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert squash(f"{empty}: no config.json or config.toml") in fails(empty, tmp_path / "o")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text(json.dumps(load_config(None).to_dict()))
    assert squash(f"{unfinished / 'global.safetensors'} does not exist") in fails(
        unfinished, tmp_path / "o")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    raw = load_config(None).to_dict()
    raw["method"] = {"name": "nope"}
    (unknown / "config.json").write_text(json.dumps(raw))
    message = fails(unknown, tmp_path / "o")
    assert squash(unknown / "config.json") in message and "'nope'isnotallowed" in message
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    assert squash(f"output folder {busy} exists and is not empty") in fails(unfinished, busy)
    assert not (tmp_path / "o").exists()
