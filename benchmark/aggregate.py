"""Run records -> one DataFrame -> the leaderboard and ablation tables.

    python benchmark/aggregate.py          # results/runs + params.yaml -> results/leaderboard.*, ablations.*, ...

A run record is ``<runs>/<benchmark>/<name>/seed<k>/metrics.json`` as ``benchmark/train.py`` writes it,
where ``<name>`` is a method (``daformer``, ``hrda+pipa``) or an ablation variant
``<method>~<variant>`` (``params.yaml`` ``ablations``, trained by ``benchmark/ablate.py``).

``runs_frame`` is the one pure function from records to a frame, one row per run; every table here and
every figure of ``benchmark/report.py`` is computed from that frame, so they cannot disagree. Runs are
averaged over seeds per (benchmark, name) only when they share the split hash and the resolved
configuration apart from the seed; otherwise ``AggregationError`` names the runs and what differs.

Statistics: mean and sample standard deviation (ddof 1) over seeds, n the number of seeds; an
ablation's delta is paired by seed (variant minus full method with the same seed, hence the same
warm start and data order), its spread the standard deviation of the paired differences.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark.ablate import VARIANT_SEPARATOR, flatten, split_variant
from benchmark.classes import CLASSES
from benchmark.config import ConfigError, load_yaml
from benchmark.formats import write_bytes_atomic
from benchmark.metrics import PROTOCOLS, family_of

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"
PUBLISHED_CSV = Path(__file__).resolve().parent / "reference" / "published_results.csv"

#: Every mIoU a protocol can define, in table order.
METRICS: tuple[str, ...] = ("miou19", "miou16", "miou13")
METRIC_LABELS = {"miou19": "mIoU19", "miou16": "mIoU16", "miou13": "mIoU13", "select_miou": "select mIoU"}

#: Published rows (``published_results.csv``, column ``method``) of harness methods: the paper's
#: number of the same method. Checkpoint-only rows and other SePiCo variants are not mapped.
PUBLISHED_METHODS = {
    "daformer": "DAFormer",
    "hrda": "HRDA",
    "hrda+mic": "MIC(HRDA)",
    "daformer+sepico": "SePiCo (DistCL; DAFormer/MiT-B5)",
    "daformer+pipa": "PiPa (DAFormer)",
    "hrda+pipa": "PiPa (HRDA)",
}
#: The paper-scale benchmarks the published numbers belong to (the mini benchmarks are not these).
PUBLISHED_BENCHMARKS = {"gta2cs": "GTA5->Cityscapes", "synthia2cs": "SYNTHIA->Cityscapes"}

RUN_COLUMNS = [
    "benchmark", "protocol", "method", "base_method", "variant", "seed", "profile",
    *METRICS, "select_miou", "test_inference", "test_scale", "steps", "wall_time_s", "split_hash",
    *CLASSES, "select_curve", "config", "record",
]  # fmt: skip


class AggregationError(ValueError):
    """Run records that cannot be aggregated: malformed, misplaced or not comparable."""


# ------------------------------------------------------------------------------------------------
# records and the grid


def display_path(path: Path | str) -> str:
    """``path`` relative to the working directory (the repository root under DVC) when it lies inside
    it: tables and reports are committed and must not hold one machine's absolute paths."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class RunRecord:
    """One run record: its row name (method or ``method~variant``), where it was read, its content."""

    name: str
    path: str
    record: Mapping[str, Any]


def load_records(runs_dir: Path | str) -> list[RunRecord]:
    """Every ``<runs_dir>/<benchmark>/<name>/seed<k>/metrics.json``, checked against its folder."""
    runs_dir = Path(runs_dir)
    records = []
    for path in sorted(runs_dir.glob("*/*/seed*/metrics.json")):
        benchmark, name, seed_folder = path.parts[-4:-1]
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise AggregationError(f"{path}: not a readable run record ({error})") from None
        if not isinstance(record, dict):
            raise AggregationError(f"{path}: not a run record (expected a JSON object)")
        expected = {
            "benchmark": benchmark,
            "method": name.partition(VARIANT_SEPARATOR)[0],
            "seed": int(seed_folder[4:]) if seed_folder[4:].isdigit() else seed_folder,
        }
        for key, value in expected.items():
            if record.get(key) != value:
                raise AggregationError(
                    f"{path}: record says {key} = {record.get(key)!r} but its folder says {value!r}; "
                    "a record must stay in the folder its run wrote"
                )
        records.append(RunRecord(name, display_path(path), record))
    return records


