"""The training entry point: configuration checks before any work (every error names the key and what
is allowed), the schedule, a failed run that writes nothing, and a tiny end-to-end run whose record
is complete and bit-identical when repeated with the same seed."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from benchmark import checkpoint as checkpoints, train
from benchmark.classes import CLASSES
from benchmark.config import ConfigError, load_yaml
from benchmark.profiles import resolve

from conftest import REPO, tiny_params

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
        (["eval.mode=sliding"], "daformer", "mini-gta2cs", "profiles.tiny.eval.mode sliding needs eval.window and eval.stride"),
        (["eval.window=[0,32]"], "daformer", "mini-gta2cs", "profiles.tiny.eval.window: expected two positive sizes"),
        (["eval.interval=-5"], "daformer", "mini-gta2cs", "profiles.tiny.eval.interval must be >= 0"),
        (["model.head=unet"], "daformer", "mini-gta2cs", "profiles.tiny.model.head: 'unet' is not one of ['daformer', 'segformer']"),
        (["model.encoder=efficientvit_b9"], "daformer", "mini-gta2cs", "model.encoder: 'efficientvit_b9' is not a timm model (see timm.list_models()); close names: efficientvit_b"),
        (["model.embed_dim=0"], "daformer", "mini-gta2cs", "profiles.tiny.model.embed_dim must be > 0, got 0"),
        (["model.batch_norm_momentum=0"], "daformer", "mini-gta2cs", "profiles.tiny.model.batch_norm_momentum must be in (0, 1] or null, got 0.0"),
        (["optim.lr=-1"], "daformer", "mini-gta2cs", "profiles.tiny.optim.lr must be > 0, got -1.0"),
        (["optim.warmup_steps=-2"], "daformer", "mini-gta2cs", "profiles.tiny.optim.warmup_steps must be >= 0"),
        (["optim.weight_decay=-0.1"], "daformer", "mini-gta2cs", "profiles.tiny.optim.weight_decay must be >= 0"),
        (["warm_start.steps=-1"], "daformer", "mini-gta2cs", "profiles.tiny.warm_start.steps must be >= 0"),
        (["log_interval=0"], "daformer", "mini-gta2cs", "profiles.tiny.log_interval must be > 0, got 0"),
        (["checkpoint_interval=-1"], "daformer", "mini-gta2cs", "profiles.tiny.checkpoint_interval must be >= 0 (0: never)"),
        (["threads=-1"], "daformer", "mini-gta2cs", "profiles.tiny.threads must be >= 0"),
        (["workers=two"], "daformer", "mini-gta2cs", "profiles.tiny.workers: expected int, got str 'two'"),
        (["optim=5"], "daformer", "mini-gta2cs", "profiles.tiny.optim: expected a mapping, got 5"),
        (["optim.steps"], "daformer", "mini-gta2cs", "override 'optim.steps' is not of the form key.path=value"),
        (["data.crop=64"], "daformer", "mini-gta2cs", "benchmarks.mini-gta2cs.crop: expected a list, got 64"),
        (["data.crop=[0,32]"], "daformer", "mini-gta2cs", "benchmarks.mini-gta2cs.crop: expected two positive sizes"),
        (["data.target.family=gta"], "daformer", "mini-gta2cs", "benchmarks.mini-gta2cs.target.family must be cityscapes, got 'gta'"),
        (["data.source.family=kitti"], "daformer", "mini-gta2cs", "source.family: 'kitti' is not one of ['gta', 'synthia', 'cityscapes']"),
        (["data.source.family=synthia"], "daformer", "mini-gta2cs", "protocol: gta2cs (mIoU19) needs all 19 classes, but a synthia source has no terrain"),
        (["data.rcs_min_crop_ratio=1.5"], "daformer", "mini-gta2cs", "rcs_min_crop_ratio must be in [0, 1], got 1.5"),
        (["method.rcs_temperature=0"], "daformer", "mini-gta2cs", "methods.daformer.rcs_temperature must be > 0 with rare_class_sampling"),
        (["method.ema_alpha=high"], "daformer", "mini-gta2cs", "methods.daformer.ema_alpha: expected float, got str 'high'"),
        (["method.class_mix=true"], "source_only", "mini-gta2cs", "unknown key methods.source_only.class_mix; allowed keys of methods.source_only: lr_warmup"),
    ],
)
def test_bad_configuration_stops_before_any_work_naming_the_key(tmp_path, overrides, method, benchmark, message):
    params = tiny_params(tmp_path / "never_read")
    with pytest.raises(ConfigError) as error:
        resolve(params, benchmark, method, seed=0, overrides=overrides)
    assert message in str(error.value)
    assert not (tmp_path / "never_read").exists()


def test_unknown_profile_names_the_profiles(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown profile 'papr'; profiles in params.yaml: tiny"):
        resolve(tiny_params(tmp_path), "mini-gta2cs", "daformer", seed=0, profile="papr")


def test_misspelt_method_section_in_the_parameter_file_is_named(tmp_path):
    params = tiny_params(tmp_path)
    params["methods"]["dafromer"] = {"mix_weight": 2.0}
    with pytest.raises(ConfigError) as error:
        resolve(params, "mini-gta2cs", "daformer", seed=0)
    assert str(error.value).startswith("methods.dafromer in the parameter file: unknown method 'dafromer'; registered methods:")


def test_batch_must_split_over_the_processes(tmp_path):
    resolve(tiny_params(tmp_path), "mini-gta2cs", "daformer", seed=0, overrides=["optim.batch_size=4"], processes=2)
    with pytest.raises(ConfigError, match=r"optim.batch_size: 3 images per step \(all processes together\) do not split over 2 processes; use a multiple of 2"):
        resolve(tiny_params(tmp_path), "mini-gta2cs", "daformer", seed=0, overrides=["optim.batch_size=3"], processes=2)


def test_batch_norm_momentum_reaches_every_batch_norm_layer_of_the_segmentor(tmp_path):
    params = tiny_params(tmp_path / "never_read")
    layers = lambda model: [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    default = train.build_model(resolve(params, "mini-gta2cs", "daformer", seed=0))
    assert layers(default) and {m.momentum for m in layers(default)} == {0.1}
    run = resolve(params, "mini-gta2cs", "daformer", seed=0, overrides=["model.batch_norm_momentum=0.01"])
    assert {m.momentum for m in layers(train.build_model(run))} == {0.01}


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


def _write_params(path, params) -> str:
    path.write_text(yaml.safe_dump(params))
    return str(path)


def test_cli_passes_the_registry_message_for_an_unsupported_combination(tmp_path, capsys, monkeypatch):
    """The registry raises KeyError (with the allowed names) for a base and add-on it cannot combine;
    the user sees its message as one line, not a KeyError traceback."""
    import methods

    message = "add-on 'mic' does not extend 'source_only'; it extends: daformer, hrda"

    def method_class(name):
        if name == "source_only+mic":
            raise KeyError(message)
        return real(name)

    real = methods.method_class
    monkeypatch.setattr(methods, "method_class", method_class)
    args = ["--params", _write_params(tmp_path / "params.yaml", tiny_params(tmp_path / "never_read"))]
    code = train.main([*args, "--benchmark", "mini-gta2cs", "--method", "source_only+mic", "--out", str(tmp_path / "run")])
    assert code == 2
    assert capsys.readouterr().err == f"train.py: error: {message}\n"
    assert not (tmp_path / "run").exists() and not (tmp_path / "never_read").exists()


def test_missing_pretrained_weights_stop_before_any_data_is_read(tmp_path, capsys):
    args = ["--params", _write_params(tmp_path / "params.yaml", tiny_params(tmp_path / "never_read"))]
    missing = tmp_path / "weights.pth"
    code = train.main([*args, "--benchmark", "mini-gta2cs", "--method", "daformer", "--out", str(tmp_path / "run"), "--set", f"model.pretrained={missing}"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"train.py: error: profiles.tiny.model.pretrained: {missing} does not exist" in err
    assert not (tmp_path / "run").exists()


def test_non_finite_loss_stops_the_run_naming_method_step_and_term_and_writes_no_record(data_root, tmp_path, capsys):
    from methods.base import Method, cross_entropy, register, unregister

    @register
    class BrokenAtStep2(Method):
        name = "test_broken_at_step_2"

        def step(self, source, target, step):
            ce = cross_entropy(self.model(source.image), source.label)
            return {"source_ce": ce, "exploding": ce * (float("inf") if step == 2 else 0.0)}

    try:
        out = tmp_path / "run"
        params = _write_params(tmp_path / "params.yaml", tiny_params(data_root))
        code = train.main(
            ["--params", params, "--benchmark", "mini-gta2cs", "--method", BrokenAtStep2.name, "--out", str(out),
             "--no-progress", "--set", "warm_start.steps=0", "eval.interval=0", "checkpoint_interval=1"]
        )  # fmt: skip
    finally:
        unregister(BrokenAtStep2.name)
    assert code == 1
    err = capsys.readouterr().err
    assert "train.py: error: test_broken_at_step_2: non-finite loss at step 2 in term(s) exploding; the run failed" in err
    assert not (out / "metrics.json").exists()
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("method", ["target_oracle"])  # daformer: see test_checkpoint.py (killed and resumed)
def test_tiny_run_writes_a_complete_record_and_repeats_bit_identically(data_root, tmp_path, method):
    run = resolve(tiny_params(data_root), "mini-gta2cs", method, seed=1)
    records = []
    for attempt in range(2):
        out = tmp_path / f"run{attempt}"
        train.train(run, out, progress=False, warm_start_dir=tmp_path / "warm")
        records.append(json.loads((out / "metrics.json").read_text()))
        assert not (out / "checkpoint.pt").exists()  # a finished run needs no checkpoint
        assert (out / "dvclive" / "plots" / "metrics" / "select" / "miou.tsv").is_file()
        assert (out / "dvclive" / "plots" / "metrics" / "train" / "lr.tsv").is_file()
    first, second = records
    assert list(first["per_class_iou"]) == list(CLASSES)
    assert {"miou19", "split_hash", "split_hashes", "wall_time_s", "steps", "config", "versions"} <= set(first)
    assert first["processes"] == 1 and first["device"] == "cpu"
    assert first["steps"] == 4 and first["method"] == method and first["seed"] == 1
    assert len(first["select_curve"]) == 2
    for key in ("per_class_iou", "miou19", "select_miou", "select_curve", "split_hash"):
        assert first[key] == second[key], f"{key} differs between two runs with the same seed"
    assert len(list((tmp_path / "warm").rglob("seed1-*.pt"))) == 1


def test_hrda_trains_at_its_own_scale_from_the_shared_warm_start_and_tests_sliding(data_root, tmp_path):
    params = tiny_params(data_root)
    run = resolve(params, "mini-gta2cs", "hrda", seed=1)
    record = train.train(run, tmp_path / "run", progress=False, warm_start_dir=tmp_path / "warm")
    assert record["test_inference"] == "sliding" and record["test_scale"] == [64, 128]
    assert record["miou19"] is not None and len(record["select_curve"]) == 2
    (warm_start,) = (tmp_path / "warm").rglob("seed1-*.pt")
    daformer = resolve(params, "mini-gta2cs", "daformer", seed=1)
    assert warm_start == train.warm_start_path(daformer, tmp_path / "warm")


def test_step_time_times_interleaved_steps_of_each_method(data_root, tmp_path):
    from benchmark.step_time import measure

    times = measure(
        tiny_params(data_root), "mini-gta2cs", ["daformer", "hrda"], steps=2, warmup=1, progress=False,
        warm_start_dir=tmp_path / "warm",
    )
    assert set(times) == {"daformer", "hrda"}
    assert all(len(seconds) == 2 and min(seconds) > 0 for seconds in times.values())


def test_timed_methods_start_from_their_runs_warm_start(data_root, tmp_path):
    from benchmark.step_time import build_contenders

    params = tiny_params(data_root)
    daformer, hrda = build_contenders(
        params, "mini-gta2cs", ["daformer", "hrda"], seed=1, warm_start_dir=tmp_path / "warm", progress=False
    )
    warm_start = train.warm_start_path(resolve(params, "mini-gta2cs", "daformer", seed=1), tmp_path / "warm")
    weights = checkpoints.load_trusted(warm_start, checkpoints.WARM_START_KIND)["model"]
    for contender in (daformer, hrda):
        state = contender.method.model.state_dict()
        assert all(torch.equal(state[key], value) for key, value in weights.items())
        teacher = contender.method.teacher.model.state_dict()
        assert all(torch.equal(teacher[key], value) for key, value in weights.items())


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
