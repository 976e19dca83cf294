"""FedSpaLLM end to end on a tiny random Llama (the real SmolLM2 tokenizer, the bundled
books): layer sampling, sparse payloads, the l0 mean with mask expansion against an
independent reference, baselines, resume, and bad input."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedprune.config import ConfigError, load_config
from fedprune.core.sparsity import is_nm_sparse, layer_budget
from fedprune.core.update import ClientUpdate, InvalidUpdate
from fedprune.data.sources import DataError
from fedprune.methods.fedspallm import FedSpaLLM, pack, unpack
from fedprune.sim import runner


@pytest.fixture
def tiny(tiny_llama) -> Path:
    return tiny_llama


def cfg_of(tiny, *extra):
    return load_config(None, [f"model.name='{tiny}'", "method.name=fedspallm",
                              "federation.num_clients=4", "federation.clients_per_round=4",
                              "federation.rounds=1", "method.fedspallm.samples=4",
                              "method.fedspallm.seq_len=32", "method.fedspallm.eval_samples=4",
                              *extra])


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_one_shot_round_prunes_sampled_layers_to_exact_sparsity(tiny, tmp_path):
    # one client of four per round: k = floor(2*4*1/4) + 1 = 3 of the 4 layers, so one layer
    # is sampled by nobody and must keep its pretrained value
    cfg = cfg_of(tiny, "federation.clients_per_round=1")
    run_dir = runner.run(cfg, tmp_path / "r", progress=False)
    fed = FedSpaLLM.world(cfg)
    final = load_file(run_dir / "global.safetensors")
    method = FedSpaLLM(cfg, fed)
    (cid,) = records(run_dir)[0]["selected"]
    method.plan(1, [cid])
    sampled = set(method.sampled[cid])
    assert len(sampled) == 3 == layer_budget([1.0] * 4, 4)[cid]
    for key, w in final.items():
        if method.layer_of[key] in sampled:
            assert int((w == 0).sum()) == math.ceil(0.5 * w.numel()), key
        else:
            assert torch.equal(w, fed.initial[key]), key  # no client sampled its layer
    (rec,) = records(run_dir)
    dense = sum(4 * fed.initial[k].numel() for k in method.layer_keys(sorted(sampled)))
    # kept values (half) + 1 bit per weight + safetensors headers
    assert dense * 0.5 < rec["bytes_up"][0] < dense * (0.5 + 1 / 32) + 8192
    assert rec["bytes_down"][0] < 200  # round 1: the client holds the model; only its layers
    assert rec["train_loss"] is None and rec["sparsity"] > 0
    assert rec["client_metrics"][str(cid)]["sparsity"] == 0.5
    assert records(run_dir)[0]["perplexity"] > 1


def l0_expand_reference(g, ws, masks, s):
    """Independent numpy version of the server rule on one matrix: l0 mean, then zero the
    not-yet-zero weights with the most prunes first, ties by smaller |W|, then index."""
    ws, masks = np.stack(ws).astype(np.float64), np.stack(masks).astype(np.float64)
    kept = masks.sum(0)
    mean = np.where(kept > 0, (masks * ws).sum(0) / np.maximum(kept, 1), 0.0).ravel()
    pruned = (len(ws) - kept).ravel()
    k = math.ceil(s * mean.size) - int((mean == 0).sum())
    candidates = [j for j in range(mean.size) if mean[j] != 0]
    candidates.sort(key=lambda j: (-pruned[j], abs(np.float32(mean[j])), j))
    mean[candidates[:max(k, 0)]] = 0.0
    return mean.reshape(g.shape).astype(np.float32)


def test_l0_mean_and_expansion_match_an_independent_reference(tiny):
    cfg = cfg_of(tiny)
    fed = FedSpaLLM.world(cfg)
    method = FedSpaLLM(cfg, fed)
    key = next(iter(fed.initial))
    g = fed.initial[key]
    gen = torch.Generator().manual_seed(1)
    ws, masks, updates = [], [], []
    for cid in range(3):  # three clients pruned the same matrix differently (40 % each)
        keep = torch.rand(g.shape, generator=gen) > 0.4
        w = torch.where(keep, g + 0.01 * torch.randn(g.shape, generator=gen), 0.0)
        ws.append(w.numpy()), masks.append(keep.numpy())
        updates.append(ClientUpdate(cid, {key: w.clone()}, 4, None, weights={key: keep}))
    new = method.aggregate(fed.initial, updates, 1.0)
    want = l0_expand_reference(g.numpy(), ws, masks, 0.5)
    assert int((new[key] == 0).sum()) == math.ceil(0.5 * g.numel())
    np.testing.assert_allclose(new[key].numpy(), want, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(new[k], fed.initial[k]) for k in fed.initial if k != key)


@pytest.mark.parametrize("aggregation", ["fedavg", "fedavg_reprune"])
def test_baselines_real_sparsity(tiny, tmp_path, aggregation):
    cfg = cfg_of(tiny, f"method.fedspallm.aggregation='{aggregation}'",
                 "method.fedspallm.cover=true")
    run_dir = runner.run(cfg, tmp_path / aggregation, progress=False)
    final = load_file(run_dir / "global.safetensors")
    zeros = [int((w == 0).sum()) / w.numel() for w in final.values()]
    if aggregation == "fedavg":  # clients' masks differ: a plain mean keeps their union
        assert max(zeros) < 0.5
    else:  # magnitude re-pruning back to s, every matrix (cover: every layer sampled)
        assert all(z == pytest.approx(0.5, abs=1 / 128) for z in zeros)


def test_nm_pattern_and_resume_bit_identical(tiny, tmp_path):
    extra = ("federation.clients_per_round=1", "method.fedspallm.pattern='2:4'",
             "method.fedspallm.pruner=wanda")
    straight = runner.run(cfg_of(tiny, "federation.rounds=2", *extra), tmp_path / "s",
                          progress=False)
    runner.run(cfg_of(tiny, "federation.rounds=1", *extra), tmp_path / "r", progress=False)
    resumed = runner.run(cfg_of(tiny, "federation.rounds=2", *extra), tmp_path / "r",
                         resume=True, progress=False)
    a, b = load_file(straight / "global.safetensors"), load_file(resumed / "global.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    fed = FedSpaLLM.world(cfg_of(tiny))
    changed = [k for k in a if not torch.equal(a[k], fed.initial[k])]
    assert changed and all(is_nm_sparse(a[k], 2, 4) for k in changed)


@pytest.mark.parametrize("aggregation", ["l0", "fedavg_reprune"])
def test_nm_pattern_survives_aggregation(tiny, tmp_path, aggregation):
    # several owners per layer disagree inside groups of 4: without N:M expansion the mean
    # would not be 2:4-sparse (the plain fedavg baseline is the witness)
    extra = ("method.fedspallm.pattern='2:4'", "method.fedspallm.pruner=wanda",
             "method.fedspallm.cover=true")
    final = {}
    for agg in (aggregation, "fedavg"):
        run_dir = runner.run(cfg_of(tiny, *extra, f"method.fedspallm.aggregation='{agg}'"),
                             tmp_path / agg, progress=False)
        final[agg] = load_file(run_dir / "global.safetensors")
    assert all(is_nm_sparse(w, 2, 4) for w in final[aggregation].values())
    assert not all(is_nm_sparse(w, 2, 4) for w in final["fedavg"].values())


def test_pack_roundtrip_and_malformed_updates(tiny):
    w = torch.tensor([[0.0, 1.5, 0.0], [2.0, 0.0, -3.0], [0.0, 0.0, 4.0]])
    packed = pack(w, w != 0)
    dense, keep = unpack(packed["::values"], packed["::mask"], w.shape)
    assert torch.equal(dense, w) and torch.equal(keep, w != 0)
    cfg = cfg_of(tiny, "federation.clients_per_round=1")
    method = FedSpaLLM(cfg, FedSpaLLM.world(cfg))
    method.plan(1, [2])
    result = method.local(method.downlink(method.initial_state(), 2, 1), 2, seed=0)
    blob = method.encode(result)
    update = method.decode(blob, 2)
    assert set(update.delta) == set(method.layer_keys(method.sampled[2]))
    with pytest.raises(InvalidUpdate, match="client 3: sent .* expected the"):
        method.decode(blob, 3)  # client 3 was not asked for these layers
    wire = method.wire_tensors(result)
    key = next(k for k in wire if k.endswith("::values"))
    wire[key] = wire[key][:-1]
    from safetensors.torch import save

    with pytest.raises(InvalidUpdate, match="client 2: .*kept weights in the mask"):
        method.decode(save(wire, metadata={"num_examples": "4"}), 2)


@pytest.mark.parametrize("override,pattern", [
    ("method.fedspallm.sparsity=1.0", r"`method.fedspallm.sparsity`: must be in \(0, 1\)"),
    ("method.fedspallm.sparsity=0.0", r"`method.fedspallm.sparsity`"),
    ("method.fedspallm.pattern='2:4'", r"`method.fedspallm.sparsity`: pattern '2:4' prunes"),
    ("method.fedspallm.pattern='4:2'", r"`method.fedspallm.pattern`: N:M needs"),
    ("method.fedspallm.pattern='half'", r"`method.fedspallm.pattern`: 'unstructured' or"),
    ("method.fedspallm.resource_scores=[1.0, 0.0, 1.0, 1.0]",
     r"resource score of client 1 must be > 0"),
    ("method.fedspallm.pruner=obs", r"`method.fedspallm.pruner` = 'obs' is not allowed"),
])
def test_bad_options_name_the_option(tiny, override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        cfg_of(tiny, "method.fedspallm.sparsity=0.6", override)


def test_bad_setups_are_clear_errors(tiny, tmp_path):
    cfg = cfg_of(tiny, "method.fedspallm.resource_scores=[1.0, 2.0]")
    with pytest.raises(ConfigError, match="resource_scores` has 2 entries; federation.num_"):
        FedSpaLLM(cfg, FedSpaLLM.world(cfg))
    with pytest.raises(ConfigError, match="`federation.prox_mu` = 0.1: FedSpaLLM's clients"):
        FedSpaLLM.check(cfg_of(tiny, "federation.prox_mu=0.1"))
    with pytest.raises(ConfigError, match="`federation.scaffold` = true with `method.name` = "
                                          "'fedspallm': its clients do not train"):
        FedSpaLLM.check(cfg_of(tiny, "federation.scaffold=true"))
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate on.")
    with pytest.raises(DataError, match="short.txt.*shorter than one sequence of seq_len=32"):
        FedSpaLLM.world(cfg_of(tiny, f"method.fedspallm.calibration='{short}'"))
    with pytest.raises(DataError, match="calibration source 'nowhere' is none of"):
        FedSpaLLM.world(cfg_of(tiny, "method.fedspallm.calibration='nowhere'"))
    with pytest.raises(ConfigError, match="`model.name` = 'minilm': FedSpaLLM prunes the "
                                          "decoder layers"):
        FedSpaLLM.world(cfg_of(tiny, "model.name=minilm"))


def test_non_iid_calibration_sources(tiny):
    books = FedSpaLLM.world(cfg_of(tiny, "method.fedspallm.calibration=book"))
    bbc = FedSpaLLM.world(cfg_of(tiny, "method.fedspallm.calibration=bbc"))
    for fed in (books, bbc):
        rows = [tuple(r["input_ids"].tolist()) for r in fed.train_rows]
        assert len(rows) == 16 and len(set(rows)) == 16  # 4 clients x 4 disjoint blocks
        held_out = {tuple(r["input_ids"].tolist()) for r in fed.val_rows}
        assert not held_out & set(rows)
    assert books.train_rows[0]["input_ids"].tolist() != bbc.train_rows[0]["input_ids"].tolist()


def test_suite_report_on_a_tiny_model(tiny, tmp_path, capsys):
    from fedprune.report.progress import shown
    from fedprune.sim.suites import run_suite

    out = tmp_path / "suite"
    run_suite("fedspallm", None, [f"model.name='{tiny}'"], out, smoke=True, progress=False,
              only="dense")
    quiet = capsys.readouterr().err  # no bars of ours unless asked for
    assert "suite fedspallm" not in quiet and "decoder layers" not in quiet
    with shown(True):
        report = run_suite("fedspallm", None, [f"model.name='{tiny}'"], out, smoke=True,
                           progress=True, only="C4-s50-*")
    err = capsys.readouterr().err
    # the suite's bar (variant, count, ETA) and the pruner's layer-by-layer bar
    assert "suite fedspallm" in err and "5/5" in err and "C4-s50-alone" in err
    assert "magnitude: decoder layers" in err
    text = report.read_text()
    for label in ("dense", "C4-s50-l0", "C4-s50-fedavg", "C4-s50-fedavg_reprune",
                  "C4-s50-centralized", "C4-s50-alone"):
        assert f"| {label} |" in text, label
    alone = json.loads((out / "C4-s50-alone" / "reference.json").read_text())
    assert len(alone["perplexities"]) == 4 and alone["worst_perplexity"] == max(
        alone["perplexities"])
    assert (out / "perplexity_sparsity.png").stat().st_size > 10_000


def test_server_optimizer_moves_only_kept_weights(tiny, tmp_path):
    # the same clients and proposal; FedAdam then steps the kept weights only, so the
    # l0 + expansion zeros (exactly s per matrix) survive it
    plain = load_file(runner.run(cfg_of(tiny, "method.fedspallm.cover=true"), tmp_path / "p",
                                 progress=False) / "global.safetensors")
    adam = load_file(runner.run(cfg_of(tiny, "method.fedspallm.cover=true",
                                       "federation.server_optimizer='fedadam'",
                                       "federation.server_lr=0.001"), tmp_path / "a",
                                progress=False) / "global.safetensors")
    for key, w in plain.items():
        assert torch.equal(adam[key] == 0, w == 0), key
    assert any(not torch.equal(adam[k], plain[k]) for k in plain)
