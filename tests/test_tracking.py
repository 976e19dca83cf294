"""Experiment trackers: a short real run with TensorBoard and MLflow on (resumed once, so
both must continue the same run), read back with the libraries' own readers and compared
with metrics.jsonl; off by default; a missing library is a ConfigError naming the option."""

import json
import os
import sys
from statistics import mean

# MLflow starts its telemetry client on import: off before the import (no test goes online);
# MLflow 3 reads file stores only when allowed (fedprune sets the same for its own runs)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedprune.config import ConfigError, load_config
from fedprune.report.tracking import log_round, round_scalars
from fedprune.sim import runner

RECORD = {"round": 3, "selected": [0, 2], "rejected": [2], "train_loss": None,
          "eval_loss": 1.5, "accuracy": 0.75, "bytes_up": [10, 30], "bytes_down": [5, 5],
          "client_metrics": {"0": {"train_s": 1.0, "train_ops": 4.0}, "2": {"train_s": 3.0}},
          "eval_s": 0.5, "wall_s": 9.0}


def cfg_of(tiny, *extra):
    return load_config(None, [
        f"model.name='{tiny}'", "method.name=fedspallm", "federation.num_clients=2",
        "federation.clients_per_round=1", "method.fedspallm.samples=4",
        "method.fedspallm.seq_len=32", "method.fedspallm.eval_samples=4",
        "model.compute_dtype='float32'", *extra])


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_round_scalars_by_hand():
    assert round_scalars(RECORD) == {
        "eval_loss": 1.5, "accuracy": 0.75, "eval_s": 0.5, "wall_s": 9.0,
        "bytes_up_per_client": 20.0, "bytes_down_per_client": 5.0,
        "clients_selected": 2.0, "clients_rejected": 1.0,
        "client/train_s": 2.0, "client/train_ops": 4.0}  # train_loss None: not logged


def test_tensorboard_and_mlflow_hold_the_metrics_of_a_resumed_run(tiny_llama, tmp_path):
    on = ["tracking.tensorboard=true", "tracking.mlflow=true"]
    run_dir = tmp_path / "run"
    runner.run(cfg_of(tiny_llama, "federation.rounds=1", *on), run_dir, progress=False)
    first_id = json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"]
    runner.run(cfg_of(tiny_llama, "federation.rounds=2", *on), run_dir, resume=True,
               progress=False)
    recs = records(run_dir)
    assert [r["round"] for r in recs] == [1, 2]
    expected = [round_scalars(r) for r in recs]
    assert {"perplexity", "sparsity", "bytes_up_per_client", "client/prune_s"} <= set(
        expected[0])

    tb = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    tb.Reload()
    assert set(tb.Tags()["scalars"]) == set(expected[0])
    for name in expected[0]:
        events = tb.Scalars(name)
        assert [e.step for e in events] == [1, 2], name
        assert [e.value for e in events] == pytest.approx(  # stored as float32
            [s[name] for s in expected], rel=1e-6), name
    assert [e.value for e in tb.Scalars("perplexity")] == pytest.approx(
        [r["perplexity"] for r in recs], rel=1e-6)
    assert [e.value for e in tb.Scalars("bytes_up_per_client")] == [
        mean(r["bytes_up"]) for r in recs]
    assert "perplexity" in tb.Tags()["images"]  # the metric plot, at the end
    config = tb.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert 'name = "fedspallm"' in config and "[tracking]" in config

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    run = client.get_run(first_id)  # the resumed run continued the same MLflow run
    assert json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"] == first_id
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["method.name"] == "fedspallm"
    assert run.data.params["method.fedspallm.pruner"] == "sparsegpt"
    assert set(run.data.metrics) == set(expected[0])
    for name in expected[0]:
        history = sorted((m.step, m.value) for m in client.get_metric_history(first_id, name))
        assert history == [(r["round"], s[name]) for r, s in zip(recs, expected, strict=True)]
    assert [m.value for m in sorted(client.get_metric_history(first_id, "perplexity"),
                                    key=lambda m: m.step)] == [r["perplexity"] for r in recs]
    artefacts = {f.path for f in client.list_artifacts(first_id)}
    assert {"config.json", "config.toml", "metrics.jsonl", "global.safetensors", "report.md",
            "perplexity.png"} <= artefacts


def test_off_by_default_and_missing_library_names_the_option(tiny_llama, tmp_path,
                                                             monkeypatch):
    cfg = cfg_of(tiny_llama)
    assert not cfg.tracking.tensorboard and not cfg.tracking.mlflow
    log_round(cfg, tmp_path, RECORD)
    assert list(tmp_path.iterdir()) == []  # nothing opened, nothing written
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"`tracking.mlflow` = true needs mlflow"):
        log_round(cfg_of(tiny_llama, "tracking.mlflow=true"), tmp_path, RECORD)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"`tracking.tensorboard` = true needs tensorboard"):
        log_round(cfg_of(tiny_llama, "tracking.tensorboard=true"), tmp_path / "b", RECORD)
