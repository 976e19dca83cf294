"""fedprune's own methods on real SuperLink / SuperNodes processes (--insecure): FedSpaLLM and
PruFed (tiers, SCAFFOLD) equal the in-process run; a SuperNode killed mid-round and one
sending garbage are dropped or rejected alone and the run goes on. Apart from test_flower.py
so that pytest-xdist runs them beside it."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import pytest
import tomli_w
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr")

from flower_helpers import (
    AOH,
    assert_same_run,
    federation,
    flwr_run,
    records,
    tiny,
    wait_for,
)

from fedprune.client.faults import injected_fault
from fedprune.config import load_config
from fedprune.sim import runner

# --- FedSpaLLM on real SuperLink / SuperNodes (tiny Llama, 2 clients) ------------------------

def test_fedspallm_on_supernodes_equals_the_in_process_run(tiny_llama, tmp_path):
    """The FedSpaLLM strategy is the same loop: sampled layers go down with the model's
    changed matrices, sparse pruned layers come up, the server's l0 mean + expansion gives the
    in-process result."""
    overrides = [f'model.name="{tiny_llama}"', "method.name=fedspallm",
                 "federation.num_clients=2", "federation.clients_per_round=2",
                 "federation.rounds=2", "method.fedspallm.samples=4",
                 "method.fedspallm.seq_len=32", "method.fedspallm.eval_samples=4",
                 "run.num_threads=1"]
    cfg = load_config(None, overrides)
    reference = SimpleNamespace(cfg=cfg, run_dir=runner.run(cfg, tmp_path / "in-process",
                                                            progress=False))
    run_dir = tmp_path / "flower-run"
    with federation(tmp_path, 2, tls=False) as fed:
        log = flwr_run(fed, [(f"overrides='{'; '.join(overrides)}' run-dir='{run_dir}' "
                             "reply-timeout=240.0 connect-timeout=120.0")])
    assert (run_dir / "global.safetensors").is_file(), log[-4000:]
    assert_same_run(reference, run_dir)
    recs = records(run_dir)
    assert recs[0]["bytes_down"][0] < 200 < recs[1]["bytes_down"][0]  # round 2 sends changes
    assert all(r["train_loss"] is None and r["perplexity"] > 1 for r in recs)


# --- PruFed on real SuperLink / SuperNodes (tiny Llama, 2 tiers, 2 clients) -------------------

def test_prufed_tiers_with_scaffold_on_supernodes_equal_the_in_process_run(tiny_llama,
                                                                            tmp_path):
    """Two tiers whose replies hold different keys: client 0 (full depth) sends the adapters
    of the 4 layers, client 1 (top-alternate, half depth) those of its 2 view layers, named
    0 / 1 locally and renamed to global 0 / 2 by the server (HeteAgg); with SCAFFOLD, each
    SuperNode keeps its control variate in its own state-dir and the changes travel in the
    same local names. The same loop gives the in-process result, and the half-depth client's
    uplink is smaller."""
    from fedprune.methods.prufed import PruFed

    overrides = [f'model.name="{tiny_llama}"', "method.name=prufed",
                 "federation.num_clients=2", "federation.clients_per_round=2",
                 "federation.rounds=2", "federation.batch_size=2", "federation.lr=0.01",
                 "method.prufed.tier_keep=[1.0, 0.5]",
                 'method.prufed.tier_strategy=["top", "top-alternate"]',
                 "method.prufed.tier_share=[0.5, 0.5]", "method.prufed.samples=2",
                 "method.prufed.max_length=48", "method.prufed.eval_samples=2",
                 "method.prufed.generate_samples=1", "method.prufed.max_new_tokens=2",
                 "run.num_threads=1", "federation.scaffold=true"]
    cfg = load_config(None, overrides)
    fed = PruFed.world(cfg)
    method = PruFed(cfg, fed)
    # independent of the run: the two tiers' plans and the keys their replies carry
    assert method.kept == [(0, 1, 2, 3), (0, 2)] and method.tier_of == [0, 1]
    full, half = (set(method.local_keys[t]) for t in (0, 1))
    assert len(half) == len(full) // 2 and half < full  # local names of view layers 0, 1
    assert {method.local_keys[1][k] for k in half} == {
        k for k in fed.initial if ".layers.0." in k or ".layers.2." in k}
    reference = SimpleNamespace(cfg=cfg, run_dir=runner.run(cfg, tmp_path / "in-process",
                                                            progress=False, fed=fed))
    run_dir = tmp_path / "flower-run"
    (tmp_path / "run-config.toml").write_text(tomli_w.dumps({
        "overrides": "; ".join(overrides), "run-dir": str(run_dir),
        "reply-timeout": 240.0, "connect-timeout": 120.0}))
    with federation(tmp_path, 2, tls=False) as fed_:
        log = flwr_run(fed_, [str(tmp_path / "run-config.toml")])
    assert (run_dir / "global.safetensors").is_file(), log[-4000:]
    assert_same_run(reference, run_dir)
    initial = fed.initial
    final = load_file(run_dir / "global.safetensors")
    moved = {int(k.split(".layers.")[1].split(".")[0]) for k in final
             if "lora_B" in k and not torch.equal(final[k], initial[k])}
    assert moved == {0, 1, 2, 3}
    # each SuperNode's c_i, under its run id, in its local names: round 2 read round 1's
    run_id = (run_dir / "run_id").read_text()
    for node, layers in ((0, 4), (1, 2)):
        kept = sorted((tmp_path / f"node{node}-state" / run_id).iterdir())
        assert [p.name for p in kept] == [f"{node}.r1.safetensors", f"{node}.r2.safetensors"]
        assert len(load_file(kept[-1])) == layers * len(full) // 4
    recs = records(run_dir)
    # the ServerApp's round line shows the method's own metrics (perplexity, ROUGE)
    line = next(x for x in log.splitlines() if x.startswith("fedprune INFO: round 2: {"))
    shown = json.loads(line.split(": ", 2)[2])
    assert shown["perplexity"] == recs[1]["perplexity"] and "rougeL" in shown
    for r in recs:
        assert r["selected"] == [0, 1] and r["dropped"] == [] and r["rejected"] == []
        assert r["client_metrics"]["1"]["layers"] == 2.0
        # half the adapters: about half the payload each way (the metadata text is shared)
        for key in ("bytes_up", "wire_bytes_up", "bytes_down", "wire_bytes_down"):
            full_b, half_b = r[key]
            assert 0.4 * full_b < half_b < 0.6 * full_b, (key, r[key])


# --- --insecure, 3 SuperNodes, one killed mid-round ------------------------------------------

def test_supernode_killed_mid_round_is_dropped_and_the_run_goes_on(tmp_path):
    """Client 2's SuperNode is killed in round 1; in round 2 client 0's SuperNode sends a
    garbled payload (faults.garbled: its draw for (seed 0, round 2, client 0) is 0.029, every
    other draw of these rounds is above 0.1). Each is dropped / rejected alone, with its
    reason; the run goes on."""
    overrides = [*tiny(tmp_path, 3), "faults.garbled=0.1"]
    faults = load_config(AOH, overrides).faults
    assert [injected_fault(faults, 0, r, c) for r in (1, 2) for c in range(3)] == \
        [None, None, None, "garbled", None, None]
    run_dir = tmp_path / "flower-run"
    (tmp_path / "run-config.toml").write_text(tomli_w.dumps({
        "experiment": str(AOH), "overrides": "; ".join(overrides), "run-dir": str(run_dir),
        "reply-timeout": 240.0, "connect-timeout": 120.0}))
    with federation(tmp_path, 3, tls=False) as fed:
        def crash_on_first_train() -> None:  # the kill lands while client 2 trains
            wait_for(lambda: "Receiving: train" in fed.procs.log("supernode2"),
                     "client 2 to receive its round-1 message", timeout=300)
            time.sleep(1.0)
            fed.procs.kill("supernode2")

        killer = threading.Thread(target=crash_on_first_train, daemon=True)
        killer.start()
        log = flwr_run(fed, [str(tmp_path / "run-config.toml")])
        killer.join(timeout=1)
        node2 = fed.procs.log("supernode2")
    assert "Sending: train" not in node2, "client 2 replied before the kill: no fault injected"
    r1, r2 = records(run_dir)
    assert r1["selected"] == [0, 1, 2] and r1["dropped"] == [2] and r1["rejected"] == []
    assert r1["bytes_up"][2] == 0 and r1["bytes_down"][2] > 0 and r1["accuracy"] is not None
    assert set(r1["client_metrics"]) == {"0", "1"}
    # the next round runs with the survivors; the dead node gets nothing, the garbled
    # update of client 0 is rejected by the ServerApp, client 1's is aggregated
    assert r2["dropped"] == [2] and set(r2["client_metrics"]) == {"1"}
    assert r2["rejected"] == [0] and "payload" in r2["rejected_reasons"]["0"]
    assert r2["bytes_down"][2] == 0 and r2["accuracy"] is not None
    assert "dropped client 2" in log
    final = load_file(run_dir / "global.safetensors")
    assert all(torch.isfinite(v).all() for v in final.values())


