"""lagm_nb.report: the verdict rule of the claims, tables and panels."""
import pandas as pd
import pytest
import torch

from lagm_nb.report import CLAIM_COLUMNS, claim_row, compare, markdown_table, save_claims


def test_verdicts_follow_the_paired_rule():
    assert compare([60, 61, 62], [50, 52, 51])["verdict"] == "holds"
    assert compare([50, 52, 51], [60, 61, 62])["verdict"] == "does not hold"
    assert compare([60, 50, 55], [55, 56, 54])["verdict"].startswith("not resolved")
    assert compare([70, 71], [50, 50])["verdict"] == "not resolved (2 seeds)"
    r = compare([3.0, 5.0, 4.0], [1.0, 1.0, 1.0])
    assert r["difference"] == pytest.approx(3.0) and r["spread"] == pytest.approx(1.0) and r["seeds"] == 3
    assert compare([2, 3, 4], [1, 2, 3], "<")["verdict"] == "does not hold"
    with pytest.raises(ValueError, match="paired"): compare([1, 2], [1])


def test_claims_file_has_the_report_columns(tmp_path):
    row = {"claim": "c", "setting": "s", "a": "x", "b": "y", "paper": "Fig. 2", "figure": "f.png",
           **compare([1, 2, 3], [1, 1, 3])}
    df = pd.read_csv(save_claims([row], tmp_path, "t", "default"))
    assert list(df.columns) == CLAIM_COLUMNS and df.verdict[0] == "not resolved (inside the spread)"
    with pytest.raises(ValueError, match="lack"): save_claims([{"claim": "c"}], tmp_path, "u", "default")


def test_markdown_table():
    assert markdown_table([{"a": 1, "b": 0.25}], ".1f") == "| a | b |\n|---|---|\n| 1 | 0.2 |\n"


def test_claim_row_pairs_by_seed():
    df = pd.DataFrame({"variant": ["a", "a", "a", "b", "b", "b"], "seed": [2, 0, 1, 0, 1, 3],
                       "score": [9.0, 5.0, 6.0, 1.0, 3.0, 100.0]})
    row = claim_row(df, "a wins", "toy", "a", "b", "score", "Table X", "x.md", column="variant")
    assert row["seeds"] == 2 and row["mean_a"] == 5.5 and row["mean_b"] == 2.0     # seeds 0 and 1 only
    assert row["verdict"] == "not resolved (2 seeds)" and row["a"] == "a" and row["figure"] == "x.md"
    assert claim_row(df, "a wins", "toy", "a", "c", "score", "Table X", "x.md", column="variant") is None
