"""End to end on the real MiniLM and a BBC News subset: artifacts, determinism, resume,
rejected updates, CLI errors."""

import json
from fnmatch import fnmatch

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedprune.cli import app
from fedprune.client.world import build
from fedprune.config import ConfigError, load_config
from fedprune.core.selection import History
from fedprune.data import DataError
from fedprune.methods import METHODS
from fedprune.report.summary import summarize
from fedprune.sim import runner
from fedprune.sim.checkpoint import CheckpointError
from fedprune.sim.suites import observe_importance
from fedprune.structure.compute import resolve_device, resolve_dtype

ROOT = __import__("pathlib").Path(__file__).parents[1]
SMALL = ["data.max_samples=160", "data.max_length=48", "federation.num_clients=4",
         "federation.clients_per_round=2", "federation.rounds=2", "federation.batch_size=16",
         "federation.eval_batch_size=64"]


def small_cfg(tmp_path, *extra):
    return load_config(None, [*SMALL, f"data.cache_dir='{tmp_path / 'cache'}'", *extra])


def run_small(tmp_path, name, *extra, resume=False):
    return runner.run(small_cfg(tmp_path, *extra), tmp_path / name, resume=resume,
                      progress=False)


def strip_time(records):
    """Records without wall-clock timings (keys ending in _s, also per client) and without
    bytes_up (the payload carries the timings as text: `same_bytes_up`)."""
    def strip(d):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items()
                if not k.endswith("_s") and k != "bytes_up"}
    return [strip(r) for r in records]


def same_bytes_up(a, b):
    """Upload sizes equal up to the timings' digits (padded to 8 bytes): 64 bytes."""
    return all(len(x["bytes_up"]) == len(y["bytes_up"]) and
               all(abs(p - q) <= 64 for p, q in zip(x["bytes_up"], y["bytes_up"], strict=True))
               for x, y in zip(a, b, strict=True))


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    return tmp, run_small(tmp, "a")


def test_end_to_end_artifacts(two_rounds):
    _, run_dir = two_rounds
    records = metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert len(r["selected"]) == 2 and len(set(r["selected"])) == 2
        assert set(r) >= {"round", "selected", "train_loss", "eval_loss", "accuracy",
                          "bytes_up", "bytes_down", "wall_s"}
        assert 0 <= r["accuracy"] <= 1 and r["eval_loss"] > 0 and r["train_loss"] > 0
    final = load_file(run_dir / "global.safetensors")
    # LoRA A/B on q, k, v, o of 6 layers (r=16, hidden 384) + classifier (5 x 384 + 5)
    lora = 6 * 4 * 2 * 16 * 384
    assert sum(v.numel() for v in final.values()) == lora + 5 * 384 + 5
    # bytes down = the serialized global state = the saved file, byte for byte
    size = (run_dir / "global.safetensors").stat().st_size
    assert all(b == size for r in records for b in r["bytes_down"])
    # FedAvg sends every tensor, plus |D_c|, L_c and client metrics as header metadata
    assert all(size < b < size + 512 for r in records for b in r["bytes_up"])
    for name in ("config.json", "config.toml", "partition.json", "metrics.csv", "accuracy.png",
                 "report.md", "checkpoint.safetensors"):
        assert (run_dir / name).is_file(), name
    part = json.loads((run_dir / "partition.json").read_text())
    assert sum(part["sizes"]) == 128 and len(part["label_histograms"]) == 4
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["compute_dtype"] == str(resolve_dtype("auto")).removeprefix("torch.")
    assert env["device"] == str(resolve_device("auto"))
    for r in records:  # each phase timed; every BBC article is longer than max_length 48: no padding
        assert r["eval_s"] > 0
        assert all(m["train_s"] > 0 and m["pad_fraction"] == 0.0
                   for m in r["client_metrics"].values())
    report = (run_dir / "report.md").read_text()
    assert "local training" in report and f"compute: {env['compute_dtype']}" in report
    assert load_config(run_dir / "config.toml") == small_cfg(two_rounds[0])


