"""benchmark/cost.py: one row per method with positive, mutually consistent figures."""

from __future__ import annotations

import csv

import pytest
from conftest import tiny_params


def test_cost_writes_one_sane_row_per_requested_method(data_root, tmp_path):
    from benchmark import cost

    out = tmp_path / "cost.csv"
    rows = cost.measure_cost(
        tiny_params(data_root), "mini-gta2cs", ["daformer", "hrda"], steps=2, warmup=1, matmul_size=128, progress=False
    )
    cost.write_csv(rows, out)
    with out.open() as handle:
        written = list(csv.DictReader(handle))
    assert [row["method"] for row in written] == ["daformer", "hrda"]
    assert set(cost.COLUMNS) <= set(written[0])
    for row in written:
        assert row["benchmark"] == "mini-gta2cs" and row["profile"] == "tiny" and row["steps"] == "2"
        for column in ("step_time_s", "flops_per_step", "achieved_flops", "peak_flops", "utilisation", "peak_memory_mb"):
            assert float(row[column]) > 0, column
        assert 0 <= float(row["data_share"]) < 1
        assert float(row["achieved_flops"]) == pytest.approx(
            float(row["flops_per_step"]) / float(row["step_time_s"]), rel=1e-3
        )
    daformer, hrda = written
    assert float(daformer["ratio_to_daformer"]) == 1
    # HRDA's step runs the network on more pixels (a context and a detail crop at twice the scale)
    assert int(hrda["flops_per_step"]) > int(daformer["flops_per_step"])


def test_cost_rejects_repeated_methods(data_root):
    from benchmark import cost

    with pytest.raises(ValueError, match="distinct"):
        cost.measure_cost(tiny_params(data_root), "mini-gta2cs", ["daformer", "daformer"], steps=1, warmup=0)