@dataclass(frozen=True)
class Grid:
    """The runs ``params.yaml`` declares: (benchmark, name, seed) for the ``train`` matrix and the
    ``ablations`` variants."""

    runs: tuple[tuple[str, str, int], ...]

    @classmethod
    def from_params(cls, document: Mapping[str, Any], where: str = "params.yaml") -> Grid:
        train = _section(document, "train", where)
        runs = [
            (benchmark, method, seed)
            for benchmark in _list(train, "benchmarks", f"{where}: train")
            for method in _list(train, "methods", f"{where}: train")
            for seed in _list(train, "seeds", f"{where}: train")
        ]
        ablations = document.get("ablations") or {}
        variants = ablations.get("variants") or {}
        if variants:
            for name in variants:
                split_variant(name, f"{where}: ablations.variants")
            runs += [
                (benchmark, name, seed)
                for name in variants
                for benchmark in _list(ablations, "benchmarks", f"{where}: ablations")
                for seed in _list(ablations, "seeds", f"{where}: ablations")
            ]
        return cls(tuple(dict.fromkeys(runs)))

    def folder(self, runs_dir: Path | str, run: tuple[str, str, int]) -> Path:
        benchmark, name, seed = run
        return Path(runs_dir) / benchmark / name / f"seed{seed}"


def _section(document: Mapping, key: str, where: str) -> Mapping:
    value = document.get(key)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: `{key}` must be a mapping, got {value!r}")
    return value


def _list(section: Mapping, key: str, where: str) -> list:
    value = section.get(key)
    if not isinstance(value, list):
        raise ConfigError(f"{where}.{key} must be a list, got {value!r}")
    return value


@dataclass
class Collection:
    """The aggregated runs with what the grid expected but did not find, and what it did not expect."""

    frame: pd.DataFrame
    missing: list[str] = field(default_factory=list)
    outside_grid: list[str] = field(default_factory=list)
    #: How many runs the grid declares (None: no grid, every record found was aggregated).
    grid_size: int | None = None


def collect(runs_dir: Path | str, grid: Grid | None = None) -> Collection:
    """Read the records under ``runs_dir`` and aggregate the ones ``grid`` declares (all without a grid)."""
    records = load_records(runs_dir)
    if grid is None:
        return Collection(runs_frame(records))
    expected = set(grid.runs)
    found = {(r.record["benchmark"], r.name, r.record["seed"]): r for r in records}
    missing = [display_path(grid.folder(runs_dir, run)) for run in grid.runs if run not in found]
    outside = [r.path for key, r in found.items() if key not in expected]
    kept = [r for key, r in found.items() if key in expected]
    return Collection(runs_frame(kept), missing, outside, len(grid.runs))


# ------------------------------------------------------------------------------------------------
# the frame


def protocol_of(record: Mapping[str, Any]) -> str:
    config = record.get("config") or {}
    protocol = (config.get("data") or {}).get("protocol")
    return protocol if protocol else family_of(record["benchmark"])


def protocol_classes(protocol: str) -> tuple[str, ...]:
    """The classes a protocol evaluates: its first (widest) mIoU's classes."""
    return next(iter(PROTOCOLS[protocol].values()))


def protocol_metrics(protocol: str) -> tuple[str, ...]:
    return tuple(PROTOCOLS[protocol])


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def _row(run: RunRecord) -> dict[str, Any]:
    record = run.record
    required = ("benchmark", "method", "seed", "per_class_iou", "split_hash", "config")
    absent = [key for key in required if key not in record]
    if absent:
        raise AggregationError(f"{run.path}: run record lacks {', '.join(absent)}")
    method, _, variant = run.name.partition(VARIANT_SEPARATOR)
    if method != record["method"]:
        raise AggregationError(f"{run.path}: run {run.name!r} holds a record of method {record['method']!r}")
    try:
        protocol = protocol_of(record)
    except ValueError as error:
        raise AggregationError(f"{run.path}: {error}") from None
    missing_metrics = [m for m in protocol_metrics(protocol) if m not in record]
    if missing_metrics:
        raise AggregationError(f"{run.path}: protocol {protocol} needs {', '.join(missing_metrics)}, absent from the record")
    evaluated = protocol_classes(protocol)
    per_class = record["per_class_iou"]
    absent_classes = [c for c in evaluated if c not in per_class]
    if absent_classes:
        raise AggregationError(f"{run.path}: per_class_iou lacks {', '.join(absent_classes)}")
    config = {key: value for key, value in record["config"].items() if key != "seed"}
    data = config.get("data") or {}
    test_scale = data.get("test_scale")
    row = {
        "benchmark": record["benchmark"],
        "protocol": protocol,
        "method": run.name,
        "base_method": method,
        "variant": variant,
        "seed": int(record["seed"]),
        "profile": record.get("profile", config.get("profile", "")),
        **{m: _number(record.get(m)) if m in PROTOCOLS[protocol] else math.nan for m in METRICS},
        "select_miou": _number(record.get("select_miou")),
        "test_inference": record.get("test_inference", ""),
        "test_scale": "x".join(str(v) for v in test_scale) if test_scale else "",
        "steps": record.get("steps"),
        "wall_time_s": _number(record.get("wall_time_s")),
        "split_hash": record["split_hash"],
        # classes outside the protocol (SYNTHIA's terrain, truck, train) are not results: NaN
        **{c: _number(per_class[c]) if c in evaluated else math.nan for c in CLASSES},
        "select_curve": [[int(step), _number(miou)] for step, miou in record.get("select_curve") or []],
        "config": config,
        "record": run.path,
    }
    return row


