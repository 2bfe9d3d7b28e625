"""lagm_nb.report: the verdict rule of the claims, tables and panels."""
import pandas as pd
import pytest
import torch

from lagm_nb.report import (CLAIM_COLUMNS, claim_from_scores, claim_row, compare, markdown_table,
                            plot_panels_vs_labels, save_claims, scores_by_seed)


def test_verdicts_follow_the_paired_rule():
    assert compare([60, 61, 62], [50, 52, 51])["verdict"] == "holds"
    assert compare([50, 52, 51], [60, 61, 62])["verdict"] == "does not hold"
    assert compare([60, 50, 55], [55, 56, 54])["verdict"].startswith("not resolved")
    assert compare([70, 71], [50, 50])["verdict"] == "not resolved (2 seeds; leans holds)"
    assert compare([40], [50])["verdict"] == "not resolved (1 seed; leans does not hold)"   # which way one seed points
    r = compare([3.0, 5.0, 4.0], [1.0, 1.0, 1.0])
    assert r["difference"] == pytest.approx(3.0) and r["spread"] == pytest.approx(1.0) and r["seeds"] == 3
    assert compare([2, 3, 4], [1, 2, 3], "<")["verdict"] == "does not hold"
    with pytest.raises(ValueError, match="paired"): compare([1, 2], [1])


def test_claims_file_has_the_report_columns(tmp_path):
    row = {"claim": "c", "setting": "s", "a": "x", "b": "y", "paper": "Fig. 2", "figure": "f.png",
           **compare([1, 2, 3], [1, 1, 3])}
    shown = save_claims([row, None], tmp_path, "t", "default")
    df = pd.read_csv(tmp_path / "t_claims.csv")
    assert list(df.columns) == CLAIM_COLUMNS and df.verdict[0] == "not resolved (inside the spread; leans holds)"
    assert len(shown) == 1 and list(shown.columns) == CLAIM_COLUMNS[:-3]   # None rows skipped, long columns left out
    with pytest.raises(ValueError, match="lack"): save_claims([{"claim": "c"}], tmp_path, "u", "default")


def test_markdown_table():
    assert markdown_table([{"a": 1, "b": 0.25}], ".1f") == "| a | b |\n|---|---|\n| 1 | 0.2 |\n"


def test_claim_row_pairs_by_seed():
    df = pd.DataFrame({"variant": ["a", "a", "a", "b", "b", "b"], "seed": [2, 0, 1, 0, 1, 3],
                       "score": [9.0, 5.0, 6.0, 1.0, 3.0, 100.0]})
    row = claim_row(df, "a wins", "toy", "a", "b", "score", "Table X", "x.md", column="variant")
    assert row["seeds"] == 2 and row["mean_a"] == 5.5 and row["mean_b"] == 2.0     # seeds 0 and 1 only
    assert row["verdict"] == "not resolved (2 seeds; leans holds)" and row["a"] == "a" and row["figure"] == "x.md"
    assert claim_row(df, "a wins", "toy", "a", "c", "score", "Table X", "x.md", column="variant") is None


def test_claim_rows_pair_scores_by_seed_not_by_position():
    df = pd.DataFrame({"method": ["gm"] * 3 + ["mt"] * 3, "seed": [2, 0, 1, 0, 1, 2],
                       "miou": [62.0, 60.0, 61.0, 50.0, 51.0, 52.0]})
    gm, mt = scores_by_seed(df, method="gm"), scores_by_seed(df, method="mt")
    row = claim_from_scores("GM beats MT", "s", "gm", "mt", gm, mt, "Fig. 2", "fig2.png")
    assert row["spread"] == pytest.approx(0.0) and row["difference"] == pytest.approx(10.0) and row["seeds"] == 3
    assert claim_from_scores("c", "s", "gm", "mt", gm.loc[[1, 2]], mt, "", "")["seeds"] == 2    # the common seeds only
    assert claim_from_scores("c", "s", "gm", "mt", gm.loc[[0]], mt.loc[[1]], "", "") is None
    with pytest.raises(ValueError, match="several rows for one seed"): scores_by_seed(df)


def test_panels_keep_a_method_colour_where_a_panel_lacks_methods():
    from matplotlib.colors import to_hex
    df = pd.DataFrame({"panel": ["p", "p", "p", "q"], "method": ["a", "b", "c", "c"], "n_labels": [2, 2, 2, 10],
                       "miou": [1.0, 2.0, 3.0, 4.0]})
    fig = plot_panels_vs_labels(df, "panel", order=["a", "b", "c"])
    p, q = fig.axes
    colours = lambda ax: {to_hex(line.get_color()) for line in ax.lines}
    assert len(colours(p)) == 3 and colours(q) == {to_hex(p.lines[2].get_color())}
    assert [t.get_text() for t in q.get_legend().get_texts()] == ["a", "b", "c"]
