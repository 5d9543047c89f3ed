"""report.py: REPORT.md and the figures from the golden run records, on full and partial results."""

from __future__ import annotations

import shutil

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from PIL import Image

from benchmark import aggregate, report
from benchmark.aggregate import Grid

from conftest import REPO

RECORDS = REPO / "tests" / "golden" / "records"


@pytest.fixture(scope="module")
def golden():
    collection = aggregate.collect(RECORDS)
    return collection, aggregate.leaderboard(collection.frame)


def _bars(ax) -> list:
    return [patch for patch in ax.patches if patch.get_width() > 0 and patch.get_height() > 0]


def test_miou_figure_draws_the_leaderboard_numbers(golden):
    collection, board = golden
    figure = report.figure_miou(collection.frame, board)
    axes = figure.axes
    assert [ax.get_title() for ax in axes] == ["gta2cs", "mini-gta2cs", "mini-synthia2cs"]
    for ax in axes:
        rows = board[board["benchmark"] == ax.get_title()]
        metric = report.headline(rows["protocol"].iloc[0])
        assert ax.get_ylabel() == f"target-test {aggregate.METRIC_LABELS[metric]} (%)"
        heights = [bar.get_height() for bar in _bars(ax)]
        assert heights == pytest.approx(list(rows[f"{metric}_mean"]))
        labels = [label.get_text() for label in ax.get_xticklabels()]
        assert labels == [f"{m}\n(upper bound)" if u else m for m, u in zip(rows["method"], rows["upper_bound"])]
    plt.close(figure)


def test_ablation_figure_draws_the_paired_deltas(golden):
    collection, _ = golden
    deltas = report.paired_deltas(collection.frame)
    table = aggregate.ablations(collection.frame)
    figure = report.figure_ablations(deltas)
    (ax,) = figure.axes
    widths = [bar.get_width() for bar in ax.patches if abs(bar.get_width()) > 0]
    assert widths == pytest.approx(list(table["miou19_delta_mean"]))
    assert "Δ target-test mIoU19" in ax.get_xlabel()
    plt.close(figure)


def test_select_curves_come_from_the_records(golden):
    collection, board = golden
    curves = report.curves_frame(collection.frame)
    daformer = curves[(curves["benchmark"] == "mini-gta2cs") & (curves["method"] == "daformer")]
    assert sorted(daformer["step"].unique()) == [100, 200, 300]
    assert len(daformer) == 9  # 3 seeds x 3 points
    figure = report.figure_select_curves(curves, board)
    assert all(ax.get_xlabel() == "training step" for ax in figure.axes)
    plt.close(figure)


def test_report_with_every_figure(tmp_path, golden):
    collection, _ = golden
    cost = tmp_path / "cost.csv"
    pd.DataFrame(
        {"method": ["source_only", "daformer", "daformer", "target_oracle"], "profile": ["embedded"] * 4, "step_time_s": [0.05, 0.15, 0.17, 0.05]}
    ).to_csv(cost, index=False)
    path = report.write_report(collection, tmp_path / "out", cost)
    text = path.read_text()
    figures = sorted(p.name for p in (tmp_path / "out" / "figures").glob("*.png"))
    assert figures == ["ablations.png", "cost_vs_miou.png", "miou.png", "per_class_iou.png", "select_curves.png"]
    for name in figures:
        assert f"](figures/{name})" in text
        with Image.open(tmp_path / "out" / "figures" / name) as image:
            assert image.width > 400 and image.height > 200
    for heading in ("## Status", "## Leaderboard", "## Training curves", "## Ablations", "## Cost", "## Published results"):
        assert heading in text
    assert "### mini-gta2cs (protocol gta2cs: mIoU19)" in text
    assert "| daformer | 3 | **18.04 ± 1.15** |" in text
    assert "| daformer | no_class_mix | `method.class_mix=false` | 2 |" in text
    # step time: the median of the method's rows, for every benchmark (cost.csv has no benchmark column)
    assert "| mini-gta2cs | daformer | 0.160 | 18.04 ± 1.15 |" in text
    assert "whole inference at 64x128" in text


def test_the_step_breakdown_figure_stacks_every_part(tmp_path, golden):
    from benchmark.step_time import PARTS

    collection, _ = golden
    # the report's columns are the cost benchmark's parts (cost.py writes <part>_s, data as data_time_s)
    assert list(report.COST_PARTS) == ["data_time_s", *(f"{part}_s" for part in PARTS[1:])]
    cost = tmp_path / "cost.csv"
    rows = {"method": ["daformer", "daformer+pipa"], "benchmark": ["mini-gta2cs"] * 2, "step_time_s": [0.06, 0.09]}
    rows.update({column: [0.001 * (k + 1), 0.002 * (k + 1)] for k, column in enumerate(report.COST_PARTS)})
    pd.DataFrame(rows).to_csv(cost, index=False)
    parts = report.load_cost_parts(cost)
    assert list(parts["method"]) == ["daformer", "daformer+pipa"]
    assert parts.loc[1, "teacher_s"] == pytest.approx(4.0)  # milliseconds
    figure = report.figure_cost_parts(parts)
    bars = _bars(figure.axes[0])
    assert len(bars) == 2 * len(report.COST_PARTS)
    # each method's bar ends at the sum of its parts
    ends: dict[float, float] = {}
    for bar in bars:
        ends[bar.get_y()] = max(ends.get(bar.get_y(), 0.0), bar.get_x() + bar.get_width())
    assert sorted(ends.values()) == pytest.approx([45.0, 90.0])  # 1+2+...+9 ms and twice that
    plt.close(figure)
    path = report.write_report(collection, tmp_path / "out", cost)
    assert "](figures/cost_breakdown.png)" in path.read_text()
    assert (tmp_path / "out" / "figures" / "cost_breakdown.png").is_file()
    pd.DataFrame(rows).drop(columns="ema_s").to_csv(cost, index=False)
    assert report.load_cost_parts(cost) is None  # a part missing: no breakdown