def runs_frame(records: Iterable[RunRecord]) -> pd.DataFrame:
    """One row per run (columns ``RUN_COLUMNS``), sorted by benchmark, name and seed.

    Raises ``AggregationError`` for a malformed record, two records of the same run, or runs of one
    (benchmark, name) with different split hashes or resolved configurations apart from the seed.
    """
    rows = [_row(run) for run in records]
    frame = pd.DataFrame(rows, columns=RUN_COLUMNS)
    if frame.empty:
        return frame
    frame = frame.sort_values(["benchmark", "method", "seed"], kind="stable").reset_index(drop=True)
    duplicated = frame[frame.duplicated(["benchmark", "method", "seed"], keep=False)]
    if not duplicated.empty:
        raise AggregationError(f"two records of the same run: {', '.join(duplicated['record'])}")
    for (benchmark, name), group in frame.groupby(["benchmark", "method"], sort=False):
        _check_comparable(benchmark, name, group)
    return frame


def _check_comparable(benchmark: str, name: str, group: pd.DataFrame) -> None:
    first = group.iloc[0]
    for _, run in group.iloc[1:].iterrows():
        if run["split_hash"] != first["split_hash"]:
            raise AggregationError(
                f"{benchmark} / {name}: runs on different splits are never averaged together: "
                f"{first['record']} (split hash {first['split_hash'][:12]}) and {run['record']} "
                f"(split hash {run['split_hash'][:12]}); re-run them on the same prepared data"
            )
        differences = config_differences(first["config"], run["config"])
        if differences:
            shown = "; ".join(f"{key}: {a!r} vs {b!r}" for key, (a, b) in list(differences.items())[:6])
            raise AggregationError(
                f"{benchmark} / {name}: runs with different configurations are never averaged together: "
                f"{first['record']} and {run['record']} differ in {shown}; re-run them with one configuration"
            )


_MISSING = object()


