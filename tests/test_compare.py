"""fedprune compare on hand-written run directories (a valid config.json, a metrics.jsonl):
config differences, seed groups with hand-computed mean ± sd, rounds and seconds to target,
bytes, OPs, the PNG and bad input."""

import json
import math

import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from fedprune.cli import app
from fedprune.config import load_config
from fedprune.report.compare import CompareError, compare_runs


def write_run(path, seed, lr, accuracy, ops=2e9):
    """A finished 3-round FedAvg run: 10 s per round, 2 clients a round sending 100 / 300
    bytes up and 1000 down, ``ops`` training OPs per client; target accuracy 0.85."""
    path.mkdir(parents=True)
    cfg = load_config(None, [f"run.seed={seed}", f"federation.lr={lr}", "federation.rounds=3",
                             f"run.name='{path.name}'"])
    (path / "config.json").write_text(json.dumps(cfg.to_dict()))
    lines = [json.dumps({
        "round": rnd, "selected": [0, 1], "rejected": [], "train_loss": 1.0,
        "eval_loss": 2.0 - acc, "accuracy": acc, "bytes_up": [100, 300],
        "bytes_down": [1000, 1000], "client_metrics": {"0": {"train_ops": ops},
                                                       "1": {"train_ops": ops}},
        "eval_s": 1.0, "wall_s": 10.0}) for rnd, acc in enumerate(accuracy, 1)]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def runs(tmp_path):
    return [write_run(tmp_path / "a0", 0, 1e-3, [0.5, 0.7, 0.8]),   # never reaches 0.85
            write_run(tmp_path / "a1", 1, 1e-3, [0.5, 0.8, 0.9]),   # round 3
            write_run(tmp_path / "a2", 2, 1e-3, [0.6, 0.9, 1.0]),   # round 2
            write_run(tmp_path / "b", 0, 5e-3, [0.9, 0.95, 0.97], ops=4e9)]


def test_seed_groups_mean_sd_and_differences(runs, tmp_path):
    result = compare_runs(runs, tmp_path / "out")
    assert result.headers[:3] == ["runs", "seeds", "federation.lr"]  # run.name is bookkeeping
    assert [g["seeds"] for g in result.groups] == [[0, 1, 2], [0]]
    a, b = (g["cells"] for g in result.groups)
    # final accuracy 0.8, 0.9, 1.0: mean 0.9, sd sqrt((0.01 + 0 + 0.01) / 2) = 0.1
    assert a["accuracy"].mean == pytest.approx(0.9) and a["accuracy"].sd == pytest.approx(0.1)
    assert a["eval_loss"].mean == pytest.approx(1.1) and a["eval_loss"].sd == pytest.approx(0.1)
    # target 0.85 reached by two of three runs, at rounds 3 and 2 (30 s and 20 s)
    assert (a["round_at_target"].mean, a["round_at_target"].n) == (2.5, 2)
    assert a["round_at_target"].sd == pytest.approx(math.sqrt(0.5))
    assert a["seconds_to_target"].mean == 25.0
    assert a["bytes_up"].mean == 200 and a["bytes_down"].mean == 1000
    assert a["bytes_total"].mean == 3 * (400 + 2000) and a["bytes_total"].sd == 0
    assert a["gops"].mean == 2.0 and b["gops"].mean == 4.0
    assert (b["accuracy"].mean, b["accuracy"].sd) == (0.97, None)
    assert b["round_at_target"].mean == 1 and b["seconds_to_target"].mean == 10.0
    row_a, row_b = result.rows
    assert row_a[:3] == ["a0, a1, a2", "0 1 2", "0.001"] and row_b[2] == "0.005"
    text = result.markdown.read_text()
    for cell in ("| 0.9000 ± 0.1000 |", "| 2.5 ± 0.707 (2/3) |", "| 25.0 ± 7.1 (2/3) |",
                 "| 0.9700 |", "| 7,200 ± 0 |", "![metric curves](compare.png)"):
        assert cell in text, cell
    height, width, _ = imread(result.figure).shape
    assert width > height > 100  # accuracy and validation-loss panels side by side


def test_cli_prints_and_writes(runs, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["compare", *map(str, runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "0.9000 ± 0.1000" in result.output
    assert (out / "compare.md").is_file() and (out / "compare.png").is_file()


def test_bad_input_names_the_path(runs, tmp_path):
    with pytest.raises(CompareError, match=f"{tmp_path / 'nope'}: no config.json"):
        compare_runs([runs[0], tmp_path / "nope"], tmp_path / "out")
    (runs[0] / "metrics.jsonl").write_text("")
    with pytest.raises(CompareError, match="a0: no metrics.jsonl with a round"):
        compare_runs(runs, tmp_path / "out")
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "nope:noconfig.json" in "".join(result.output.split())  # rich wraps lines
