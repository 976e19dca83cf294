"""SCAFFOLD (client/scaffold.py): the local correction and the control-variate updates by
hand, the client-side store (lazy, versioned by round), real AoH and PruFed runs (payload
bytes, pruned heads untouched, layers renamed, resume after a crash between a client's write
and the checkpoint), and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_server_opt import SumModel  # loss = sum(w): every gradient is 1

from fedprune.client.scaffold import ControlStore, control_step, local_steps
from fedprune.client.train import LocalTrainSpec, load_state, local_train, snapshot
from fedprune.client.work import client_round
from fedprune.config import ConfigError, load_config
from fedprune.core.update import ClientUpdate, InvalidUpdate, validate_update
from fedprune.methods import METHODS
from fedprune.methods.base import LocalResult
from fedprune.sim import runner
from fedprune.sim.checkpoint import CHECKPOINT

ROWS = [{"input_ids": torch.tensor([1]), "attention_mask": torch.tensor([1])}] * 2
FROZEN = {"w": torch.tensor([False, True, False])}


def collate(batch):
    return {k: torch.stack([r[k] for r in batch]) for k in batch[0]}


def test_local_correction_by_hand():
    model = SumModel()
    spec = LocalTrainSpec(epochs=1, batch_size=1, lr=0.1, optimizer="sgd",
                          correction={"w": torch.tensor([0.5, 0.5, -1.0])})
    local_train(model, {"w": model.w}, ROWS, [0, 1], collate, spec, seed=0, frozen=FROZEN)
    # each of the 2 steps: -0.1 * grad 1, then -0.1 * (c - c_i); the frozen entry never moves
    assert model.w.detach().tolist() == pytest.approx([1 - 0.3, 2.0, 3 - 0.0])


class SumMethod:
    """The method surface client_round uses, on SumModel with SGD (lr 0.1, 2 steps)."""

    def __init__(self):
        self.cfg = load_config(None)  # no attack
        self.model = SumModel()
        self.params = {"w": self.model.w}
        self.spec = LocalTrainSpec(epochs=1, batch_size=1, lr=0.1, optimizer="sgd")

    def local(self, start, client_id, seed):
        load_state(self.params, start)
        stats = local_train(self.model, self.params, ROWS, [0, 1], collate, self.spec, seed,
                            frozen=FROZEN)
        after = snapshot(self.params)
        return LocalResult({"w": after["w"] - start["w"]}, stats.loss, len(ROWS))

    def trained_mask(self, result):
        return {"w": ~FROZEN["w"]}


def test_client_round_first_and_second_round_by_hand(tmp_path):
    method, store = SumMethod(), ControlStore(tmp_path)
    x = {"w": torch.tensor([1.0, 2.0, 3.0])}
    zero = {"scaffold::w": torch.zeros(3)}
    assert local_steps(2, 1, 1) == 2
    # round 1, c = c_i = 0: y - x = -0.2 (2 SGD steps of grad 1), Δc_i = -(y - x)/(K lr) = 1
    r1 = client_round(method, {**x, **zero}, 7, seed=0, rnd=1, store=store)
    assert r1.delta["w"].tolist() == pytest.approx([-0.2, 0.0, -0.2])
    assert r1.control["w"].tolist() == pytest.approx([1.0, 0.0, 1.0])  # 0 where not trained
    assert method.spec.correction is None  # the method's spec is restored
    # round 3, c = 0.25: each step -0.1 (grad) - 0.1 (0.25 - 1) = -0.025, so y - x = -0.05
    # and Δc_i = -c - (y - x)/(K lr) = -0.25 + 0.25 = 0 (the gradient is constant)
    c = {"scaffold::w": torch.full((3,), 0.25)}
    r3 = client_round(method, {**x, **c}, 7, seed=0, rnd=3, store=store)
    assert r3.delta["w"].tolist() == pytest.approx([-0.05, 0.0, -0.05], abs=1e-6)
    assert r3.control["w"].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-5)
    assert store.load(7, 4)["w"].tolist() == pytest.approx([1.0, 0.0, 1.0], abs=1e-5)
    # without control tensors in the downlink it is plain local work, no store needed
    assert client_round(method, x, 7, seed=0, rnd=5, store=None).control == {}


def test_control_step_by_hand():
    state = {"a": torch.zeros(2), "b": torch.zeros(2)}
    moments = {"scaffold::a": torch.tensor([1.0, 1.0]), "server_opt::m::a": torch.ones(2)}
    u1 = ClientUpdate(1, {"l.x": torch.zeros(2)}, 3, 0.1, keymap={"l.x": "a"},
                      control={"l.x": torch.tensor([2.0, 4.0])})
    u0 = ClientUpdate(0, {"b": torch.zeros(2)}, 3, 0.1, control={"b": torch.tensor([8.0, 0.0])})
    out = control_step(moments, state, [u1, u0], num_clients=4)
    assert out["scaffold::a"].tolist() == [1.5, 2.0]   # c + (1/N) Σ Δc_i, N = 4 clients
    assert out["scaffold::b"].tolist() == [2.0, 0.0]   # lazily created at 0
    assert torch.equal(out["server_opt::m::a"], moments["server_opt::m::a"])
    assert moments["scaffold::a"].tolist() == [1.0, 1.0]  # inputs untouched


def test_store_reads_the_newest_version_before_the_round(tmp_path):
    store = ControlStore(tmp_path / "c")
    assert store.load(3, 1) is None and not (tmp_path / "c").exists()  # lazy
    for rnd in (1, 3, 5):
        store.save(3, rnd, {"w": torch.full((2,), float(rnd))})
    assert store.load(3, 5)["w"].tolist() == [3.0, 3.0]  # a redone round 5 reads round 3's
    assert store.load(3, 9)["w"].tolist() == [5.0, 5.0]
    assert store.load(4, 9) is None
    # writing round 5 (which read round 3) dropped round 1's file: at most two per client
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["3.r3.safetensors",
                                                                  "3.r5.safetensors"]


SMALL = ["data.max_samples=160", "data.max_length=48", "federation.num_clients=4",
         "federation.clients_per_round=2", "federation.batch_size=16",
         "federation.eval_batch_size=64", "method.name='aoh'", "federation.selection='loss'",
         "method.aoh.sparsity=0.5", "method.aoh.importance_samples=8"]


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_aoh_run_bytes_pruned_heads_and_resume_after_a_crash(tmp_path):
    def cfg(rounds, *extra):
        return load_config(None, [*SMALL, f"data.cache_dir='{tmp_path / 'cache'}'",
                                  f"federation.rounds={rounds}", *extra])

    on = ("federation.scaffold=true",)
    plain = runner.run(cfg(2), tmp_path / "plain", progress=False)
    straight = runner.run(cfg(2, *on), tmp_path / "s", progress=False)
    p, s = records(plain), records(straight)
    # round 1: c = c_i = 0, so the same training and aggregate; the payloads carry c (down)
    # and Δc_i in the kept heads' layout (up): about twice the bytes each way
    assert s[0]["selected"] == p[0]["selected"] and s[0]["accuracy"] == p[0]["accuracy"]
    for a, b in zip(s[0]["bytes_up"], p[0]["bytes_up"], strict=True):
        assert 1.85 < a / b < 2.0
    for a, b in zip(s[0]["bytes_down"], p[0]["bytes_down"], strict=True):
        assert 1.95 < a / b < 2.05
    final, base = load_file(straight / "global.safetensors"), load_file(plain / "global.safetensors")
    assert any(not torch.equal(final[k], base[k]) for k in final)  # round 2 was corrected
    assert not any(k.startswith("scaffold::") for k in final)
    ckpt = load_file(straight / CHECKPOINT)
    assert any(k.startswith("scaffold::") and v.abs().sum() > 0 for k, v in ckpt.items())
    # c_i files only for the clients that took part (lazy), zero on the heads they pruned
    seen = {c for r in s for c in r["selected"]}
    files = sorted((straight / "clients").iterdir())
    assert {int(f.name.split(".")[0]) for f in files} == seen
    q = next(k for k in final if "query" in k and "lora_B" in k)
    rows = load_file(files[0])[q].abs().sum(dim=1)
    assert 0 < int((rows == 0).sum()) < len(rows)  # pruned heads' rows untouched, others not

    # a crash after round 2's clients wrote their c_i but before its checkpoint: resuming
    # from round 1's checkpoint redoes round 2 bit-identically
    crash = tmp_path / "crash"
    runner.run(cfg(1, *on), crash, progress=False)
    saved = (crash / CHECKPOINT).read_bytes()
    runner.run(cfg(2, *on), crash, resume=True, progress=False)
    (crash / CHECKPOINT).write_bytes(saved)
    resumed = runner.run(cfg(2, *on), crash, resume=True, progress=False)
    again = load_file(resumed / "global.safetensors")
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert [r["accuracy"] for r in records(resumed)] == [r["accuracy"] for r in s]



def test_prufed_control_in_local_and_global_keys(tiny_llama, tmp_path):
    # two tiers, one client each: layers [0, 1, 2] and [0]; layer 3 is held by nobody
    cfg = load_config(None, [
        f"model.name='{tiny_llama}'", "federation.num_clients=2",
        "federation.clients_per_round=2", "method.name=prufed", "method.prufed.samples=2",
        "method.prufed.max_length=48", "method.prufed.eval_samples=2",
        "method.prufed.generate_samples=1", "method.prufed.max_new_tokens=2",
        "federation.batch_size=2", "federation.lr=0.01", "run.num_threads=1",
        "method.prufed.tier_keep=[0.75, 0.25]",
        "method.prufed.tier_strategy=['top', 'top-alternate']", "federation.rounds=2",
        "federation.scaffold=true"])
    out = runner.run(cfg, tmp_path / "p", progress=False)
    ckpt = load_file(out / CHECKPOINT)
    moved = {k.removeprefix("scaffold::") for k, v in ckpt.items()
             if k.startswith("scaffold::") and v.abs().sum() > 0}
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in moved}
    assert layers == {0, 1, 2}  # layer 3 is held by no tier: its c stays 0
    stored = load_file(max((out / "clients").glob("1.r*.safetensors")))
    assert all(".layers.0." in k for k in stored)  # tier 1 keeps layer 0 only: local keys


@pytest.mark.parametrize("extra, pattern", [
    (("method.name='aoh'", "method.aoh.mode='structural'"),
     ("`federation.scaffold` = true with `method.name` = 'aoh': `method.aoh.mode` = "
     "'structural'")),
    (("method.name='prufed'", "method.prufed.aggregation='heteagg_product'"),
     "'prufed': `method.prufed.aggregation` = 'heteagg_product' re-bases"),
])
def test_methods_that_cannot_take_scaffold_say_why(extra, pattern):
    cfg = load_config(None, ["federation.scaffold=true", *extra])
    with pytest.raises(ConfigError, match=pattern):
        METHODS[cfg.method.name].check(cfg)


def test_updates_without_or_with_unexpected_or_bad_control_are_rejected():
    ref = {"w": torch.zeros(2)}
    delta = {"w": torch.ones(2)}
    with pytest.raises(InvalidUpdate, match="client 2: SCAFFOLD needs a control-variate "
                                            "change for each of its 1 tensors, it sent 0"):
        validate_update(ClientUpdate(2, delta, 4, 0.1), ref, control=True)
    with pytest.raises(InvalidUpdate, match="client 2: sent control variates, but "
                                            "federation.scaffold is off"):
        validate_update(ClientUpdate(2, delta, 4, 0.1, control=delta), ref)
    bad = {"w": torch.tensor([1.0, float("nan")])}
    with pytest.raises(InvalidUpdate, match="client 2: control of 'w' has non-finite"):
        validate_update(ClientUpdate(2, delta, 4, 0.1, control=bad), ref, control=True)
    with pytest.raises(InvalidUpdate, match="control of 'w' has shape"):
        validate_update(ClientUpdate(2, delta, 4, 0.1, control={"w": torch.ones(3)}), ref,
                        control=True)
