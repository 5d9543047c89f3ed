"""Write ``results/REPORT.md`` and the figures ``results/figures/*.png`` from the run records.

    python benchmark/report.py                                  # aggregate results/runs (params.yaml's grid)
    python benchmark/report.py --frame results/aggregate.json   # the frame the aggregate stage wrote

The report holds the leaderboard, per-class and ablation tables and six seaborn figures, all drawn
from the one frame of ``benchmark.aggregate.runs_frame``: target-test mIoU per method with the seeds
and their standard deviation (``miou.png``), per-class IoU heatmaps (``per_class_iou.png``), select
mIoU during training (``select_curves.png``), ablation deltas (``ablations.png``) and, when the cost
benchmark has written ``results/cost.csv``, step time against mIoU (``cost_vs_miou.png``) and where each
method's step goes (``cost_breakdown.png``). It works
on partial results: runs of the grid without a record, records outside the grid and absent inputs
are listed in the report instead of stopping it.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from benchmark.aggregate import (
    ABLATION_NOTE,
    BEST_NOTE,
    METRIC_LABELS,
    PUBLISHED_NOTE,
    AggregationError,
    Collection,
    Grid,
    ablations,
    ablations_markdown,
    collect,
    leaderboard,
    leaderboard_markdown,
    load_published,
    markdown_table,
    mean_std_text,
    protocol_classes,
    protocol_metrics,
    published_markdown,
    read_frame_json,
)
from benchmark.config import ConfigError, load_yaml
from benchmark.formats import write_bytes_atomic

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"
#: Column names a step-time column of ``results/cost.csv`` may have, in order of preference.
STEP_TIME_COLUMNS = ("step_time_s", "step_time_s_median", "median_step_time_s", "step_time_median_s")
#: The columns of ``results/cost.csv`` that split an iteration into parts (``step_time.PARTS``), with
#: their legend labels; the breakdown figure needs all of them.
COST_PARTS = {
    "data_time_s": "waiting for data",
    "teacher_s": "teacher pass",
    "mix_s": "mixed batch",
    "student_s": "student pass",
    "addon_s": "add-on terms",
    "losses_s": "losses (rest of the step)",
    "backward_s": "backward",
    "optimizer_s": "optimiser",
    "ema_s": "EMA update",
}


def headline(protocol: str) -> str:
    """The protocol's first mIoU: mIoU19 for gta2cs, mIoU16 for synthia2cs."""
    return protocol_metrics(protocol)[0]


def _stripplot(**kwargs) -> None:
    """``sns.stripplot`` with a fixed jitter: seaborn draws it from NumPy's global generator, and
    figures must be byte-identical when the records are (DVC sees a changed output otherwise)."""
    state = np.random.get_state()
    np.random.seed(0)
    try:
        sns.stripplot(**kwargs)
    finally:
        np.random.set_state(state)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=130, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _benchmarks(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    return [(benchmark, rows) for benchmark, rows in table.groupby("benchmark", sort=True)]


def _method_order(board: pd.DataFrame, benchmark: str) -> list[str]:
    return list(board.loc[board["benchmark"] == benchmark, "method"])


def _tick_labels(board: pd.DataFrame, benchmark: str, methods: list[str]) -> list[str]:
    upper = set(board.loc[(board["benchmark"] == benchmark) & board["upper_bound"], "method"])
    return [f"{m}\n(upper bound)" if m in upper else m for m in methods]


# ------------------------------------------------------------------------------------------------
# figures


def figure_miou(frame: pd.DataFrame, board: pd.DataFrame):
    """Bars: mean target-test headline mIoU per method, error bars one std over seeds; dots: seeds."""
    full = frame[frame["variant"] == ""]
    panels = _benchmarks(full)
    width = 2.0 + 0.9 * board.groupby("benchmark").size().max()
    figure, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4.6), squeeze=False)
    for ax, (benchmark, runs) in zip(axes[0], panels):
        metric = headline(runs["protocol"].iloc[0])
        order = _method_order(board, benchmark)
        sns.barplot(data=runs, x="method", y=metric, order=order, errorbar="sd", capsize=0.15, color="#9ecae1", edgecolor="#3a6d8c", err_kws={"linewidth": 1.2}, ax=ax)
        _stripplot(data=runs, x="method", y=metric, order=order, color="#08306b", size=4, jitter=0.12, ax=ax)
        rows = board[board["benchmark"] == benchmark].set_index("method")
        for position, method in enumerate(order):
            ax.annotate(f"{rows.loc[method, f'{metric}_mean']:.1f}", (position, 0), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=8, color="#08306b")
        published = rows[f"published_{metric}"].reindex(order)
        if published.notna().any():
            ax.scatter(range(len(order)), published, marker="D", s=36, color="#cb181d", zorder=5, label="published (paper, real data)")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_title(benchmark)
        ax.set_xlabel("method")
        ax.set_ylabel(f"target-test {METRIC_LABELS[metric]} (%)")
        ax.set_xticks(range(len(order)), _tick_labels(board, benchmark, order), rotation=30, ha="right")
    figure.suptitle("Target-test mIoU per method: mean ± std over seeds (bars), single seeds (dots)", fontsize=10)
    figure.tight_layout()
    return figure