def test_cost_rows_by_benchmark_and_bad_cost_files(tmp_path, golden):
    _, board = golden
    cost = tmp_path / "cost.csv"
    pd.DataFrame({"method": ["daformer", "daformer"], "benchmark": ["mini-gta2cs", "gta2cs"], "step_time_s": [0.2, 1.5]}).to_csv(cost, index=False)
    table, why_not = report.load_cost(cost)
    points = report.cost_points(board, table).set_index(["benchmark", "method"])["step_time_s"]
    assert points.to_dict() == {("gta2cs", "daformer"): 1.5, ("mini-gta2cs", "daformer"): 0.2}
    pd.DataFrame({"method": ["daformer"], "flops": [1e9]}).to_csv(cost, index=False)
    table, why_not = report.load_cost(cost)
    assert table is None and "no step-time column" in why_not and "flops" in why_not
    table, why_not = report.load_cost(tmp_path / "absent.csv")
    assert table is None and "`absent.csv` not found" in why_not


def test_partial_results_are_reported_not_fatal(tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(RECORDS / "mini-gta2cs" / "daformer", runs / "mini-gta2cs" / "daformer")
    document = {
        "train": {"benchmarks": ["mini-gta2cs", "mini-synthia2cs"], "methods": ["daformer"], "seeds": [0, 1, 2]},
        "ablations": {"benchmarks": ["mini-gta2cs"], "seeds": [0], "variants": {"daformer~no_class_mix": {"method": {"class_mix": False}}}},
    }
    collection = aggregate.collect(runs, Grid.from_params(document))
    out = tmp_path / "out"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "stale.png").write_bytes(b"old")
    text = report.write_report(collection, out, tmp_path / "cost.csv").read_text()
    assert "3 of the 7 runs of the grid" in text
    for seed in (0, 1, 2):
        assert f"runs/mini-synthia2cs/daformer/seed{seed}`" in text
    assert "runs/mini-gta2cs/daformer~no_class_mix/seed0`" in text
    assert "`cost.csv` not found" in text
    assert "No ablation runs in the grid yet" in text
    assert sorted(p.name for p in (out / "figures").glob("*.png")) == ["miou.png", "per_class_iou.png", "select_curves.png"]


def test_report_without_any_record(tmp_path):
    document = {"train": {"benchmarks": ["mini-gta2cs"], "methods": ["daformer"], "seeds": [0]}}
    collection = aggregate.collect(tmp_path / "runs", Grid.from_params(document))
    text = report.write_report(collection, tmp_path / "out", tmp_path / "cost.csv").read_text()
    assert "0 of the 1 runs of the grid" in text and "No finished runs" in text
    assert not list((tmp_path / "out" / "figures").glob("*.png"))


def test_report_from_the_frame_file_equals_report_from_the_records(tmp_path):
    assert aggregate.main(["--runs", str(RECORDS), "--all", "--out", str(tmp_path / "agg")]) == 0
    assert report.main(["--frame", str(tmp_path / "agg" / "aggregate.json"), "--out", str(tmp_path / "a"), "--cost", str(tmp_path / "none.csv")]) == 0
    direct = report.build_report(aggregate.collect(RECORDS), tmp_path / "figures", tmp_path / "none.csv")[0]
    assert (tmp_path / "a" / "REPORT.md").read_text() == direct


def test_figures_are_byte_identical_across_runs(tmp_path, golden):
    collection, _ = golden
    for name in ("a", "b"):
        report.write_report(collection, tmp_path / name, tmp_path / "cost.csv")
    figures = sorted(p.name for p in (tmp_path / "a" / "figures").glob("*.png"))
    assert figures
    for figure in figures:
        assert (tmp_path / "a" / "figures" / figure).read_bytes() == (tmp_path / "b" / "figures" / figure).read_bytes()


def test_labels_of_crowded_points_move_below_their_point():
    from benchmark.report import _label_offsets

    # daformer just below daformer+sepico: its label goes under its point
    x, y = [0.06, 0.17, 0.17, 0.57], [13.3, 16.1, 16.3, 17.0]
    placements = _label_offsets(x, y)
    assert placements[1][1] < 0 < placements[2][1]
    assert placements[0][1] > 0 and placements[3][1] > 0
    assert all(p[0] > 0 and p[2] == "left" for p in placements)
    # daformer with daformer+mic just right of it at its height: its label goes left of its point
    placements = _label_offsets([0.06, 0.153, 0.202, 0.46], [13.3, 17.48, 17.56, 17.98])
    assert placements[1][0] < 0 and placements[1][2] == "right"
    assert placements[2][0] > 0 and placements[2][2] == "left"
    assert _label_offsets([0.1], [5.0]) == [(5, 4, "left")]