def config_differences(a: Mapping, b: Mapping) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two configurations: {key: (value in a, value in b)}."""
    # an empty section ({} method overrides) and an absent one are the same configuration
    flat_a = {k: v for k, v in flatten(a).items() if v != {}}
    flat_b = {k: v for k, v in flatten(b).items() if v != {}}
    keys = list(dict.fromkeys([*flat_a, *flat_b]))
    return {
        key: (flat_a.get(key, _MISSING), flat_b.get(key, _MISSING))
        for key in keys
        if flat_a.get(key, _MISSING) != flat_b.get(key, _MISSING)
    }


def override_text(key: str, value: Any) -> str:
    """A configuration difference as ``train.py --set`` spells it: ``method.class_mix=false``."""
    for prefix, replacement in (("method_params.", "method."), ("settings.", ""), ("data.", "data.")):
        if key.startswith(prefix):
            key = replacement + key[len(prefix) :]
            break
    if value is _MISSING:
        return f"{key} (default)"
    return f"{key}={json.dumps(value)}"


# ------------------------------------------------------------------------------------------------
# published numbers


def load_published(path: Path | str = PUBLISHED_CSV) -> pd.DataFrame:
    """Published numbers of harness methods on the paper-scale benchmarks, one row per (benchmark,
    method): columns benchmark, method, published_name, miou19, miou16, miou13, source, notes."""
    table = pd.read_csv(path)
    rows = []
    for method, published_name in PUBLISHED_METHODS.items():
        for benchmark, published_benchmark in PUBLISHED_BENCHMARKS.items():
            match = table[(table["method"] == published_name) & (table["benchmark"] == published_benchmark)]
            if match.empty:
                continue
            entry = match.iloc[0]
            headline, *others = protocol_metrics(benchmark)
            values = {headline: entry["reported_mIoU"]}
            if others:
                values[others[0]] = entry["reported_mIoU13"]
            if all(pd.isna(v) for v in values.values()):
                continue
            rows.append(
                {
                    "benchmark": benchmark,
                    "method": method,
                    "published_name": published_name,
                    **{m: float(values.get(m, math.nan)) for m in METRICS},
                    "source": entry["source"],
                    "notes": "" if pd.isna(entry["notes"]) else entry["notes"],
                }
            )
    return pd.DataFrame(rows, columns=["benchmark", "method", "published_name", *METRICS, "source", "notes"])


# ------------------------------------------------------------------------------------------------
# tables from the frame


def uses_target_labels(method: str) -> bool:
    """Whether a method trains on target labels (the oracle): an upper bound, never ranked."""
    from methods import method_class

    try:
        return bool(method_class(method).uses_target_labels)
    except KeyError:
        return False


def _std(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.std(ddof=1)) if len(values) > 1 else math.nan


def _mean(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.mean()) if len(values) else math.nan


def leaderboard(frame: pd.DataFrame, published: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per method (not ablation variants) per benchmark: mean, std over seeds and n for each
    mIoU of the protocol and the select mIoU; per-class mean IoU; the published numbers of the same
    method on the same benchmark; ``<metric>_best``: the best mean in its column among methods that do
    not use target labels. Sorted by benchmark, then ranked methods by headline mIoU, then upper bounds."""
    columns = [
        "benchmark", "protocol", "method", "upper_bound", "n", "seeds",
        *[f"{m}_{s}" for m in (*METRICS, "select_miou") for s in ("mean", "std")],
        *CLASSES, *[f"published_{m}" for m in METRICS], "published_source",
        *[f"{m}_best" for m in METRICS], "profile", "steps", "test_inference", "test_scale", "wall_time_s_mean",
    ]  # fmt: skip
    full = frame[frame["variant"] == ""] if not frame.empty else frame
    if full.empty:
        return pd.DataFrame(columns=columns)
    published = load_published() if published is None else published
    rows = []
    for (benchmark, method), runs in full.groupby(["benchmark", "method"], sort=True):
        first = runs.iloc[0]
        row = {
            "benchmark": benchmark,
            "protocol": first["protocol"],
            "method": method,
            "upper_bound": uses_target_labels(method),
            "n": len(runs),
            "seeds": " ".join(str(s) for s in sorted(runs["seed"])),
        }
        for metric in (*METRICS, "select_miou"):
            row[f"{metric}_mean"] = _mean(runs[metric])
            row[f"{metric}_std"] = _std(runs[metric])
        for name in CLASSES:
            row[name] = _mean(runs[name])
        match = published[(published["benchmark"] == benchmark) & (published["method"] == method)]
        for metric in METRICS:
            row[f"published_{metric}"] = float(match.iloc[0][metric]) if not match.empty else math.nan
        row["published_source"] = match.iloc[0]["source"] if not match.empty else ""
        row.update(
            profile=first["profile"],
            steps=first["steps"],
            test_inference=first["test_inference"],
            test_scale=first["test_scale"],
            wall_time_s_mean=_mean(runs["wall_time_s"]),
        )
        rows.append(row)
    table = pd.DataFrame(rows)
    for metric in METRICS:
        table[f"{metric}_best"] = False
    ordered = []
    for benchmark, rows_of_benchmark in table.groupby("benchmark", sort=True):
        headline = protocol_metrics(rows_of_benchmark["protocol"].iloc[0])[0]
        rows_of_benchmark = rows_of_benchmark.assign(_rank=-rows_of_benchmark[f"{headline}_mean"].fillna(-math.inf))
        rows_of_benchmark = rows_of_benchmark.sort_values(["upper_bound", "_rank", "method"], kind="stable")
        ranked = rows_of_benchmark[~rows_of_benchmark["upper_bound"]]
        for metric in METRICS:
            rows_of_benchmark.loc[best_rows(ranked[f"{metric}_mean"]), f"{metric}_best"] = True
        ordered.append(rows_of_benchmark.drop(columns="_rank"))
    return pd.concat(ordered, ignore_index=True)[columns]


def best_rows(values: pd.Series) -> pd.Index:
    """The index of the best (largest) values as shown with 2 decimals; none when fewer than two
    values compete or the best is 0 (a tie at nothing is no result)."""
    shown = values.dropna().round(2)
    if len(shown) < 2 or shown.max() <= 0:
        return shown.index[:0]
    return shown.index[shown == shown.max()]


