"""The training entry point: configuration checks before any work, the schedule, and a tiny end-to-end
run whose record is complete and bit-identical when repeated with the same seed."""

from __future__ import annotations

import json

import pytest

from benchmark import generate, prepare, train
from benchmark.classes import CLASSES
from benchmark.config import ConfigError, load_yaml
from benchmark.profiles import resolve

from conftest import REPO

SIZE = dict(height=64, width=128)


def _tiny_params(data_root) -> dict:
    return {
        "profile": "tiny",
        "profiles": {
            "tiny": {
                "model": {"encoder": "efficientvit_b0", "head": "daformer", "embed_dim": 16},
                "optim": {"lr": 1e-3, "warmup_steps": 2, "steps": 4, "batch_size": 2},
                "warm_start": {"steps": 2, "lr": 1e-3},
                "eval": {"batch_size": 4, "interval": 2},
                "checkpoint_interval": 2,
                "log_interval": 1,
            }
        },
        "benchmarks": {
            "mini-gta2cs": {
                "protocol": "gta2cs",
                "source": {"family": "gta", "root": str(data_root / "gta"), "scale": [48, 96]},
                "target": {"family": "cityscapes", "root": str(data_root / "cityscapes"), "scale": [32, 64]},
                "crop": [32, 32],
                "test_scale": [32, 64],
                "rcs_min_pixels": 4,
                "cache": True,
            }
        },
        "methods": {"daformer": {}},
    }


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    generate.generate("gta", root / "gta", count=8, seed=0, workers=1, **SIZE)
    prepare.prepare("gta", root / "gta")
    generate.generate("cityscapes", root / "cityscapes", train=10, val=4, seed=0, workers=1, **SIZE)
    prepare.prepare("cityscapes", root / "cityscapes", select_fraction=0.2)
    return root


def test_learning_rate_schedule_is_warmup_then_linear_decay():
    lr = [train.learning_rate(t, 1.0, warmup_steps=10, total_steps=100) for t in range(101)]
    assert lr[0] == pytest.approx(1e-6)
    assert lr[5] == pytest.approx((1 - 5 / 100) * (1e-6 + (1 - 1e-6) * 0.5))
    assert lr[10] == pytest.approx(0.9) and lr[55] == pytest.approx(0.45) and lr[100] == 0.0
    assert all(a < b for a, b in zip(lr[:10], lr[1:11])) and all(a > b for a, b in zip(lr[10:100], lr[11:101]))
    assert train.learning_rate(0, 1.0, 0, 100) == 1.0


@pytest.mark.parametrize(
    "overrides, method, benchmark, message",
    [
        (["optim.stepz=5"], "daformer", "mini-gta2cs", "unknown key profiles.tiny.optim.stepz; allowed keys of profiles.tiny.optim: batch_size"),
        (["optim.steps=many"], "daformer", "mini-gta2cs", "profiles.tiny.optim.steps: expected int, got str 'many'"),
        (["method.mix_wieght=2"], "daformer", "mini-gta2cs", "unknown key methods.daformer.mix_wieght"),
        (["method.class_mix=maybe"], "daformer", "mini-gta2cs", "methods.daformer.class_mix: expected true or false"),
        ([], "dafomer", "mini-gta2cs", "unknown method 'dafomer'; registered methods: daformer"),
        ([], "daformer", "mini-gta5", "unknown benchmark 'mini-gta5'; benchmarks: mini-gta2cs"),
        (["data.crop=[64,64]"], "daformer", "mini-gta2cs", "crop [64, 64] is larger than source.scale [48, 96]"),
        (["data.protocol=gta2kitti"], "daformer", "mini-gta2cs", "protocol: 'gta2kitti' is not one of"),
        (["eval.mode=tiles"], "daformer", "mini-gta2cs", "eval.mode: 'tiles' is not whole or sliding"),
    ],
)
def test_bad_configuration_stops_before_any_work_naming_the_key(tmp_path, overrides, method, benchmark, message):
    params = _tiny_params(tmp_path / "never_read")
    with pytest.raises(ConfigError) as error:
        resolve(params, benchmark, method, seed=0, overrides=overrides)
    assert message in str(error.value)
    assert not (tmp_path / "never_read").exists()


