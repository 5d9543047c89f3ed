"""benchmark/cost.py: one row per method with positive, mutually consistent figures."""

from __future__ import annotations

import csv

import pytest
from conftest import tiny_params


def test_cost_writes_one_sane_row_per_requested_method(data_root, tmp_path):
    from benchmark import cost

    out = tmp_path / "cost.csv"
    rows = cost.measure_cost(
        tiny_params(data_root), "mini-gta2cs", ["daformer", "hrda"], steps=2, warmup=1, matmul_size=128,
        progress=False, warm_start_dir=tmp_path / "warm",
    )
    cost.write_csv(rows, out)
    assert len(list((tmp_path / "warm").rglob("seed0-*.pt"))) == 1  # both started from the one warm start
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
    # the breakdown: every part timed, the self-training parts non-zero, no add-on terms without add-ons
    for row in written:
        for part in ("teacher", "mix", "student", "losses", "backward", "optimizer", "ema"):
            assert float(row[f"{part}_s"]) > 0, (row["method"], part)
        assert float(row["addon_s"]) < 1e-3
    # HRDA's step runs the network on more pixels (a context and a detail crop at twice the scale)
    assert int(hrda["flops_per_step"]) > int(daformer["flops_per_step"])


def test_the_breakdown_times_each_part_of_a_step_once(data_root, tmp_path):
    from benchmark import step_time

    names = ["daformer+pipa", "source_only"]
    contenders = step_time.build_contenders(
        tiny_params(data_root), "mini-gta2cs", names, progress=False, warm_start_dir=tmp_path / "warm"
    )
    for contender in contenders:
        stages = step_time.StageTimer(contender.method, contender.device)
        parts = step_time.timed_parts(contender, 0, stages)
        assert list(parts) == list(step_time.PARTS)
        assert all(seconds >= 0 for seconds in parts.values())
        assert stages.take() == {part: 0.0 for part in step_time.STEP_PARTS}  # taken by the step
        if contender.name == "source_only":  # none of the self-training hooks: the step is its losses
            assert parts["losses"] > 0 and all(parts[part] == 0 for part in step_time.STEP_PARTS)
        else:
            assert all(parts[part] > 0 for part in step_time.STEP_PARTS)


def test_the_stage_timer_counts_a_nested_hook_in_the_outer_part_only():
    import time

    import torch

    from benchmark import step_time

    class Method:
        def teacher_pass(self):
            time.sleep(0.02)
            return self.mixed_batch()  # a hook calling another: its time belongs to the caller

        def mixed_batch(self):
            time.sleep(0.01)
            return "mixed"

    method = Method()
    stages = step_time.StageTimer(method, torch.device("cpu"))
    assert method.teacher_pass() == "mixed"
    assert Method().mixed_batch() == "mixed"  # other instances are not timed
    seconds = stages.take()
    assert seconds["teacher"] >= 0.03 and seconds["mix"] == 0.0
    method.mixed_batch()
    seconds = stages.take()
    assert seconds["mix"] >= 0.01 and seconds["teacher"] == 0.0


def test_cost_rejects_repeated_methods(data_root):
    from benchmark import cost

    with pytest.raises(ValueError, match="distinct"):
        cost.measure_cost(tiny_params(data_root), "mini-gta2cs", ["daformer", "daformer"], steps=1, warmup=0)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("groups", [1, 4, 16])
def test_flop_count_of_a_convolution_backward_is_twice_its_forward(groups, transposed):
    # a stride-1 convolution's input and weight gradients each take as many multiply-adds as its
    # forward pass, whatever the groups; torch's own formula counts the weight gradient of a grouped
    # convolution ``groups`` times over
    import torch

    from benchmark import cost

    images = torch.randn(2, 16, 8, 8, requires_grad=True)
    layer = torch.nn.ConvTranspose2d if transposed else torch.nn.Conv2d
    conv = layer(16, 32, 3, padding=1, groups=groups, bias=False)
    forward_flops = 2 * 2 * 8 * 8 * 32 * (16 // groups) * 3 * 3
    with cost.flop_counter() as counter:
        outputs = conv(images)
    assert counter.get_total_flops() == forward_flops
    with cost.flop_counter() as counter:
        outputs.sum().backward()
    assert counter.get_total_flops() == 2 * forward_flops