def ablations(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per ablation variant per benchmark: what it changes relative to the full method (from
    the two resolved configurations), the seeds both have (n), and for each mIoU of the protocol the
    full and variant means and stds over those seeds and the paired delta (variant - full) mean and std."""
    columns = [
        "benchmark", "protocol", "method", "variant", "changes", "n", "seeds", "unpaired_seeds",
        *[f"{m}_{part}_{s}" for m in METRICS for part in ("full", "variant", "delta") for s in ("mean", "std")],
    ]  # fmt: skip
    if frame.empty or (frame["variant"] == "").all():
        return pd.DataFrame(columns=columns)
    rows = []
    variants = frame[frame["variant"] != ""]
    for (benchmark, name), runs in variants.groupby(["benchmark", "method"], sort=True):
        first = runs.iloc[0]
        full = frame[(frame["benchmark"] == benchmark) & (frame["method"] == first["base_method"])]
        paired = sorted(set(runs["seed"]) & set(full["seed"]))
        unpaired = sorted(set(runs["seed"]) - set(full["seed"]))
        changes = ""
        if not full.empty:
            differences = config_differences(full.iloc[0]["config"], first["config"])
            changes = " ".join(override_text(key, value) for key, (_, value) in differences.items())
        row = {
            "benchmark": benchmark,
            "protocol": first["protocol"],
            "method": first["base_method"],
            "variant": first["variant"],
            "changes": changes,
            "n": len(paired),
            "seeds": " ".join(str(s) for s in paired),
            "unpaired_seeds": " ".join(str(s) for s in unpaired),
        }
        variant_by_seed = runs.set_index("seed").loc[paired] if paired else runs.iloc[:0]
        full_by_seed = full.set_index("seed").loc[paired] if paired else full.iloc[:0]
        for metric in METRICS:
            delta = variant_by_seed[metric] - full_by_seed[metric] if paired else pd.Series(dtype=float)
            for part, values in (("full", full_by_seed[metric]), ("variant", variant_by_seed[metric]), ("delta", delta)):
                row[f"{metric}_{part}_mean"] = _mean(values)
                row[f"{metric}_{part}_std"] = _std(values)
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def metrics_summary(board: pd.DataFrame, ablation_table: pd.DataFrame) -> dict:
    """The numbers DVC shows (``dvc metrics show``, ``dvc exp show``): per benchmark and method the
    protocol's mIoUs (mean, std, n), per ablation variant the paired deltas."""

    def clean(value: float) -> float | None:
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 4)

    summary: dict[str, dict] = {"leaderboard": {}, "ablations": {}}
    for _, row in board.iterrows():
        entry = {"n": int(row["n"])}
        for metric in protocol_metrics(row["protocol"]):
            entry[metric] = clean(row[f"{metric}_mean"])
            entry[f"{metric}_std"] = clean(row[f"{metric}_std"])
        summary["leaderboard"].setdefault(row["benchmark"], {})[row["method"]] = entry
    for _, row in ablation_table.iterrows():
        entry = {"n": int(row["n"])}
        for metric in protocol_metrics(row["protocol"]):
            entry[f"delta_{metric}"] = clean(row[f"{metric}_delta_mean"])
            entry[f"delta_{metric}_std"] = clean(row[f"{metric}_delta_std"])
        name = f"{row['method']}{VARIANT_SEPARATOR}{row['variant']}"
        summary["ablations"].setdefault(row["benchmark"], {})[name] = entry
    return summary


# ------------------------------------------------------------------------------------------------
# formatting: markdown, LaTeX, CSV


