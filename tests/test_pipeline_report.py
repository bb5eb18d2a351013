"""The results table over seeds: mean and sample spread per model and task, headline metric per
task kind, other metrics listed, routing and throughput sections."""
import pytest

from finteam import report

META = {"sentiment": {"metric": "classification"}, "numeric": {"metric": "numeric"}}


def seed(team_f1, dense_f1):
    return {"scores": {
        "team (MoE)": {"sentiment": {"acc": 0.5, "f1": team_f1, "n": 10}, "numeric": {"em": 0.2, "n": 10}},
        "dense baseline": {"sentiment": {"acc": 0.4, "f1": dense_f1, "n": 10}, "numeric": {"em": 0.1, "n": 10}},
    }}


def test_mean_and_spread_over_seeds():
    summary = report.aggregate([seed(0.6, 0.5), seed(0.8, 0.5)])
    cell = summary["team (MoE)"]["sentiment"]["f1"]
    assert cell["mean"] == pytest.approx(0.7) and cell["std"] == pytest.approx(0.1414, abs=1e-4)
    assert summary["dense baseline"]["sentiment"]["f1"]["std"] == 0.0
    text = report.markdown(summary, META, {"team, eager experts": {"train_tok_s": 10, "prefill_tok_s": 20, "decode_tok_s": 3},
                                           "team, finteam experts": {"skipped": "not built"}},
                           {"sentiment": [0.5, 0.3, 0.2]}, ["macro", "micro", "quant"], ["a note"])
    assert "| model | sentiment (f1) | numeric (em) | mean |" in text
    assert "| team (MoE) | 0.700 ± 0.141 | 0.200 ± 0.000 | 0.450 |" in text
    assert "team (MoE) sentiment acc 0.500 ± 0.000" in text
    assert "| sentiment | 0.50 | 0.30 | 0.20 |" in text
    assert "| team, finteam experts | skipped: not built | | |" in text and "- a note" in text


def test_one_seed_shows_plain_numbers():
    text = report.markdown(report.aggregate([seed(0.6, 0.5)]), META, {}, {}, [], [])
    assert "| dense baseline | 0.500 | 0.100 | 0.300 |" in text
