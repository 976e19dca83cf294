"""PruFed end to end on a tiny random Llama (4 layers, the real SmolLM2 tokenizer, BBC
headlines): tier plans and assignment, HeteAgg hand-computed through `owned_mean` with renamed
layers, per-tier payloads and metrics, layers nobody holds, the exclusive and private-top
variants, the restored backbone, resume, and bad input."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedprune.client.train import load_state
from fedprune.config import ConfigError, load_config
from fedprune.core.layerdrop import angular_distance_block, block_influence_drop
from fedprune.core.update import ClientUpdate, InvalidUpdate
from fedprune.methods.prufed import PruFed, assign_tiers
from fedprune.sim import runner

SMALL = ["method.name=prufed", "method.prufed.samples=2", "method.prufed.max_length=48",
         "method.prufed.eval_samples=2", "method.prufed.generate_samples=1",
         "method.prufed.max_new_tokens=2", "federation.batch_size=2", "federation.lr=0.01",
         "run.num_threads=1"]
# four tiers, one client each: full depth, bottom [2, 3], top-alternate [0, 2], explicit [1, 3]
FOUR = ["method.prufed.tier_keep=[1.0, 0.5, 0.5, 0.5]",
        "method.prufed.tier_strategy=['top', 'bottom', 'top-alternate', 'explicit']",
        "method.prufed.tier_layers=[[], [], [], [1, 3]]",
        "method.prufed.tier_share=[0.25, 0.25, 0.25, 0.25]"]
# two tiers, one client each: layers [0, 1, 2] and [0]; layer 3 is held by nobody
TWO = ["method.prufed.tier_keep=[0.75, 0.25]",
       "method.prufed.tier_strategy=['top', 'top-alternate']"]


def cfg_of(tiny, clients, *extra):
    return load_config(None, [f"model.name='{tiny}'", f"federation.num_clients={clients}",
                              f"federation.clients_per_round={clients}", *SMALL, *extra])


@pytest.fixture(scope="module")
def fed4(tiny_llama):
    return PruFed.world(cfg_of(tiny_llama, 4))


@pytest.fixture(scope="module")
def fed2(tiny_llama):
    return PruFed.world(cfg_of(tiny_llama, 2))


def key(layer, rest="self_attn.q_proj.lora_B.default.weight"):
    return f"base_model.model.model.layers.{layer}.{rest}"


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tier_assignment_by_cumulative_shares():
    assert assign_tiers([0.3, 0.7], 10) == [0, 0, 0] + [1] * 7
    assert assign_tiers([0.5, 0.5], 2) == [0, 1]
    assert assign_tiers([1 / 3, 1 / 3, 1 / 3], 6) == [0, 0, 1, 1, 2, 2]
    assert assign_tiers([0.5, 0.0, 0.5], 4) == [0, 0, 2, 2]


def test_heteagg_hand_computed_with_renamed_layers(tiny_llama, fed4):
    method = PruFed(cfg_of(tiny_llama, 4, *FOUR), fed4)
    assert method.kept == [(0, 1, 2, 3), (2, 3), (0, 2), (1, 3)]
    assert method.tier_of == [0, 1, 2, 3]
    # the client keeping global layers [1, 3] sends local layers 0 / 1 -> global 1 / 3
    keymap = _update(method, 3, 4).keymap
    assert keymap[key(0)] == key(1) and keymap[key(1)] == key(3)
    state = method.initial_state()
    assert set(state) == set(fed4.initial)  # heteagg: one shared tensor per adapter

    # client c sends delta = (c + 1) + 10 * local layer index on every tensor; |D_c| = c + 1
    updates = [_update(method, c, c + 1) for c in range(4)]
    new = method.aggregate(state, updates, 1.0)
    # holders (value, weight) per global layer, by hand:
    want = {0: (1 * 1 + 3 * 3) / (1 + 3),                  # c0 local 0, c2 local 0
            1: (11 * 1 + 4 * 4) / (1 + 4),                 # c0 local 1, c3 local 0
            2: (21 * 1 + 2 * 2 + 13 * 3) / (1 + 2 + 3),    # c0, c1 local 0, c2 local 1
            3: (31 * 1 + 12 * 2 + 14 * 4) / (1 + 2 + 4)}   # c0, c1 local 1, c3 local 1
    for layer, mean in want.items():
        for rest in ("self_attn.q_proj.lora_B.default.weight",
                     "self_attn.o_proj.lora_A.default.weight"):
            k = key(layer, rest)
            torch.testing.assert_close(new[k], state[k] + mean, rtol=1e-6, atol=1e-6)

    # only the bottom and top-alternate clients: layer 1 is held by neither, keeps its value
    new = method.aggregate(state, updates[1:3], 1.0)
    assert all(torch.equal(new[k], state[k]) for k in state if ".layers.1." in k)
    torch.testing.assert_close(new[key(0)], state[key(0)] + 3.0)                  # c2 alone
    torch.testing.assert_close(new[key(2)], state[key(2)] + (2 * 2 + 13 * 3) / 5)
    torch.testing.assert_close(new[key(3)], state[key(3)] + 12.0)                 # c1 alone


def _update(method, cid, n):
    tier = method.tier_of[cid]
    delta = {local: torch.full_like(method.fed.initial[g], (cid + 1) + 10 * int(
        local.split(".layers.")[1].split(".")[0])) for local, g in method.local_keys[tier].items()}
    return method.from_wire(ClientUpdate(cid, delta, n, 0.5))


def test_two_tiers_end_to_end_bytes_metrics_unheld_layer_and_resume(tiny_llama, fed2, tmp_path):
    cfg = cfg_of(tiny_llama, 2, *TWO, "federation.rounds=2")
    straight = runner.run(cfg, tmp_path / "s", progress=False, fed=fed2)
    recs = records(straight)
    method = PruFed(cfg, fed2)
    assert method.kept == [(0, 1, 2), (0,)] and method.tier_of == [0, 1]
    for rec in recs:
        assert rec["selected"] == [0, 1]
        # the weaker tier holds a third of the adapters: smaller payloads both ways
        up, down = rec["bytes_up"], rec["bytes_down"]
        assert up[1] < 0.4 * up[0] and down[1] < 0.4 * down[0]
        for name in ("perplexity", "perplexity_tier0", "perplexity_tier1", "rougeL",
                     "rougeL_tier0", "rougeL_tier1"):
            assert rec[name] is not None and math.isfinite(rec[name]), name
        assert rec["eval_loss"] == pytest.approx(math.log(rec["perplexity"]))
        assert rec["client_metrics"]["1"]["tier"] == 1.0
        assert rec["client_metrics"]["1"]["layers"] == 1.0
    final = load_file(straight / "global.safetensors")
    assert set(final) == set(fed2.initial)
    for k, v in final.items():
        if ".layers.3." in k:  # no client holds layer 3
            assert torch.equal(v, fed2.initial[k]), k
    moved = [k for k in final if "lora_B" in k and not torch.equal(final[k], fed2.initial[k])]
    assert {int(k.split(".layers.")[1].split(".")[0]) for k in moved} == {0, 1, 2}

    runner.run(cfg_of(tiny_llama, 2, *TWO, "federation.rounds=1"), tmp_path / "r",
               progress=False, fed=fed2)
    resumed = runner.run(cfg, tmp_path / "r", resume=True, progress=False, fed=fed2)
    again = load_file(resumed / "global.safetensors")
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert records(resumed)[1]["perplexity_tier1"] == recs[1]["perplexity_tier1"]


def test_layer_view_and_training_leave_the_backbone_as_it_was(tiny_llama, fed2):
    method = PruFed(cfg_of(tiny_llama, 2, *TWO), fed2)
    state = method.initial_state()
    gen = torch.Generator().manual_seed(0)
    state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
    model = fed2.model
    load_state(fed2.params, method.full_values(state))
    batch = method.val_batches[0]
    layers, n_layers = model.base_model.model.model.layers, model.config.num_hidden_layers
    with torch.no_grad():
        before = model(**batch).logits
    result = method.local(method.downlink(state, 1, 1), 1, seed=3)
    assert result.loss is not None and set(result.delta) == {
        k for k in fed2.initial if ".layers.0." in k}  # the tier-1 client's one layer
    method.evaluate(state)
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.equal(before, after)
    assert model.base_model.model.model.layers is layers
    assert model.config.num_hidden_layers == n_layers == 4
    assert not model.training


def test_exclusive_and_private_top_layer(tiny_llama, fed4):
    tiers = ["method.prufed.tier_keep=[1.0, 0.5]", "method.prufed.tier_strategy=['top', 'top']"]
    ex = PruFed(cfg_of(tiny_llama, 4, *tiers, "method.prufed.aggregation='exclusive'"), fed4)
    state = ex.initial_state()
    assert all(k.startswith(("tier0::", "tier1::")) for k in state)
    assert sum(k.startswith("tier1::") for k in state) == len(fed4.initial) // 2
    up = _update(ex, 2, 3)  # a tier-1 client moves only tier 1's copies
    new = ex.aggregate(state, [up], 1.0)
    changed = {k for k in state if not torch.equal(new[k], state[k])}
    assert changed == {f"tier1::{g}" for g in ex.local_keys[1].values()}
    scores = ex.evaluate(new)
    assert scores["perplexity"] == scores["perplexity_tier0"]  # full depth = the full tier
    assert scores["perplexity_tier1"] != scores["perplexity"]

    top = PruFed(cfg_of(tiny_llama, 4, *tiers, "method.prufed.share_top=false"), fed4)
    state = top.initial_state()
    private = {k for k in state if "::" in k}
    assert private == {f"tier1::{k}" for k in fed4.initial if ".layers.1." in k}
    assert set(top.downlink(state, 2, 1)) == set(top.local_keys[1])
    new = top.aggregate(state, [_update(top, 0, 1), _update(top, 2, 1)], 1.0)
    # shared layer 1: client 0 alone (its local 1 -> 11); tier 1's private copy: client 2 (13)
    torch.testing.assert_close(new[key(1)], state[key(1)] + 11.0)
    torch.testing.assert_close(new[f"tier1::{key(1)}"], state[f"tier1::{key(1)}"] + 13.0)
    torch.testing.assert_close(new[key(0)], state[key(0)] + (1.0 + 3.0) / 2)  # shared layer 0


def test_data_driven_plans(tiny_llama, fed4):
    cfg = cfg_of(tiny_llama, 4, "method.prufed.tier_keep=[0.75, 0.5]",
                 "method.prufed.tier_strategy=['angular', 'block_influence']",
                 "method.prufed.calibration_samples=2",
                 f"method.prufed.calibration='{Path(__file__).parent / 'data' / 'emma_excerpt.txt'}'")
    method = PruFed(cfg, fed4)
    assert method.kept[0] == tuple(angular_distance_block(
        method.similarity(True).angular_distance, 0.75))
    assert method.kept[1] == tuple(block_influence_drop(method.similarity(False).block_influence,
                                                        0.5))
    assert [len(k) for k in method.kept] == [3, 2]
    assert method.similarity(True).tokens == 2 and method.similarity(False).tokens == 2 * 48


def test_malformed_update_rejected(tiny_llama, fed4):
    method = PruFed(cfg_of(tiny_llama, 4, *FOUR), fed4)
    full = {k: torch.zeros_like(v) for k, v in fed4.initial.items()}
    with pytest.raises(InvalidUpdate, match=r"client 1: sent .* tier 1 holds the .* \[2, 3\]"):
        method.from_wire(ClientUpdate(1, full, 2, 0.1))


@pytest.mark.parametrize("override,pattern", [
    ("method.prufed.tier_keep=[1.5, 0.5]",
     r"`method.prufed.tier_keep`: keep ratio of tier 0 must be in \(0, 1\]"),
    ("method.prufed.tier_keep=[1.0, 0.0]", r"`method.prufed.tier_keep`: keep ratio of tier 1"),
    ("method.prufed.tier_share=[0.5, 0.4]", r"`method.prufed.tier_share`: shares must sum to 1"),
    ("method.prufed.tier_strategy=['top', 'middle']",
     r"`method.prufed.tier_strategy`: tier 1: unknown strategy 'middle'"),
    ("method.prufed.tier_share=[1.0]", r"`method.prufed.tier_share`: has 1 entries"),
    ("method.prufed.tier_layers=[[], [0, 1]]",
     r"`method.prufed.tier_layers`: tier 1 uses 'top-alternate', not 'explicit'"),
])
def test_bad_options_name_the_option(tiny_llama, override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        cfg_of(tiny_llama, 2, override)


def test_bad_explicit_lists_and_shares(tiny_llama, fed4):
    explicit = "method.prufed.tier_strategy=['top', 'explicit']"
    with pytest.raises(ConfigError, match=r"`method.prufed.tier_layers`: tier 1: duplicate"):
        cfg_of(tiny_llama, 4, explicit, "method.prufed.tier_layers=[[], [1, 1]]")
    with pytest.raises(ConfigError, match=r"`method.prufed.tier_layers`: tier 1 is 'explicit'"):
        cfg_of(tiny_llama, 4, explicit)
    cfg = cfg_of(tiny_llama, 4, explicit, "method.prufed.tier_layers=[[], [0, 7]]")
    with pytest.raises(ConfigError, match=r"`method.prufed.tier_layers`: tier 1: explicit kept "
                                          r"layer 7 is not an int in \[0, 4\)"):
        PruFed(cfg, fed4)
    cfg = cfg_of(tiny_llama, 4, explicit, "method.prufed.tier_layers=[[], [0, 2, 3]]")
    with pytest.raises(ConfigError, match=r"`method.prufed.tier_keep`: tier 1 keeps 3 of 4 "
                                          r"layers explicitly.* 0.75"):
        PruFed(cfg, fed4)
    with pytest.raises(ConfigError, match=r"`method.prufed.tier_share`: tier 1 gets none"):
        PruFed(cfg_of(tiny_llama, 4, "method.prufed.tier_share=[0.9, 0.1]"), fed4)
    with pytest.raises(ConfigError, match=r"`method.prufed.samples`: 4 clients x 1000"):
        PruFed.world(cfg_of(tiny_llama, 4, "method.prufed.samples=1000"))


def test_example_config_loads(tiny_llama):
    cfg = load_config(Path(__file__).parents[1] / "configs" / "prufed.toml")
    assert cfg.method.name == "prufed" and cfg.method.own.tier_keep == [1.0, 0.5]


# --- FlexLoRA-style aggregation, the baselines, the suite ------------------------------------

def test_heteagg_product_is_the_truncated_svd_of_the_mean_product(tiny_llama, fed4):
    import numpy as np

    method = PruFed(cfg_of(tiny_llama, 4, *FOUR, "method.prufed.aggregation='heteagg_product'"),
                    fed4)
    gen = torch.Generator().manual_seed(1)
    state = {k: v + (0.02 * torch.randn(v.shape, generator=gen) if "lora_B" in k else 0)
             for k, v in method.initial_state().items()}
    updates = []
    for cid in (1, 2):  # bottom [2, 3] and top-alternate [0, 2]: layer 1 is held by neither
        tier = method.tier_of[cid]
        delta = {local: 0.05 * torch.randn(state[g].shape, generator=gen)
                 for local, g in method.local_keys[tier].items()}
        updates.append(method.from_wire(ClientUpdate(cid, delta, cid + 1, 0.5)))
    new = method.aggregate(state, updates, 1.0)
    assert set(new) == set(state)
    rank = fed4.initial[key(0, "self_attn.q_proj.lora_A.default.weight")].shape[0]
    for layer, holders in ((0, [1]), (2, [0, 1]), (3, [0])):  # indices into updates
        a_key = key(layer, "self_attn.q_proj.lora_A.default.weight")
        b_key = key(layer, "self_attn.q_proj.lora_B.default.weight")
        mean = 0
        for i in holders:
            u = updates[i]
            local = {g: loc for loc, g in u.keymap.items()}
            b = state[b_key] + u.delta[local[b_key]]
            a = state[a_key] + u.delta[local[a_key]]
            mean = mean + u.num_examples * (b @ a).double().numpy()
        mean /= sum(updates[i].num_examples for i in holders)
        uu, ss, vv = np.linalg.svd(mean)  # independent reference: numpy's SVD
        best = (uu[:, :rank] * ss[:rank]) @ vv[:rank]
        got = (new[b_key] @ new[a_key]).double().numpy()
        np.testing.assert_allclose(got, best, rtol=1e-4, atol=1e-6)
        if len(holders) == 1:  # one client: its product has rank <= r, reproduced exactly
            np.testing.assert_allclose(got, mean, rtol=1e-4, atol=1e-6)
    for k, value in state.items():  # layer 1: nobody holds it, A and B keep their values
        if ".layers.1." in k:
            assert torch.equal(new[k], value), k


def test_heteagg_product_end_to_end(tiny_llama, fed2, tmp_path):
    cfg = cfg_of(tiny_llama, 2, *TWO, "federation.rounds=2",
                 "method.prufed.aggregation='heteagg_product'")
    out = runner.run(cfg, tmp_path / "p", progress=False, fed=fed2)
    final = load_file(out / "global.safetensors")
    assert set(final) == set(fed2.initial)
    for k, v in final.items():
        if ".layers.3." in k:
            assert torch.equal(v, fed2.initial[k]), k  # nobody holds layer 3
    b, a = key(0), key(0, "self_attn.q_proj.lora_A.default.weight")
    assert not torch.equal(final[b], fed2.initial[b]) and not torch.equal(final[a],
                                                                          fed2.initial[a])
    assert all(math.isfinite(r["perplexity_tier1"]) for r in records(out))


def test_heteagg_product_refuses_a_server_optimizer(tiny_llama, fed4):
    cfg = cfg_of(tiny_llama, 4, "method.prufed.aggregation='heteagg_product'",
                 "federation.server_optimizer='fedadam'")
    with pytest.raises(ConfigError, match=r"`method.prufed.aggregation` = 'heteagg_product' "
                                          r"re-bases A and B .* 'fedadam'"):
        PruFed(cfg, fed4)


def test_pooled_client_holds_every_clients_rows(tiny_llama, fed4):
    pooled = PruFed.world(cfg_of(tiny_llama, 1, "method.prufed.pool_clients=4",
                                 "method.prufed.tier_keep=[0.5]",
                                 "method.prufed.tier_strategy=['top']",
                                 "method.prufed.tier_share=[1.0]"))
    assert [len(ix) for ix in pooled.client_indices] == [8]
    rows = [pooled.train_rows[i]["input_ids"] for i in pooled.client_indices[0]]
    federated = [fed4.train_rows[i]["input_ids"] for ix in fed4.client_indices for i in ix]
    assert rows == federated
    assert [r["input_ids"] for r in pooled.val_rows] == [r["input_ids"] for r in fed4.val_rows]
    with pytest.raises(ConfigError, match=r"`method.prufed.pool_clients` = 4 .* must be 1"):
        PruFed.world(cfg_of(tiny_llama, 2, "method.prufed.pool_clients=4"))


def test_alone_equals_a_one_client_federation_of_its_data(tiny_llama, tmp_path):
    from fedprune.sim.suites import run_reference

    tiers = ["method.prufed.tier_keep=[1.0, 0.5]", "method.prufed.tier_strategy=['top', 'top']"]
    cfg = cfg_of(tiny_llama, 4, *tiers, "federation.rounds=2")
    run_reference(cfg, tmp_path / "alone", "alone")
    ref = json.loads((tmp_path / "alone" / "reference.json").read_text())
    assert ref["kind"] == "alone" and [c["tier"] for c in ref["clients"]] == [0, 0, 1, 1]
    for t in (0, 1):
        ppl = [c["perplexity"] for c in ref["clients"] if c["tier"] == t]
        assert ref[f"perplexity_tier{t}"] == pytest.approx(sum(ppl) / 2)
        assert ref[f"worst_perplexity_tier{t}"] == max(ppl)
        rouge = [c["rougeL"] for c in ref["clients"] if c["tier"] == t]
        assert ref[f"worst_rougeL_tier{t}"] == min(rouge)
    # client 0 (full depth) alone = a federation of one client holding its rows (the first
    # `samples` rows of the same seeded deal), trained in every round with the same seeds
    one = cfg_of(tiny_llama, 1, "method.prufed.pool_clients=1", "federation.rounds=2",
                 "method.prufed.tier_keep=[1.0]", "method.prufed.tier_strategy=['top']",
                 "method.prufed.tier_share=[1.0]")
    out = runner.run(one, tmp_path / "one", progress=False)
    last = records(out)[-1]
    assert ref["clients"][0]["perplexity"] == pytest.approx(last["perplexity"], rel=1e-5)
    assert ref["clients"][0]["perplexity"] != ref["clients"][1]["perplexity"]


SUITE_BASE = Path(__file__).parents[1] / "configs" / "prufed_suite.toml"


def _cell(report, task, metric, strategy, keep):
    """The cells of one row of the report's (task, metric) table, by column title."""
    lines = report.split(f"## {task}: {metric}\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    head = [h.strip() for h in lines[0].strip("|").split("|")]
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:2] == [strategy, f"{keep:g}"]:
            return dict(zip(head, cells, strict=True))
    raise AssertionError(f"no row {strategy} {keep} in {task} {metric}")