def _fmt(value: float, digits: int = 2, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def mean_std_text(mean: float, std: float, signed: bool = False) -> str:
    """``16.73 ± 0.57``; the mean alone when there is no spread (one seed); ``—`` when absent."""
    if mean is None or math.isnan(mean):
        return "—"
    if std is None or math.isnan(std):
        return _fmt(mean, signed=signed)
    return f"{_fmt(mean, signed=signed)} ± {std:.2f}"


def markdown_table(header: list[str], rows: list[list[str]], align: str) -> str:
    """A GitHub markdown table; ``align`` holds one of ``l``/``r`` per column."""
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def _bold_md(text: str, bold: bool) -> str:
    return f"**{text}**" if bold and text != "—" else text


def _method_label(row: Mapping) -> str:
    return f"{row['method']} (upper bound)" if row["upper_bound"] else row["method"]


def _benchmark_heading(rows: pd.DataFrame) -> str:
    protocol = rows["protocol"].iloc[0]
    metrics = ", ".join(METRIC_LABELS[m] for m in protocol_metrics(protocol))
    return f"{rows['benchmark'].iloc[0]} (protocol {protocol}: {metrics})"


def _settings_line(rows: pd.DataFrame) -> str:
    parts = []
    for column, label in (("profile", "profile"), ("steps", "steps"), ("test_inference", "test"), ("test_scale", "test scale")):
        values = list(dict.fromkeys(str(v) for v in rows[column]))
        parts.append(f"{label} {' / '.join(values)}")
    return ", ".join(parts)


def leaderboard_markdown(board: pd.DataFrame) -> str:
    """The leaderboard and per-class tables of every benchmark, as markdown sections (``##``)."""
    if board.empty:
        return "No finished runs of the methods in the grid yet.\n"
    out = []
    for benchmark, rows in board.groupby("benchmark", sort=False):
        metrics = protocol_metrics(rows["protocol"].iloc[0])
        with_published = benchmark in PUBLISHED_BENCHMARKS
        header = ["method", "n"]
        for metric in metrics:
            header.append(METRIC_LABELS[metric])
            if with_published:
                header.append(f"published {METRIC_LABELS[metric]}")
        body = []
        for _, row in rows.iterrows():
            cells = [_method_label(row), str(row["n"])]
            for metric in metrics:
                cells.append(_bold_md(mean_std_text(row[f"{metric}_mean"], row[f"{metric}_std"]), row[f"{metric}_best"]))
                if with_published:
                    cells.append(_fmt(row[f"published_{metric}"], 1))
            body.append(cells)
        out.append(f"## {_benchmark_heading(rows)}\n")
        out.append(f"Target-test mIoU (%), mean ± std over n seeds; {_settings_line(rows)}.\n")
        out.append(markdown_table(header, body, "lr" + "r" * (len(header) - 2)))
        out.append(per_class_markdown(rows))
    return "\n".join(out)


def per_class_markdown(rows: pd.DataFrame) -> str:
    """Classes as rows, methods as columns: per-class target-test IoU (%), mean over seeds."""
    classes = protocol_classes(rows["protocol"].iloc[0])
    ranked = rows[~rows["upper_bound"]]
    header = ["class", *[_method_label(row) for _, row in rows.iterrows()]]
    body = []
    for name in classes:
        best = set(best_rows(ranked[name]))
        body.append([name, *[_bold_md(_fmt(row[name]), index in best) for index, row in rows.iterrows()]])
    title = f"Per-class IoU (%) on {rows['benchmark'].iloc[0]}, mean over seeds:\n"
    return "\n" + title + "\n" + markdown_table(header, body, "l" + "r" * len(rows))


def published_markdown(published: pd.DataFrame) -> str:
    header = ["method", "benchmark", "published as", *[METRIC_LABELS[m] for m in METRICS], "source", "notes"]
    body = [
        [row["method"], row["benchmark"], row["published_name"], *[_fmt(row[m], 1) for m in METRICS], row["source"], row["notes"]]
        for _, row in published.iterrows()
    ]
    return markdown_table(header, body, "lll" + "r" * len(METRICS) + "ll")


BEST_NOTE = (
    "Bold: best mean in its column among methods that do not train on target labels; upper bounds "
    "(target labels) are not ranked. A number without ± comes from one seed; — means not defined by "
    "the protocol or not available."
)
PUBLISHED_NOTE = (
    "Published numbers are the papers' results on the real datasets at paper scale (MiT-B5-class "
    "encoders, 40k iterations), listed beside ours only for the benchmarks of the same name "
    "(`gta2cs`, `synthia2cs`). The embedded mini benchmarks are different, much smaller problems: "
    "their numbers are not comparable with these."
)


def leaderboard_document(board: pd.DataFrame, published: pd.DataFrame, run_count: int) -> str:
    """``results/leaderboard.md``."""
    return (
        "# Leaderboard\n\n"
        f"Aggregated from {run_count} run record(s) by `benchmark/aggregate.py`; do not edit by hand.\n"
        f"{BEST_NOTE}\n\n"
        + leaderboard_markdown(board)
        + "\n## Published results (paper scale, for reference)\n\n"
        + f"{PUBLISHED_NOTE}\n\n"
        + published_markdown(published)
    )


def ablations_markdown(table: pd.DataFrame) -> str:
    if table.empty:
        return "No ablation runs in the grid yet (params.yaml `ablations.variants`).\n"
    out = []
    for benchmark, rows in table.groupby("benchmark", sort=False):
        metrics = protocol_metrics(rows["protocol"].iloc[0])
        header = ["method", "variant", "changes", "n"]
        for metric in metrics:
            label = METRIC_LABELS[metric]
            header += [f"full {label}", f"variant {label}", f"Δ {label}"]
        body = []
        for _, row in rows.iterrows():
            cells = [row["method"], row["variant"], f"`{row['changes']}`" if row["changes"] else "—", str(row["n"])]
            for metric in metrics:
                for part in ("full", "variant", "delta"):
                    cells.append(mean_std_text(row[f"{metric}_{part}_mean"], row[f"{metric}_{part}_std"], signed=part == "delta"))
            body.append(cells)
        out.append(f"## {benchmark}\n")
        out.append(markdown_table(header, body, "lllr" + "r" * (len(header) - 4)))
        unpaired = rows[rows["unpaired_seeds"] != ""]
        for _, row in unpaired.iterrows():
            out.append(f"{row['method']}{VARIANT_SEPARATOR}{row['variant']}: seeds {row['unpaired_seeds']} have no run of the full method and are left out.\n")
    return "\n".join(out)


ABLATION_NOTE = (
    "Each variant switches one thing off (or changes it) relative to the full method, on the same "
    "benchmark and seeds. Δ = variant - full, paired by seed (same warm start and data order), mean ± "
    "std of the paired differences over the n seeds both have; full and variant columns are over the "
    "same seeds. Negative Δ: the switched-off part helps."
)


def ablations_document(table: pd.DataFrame) -> str:
    """``results/ablations.md``."""
    return "# Ablations\n\n" + ABLATION_NOTE + "\n\n" + ablations_markdown(table)


def _tex(text: str) -> str:
    replacements = {"\\": r"\textbackslash{}", "_": r"\_", "&": r"\&", "%": r"\%", "#": r"\#", "~": r"\textasciitilde{}", "$": r"\$"}
    return "".join(replacements.get(ch, ch) for ch in str(text))


def _tex_mean_std(mean: float, std: float, bold: bool = False, signed: bool = False) -> str:
    if mean is None or math.isnan(mean):
        return "--"
    text = _fmt(mean, signed=signed) if std is None or math.isnan(std) else f"{_fmt(mean, signed=signed)} \\pm {std:.2f}"
    return f"$\\mathbf{{{text}}}$" if bold else f"${text}$"


def leaderboard_latex(board: pd.DataFrame) -> str:
    """One booktabs ``tabular`` per benchmark (needs ``\\usepackage{booktabs}``)."""
    out = ["% Generated by benchmark/aggregate.py; needs \\usepackage{booktabs}."]
    for benchmark, rows in board.groupby("benchmark", sort=False):
        metrics = protocol_metrics(rows["protocol"].iloc[0])
        with_published = benchmark in PUBLISHED_BENCHMARKS
        header = ["Method", "$n$"]
        for metric in metrics:
            header.append(METRIC_LABELS[metric])
            if with_published:
                header.append(f"Published {METRIC_LABELS[metric]}")
        out.append(f"% {benchmark}: target-test mIoU (%), mean $\\pm$ std over $n$ seeds; bold: best without target labels")
        out.append("\\begin{tabular}{l" + "r" * (len(header) - 1) + "}")
        out.append("\\toprule")
        out.append(" & ".join(header) + " \\\\")
        out.append("\\midrule")
        for _, row in rows.iterrows():
            cells = [_tex(_method_label(row)), str(row["n"])]
            for metric in metrics:
                cells.append(_tex_mean_std(row[f"{metric}_mean"], row[f"{metric}_std"], bool(row[f"{metric}_best"])))
                if with_published:
                    cells.append("--" if math.isnan(row[f"published_{metric}"]) else f"{row[f'published_{metric}']:.1f}")
            out.append(" & ".join(cells) + " \\\\")
        out.append("\\bottomrule")
        out.append("\\end{tabular}")
        out += per_class_latex(rows)
    return "\n".join(out) + "\n"


def per_class_latex(rows: pd.DataFrame) -> list[str]:
    """Methods as rows, the protocol's classes as columns (the layout of the papers' tables)."""
    classes = protocol_classes(rows["protocol"].iloc[0])
    ranked = rows[~rows["upper_bound"]]
    best = {name: set(best_rows(ranked[name])) for name in classes}
    out = [f"% {rows['benchmark'].iloc[0]}: per-class target-test IoU (%), mean over seeds; bold: best without target labels"]
    out.append("\\begin{tabular}{l" + "r" * len(classes) + "}")
    out.append("\\toprule")
    out.append(" & ".join(["Method", *[_tex(name) for name in classes]]) + " \\\\")
    out.append("\\midrule")
    for index, row in rows.iterrows():
        cells = [_tex(_method_label(row))]
        for name in classes:
            text = _fmt(row[name], 1)
            cells.append("--" if text == "—" else (f"\\textbf{{{text}}}" if index in best[name] else text))
        out.append(" & ".join(cells) + " \\\\")
    out.append("\\bottomrule")
    out.append("\\end{tabular}")
    return out


def ablations_latex(table: pd.DataFrame) -> str:
    out = ["% Generated by benchmark/aggregate.py; needs \\usepackage{booktabs}."]
    for benchmark, rows in table.groupby("benchmark", sort=False):
        metrics = protocol_metrics(rows["protocol"].iloc[0])
        header = ["Method", "Variant", "$n$"]
        for metric in metrics:
            label = METRIC_LABELS[metric]
            header += [f"Full {label}", f"Variant {label}", f"$\\Delta$ {label}"]
        out.append(f"% {benchmark}: Delta = variant - full, paired by seed, mean $\\pm$ std over $n$ seeds")
        out.append("\\begin{tabular}{ll" + "r" * (len(header) - 2) + "}")
        out.append("\\toprule")
        out.append(" & ".join(header) + " \\\\")
        out.append("\\midrule")
        for _, row in rows.iterrows():
            cells = [_tex(row["method"]), _tex(row["variant"]), str(row["n"])]
            for metric in metrics:
                for part in ("full", "variant", "delta"):
                    cells.append(_tex_mean_std(row[f"{metric}_{part}_mean"], row[f"{metric}_{part}_std"], signed=part == "delta"))
            out.append(" & ".join(cells) + " \\\\")
        out.append("\\bottomrule")
        out.append("\\end{tabular}")
    return "\n".join(out) + "\n"


def csv_text(table: pd.DataFrame) -> str:
    """CSV with floats rounded to 4 decimals (the records' precision), NaN as empty."""
    return table.to_csv(index=False, float_format="%.4f", lineterminator="\n")


def frame_json(collection: Collection) -> str:
    """The frame with what was missing, as ``report.py --frame`` reads it back."""
    frame = collection.frame.astype(object).where(collection.frame.notna(), None)
    document = {
        "runs": frame.to_dict(orient="records"),
        "missing": collection.missing,
        "outside_grid": collection.outside_grid,
        "grid_size": collection.grid_size,
    }
    return json.dumps(document, indent=1) + "\n"


def read_frame_json(path: Path | str) -> Collection:
    """Inverse of ``frame_json``."""
    document = json.loads(Path(path).read_text())
    frame = pd.DataFrame(document["runs"], columns=RUN_COLUMNS)
    numeric = [*METRICS, "select_miou", "wall_time_s", *CLASSES]
    frame[numeric] = frame[numeric].astype(float)
    if not frame.empty:
        frame["seed"] = frame["seed"].astype(int)
    return Collection(frame, document["missing"], document["outside_grid"], document["grid_size"])


def write_tables(collection: Collection, out_dir: Path | str) -> list[Path]:
    """Write the leaderboard and ablation tables, the DVC metrics and the frame into ``out_dir``."""
    out_dir = Path(out_dir)
    frame = collection.frame
    published = load_published()
    board = leaderboard(frame, published)
    ablation_table = ablations(frame)
    files = {
        "leaderboard.csv": csv_text(board),
        "leaderboard.md": leaderboard_document(board, published, len(frame)),
        "leaderboard.tex": leaderboard_latex(board),
        "ablations.csv": csv_text(ablation_table),
        "ablations.md": ablations_document(ablation_table),
        "ablations.tex": ablations_latex(ablation_table),
        "metrics.json": json.dumps(metrics_summary(board, ablation_table), indent=1) + "\n",
        "aggregate.json": frame_json(collection),
    }
    written = []
    for name, text in files.items():
        write_bytes_atomic(out_dir / name, text.encode())
        written.append(out_dir / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=RESULTS / "runs", help="folder of run records")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="the grid of expected runs")
    parser.add_argument("--all", action="store_true", help="aggregate every record found, not only the grid's")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the tables go")
    args = parser.parse_args(argv)
    try:
        grid = None if args.all else Grid.from_params(load_yaml(args.params), str(args.params))
        collection = collect(args.runs, grid)
        write_tables(collection, args.out)
    except (AggregationError, ConfigError) as error:
        print(f"aggregate.py: error: {error}", file=sys.stderr)
        return 2
    print(f"aggregate.py: {len(collection.frame)} run(s) aggregated into {args.out}")
    if collection.missing:
        print(f"aggregate.py: {len(collection.missing)} run(s) of the grid have no record yet:", file=sys.stderr)
        for path in collection.missing:
            print(f"  {path}", file=sys.stderr)
    if collection.outside_grid:
        print(f"aggregate.py: {len(collection.outside_grid)} record(s) outside the grid left out (see --all)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