def figure_per_class(board: pd.DataFrame):
    """Heatmaps, one per benchmark: methods (rows) x the protocol's classes (columns), mean IoU (%)."""
    panels = _benchmarks(board)
    heights = [1.2 + 0.42 * len(rows) for _, rows in panels]
    figure, axes = plt.subplots(len(panels), 1, figsize=(13, sum(heights) + 0.6), gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (benchmark, rows) in zip(axes[:, 0], panels):
        classes = list(protocol_classes(rows["protocol"].iloc[0]))
        matrix = rows.set_index("method")[classes].astype(float)
        sns.heatmap(matrix, annot=True, fmt=".1f", annot_kws={"fontsize": 7}, cmap="viridis", vmin=0, vmax=100, cbar_kws={"label": "IoU (%)", "pad": 0.01}, linewidths=0.5, ax=ax)
        ax.set_title(f"{benchmark}: per-class target-test IoU (%), mean over seeds", fontsize=10)
        ax.set_xlabel("class")
        ax.set_ylabel("method")
        ax.tick_params(axis="x", rotation=45)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
        ax.set_yticks([i + 0.5 for i in range(len(rows))], _tick_labels(board, benchmark, list(rows["method"])), rotation=0)
    figure.tight_layout()
    return figure


def curves_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The select curves long-form: benchmark, protocol, method, seed, step, select_miou."""
    rows = [
        {"benchmark": run["benchmark"], "protocol": run["protocol"], "method": run["method"], "seed": run["seed"], "step": step, "select_miou": miou}
        for _, run in frame[frame["variant"] == ""].iterrows()
        for step, miou in run["select_curve"]
    ]
    return pd.DataFrame(rows, columns=["benchmark", "protocol", "method", "seed", "step", "select_miou"])


def figure_select_curves(curves: pd.DataFrame, board: pd.DataFrame):
    """Select mIoU against the training step per method: mean over seeds, band one std."""
    panels = _benchmarks(curves)
    figure, axes = plt.subplots(1, len(panels), figsize=(7.6 * len(panels), 4.2), squeeze=False)
    for ax, (benchmark, points) in zip(axes[0], panels):
        metric = headline(points["protocol"].iloc[0])
        order = [m for m in _method_order(board, benchmark) if m in set(points["method"])]
        sns.lineplot(data=points, x="step", y="select_miou", hue="method", hue_order=order, errorbar="sd", marker="o", markersize=4, ax=ax)
        ax.set_title(benchmark)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"target-select {METRIC_LABELS[metric]} (%)")
        ax.legend(title="method", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.suptitle("Model-selection mIoU during training (target_select): mean over seeds, band ± std", fontsize=10)
    figure.tight_layout()
    return figure


def paired_deltas(frame: pd.DataFrame) -> pd.DataFrame:
    """Per ablation variant, benchmark and shared seed: the headline mIoU difference variant - full."""
    rows = []
    for _, run in frame[frame["variant"] != ""].iterrows():
        full = frame[(frame["benchmark"] == run["benchmark"]) & (frame["method"] == run["base_method"]) & (frame["seed"] == run["seed"])]
        if full.empty:
            continue
        metric = headline(run["protocol"])
        rows.append({"benchmark": run["benchmark"], "protocol": run["protocol"], "variant": run["method"], "seed": run["seed"], "delta": run[metric] - full.iloc[0][metric]})
    return pd.DataFrame(rows, columns=["benchmark", "protocol", "variant", "seed", "delta"])


def figure_ablations(deltas: pd.DataFrame):
    """Per benchmark: the paired headline-mIoU delta of each variant (bar: mean, error bar: std over
    seeds, dots: single seeds); left of zero means the switched-off part helps."""
    panels = _benchmarks(deltas)
    count = max(rows["variant"].nunique() for _, rows in panels)
    figure, axes = plt.subplots(1, len(panels), figsize=(8.0 * len(panels), 2.2 + 0.5 * count), squeeze=False)
    for ax, (benchmark, rows) in zip(axes[0], panels):
        metric = headline(rows["protocol"].iloc[0])
        order = sorted(rows["variant"].unique())
        for position, variant in enumerate(order):
            values = rows.loc[rows["variant"] == variant, "delta"]
            spread = f" ± {values.std():.2f}" if len(values) > 1 else ""
            # a column right of the axes, where no bar, whisker or dot can cover it
            ax.annotate(f"{values.mean():+.2f}{spread} (n={len(values)})", (1.02, position), xycoords=("axes fraction", "data"), ha="left", va="center", fontsize=8)
        sns.barplot(data=rows, y="variant", x="delta", order=order, errorbar="sd", capsize=0.15, color="#fdae6b", edgecolor="#a63603", err_kws={"linewidth": 1.2}, ax=ax)
        _stripplot(data=rows, y="variant", x="delta", order=order, color="#7f2704", size=4, jitter=0.1, ax=ax)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(f"{benchmark}: ablation vs full method")
        ax.set_xlabel(f"Δ target-test {METRIC_LABELS[metric]} (variant - full, paired by seed)")
        ax.set_ylabel("variant")
    figure.tight_layout()
    return figure


def load_cost(path: Path) -> tuple[pd.DataFrame | None, str]:
    """``results/cost.csv`` as (method, [benchmark,] step_time_s), or None and why not."""
    if not path.is_file():
        return None, f"`{path.name}` not found: run the cost benchmark (`python benchmark/cost.py`) to add step time against mIoU."
    try:
        cost = pd.read_csv(path)
    except (OSError, ValueError) as error:
        return None, f"`{path.name}` could not be read ({error}); cost against mIoU is left out."
    step_column = next((c for c in STEP_TIME_COLUMNS if c in cost.columns), None)
    if "method" not in cost.columns or step_column is None:
        return None, (
            f"`{path.name}` has no `method` column or no step-time column (looked for {', '.join(STEP_TIME_COLUMNS)}; "
            f"found {', '.join(map(str, cost.columns))}); cost against mIoU is left out."
        )
    keys = ["method", "benchmark"] if "benchmark" in cost.columns else ["method"]
    cost = cost.rename(columns={step_column: "step_time_s"})
    return cost.groupby(keys, as_index=False)["step_time_s"].median(), ""


def load_cost_parts(path: Path) -> pd.DataFrame | None:
    """Median milliseconds per part of an iteration (``COST_PARTS``) per method and benchmark of
    ``results/cost.csv``, in its row order; None when the file or any part column is missing."""
    try:
        cost = pd.read_csv(path)
    except (OSError, ValueError):
        return None
    if not {"method", "benchmark", *COST_PARTS} <= set(cost.columns):
        return None
    parts = cost.groupby(["benchmark", "method"], sort=False, as_index=False)[list(COST_PARTS)].median()
    parts[list(COST_PARTS)] *= 1e3
    return parts


def figure_cost_parts(parts: pd.DataFrame):
    """Where each method's training iteration goes: stacked horizontal bars of median ms per part."""
    panels = list(parts.groupby("benchmark", sort=False))
    height = 0.45 * max(len(rows) for _, rows in panels) + 1.6
    figure, axes = plt.subplots(1, len(panels), figsize=(8.0 * len(panels) + 2.0, height), squeeze=False)
    colours = sns.color_palette("tab10", len(COST_PARTS))
    for ax, (benchmark, rows) in zip(axes[0], panels):
        left = np.zeros(len(rows))
        for colour, (column, label) in zip(colours, COST_PARTS.items()):
            ax.barh(rows["method"], rows[column], left=left, color=colour, label=label)
            left += rows[column].to_numpy()
        ax.invert_yaxis()
        ax.set_title(benchmark)
        ax.set_xlabel("median ms per training iteration, by part")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    figure.suptitle("Where each step goes (results/cost.csv; medians per part, so they add up only roughly)", fontsize=10)
    figure.tight_layout()
    return figure


def cost_points(board: pd.DataFrame, cost: pd.DataFrame) -> pd.DataFrame:
    """Leaderboard rows with the step time of their method (and benchmark when cost.csv has one)."""
    keys = ["method", "benchmark"] if "benchmark" in cost.columns and set(cost["benchmark"]) & set(board["benchmark"]) else ["method"]
    if keys == ["method"]:
        cost = cost.groupby("method", as_index=False)["step_time_s"].median()
    return board.merge(cost[[*keys, "step_time_s"]], on=keys, how="inner")


def _label_offsets(x: list[float], y: list[float]) -> list[tuple[int, int, str]]:
    """Placement of the point labels of a scatter plot, as (x offset, y offset in points, horizontal
    alignment): above right by default; left of the point when a neighbour sits where the label would
    run (close to its right at about its height); below when a near neighbour sits just above it,
    whose label would otherwise cover its own."""
    span_x = (max(x) - min(x)) or 1.0
    span_y = (max(y) - min(y)) or 1.0
    placements = []
    for i, (xi, yi) in enumerate(zip(x, y)):
        others = [(xj, yj) for j, (xj, yj) in enumerate(zip(x, y)) if j != i]
        right = any(0 < xj - xi < 0.14 * span_x and abs(yj - yi) < 0.06 * span_y for xj, yj in others)
        above = any(abs(xj - xi) < 0.12 * span_x and 0 <= yj - yi < 0.08 * span_y for xj, yj in others)
        placements.append((-5 if right else 5, -11 if above else 4, "right" if right else "left"))
    return placements


def figure_cost(points: pd.DataFrame):
    """Median training-step time against mean target-test mIoU (error bars: std over seeds)."""
    panels = _benchmarks(points)
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (benchmark, rows) in zip(axes[0], panels):
        metric = headline(rows["protocol"].iloc[0])
        sns.scatterplot(data=rows, x="step_time_s", y=f"{metric}_mean", hue="method", s=60, ax=ax, legend=False)
        ax.errorbar(rows["step_time_s"], rows[f"{metric}_mean"], yerr=rows[f"{metric}_std"].fillna(0), fmt="none", ecolor="grey", capsize=3, linewidth=1)
        placements = _label_offsets(list(rows["step_time_s"]), list(rows[f"{metric}_mean"]))
        for (_, row), (dx, dy, align) in zip(rows.iterrows(), placements):
            ax.annotate(
                row["method"], (row["step_time_s"], row[f"{metric}_mean"]), xytext=(dx, dy),
                textcoords="offset points", fontsize=8, ha=align,
            )
        ax.set_title(benchmark)
        ax.set_xlabel("median training-step time (s)")
        ax.set_ylabel(f"target-test {METRIC_LABELS[metric]} (%)")
        ax.set_xlim(left=0)
    figure.suptitle("Cost against accuracy: step time (results/cost.csv) vs mIoU (mean ± std over seeds)", fontsize=10)
    figure.tight_layout()
    return figure


# ------------------------------------------------------------------------------------------------
# the report


def _demote(markdown: str) -> str:
    """Section headings one level down, to nest a table document under a report section."""
    return "\n".join(("#" + line) if line.startswith("#") else line for line in markdown.split("\n"))


def status_markdown(collection: Collection) -> str:
    frame = collection.frame
    if collection.grid_size is not None:
        lines = [
            f"{len(frame)} of the {collection.grid_size} runs of the grid (params.yaml `train` and `ablations`) have a record."
        ]
    else:
        lines = [f"{len(frame)} run record(s): every record found (no grid)."]
    if collection.missing:
        lines.append("\nRuns without a record yet (not started, still running or failed):\n")
        lines += [f"- `{path}`" for path in collection.missing]
    if collection.outside_grid:
        lines.append("\nRecords outside the grid, left out of every table and figure:\n")
        lines += [f"- `{path}`" for path in collection.outside_grid]
    if not frame.empty:
        tests = frame.groupby(["test_inference", "test_scale"]).size().index
        described = ", ".join(f"{inference} inference at {scale} (height x width)" for inference, scale in tests)
        lines.append(f"\nEvery method is tested the same way unless its configuration says otherwise; here: {described}.")
    return "\n".join(lines) + "\n"


def build_report(collection: Collection, figures_dir: Path, cost_path: Path) -> tuple[str, dict[str, bytes]]:
    """REPORT.md text and the figures (name -> PNG bytes) for ``collection``."""
    frame = collection.frame
    published = load_published()
    board = leaderboard(frame, published)
    ablation_table = ablations(frame)
    figures: dict[str, bytes] = {}
    link = f"{figures_dir.name}"
    sections = ["# Report\n", "Written by `benchmark/report.py` from the run records; do not edit by hand.\n", "## Status\n", status_markdown(collection)]

    sections.append("## Leaderboard\n")
    sections.append(BEST_NOTE + "\n")
    if board.empty:
        sections.append("No finished runs of the methods in the grid yet.\n")
    else:
        figures["miou.png"] = _png(figure_miou(frame, board))
        figures["per_class_iou.png"] = _png(figure_per_class(board))
        sections.append(f"![Target-test mIoU per method]({link}/miou.png)\n")
        sections.append(_demote(leaderboard_markdown(board)))
        sections.append(f"\n![Per-class IoU]({link}/per_class_iou.png)\n")

    sections.append("## Training curves\n")
    curves = curves_frame(frame) if not frame.empty else curves_frame(frame.iloc[:0])
    if curves.empty:
        sections.append("No select-mIoU curves in the records (`eval.interval` 0 or no runs yet).\n")
    else:
        figures["select_curves.png"] = _png(figure_select_curves(curves, board))
        sections.append(
            "mIoU on `target_select` (held-out target-train frames with labels, for model selection only) "
            "every `eval.interval` steps; the leaderboard uses `target_test` at the end.\n"
        )
        sections.append(f"![Select mIoU during training]({link}/select_curves.png)\n")

    sections.append("## Ablations\n")
    sections.append(ABLATION_NOTE + "\n")
    sections.append(_demote(ablations_markdown(ablation_table)))
    deltas = paired_deltas(frame) if not frame.empty else pd.DataFrame()
    if not deltas.empty:
        figures["ablations.png"] = _png(figure_ablations(deltas))
        sections.append(f"\n![Ablation deltas]({link}/ablations.png)\n")

    sections.append("## Cost\n")
    cost, why_not = load_cost(cost_path)
    if cost is not None:
        points = cost_points(board, cost)
        if points.empty:
            sections.append(f"`{cost_path.name}` has no method of the leaderboard; cost against mIoU is left out.\n")
        else:
            figures["cost_vs_miou.png"] = _png(figure_cost(points))
            rows = [
                [row["benchmark"], row["method"], f"{row['step_time_s']:.3f}", mean_std_text(row[f"{headline(row['protocol'])}_mean"], row[f"{headline(row['protocol'])}_std"])]
                for _, row in points.iterrows()
            ]
            sections.append(markdown_table(["benchmark", "method", "step time (s)", "headline mIoU"], rows, "llrr"))
            sections.append(f"\n![Cost against mIoU]({link}/cost_vs_miou.png)\n")
        parts = load_cost_parts(cost_path)
        if parts is not None:
            figures["cost_breakdown.png"] = _png(figure_cost_parts(parts))
            sections.append(f"Where each method's iteration goes, median ms per part:\n\n![Step breakdown]({link}/cost_breakdown.png)\n")
    else:
        sections.append(why_not + "\n")

    sections.append("## Published results (paper scale, for reference)\n")
    sections.append(PUBLISHED_NOTE + "\n")
    sections.append(published_markdown(published))
    text = "\n".join(sections)
    return text, figures


def write_report(collection: Collection, out_dir: Path, cost_path: Path) -> Path:
    """Write ``out_dir/REPORT.md`` and ``out_dir/figures/*.png``; figures this report does not draw are removed."""
    figures_dir = out_dir / "figures"
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)
    text, figures = build_report(collection, figures_dir, cost_path)
    figures_dir.mkdir(parents=True, exist_ok=True)
    for name, data in figures.items():
        write_bytes_atomic(figures_dir / name, data)
    for stale in figures_dir.glob("*.png"):
        if stale.name not in figures:
            stale.unlink()
    write_bytes_atomic(out_dir / "REPORT.md", text.encode())
    return out_dir / "REPORT.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frame", type=Path, default=None, help="read the frame aggregate.py wrote instead of the records")
    parser.add_argument("--runs", type=Path, default=RESULTS / "runs", help="folder of run records")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="the grid of expected runs")
    parser.add_argument("--all", action="store_true", help="report every record found, not only the grid's")
    parser.add_argument("--cost", type=Path, default=RESULTS / "cost.csv", help="the cost benchmark's table (optional)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where REPORT.md and figures/ go")
    args = parser.parse_args(argv)
    try:
        if args.frame is not None:
            collection = read_frame_json(args.frame)
        else:
            grid = None if args.all else Grid.from_params(load_yaml(args.params), str(args.params))
            collection = collect(args.runs, grid)
        path = write_report(collection, args.out, args.cost)
    except (AggregationError, ConfigError, OSError) as error:
        print(f"report.py: error: {error}", file=sys.stderr)
        return 2
    print(f"report.py: {len(collection.frame)} run(s) -> {path}")
    if collection.missing:
        print(f"report.py: {len(collection.missing)} run(s) of the grid have no record yet (listed in the report)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