def test_committed_params_resolve_for_every_benchmark_and_method():
    params = load_yaml(REPO / "params.yaml")
    for profile in params["profiles"]:
        for benchmark in params["benchmarks"]:
            for method in ("source_only", "daformer", "hrda", "target_oracle"):
                run = resolve(params, benchmark, method, seed=0, profile=profile)
                assert run.data.protocol in ("gta2cs", "synthia2cs")


def test_cli_reports_config_errors_with_exit_code_2(tmp_path, capsys):
    code = train.main(["--benchmark", "mini-gta2cs", "--method", "nope", "--out", str(tmp_path / "run")])
    assert code == 2
    assert "train.py: error: unknown method 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["daformer", "target_oracle"])
def test_tiny_run_writes_a_complete_record_and_repeats_bit_identically(data_root, tmp_path, method):
    run = resolve(_tiny_params(data_root), "mini-gta2cs", method, seed=1)
    records = []
    for attempt in range(2):
        out = tmp_path / f"run{attempt}"
        train.train(run, out, progress=False, warm_start_dir=tmp_path / "warm")
        records.append(json.loads((out / "metrics.json").read_text()))
        assert (out / "checkpoint.pt").is_file()
        assert (out / "dvclive" / "plots" / "metrics" / "select" / "miou.tsv").is_file()
        assert (out / "dvclive" / "plots" / "metrics" / "train" / "lr.tsv").is_file()
    first, second = records
    assert list(first["per_class_iou"]) == list(CLASSES)
    assert {"miou19", "split_hash", "split_hashes", "wall_time_s", "steps", "config", "versions"} <= set(first)
    assert first["steps"] == 4 and first["method"] == method and first["seed"] == 1
    assert len(first["select_curve"]) == 2
    for key in ("per_class_iou", "miou19", "select_miou", "select_curve", "split_hash"):
        assert first[key] == second[key], f"{key} differs between two runs with the same seed"
    assert len(list((tmp_path / "warm").rglob("seed1-*.pt"))) == 1


def test_hrda_trains_at_its_own_scale_from_the_shared_warm_start_and_tests_sliding(data_root, tmp_path):
    params = _tiny_params(data_root)
    run = resolve(params, "mini-gta2cs", "hrda", seed=1)
    record = train.train(run, tmp_path / "run", progress=False, warm_start_dir=tmp_path / "warm")
    assert record["test_inference"] == "sliding" and record["test_scale"] == [64, 128]
    assert record["miou19"] is not None and len(record["select_curve"]) == 2
    (warm_start,) = (tmp_path / "warm").rglob("seed1-*.pt")
    daformer = resolve(params, "mini-gta2cs", "daformer", seed=1)
    assert warm_start == train.warm_start_path(daformer, tmp_path / "warm")


def test_step_time_times_interleaved_steps_of_each_method(data_root):
    from benchmark.step_time import measure

    times = measure(_tiny_params(data_root), "mini-gta2cs", ["daformer", "hrda"], steps=2, warmup=1, progress=False)
    assert set(times) == {"daformer", "hrda"}
    assert all(len(seconds) == 2 and min(seconds) > 0 for seconds in times.values())


@pytest.mark.parametrize(
    "text, expected",
    [
        ("optim.lr=3e-4", (["optim", "lr"], 3e-4)),
        ("optim.steps=200", (["optim", "steps"], 200)),
        ("method.class_mix=false", (["method", "class_mix"], False)),
        ("data.crop=[64, 64]", (["data", "crop"], [64, 64])),
        ("model.encoder=resnet18", (["model", "encoder"], "resnet18")),
    ],
)
def test_overrides_parse_as_a_user_means_them(text, expected):
    from benchmark.config import parse_override

    assert parse_override(text) == expected
