"""Aggregation: run records -> one frame -> leaderboard and ablation tables.

The golden-file test aggregates the committed records in ``tests/golden/records`` (made by
``tests/golden/make_records.py``) and compares every table byte for byte with
``tests/golden/expected``. After an intended change of the tables, regenerate the expected files with
``UPDATE_GOLDEN=1 pytest tests/test_aggregate.py`` and review the diff.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import statistics

import pandas as pd
import pytest

from benchmark import ablate, aggregate
from benchmark.aggregate import AggregationError, Grid, RunRecord
from benchmark.classes import CLASSES, CLASSES_16
from benchmark.config import ConfigError

from conftest import REPO

GOLDEN = REPO / "tests" / "golden"
RECORDS = GOLDEN / "records"
EXPECTED = GOLDEN / "expected"
TABLES = ["leaderboard.csv", "leaderboard.md", "leaderboard.tex", "ablations.csv", "ablations.md", "ablations.tex", "metrics.json"]


def _golden_records() -> list[RunRecord]:
    return aggregate.load_records(RECORDS)


def _by_run(records: list[RunRecord]) -> dict[tuple[str, str, int], RunRecord]:
    return {(r.record["benchmark"], r.name, r.record["seed"]): r for r in records}


@pytest.mark.parametrize("name", TABLES)
def test_golden_tables(tmp_path, name):
    assert aggregate.main(["--runs", str(RECORDS), "--all", "--out", str(tmp_path)]) == 0
    produced = (tmp_path / name).read_text()
    if os.environ.get("UPDATE_GOLDEN"):
        (EXPECTED / name).parent.mkdir(parents=True, exist_ok=True)
        (EXPECTED / name).write_text(produced)
    assert produced == (EXPECTED / name).read_text(), f"{name} differs from tests/golden/expected/{name}"


def test_leaderboard_numbers_match_the_records():
    """Means, sample stds and n recomputed from the JSON files with the statistics module."""
    board = aggregate.leaderboard(aggregate.runs_frame(_golden_records())).set_index(["benchmark", "method"])
    groups: dict[tuple[str, str], list[dict]] = {}
    for path in RECORDS.glob("*/*/seed*/metrics.json"):
        if "~" not in path.parts[-3]:
            record = json.loads(path.read_text())
            groups.setdefault((record["benchmark"], record["method"]), []).append(record)
    assert set(board.index) == set(groups)
    for key, records in groups.items():
        metric = "miou19" if "gta" in key[0] else "miou16"
        values = [r[metric] for r in records]
        row = board.loc[key]
        assert row["n"] == len(values)
        assert row[f"{metric}_mean"] == pytest.approx(statistics.fmean(values))
        if len(values) > 1:
            assert row[f"{metric}_std"] == pytest.approx(statistics.stdev(values))
        else:
            assert pd.isna(row[f"{metric}_std"])
        assert row["road"] == pytest.approx(statistics.fmean(r["per_class_iou"]["road"] for r in records))


def test_protocol_metrics_and_classes():
    frame = aggregate.runs_frame(_golden_records())
    synthia = frame[frame["benchmark"] == "mini-synthia2cs"]
    gta = frame[frame["benchmark"] == "mini-gta2cs"]
    assert synthia["miou19"].isna().all() and synthia["miou16"].notna().all() and synthia["miou13"].notna().all()
    assert gta["miou19"].notna().all() and gta["miou16"].isna().all()
    # SYNTHIA has no terrain, truck, train: not results of its protocol
    assert synthia[["terrain", "truck", "train"]].isna().all().all()
    assert synthia[list(CLASSES_16)].notna().all().all()
    assert gta[list(CLASSES)].notna().all().all()


def test_best_marks_skip_the_oracle_and_published_numbers_only_at_paper_scale():
    board = aggregate.leaderboard(aggregate.runs_frame(_golden_records())).set_index(["benchmark", "method"])
    oracle, daformer = board.loc[("mini-gta2cs", "target_oracle")], board.loc[("mini-gta2cs", "daformer")]
    assert oracle["miou19_mean"] > daformer["miou19_mean"]
    assert oracle["upper_bound"] and not oracle["miou19_best"] and daformer["miou19_best"]
    assert board.loc[("gta2cs", "daformer"), "published_miou19"] == pytest.approx(68.3)
    assert "DAFormer" in board.loc[("gta2cs", "daformer"), "published_source"]
    assert pd.isna(board.loc[("mini-gta2cs", "daformer"), "published_miou19"])
    assert pd.isna(board.loc[("gta2cs", "source_only"), "published_miou19"])
    # ranked methods first by headline mIoU, then the upper bound
    order = list(aggregate.leaderboard(aggregate.runs_frame(_golden_records())).query("benchmark == 'mini-gta2cs'")["method"])
    assert order == ["daformer", "source_only", "target_oracle"]


def test_published_reference_rows():
    published = aggregate.load_published().set_index(["benchmark", "method"])
    assert published.loc[("gta2cs", "daformer"), "miou19"] == pytest.approx(68.3)
    assert published.loc[("synthia2cs", "daformer"), "miou16"] == pytest.approx(60.9)
    assert published.loc[("synthia2cs", "daformer"), "miou13"] == pytest.approx(67.4)
    assert published.loc[("gta2cs", "hrda+mic"), "miou19"] == pytest.approx(75.9)
    # MIC's SYNTHIA number is only a figure in its README: no number, no row
    assert ("synthia2cs", "hrda+mic") not in published.index
    assert published["source"].str.len().min() > 10


def test_ablation_deltas_are_paired_by_seed():
    frame = aggregate.runs_frame(_golden_records())
    table = aggregate.ablations(frame)
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["method"], row["variant"], row["changes"]) == ("daformer", "no_class_mix", "method.class_mix=false")
    assert row["n"] == 2 and row["seeds"] == "0 1"
    runs = _by_run(_golden_records())
    deltas = [runs[("mini-gta2cs", "daformer~no_class_mix", s)].record["miou19"] - runs[("mini-gta2cs", "daformer", s)].record["miou19"] for s in (0, 1)]
    assert row["miou19_delta_mean"] == pytest.approx(statistics.fmean(deltas))
    assert row["miou19_delta_std"] == pytest.approx(statistics.stdev(deltas), abs=1e-9)
    full = [runs[("mini-gta2cs", "daformer", s)].record["miou19"] for s in (0, 1)]
    assert row["miou19_full_mean"] == pytest.approx(statistics.fmean(full))  # seed 2 has no variant run


def test_unpaired_ablation_seeds_are_reported(tmp_path):
    records = _golden_records()
    extra = next(r for r in records if r.name == "daformer~no_class_mix" and r.record["seed"] == 1)
    moved = copy.deepcopy(dict(extra.record))
    moved["seed"] = 5
    moved["config"]["seed"] = 5
    table = aggregate.ablations(aggregate.runs_frame([*records, RunRecord(extra.name, "seed5", moved)]))
    assert table.iloc[0]["n"] == 2 and table.iloc[0]["unpaired_seeds"] == "5"
    assert "seeds 5 have no run of the full method" in aggregate.ablations_markdown(table)


def _mutated(name: str, seed: int, change) -> list[RunRecord]:
    records = _golden_records()
    for i, run in enumerate(records):
        if run.record["benchmark"] == "mini-gta2cs" and run.name == name and run.record["seed"] == seed:
            record = copy.deepcopy(dict(run.record))
            change(record)
            records[i] = RunRecord(run.name, run.path, record)
    return records


def test_refuses_to_average_different_splits():
    records = _mutated("daformer", 1, lambda r: r.update(split_hash="ff" * 32))
    with pytest.raises(AggregationError) as error:
        aggregate.runs_frame(records)
    message = str(error.value)
    assert "mini-gta2cs / daformer" in message and "different splits" in message
    assert "daformer/seed0/metrics.json" in message and "daformer/seed1/metrics.json" in message


def test_refuses_to_average_different_configurations():
    records = _mutated("daformer", 2, lambda r: r["config"]["settings"]["optim"].update(steps=20))
    with pytest.raises(AggregationError) as error:
        aggregate.runs_frame(records)
    message = str(error.value)
    assert "settings.optim.steps: 300 vs 20" in message
    assert "daformer/seed0/metrics.json" in message and "daformer/seed2/metrics.json" in message


def test_refuses_method_override_differences_within_one_name():
    records = _mutated("daformer", 1, lambda r: r["config"]["method_params"].update(mix_weight=0.5))
    with pytest.raises(AggregationError, match="method_params.mix_weight"):
        aggregate.runs_frame(records)


def test_refuses_duplicates_and_incomplete_records():
    records = _golden_records()
    with pytest.raises(AggregationError, match="two records of the same run"):
        aggregate.runs_frame([*records, records[0]])
    incomplete = _mutated("daformer", 0, lambda r: r.pop("split_hash"))
    with pytest.raises(AggregationError, match="lacks split_hash"):
        aggregate.runs_frame(incomplete)
    no_metric = _mutated("daformer", 0, lambda r: r.pop("miou19"))
    with pytest.raises(AggregationError, match="protocol gta2cs needs miou19"):
        aggregate.runs_frame(no_metric)


def test_load_records_checks_the_folder(tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(RECORDS / "mini-gta2cs" / "daformer", runs / "mini-gta2cs" / "daformer")
    assert len(aggregate.load_records(runs)) == 3
    (runs / "mini-gta2cs" / "daformer" / "seed1").rename(runs / "mini-gta2cs" / "daformer" / "seed4")
    with pytest.raises(AggregationError, match=r"seed4/metrics.json: record says seed = 1 but its folder says 4"):
        aggregate.load_records(runs)
    (runs / "mini-gta2cs" / "daformer" / "seed4" / "metrics.json").write_text("{not json")
    with pytest.raises(AggregationError, match="seed4/metrics.json: not a readable run record"):
        aggregate.load_records(runs)


def test_grid_lists_missing_runs_and_leaves_out_records_outside_it():
    document = {
        "train": {"benchmarks": ["mini-gta2cs"], "methods": ["source_only", "daformer"], "seeds": [0, 1, 2]},
        "ablations": {"benchmarks": ["mini-gta2cs"], "seeds": [0, 1], "variants": {"daformer~no_class_mix": {"method": {"class_mix": False}}}},
    }
    grid = Grid.from_params(document)
    assert len(grid.runs) == 8
    collection = aggregate.collect(RECORDS, grid)
    assert collection.grid_size == 8
    (missing,) = collection.missing
    assert missing.endswith("tests/golden/records/mini-gta2cs/source_only/seed2")
    assert len(collection.frame) == 7
    assert set(collection.frame["benchmark"]) == {"mini-gta2cs"}
    assert "target_oracle" not in set(collection.frame["method"])
    assert any("target_oracle/seed0" in path for path in collection.outside_grid)
    assert any("gta2cs/daformer/seed1" in path for path in collection.outside_grid)


def test_grid_rejects_bad_declarations():
    with pytest.raises(ConfigError, match="train.seeds must be a list"):
        Grid.from_params({"train": {"benchmarks": ["b"], "methods": ["m"], "seeds": 3}})
    with pytest.raises(ConfigError, match="must be <method>~<name>"):
        Grid.from_params({"train": {"benchmarks": [], "methods": [], "seeds": []}, "ablations": {"benchmarks": [], "seeds": [], "variants": {"no_class_mix": {}}}})


def test_variant_overrides_and_names():
    document = {"ablations": {"variants": {"daformer~lite": {"method": {"class_mix": False, "mix_weight": 0.5}, "optim": {"steps": 600}}}}}
    method, overrides = ablate.variant_overrides(document, "daformer~lite")
    assert method == "daformer"
    assert overrides == ["method.class_mix=false", "method.mix_weight=0.5", "optim.steps=600"]
    with pytest.raises(ConfigError, match="unknown ablation variant 'daformer~x'; ablations.variants in params.yaml: daformer~lite"):
        ablate.variant_overrides(document, "daformer~x")
    with pytest.raises(ConfigError, match="expected the settings it changes"):
        ablate.variant_overrides({"ablations": {"variants": {"daformer~empty": {}}}}, "daformer~empty")
    for bad in ("daformer", "~x", "daformer~", "a~b~c"):
        with pytest.raises(ConfigError):
            ablate.split_variant(bad)
    assert ablate.split_variant("hrda+pipa~released_patch") == ("hrda+pipa", "released_patch")


def test_ablate_trains_the_variant_into_its_own_folder(monkeypatch, tmp_path):
    from benchmark import train

    params = tmp_path / "params.yaml"
    params.write_text("ablations:\n  variants:\n    daformer~no_class_mix: {method: {class_mix: false}}\n")
    calls = []
    monkeypatch.setattr(train, "main", lambda argv: calls.append(argv) or 0)
    assert ablate.main(["--variant", "daformer~no_class_mix", "--benchmark", "mini-gta2cs", "--seed", "2", "--params", str(params), "--runs", str(tmp_path / "runs")]) == 0
    (argv,) = calls
    assert argv[argv.index("--method") + 1] == "daformer"
    assert argv[argv.index("--seed") + 1] == "2"
    assert argv[argv.index("--out") + 1] == str(tmp_path / "runs" / "mini-gta2cs" / "daformer~no_class_mix" / "seed2")
    assert argv[argv.index("--set") + 1] == "method.class_mix=false"
    assert ablate.main(["--variant", "daformer~nope", "--benchmark", "mini-gta2cs", "--params", str(params)]) == 2


def test_metrics_file_for_dvc():
    frame = aggregate.runs_frame(_golden_records())
    summary = aggregate.metrics_summary(aggregate.leaderboard(frame), aggregate.ablations(frame))
    assert summary["leaderboard"]["mini-gta2cs"]["daformer"]["n"] == 3
    assert set(summary["leaderboard"]["mini-synthia2cs"]["daformer"]) == {"n", "miou16", "miou16_std", "miou13", "miou13_std"}
    assert summary["leaderboard"]["mini-gta2cs"]["target_oracle"]["miou19_std"] is None  # one seed: no spread
    assert summary["ablations"]["mini-gta2cs"]["daformer~no_class_mix"]["delta_miou19"] == pytest.approx(-2.0)


def test_frame_round_trips_through_json(tmp_path):
    collection = aggregate.collect(RECORDS)
    path = tmp_path / "aggregate.json"
    path.write_text(aggregate.frame_json(collection))
    back = aggregate.read_frame_json(path)
    pd.testing.assert_frame_equal(back.frame, collection.frame, check_dtype=False)
    assert aggregate.leaderboard_markdown(aggregate.leaderboard(back.frame)) == aggregate.leaderboard_markdown(aggregate.leaderboard(collection.frame))


def test_cli_reports_errors_naming_the_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(RECORDS / "mini-gta2cs" / "daformer", runs / "mini-gta2cs" / "daformer")
    path = runs / "mini-gta2cs" / "daformer" / "seed2" / "metrics.json"
    record = json.loads(path.read_text())
    record["split_hash"] = "00" * 32
    path.write_text(json.dumps(record))
    assert aggregate.main(["--runs", str(runs), "--all", "--out", str(tmp_path / "out")]) == 2
    assert "seed2/metrics.json (split hash 000000000000)" in capsys.readouterr().err
    assert not (tmp_path / "out" / "leaderboard.md").exists()
