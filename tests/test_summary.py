"""Time to target in run summaries (report/summary.py), on hand-written records."""

from fedprune.report.summary import rounds_to_target, seconds_to_target

RECORDS = [{"round": 1, "accuracy": 0.5, "perplexity": 90.0, "wall_s": 10.0},
           {"round": 2, "accuracy": None, "perplexity": None, "wall_s": 12.5},
           {"round": 3, "accuracy": 0.86, "perplexity": 40.0, "wall_s": 11.0},
           {"round": 4, "accuracy": 0.9, "perplexity": 35.0, "wall_s": 9.0}]


def test_rounds_and_seconds_to_target():
    assert rounds_to_target(RECORDS, "accuracy", 0.85) == 3
    assert seconds_to_target(RECORDS, 3) == 10.0 + 12.5 + 11.0  # the rounds up to it
    assert rounds_to_target(RECORDS, "perplexity", 40.0, higher_is_better=False) == 3
    assert rounds_to_target(RECORDS, "accuracy", 0.95) is None
    assert seconds_to_target(RECORDS, None) is None