def _last(run_dir, name):
    return next(r[name] for r in reversed(records(run_dir)) if r.get(name) is not None)


def test_prufed_suite_smoke_report(tiny_llama, tmp_path):
    import numpy as np

    from fedprune.report.suites import mean_sd
    from fedprune.sim.suites import prufed_smoke, run_suite

    out = tmp_path / "suite"
    # seed 0: every role of top-alternate and the full-depth ones; seed 1: PruFed and the
    # centralized keep-0.5 model (a mean ± sd); angular: PruFed, seed 0 (a second strategy)
    for only in ("bbc_category-s0-top-alternate-*", "bbc_category-s0-full-*",
                 "bbc_category-s1-top-alternate-central50",
                 "bbc_category-s1-top-alternate-heteagg", "bbc_category-s0-angular-heteagg"):
        report = run_suite("prufed", SUITE_BASE, [f"model.name='{tiny_llama}'"], out,
                           smoke=True, progress=False, only=only)
    text = report.read_text()
    assert {v.label for v in prufed_smoke()} >= {p.name for p in out.iterdir() if p.is_dir()}
    assert (out / "bbc_category-s1-top-alternate-central50").is_dir()

    def runs(variant, name):  # the last value of ``name`` in every seed's run of a variant
        dirs = [out / f"bbc_category-s{s}-{variant}" for s in (0, 1)]
        return [_last(d, name) for d in dirs if (d / "global.safetensors").is_file()]

    def refs(variant, name):
        files = [out / f"bbc_category-s{s}-{variant}" / "reference.json" for s in (0, 1)]
        return [json.loads(f.read_text())[name] for f in files if f.is_file()]

    for keep, tier in ((0.75, 1), (0.5, 2), (0.25, 3), (1.0, 0)):
        row = _cell(text, "bbc_category", "response perplexity", "top-alternate", keep)
        fed = runs("top-alternate-heteagg", f"perplexity_tier{tier}")
        assert len(fed) == 2
        assert row["PruFed (HeteAgg)"] == f"{np.mean(fed):,.2f} ± {np.std(fed, ddof=1):,.2f}"
        assert row["alone (mean)"] == mean_sd(refs("top-alternate-alone",
                                                   f"perplexity_tier{tier}"), ",.2f")
        assert row["alone (worst)"] == mean_sd(refs("top-alternate-alone",
                                                    f"worst_perplexity_tier{tier}"), ",.2f")
        assert row["untuned"] == mean_sd(refs("top-alternate-untuned",
                                              f"perplexity_tier{tier}"), ",.2f")
        central = ("full-central" if keep == 1 else f"top-alternate-central{round(100 * keep)}")
        cen = runs(central, "perplexity_tier0")
        assert len(cen) == (2 if keep == 0.5 else 1)
        assert row["centralized"] == mean_sd(cen, ",.2f")
        diff = [b - a for a, b in zip(fed, cen, strict=False)]  # paired by seed; > 0: PruFed
        m, sd = np.mean(diff), (np.std(diff, ddof=1) if len(diff) > 1 else 0.0)
        assert row["vs centralized"] == ("beats" if m > sd else "matches" if m >= -sd
                                         else "worse")
        assert row["exclusive"] == mean_sd(runs("top-alternate-exclusive",
                                                f"perplexity_tier{tier}"), ",.2f")
        one = {0.25: "top-alternate-smallest", 1.0: "full-fed"}.get(keep)
        assert row["one-depth federation"] == (
            mean_sd(runs(one, "perplexity_tier0"), ",.2f") if one else "–")
        score = _cell(text, "bbc_category", "exact_match", "top-alternate", keep)
        assert score["PruFed (HeteAgg)"] == mean_sd(
            runs("top-alternate-heteagg", f"exact_match_tier{tier}"), ".3f")
    # angular ran one seed, PruFed only: its row holds that run, the others are empty
    row = _cell(text, "bbc_category", "response perplexity", "angular", 0.5)
    assert row["PruFed (HeteAgg)"] == format(runs("angular-heteagg", "perplexity_tier2")[0],
                                             ",.2f")
    assert row["centralized"] == "–" and row["vs centralized"] == "–"
    # the best strategy, from the runs: geometric mean over the pruned tiers (one task here)
    geo = {s: float(np.exp(np.mean([np.mean(np.log(runs(f"{s}-heteagg", f"perplexity_tier{t}")))
                                    for t in (1, 2, 3)])))
           for s in ("top-alternate", "angular")}
    best = min(geo, key=geo.get)
    assert f"Best strategy on average over the pruned tiers and tasks: {best}**" in text
    assert f"{best} {geo[best]:,.2f}" in text
    assert "match or beat **centralized** (perplexity) in" in text
    assert "match or beat **alone (mean client)** (perplexity) in" in text
    assert "match or beat **exclusive (federated within the tier only)** (perplexity)" in text
    for png in ("prufed_strategies.png", "prufed_counterparts.png"):
        assert (out / png).stat().st_size > 10_000, png