def test_training_moves_the_model_and_learns(two_rounds):
    tmp, run_dir = two_rounds
    cfg = small_cfg(tmp)
    fed = build(cfg)
    untrained = METHODS["fedavg"](cfg, fed).evaluate(fed.initial)  # the round-0 global model
    records = metrics(run_dir)
    # 2 rounds of 3 local steps at lr 1e-3 move the loss little (1.600 -> 1.585 here) but
    # surely: every round's global model is better than the untrained one
    assert all(r["eval_loss"] < untrained["eval_loss"] - 0.005 for r in records)
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]
    final = load_file(run_dir / "global.safetensors")
    b = [v for k, v in final.items() if "lora_B" in k]
    assert all(t.abs().sum() > 0 for t in b)  # LoRA B starts at zero; every one was trained


def test_same_seed_same_result(two_rounds, tmp_path):
    tmp, first = two_rounds
    second = runner.run(small_cfg(tmp), tmp_path / "b", progress=False)
    a, b = load_file(first / "global.safetensors"), load_file(second / "global.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert strip_time(metrics(first)) == strip_time(metrics(second))
    assert same_bytes_up(metrics(first), metrics(second))
    other = runner.run(small_cfg(tmp, "run.seed=1"), tmp_path / "c", progress=False)
    c = load_file(other / "global.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_is_bit_identical(two_rounds, tmp_path):
    tmp, first = two_rounds
    straight = runner.run(small_cfg(tmp, "federation.rounds=3"), tmp_path / "s", progress=False)
    # the 2-round run stopped after round 2: resume it to 3 rounds
    import shutil
    shutil.copytree(first, tmp_path / "r")
    resumed = runner.run(small_cfg(tmp, "federation.rounds=3"), tmp_path / "r", resume=True,
                         progress=False)
    a, b = load_file(straight / "global.safetensors"), load_file(resumed / "global.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert strip_time(metrics(straight)) == strip_time(metrics(resumed))
    assert same_bytes_up(metrics(straight), metrics(resumed))


def test_resume_a_run_saved_before_newer_options(two_rounds, tmp_path):
    # a run directory written before [tracking] and federation.server_optimizer existed
    import shutil
    tmp, first = two_rounds
    old = tmp_path / "old"
    shutil.copytree(first, old)
    saved = json.loads((old / "config.json").read_text())
    del saved["tracking"], saved["federation"]["server_optimizer"]
    (old / "config.json").write_text(json.dumps(saved))
    resumed = runner.run(small_cfg(tmp, "federation.rounds=3"), old, resume=True,
                         progress=False)
    assert [r["round"] for r in metrics(resumed)] == [1, 2, 3]
    with pytest.raises(ConfigError, match="differs.*federation.server_optimizer"):
        runner.run(small_cfg(tmp, "federation.rounds=4", "federation.server_optimizer=fedadam"),
                   old, resume=True, progress=False)


def test_existing_run_dir_is_not_overwritten(two_rounds):
    tmp, first = two_rounds
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        runner.run(small_cfg(tmp), first, progress=False)
    with pytest.raises(ConfigError, match="differs.*federation.lr"):
        runner.run(small_cfg(tmp, "federation.lr=0.5"), first, resume=True, progress=False)


def test_bad_update_is_rejected_and_the_rest_aggregated(tmp_path, monkeypatch, caplog):
    import fedprune.methods.fedavg as fedavg_method
    real = fedavg_method.local_train
    cfg = small_cfg(tmp_path, "federation.rounds=1")
    fed = build(cfg)
    victim = runner.SELECTORS["random"](1, History(np.ones(4)), 2, 0)[0]
    first_index = fed.client_indices[victim][0]

    def poisoned(model, params, rows, indices, *args, **kwargs):
        loss = real(model, params, rows, indices, *args, **kwargs)
        if indices[0] == first_index:
            with torch.no_grad():
                next(iter(params.values()))[0] = float("nan")
        return loss

    monkeypatch.setattr(fedavg_method, "local_train", poisoned)
    run_dir = runner.run(cfg, tmp_path / "p", progress=False)
    (record,) = metrics(run_dir)
    assert record["rejected"] == [victim] and victim in record["selected"]
    assert f"client {victim}: " in caplog.text and "non-finite" in caplog.text
    final = load_file(run_dir / "global.safetensors")
    assert all(torch.isfinite(v).all() for v in final.values())


def test_cli_errors_name_the_option(tmp_path):
    cli = CliRunner()
    res = cli.invoke(app, ["run", "configs/fedavg.toml", "federation.clients_per_round=99",
                           "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "federation.clients_per_round" in res.output
    res = cli.invoke(app, ["run", "configs/fedavg.toml", "data.dataset=/no/such/file.csv",
                           "--out", str(tmp_path / "y")])
    assert res.exit_code == 2 and "/no/such/file.csv" in res.output
    res = cli.invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "metrics.jsonl" in res.output


def test_cli_help_lists_every_option():
    res = CliRunner().invoke(app, ["run", "--help"])
    assert res.exit_code == 0
    for key in ("federation.clients_per_round", "peft.target_modules", "partition.alpha",
                "data.max_length", "run.seed", "--resume", "--out"):
        assert key in res.output


def test_cli_report(two_rounds):
    res = CliRunner().invoke(app, ["report", str(two_rounds[1])])
    assert res.exit_code == 0 and "final_accuracy" in res.output


def test_suite_header_names_every_seed_run():
    from fedprune.report.suites import _seeds_phrase

    rows = [{"cfg": {"run": {"seed": s}}} for s in (2, 0, 1, 0)]
    assert _seeds_phrase(rows) == "seeds 0, 1, 2"
    assert _seeds_phrase(rows[1:2]) == "seed 0"


@pytest.mark.parametrize("name", ["ablation", "sparsity", "noniid", "table1", "robustness",
                                  "privacy", "peft", "tasks", "backbones"])
def test_suite_smoke(tmp_path, name):
    from fedprune.sim.suites import BASES, SMOKE_VARIANTS, SUITES, run_suite

    only = {"table1": "B1-random-sel-s0,AoH-loss-sel-s0",  # 2 of its 6 rows
            "robustness": "FedAvg-clean-mean,FedAvg-scaling-mean",
            }.get(name, "*")
    path = run_suite(name, ROOT / BASES[name],
                     [f"data.cache_dir='{tmp_path / 'cache'}'", "federation.rounds=1",
                      "run.count_flops=false"], tmp_path / name, smoke=True, progress=False,
                     only=only)
    text = path.read_text()
    for v in SMOKE_VARIANTS.get(name, SUITES[name])():
        if any(fnmatch(v.label, g) for g in only.split(",")):
            assert name in ("robustness", "peft", "tasks", "backbones") or v.label in text
            assert (tmp_path / name / v.label / "global.safetensors").is_file()
    figure = {"ablation": "accuracy_curves.png", "sparsity": "sparsity.png",
              "noniid": "importance.png", "table1": "table1_curves.png",
              "privacy": "privacy.png", "peft": "peft.png", "tasks": "tasks.png",
              "backbones": "backbones.png"}.get(name)
    if figure:
        assert (tmp_path / name / figure).stat().st_size > 10_000
    if name in ("ablation", "sparsity", "table1"):
        assert "seed 0." in text
    if name == "ablation":  # each mode against B1 and against adapter mode; no B1, no B1 lines
        from fedprune.report.suites import REPORTS

        b1, adapter = text.split("Against AoH's adapter mode (AoH-loss-sel):")
        assert b1.count("\n- ") == 8 and adapter.count("\n- ") == 5
        top = [x for x in adapter.splitlines() if x.startswith("- AoH-loss-sel-top")]
        assert len(top) == 3 and all(float(x.split("upload ")[1].split("x")[0]) > 1 for x in top)
        two = [v for v in SUITES[name]() if v.label in ("AoH-loss-sel", "AoH-loss-sel-top1")]
        alone = REPORTS[name](tmp_path / name, two).read_text()
        assert "Against B1" not in alone and "- AoH-loss-sel-top1: upload" in alone
    if name == "table1":  # the ratio to B1: 1x on B1's row, "–" when no B1 row has run
        from fedprune.report.suites import REPORTS

        assert "| B1-random-sel | 1 |" in text and " | 1.00x | " in text
        aoh = [v for v in SUITES[name]() if v.label == "AoH-loss-sel-s0"]
        alone = REPORTS[name](tmp_path / name, aoh).read_text()
        assert next(x for x in alone.splitlines() if x.startswith("| AoH-loss-sel |")
                    ).split(" | ")[5] == "–"
    if name == "robustness":  # the attack x rule table against the clean run
        assert "| scaling | " in text and "(+0.0)" in text.split("| clean |")[1].split("\n")[0]
        scaled = json.loads((tmp_path / name / "FedAvg-scaling-mean" / "config.json").read_text())
        assert (scaled["attack"]["kind"], scaled["attack"]["scale"]) == ("scaling", 100.0)
    if name == "peft":  # a row per PEFT method: FedAvg's figures, AoH's sparsity (or none)
        ia3 = next(x for x in text.splitlines() if x.startswith("| ia3 |")).split(" | ")
        prompt = next(x for x in text.splitlines() if x.startswith("| prompt |")).split(" | ")
        assert ia3[4] != "–" and prompt[1:5] == ["–"] * 4  # prompt: no FedAvg run here
        assert ia3[5] in ("–", "50 %") and float(ia3[3]) > 0  # GOPs
    if name == "tasks":  # the generation rows: ROUGE-1/2/L in [0, 1], perplexity > 1
        row = next(x for x in text.splitlines() if x.startswith("| 4 / 2 | AoH 90 % |")
                   and text.index(x) > text.index("## headline")).split(" | ")
        assert all(0.0 <= float(v) <= 1.0 for v in row[2:5])
        assert float(row[5].replace(",", "")) > 1.0
    if name == "backbones":  # T5-small untrained, at its published sizes; AoH sends less
        row = next(x for x in text.splitlines() if x.startswith("| t5-small |")).split(" | ")
        assert row[1].startswith("**no**") and row[7] == row[11].rstrip(" |") == "untrained"
        assert float(row[9].replace(",", "")) < float(row[4].replace(",", ""))
        from transformers import AutoModelForSeq2SeqLM

        from fedprune.structure.attention import describe

        t5 = describe(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / name / "models" /
                                                            "t5-small"))
        assert {k: len(v) for k, v in t5.layers.items()} == {"encoder": 6, "decoder": 6}
        assert {(a.n_heads, a.head_dim) for a in t5.attention} == {(8, 64)}
    if name == "privacy":  # epsilon of one Poisson-sampled round with z = 1, q = 10 / 20
        from fedprune.core.privacy import epsilon
        assert "clipping C = 0.5," in text  # the DP runs' C, not the no-DP run's 0
        row = next(x for x in text.splitlines() if x.startswith("| AoH-z1.0-a0.05 |"))
        assert f"| {epsilon(1.0, 0.5, 1, 1e-5):.2f} |" in row and "| 0.05 |" in row
    if name == "noniid":  # two clients' importance logged each round, one value per head
        rec = json.loads((tmp_path / name / "AoH-iid-s0" / "metrics.jsonl").read_text())
        assert len(rec["observed"]["alpha"]["0"]) == 72
        row = next(x for x in text.splitlines() if x.startswith("| dir0.1 | 1 |")).split(" | ")
        acc = {r: summarize(tmp_path / name / f"{r}-dir0.1-s0")["final_accuracy"]
               for r in ("FedAvg", "AoH")}
        assert row[2:5] == [f"{acc['FedAvg']:.4f}", f"{acc['AoH']:.4f}",
                            f"{100 * (acc['AoH'] - acc['FedAvg']):+.1f} |"]
    if name == "sparsity":  # a row per mode and sparsity; structural from 50 % on
        rows = [x.split(" | ")[:3] for x in text.splitlines()
                if x.startswith(("| adapter |", "| structural |"))]
        assert rows == [["| adapter", f"{s:.2f}", "1"] for s in (0, 0.5, 0.7, 0.9, 0.95)] + [
            ["| structural", f"{s:.2f}", "1"] for s in (0.5, 0.7, 0.9, 0.95)]


def test_sparsity_suite_resolves_on_the_paper_preset():
    # the preset maps B rows only (P = {B}); structural mode takes that where nothing on o
    # trains (LoRA on q and v), and scores heads before training
    from fedprune.methods import METHODS
    from fedprune.sim.suites import sparsity, variant_config

    for v in sparsity():
        cfg = variant_config(ROOT / "configs/paper_table1.toml", [], v)
        METHODS["aoh"].check(cfg)
        aoh = cfg.method.own
        assert (aoh.mode, aoh.importance, aoh.head_params) == (
            ("structural", "before", "B") if "structural" in v.label else ("adapter", "after", "B"))


def test_optimizers_suite_smoke_report(tmp_path):
    """Three options of issue 18 on AoH (Dirichlet 0.1, seed 0, tiny sizes): a table row with
    a cell per option, the gain over FedAvg in points, curves."""
    from fedprune.sim.suites import OPTIMIZERS, run_suite

    out = tmp_path / "opt"
    path = run_suite("optimizers", None, [f"data.cache_dir='{tmp_path / 'cache'}'",
                                          "federation.rounds=1"], out, smoke=True,
                     progress=False, only="AoH-dir0.1-s0-fedavg,AoH-dir0.1-s0-fedadam,"
                                           "AoH-dir0.1-s0-scaffold")
    lines = path.read_text().splitlines()
    header = next(x for x in lines if x.startswith("| method | partition |"))
    assert header.split(" | ")[2:] == ["fedavg", "fedadam", "scaffold |"]
    assert {"fedadam", "scaffold"} < set(OPTIMIZERS)
    row = next(x for x in lines if x.startswith("| AoH | dir0.1 |"))
    assert row.count("(") == 2  # a gain for every option but FedAvg
    assert (out / "optimizer_curves.png").stat().st_size > 10_000
    up = {o: json.loads((out / f"AoH-dir0.1-s0-{o}" / "metrics.jsonl").read_text())["bytes_up"]
          for o in ("fedavg", "scaffold")}
    assert all(1.8 < s / p < 2.0 for s, p in zip(up["scaffold"], up["fedavg"], strict=True))


def test_cli_unknown_suite():
    res = CliRunner().invoke(app, ["suite", "tabel1"])
    assert res.exit_code == 2 and "unknown suite 'tabel1'" in res.output and "ablation" in res.output


def poison(monkeypatch, victims):
    """Clients in ``victims`` send NaN updates (rejected by validation)."""
    import fedprune.methods.fedavg as fedavg_method

    real = fedavg_method.FedAvg.local

    def local(self, start, client_id, seed):
        result = real(self, start, client_id, seed)
        if client_id in victims:
            next(iter(result.delta.values()))[0] = float("nan")
        return result

    monkeypatch.setattr(fedavg_method.FedAvg, "local", local)


def first_selected(cfg):
    return runner.SELECTORS["random"](1, History(np.ones(cfg.federation.num_clients)),
                                      cfg.federation.clients_per_round, cfg.run.seed)


def test_all_rejected_round_logs_no_train_loss_and_changes_nothing(tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path, "federation.rounds=1")
    poison(monkeypatch, set(first_selected(cfg)))
    run_dir = runner.run(cfg, tmp_path / "p", progress=False)
    (record,) = metrics(run_dir)
    assert record["rejected"] == record["selected"] and record["train_loss"] is None
    final, initial = load_file(run_dir / "global.safetensors"), build(cfg).initial
    assert all(torch.equal(final[k], initial[k]) for k in initial)
    assert "train loss" in (run_dir / "report.md").read_text()


def test_losses_of_a_round_not_aggregated_are_not_kept(tmp_path, monkeypatch):
    # 1 valid update < min_valid_updates = 2: the round is not aggregated, so the valid
    # client's L_c must not steer Eq. 9 selection later
    cfg = small_cfg(tmp_path, "federation.rounds=1", "federation.min_valid_updates=2")
    victim, _ = first_selected(cfg)
    poison(monkeypatch, {victim})
    run_dir = runner.run(cfg, tmp_path / "p", progress=False)
    (record,) = metrics(run_dir)
    assert record["rejected"] == [victim] and record["train_loss"] is not None
    from fedprune.sim.checkpoint import load_checkpoint

    _, server = load_checkpoint(run_dir)
    assert server["client_loss"] == {}


def test_num_examples_must_match_the_partition(tmp_path, monkeypatch, caplog):
    import fedprune.methods.fedavg as fedavg_method

    cfg = small_cfg(tmp_path, "federation.rounds=1")
    liar = first_selected(cfg)[0]
    real = fedavg_method.FedAvg.local

    def local(self, start, client_id, seed):
        result = real(self, start, client_id, seed)
        if client_id == liar:
            result.num_examples *= 10  # claims ten times its data to weigh more in Eq. 5
        return result

    monkeypatch.setattr(fedavg_method.FedAvg, "local", local)
    run_dir = runner.run(cfg, tmp_path / "p", progress=False)
    (record,) = metrics(run_dir)
    assert record["rejected"] == [liar]
    assert f"client {liar}: num_examples=" in caplog.text and "the server knows" in caplog.text


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    cfg = small_cfg(tmp_path, "federation.rounds=1")
    run_dir = runner.run(cfg, tmp_path / "p", progress=False)
    (run_dir / "checkpoint.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match="checkpoint .*checkpoint.safetensors is corrupt"):
        runner.run(small_cfg(tmp_path, "federation.rounds=2"), run_dir, resume=True,
                   progress=False)


@pytest.mark.parametrize("policy", ["random", "poisson", "loss", "pow-d"])
def test_clients_without_data_are_never_selected(tmp_path, policy):
    cfg = small_cfg(tmp_path, "federation.num_clients=8", "federation.clients_per_round=3",
                    f"federation.selection='{policy}'")
    sizes = np.array([5, 0, 7, 0, 0, 3, 9, 4])
    held = np.flatnonzero(sizes)
    losses = {0: 1.0, 2: 3.0, 5: 0.5, 6: 2.0, 7: 4.0, 1: 99.0}  # 1 can hold no loss: ignored
    server = runner.ServerState(client_loss=losses, global_loss=0.2)
    seen = set()
    for rnd in range(1, 41):
        chosen = runner.select_clients(cfg, sizes, server, rnd)
        assert set(chosen) <= set(held.tolist()) and chosen == sorted(chosen)
        seen |= set(chosen)
        # the policy over the 5 clients that hold data, renumbered 0..4 and mapped back
        sub = History(sizes[held], {j: losses[c] for j, c in enumerate(held)}, 0.2)
        options = {"d": 0} if policy == "pow-d" else {}
        direct = runner.SELECTORS[policy](rnd, sub, 3, cfg.run.seed, **options)
        assert chosen == [int(held[j]) for j in direct]
    if policy in ("loss", "pow-d"):  # by hand: the 3 highest L_c (- L_g) of 0, 2, 5, 6, 7
        # (pow-d: d = min(5, 2K) draws every client that holds data)
        assert seen == {7, 2, 6}
    else:
        assert seen == set(held.tolist())


def test_selection_over_full_partitions_is_unchanged(tmp_path):
    cfg = small_cfg(tmp_path, "federation.num_clients=8", "federation.clients_per_round=3")
    sizes = np.arange(1, 9)
    server = runner.ServerState()
    for rnd in range(1, 6):
        assert (runner.select_clients(cfg, sizes, server, rnd)
                == runner.SELECTORS["random"](rnd, History(sizes), 3, cfg.run.seed))


def test_aoh_runs_with_an_empty_client_and_refuses_too_few(tmp_path, caplog):
    # Dirichlet at small alpha with min_partition_size = 0 leaves clients without data: AoH's
    # importance (Eq. 6) has no sample there, so such a client must never be selected
    cfg = small_cfg(tmp_path, "method.name='aoh'", "federation.clients_per_round=3",
                    "federation.selection='loss'")
    fed = METHODS["aoh"].world(cfg)
    fed.client_indices[1] = fed.client_indices[1][:0]
    run_dir = runner.run(cfg, tmp_path / "e", progress=False, fed=fed,
                         observe=observe_importance)  # the noniid suite's observer
    records = metrics(run_dir)
    assert [r["selected"] for r in records] == [[0, 2, 3]] * 2 and not records[0]["rejected"]
    assert list(records[0]["observed"]["alpha"]) == ["0", "2"]  # the two that hold data
    assert "1 of 4 clients hold no training examples" in caplog.text
    fed.client_indices[2] = fed.client_indices[2][:0]
    with pytest.raises(DataError, match=r"only 2 of 4 clients hold training examples .*"
                                        r"`federation.clients_per_round` = 3"):
        runner.run(cfg, tmp_path / "f", progress=False, fed=fed)