def test_best_strategy_per_task_and_overall_by_hand():
    from fedprune.report.suites import FED, PruFedResults, prufed_best_strategy

    # perplexity of the PruFed tier models: (task, strategy) -> {keep: [seed 0, seed 1]}
    ppl = {("head", "a"): {0.5: [10, 1000], 0.25: [100, 100]},   # seeds: geo 100; tiers: 100
           ("head", "b"): {0.5: [200, 200], 0.25: [200, 200]},   # 200
           ("cat", "a"): {0.5: [8, 8], 0.25: [8, 8]},            # 8
           ("cat", "b"): {0.5: [2, 2], 0.25: [2, 2]}}            # 2
    res = PruFedResults([{"task": t, "strategy": s, "keep": k, "role": FED, "seed": i,
                          "perplexity": p, "score": None}
                         for (t, s), by_keep in ppl.items() for k, ps in by_keep.items()
                         for i, p in enumerate(ps)])
    assert prufed_best_strategy(res, tasks=("head",)) == ("a", pytest.approx({"a": 100,
                                                                             "b": 200}))
    assert prufed_best_strategy(res, tasks=("cat",))[0] == "b"
    # over both tasks: a = (100 * 8) ** 0.5 = 28.3, b = (200 * 2) ** 0.5 = 20
    best, avg = prufed_best_strategy(res)
    assert best == "b" and avg == pytest.approx({"a": math.sqrt(800), "b": 20.0})
