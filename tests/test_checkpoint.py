"""Resume and safe loading: a run killed with SIGKILL and started again with the same command writes
the record an uninterrupted run writes; a checkpoint of another run is not resumed; a file that is
not a checkpoint of this harness is refused with a message naming it."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from benchmark import checkpoint as checkpoints
from benchmark import train
from benchmark.checkpoint import CheckpointError
from benchmark.config import to_mapping
from benchmark.profiles import resolve

from conftest import REPO, tiny_params

#: Long enough that the kill lands mid-training: the first checkpoint is written after step 2 of 8.
OVERRIDES = ["optim.steps=8", "eval.interval=4", "checkpoint_interval=2"]


def _command(params: Path, out: Path, warm: Path) -> list[str]:
    return [
        sys.executable, str(REPO / "benchmark" / "train.py"), "--params", str(params), "--benchmark", "mini-gta2cs",
        "--method", "daformer", "--seed", "1", "--out", str(out), "--warm-start-dir", str(warm), "--no-progress",
        "--set", *OVERRIDES,
    ]  # fmt: skip


def test_run_killed_with_sigkill_resumes_to_the_record_of_an_uninterrupted_run(data_root, tmp_path):
    """DAFormer has every kind of state: student, EMA teacher, frozen reference encoder, AdamW moments,
    rare-class and uniform samplers, its own mixing generator and dropout."""
    params = tiny_params(data_root)
    warm = tmp_path / "warm"
    reference = tmp_path / "uninterrupted"
    train.train(resolve(params, "mini-gta2cs", "daformer", seed=1, overrides=OVERRIDES), reference, progress=False, warm_start_dir=warm)
    expected = json.loads((reference / "metrics.json").read_text())

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    out = tmp_path / "killed"
    command = _command(params_file, out, warm)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint.pt").is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    assert not (out / "metrics.json").exists(), "the run finished before it was killed"
    killed_at = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < killed_at < 8

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {out / 'checkpoint.pt'} at step {killed_at}" in resumed.stderr
    record = json.loads((out / "metrics.json").read_text())
    differing = {key for key in expected if record[key] != expected[key]}
    # wall time may differ (and, rarely, agree to the hundredth of a second); nothing else may
    assert differing <= {"wall_time_s"}, f"{differing - {'wall_time_s'}} differ after the resume"
    assert not (out / "checkpoint.pt").exists()
    # the DVCLive log continues where the checkpoint was: no step twice, none missing
    for curve in ("train/lr.tsv", "train/mix_ce.tsv", "select/miou.tsv"):
        logged = (out / "dvclive/plots/metrics" / curve).read_text()
        assert logged == (reference / "dvclive/plots/metrics" / curve).read_text(), curve


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.generator = torch.Generator().manual_seed(0)


def _save(path: Path, fingerprint: dict) -> None:
    module = _Tiny()
    optimizer = torch.optim.AdamW(module.parameters())
    rng = checkpoints.rng_state(module.generator, torch.device("cpu"))
    checkpoints.save(
        path, fingerprint=fingerprint, step=3, method=module, optimizer=optimizer, rng=[rng],
        select_curve=[(2, 1.5)], log={"plots/metrics/train/lr.tsv": "step\tlr\n0\t0.1\n"}, wall_time_s=1.0,
    )  # fmt: skip


FINGERPRINT = {"config": "c" * 64, "splits": "s" * 64, "code": "k" * 64, "processes": 1}


@pytest.mark.parametrize(
    "key, value, named",
    [
        ("config", "d" * 64, "configuration"),
        ("splits", "t" * 64, "data splits"),
        ("code", "l" * 64, "harness code (benchmark/, methods/)"),
        ("processes", 2, "number of processes"),
    ],
)
def test_checkpoint_of_another_run_is_not_resumed_and_says_what_changed(tmp_path, key, value, named):
    path = tmp_path / "checkpoint.pt"
    _save(path, FINGERPRINT)
    state, message = checkpoints.resumable(path, FINGERPRINT)
    assert state["step"] == 3 and message == f"resuming from {path} at step 3"
    state, message = checkpoints.resumable(path, {**FINGERPRINT, key: value})
    assert state is None
    assert message == f"{path} was made with another {named}: starting fresh"


def test_run_fingerprint_follows_the_resolved_configuration(data_root):
    run = resolve(tiny_params(data_root), "mini-gta2cs", "daformer", seed=1)
    changed = resolve(tiny_params(data_root), "mini-gta2cs", "daformer", seed=1, overrides=["method.mix_weight=0.5"])
    same = checkpoints.fingerprint(to_mapping(run), "h", 1)
    assert same == checkpoints.fingerprint(to_mapping(run), "h", 1)
    assert same["config"] != checkpoints.fingerprint(to_mapping(changed), "h", 1)["config"]


def test_random_generators_come_back_exactly(tmp_path):
    import random

    generator = torch.Generator().manual_seed(5)
    state = checkpoints.rng_state(generator, torch.device("cpu"))
    path = tmp_path / "rng.pt"
    path.write_bytes(checkpoints.to_bytes({"kind": checkpoints.KIND, "rng": state}))
    draws = (torch.rand(3), torch.rand(3, generator=generator), np.random.rand(3), random.random())
    checkpoints.set_rng_state(checkpoints.load_trusted(path)["rng"], generator, torch.device("cpu"))
    again = (torch.rand(3), torch.rand(3, generator=generator), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and torch.equal(draws[1], again[1])
    assert np.array_equal(draws[2], again[2]) and draws[3] == again[3]


class Foreign:
    """Any Python object: unpickling it could run code, so weights-only loading refuses it."""


@pytest.mark.parametrize(
    "content, message",
    [
        (lambda: pickle.dumps({"step": 1, "payload": Foreign()}), ": not a torch.save file of tensors and plain containers"),
        (lambda: checkpoints.to_bytes({"step": 1, "payload": Foreign()}), ": it holds a Python object (test_checkpoint.Foreign)"),
        (lambda: checkpoints.to_bytes(nn.Linear(3, 2).state_dict()), " (no kind marker; a state dict saved by other code?)"),
        (lambda: checkpoints.to_bytes({"kind": checkpoints.WARM_START_KIND, "model": {}}), " (kind 'uda-seg-bench warm start';"),
        (lambda: np.random.default_rng(0).bytes(4096), ": not a torch.save file of tensors and plain containers"),
        (lambda: checkpoints.to_bytes({"kind": checkpoints.KIND})[:200], ": unreadable (PytorchStreamReader failed"),
    ],
    ids=["pickle", "torch-save-of-an-object", "foreign-state-dict", "warm-start", "random-bytes", "truncated"],
)
def test_a_file_that_is_not_our_checkpoint_is_refused_naming_it(tmp_path, content, message):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content())
    with pytest.raises(CheckpointError) as error:
        checkpoints.load_trusted(path)
    assert str(error.value).startswith(f"{path}: refused, not a uda-seg-bench checkpoint of this harness{message}")


def test_the_cli_refuses_a_foreign_checkpoint_and_leaves_it_alone(data_root, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(data_root)))
    foreign = tmp_path / "checkpoint.pt"
    torch.save(nn.Linear(3, 2).state_dict(), foreign)
    before = foreign.read_bytes()
    code = train.main(
        ["--params", str(params), "--benchmark", "mini-gta2cs", "--method", "daformer", "--out", str(tmp_path / "run"),
         "--checkpoint", str(foreign), "--no-progress"]
    )  # fmt: skip
    assert code == 2
    assert f"train.py: error: {foreign}: refused, not a uda-seg-bench checkpoint of this harness" in capsys.readouterr().err
    assert foreign.read_bytes() == before and not (tmp_path / "run").exists()


def test_a_foreign_warm_start_is_refused(tmp_path):
    path = tmp_path / "warm.pt"
    torch.save({"model": nn.Linear(3, 2).state_dict()}, path)
    with pytest.raises(CheckpointError, match="not a uda-seg-bench warm start of this harness"):
        train.load_warm_start(nn.Linear(3, 2), path)


def test_temporaries_of_a_killed_write_are_removed(tmp_path):
    path = tmp_path / "checkpoint.pt"
    stale = [tmp_path / ".checkpoint.pt.abc123.tmp", tmp_path / ".checkpoint.pt.xyz.tmp"]
    for file in stale:
        file.write_bytes(b"half a checkpoint")
    other = tmp_path / ".metrics.json.abc.tmp"
    other.write_bytes(b"{")
    checkpoints.remove_stale_temporaries(path)
    assert not any(file.exists() for file in stale) and other.exists()


def test_log_snapshot_round_trips_and_drops_later_lines(tmp_path):
    live = tmp_path / "dvclive"
    (live / "plots/metrics/train").mkdir(parents=True)
    (live / "plots/metrics/train/lr.tsv").write_text("step\tlr\n0\t0.1\n1\t0.2\n")
    snapshot = checkpoints.read_log(live)
    (live / "plots/metrics/train/lr.tsv").write_text("step\tlr\n0\t0.1\n1\t0.2\n2\t0.3\n")
    (live / "plots/metrics/train/late.tsv").write_text("step\tlate\n2\t1\n")
    checkpoints.write_log(live, snapshot)
    assert checkpoints.read_log(live) == {"plots/metrics/train/lr.tsv": "step\tlr\n0\t0.1\n1\t0.2\n"}


def test_pretrained_weights_holding_objects_are_refused_with_the_key_named(data_root, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(data_root)))
    weights = tmp_path / "weights.pth"
    torch.save({"state_dict": nn.Linear(3, 2).state_dict(), "trainer": Foreign()}, weights)
    code = train.main(
        ["--params", str(params), "--benchmark", "mini-gta2cs", "--method", "source_only", "--out", str(tmp_path / "run"),
         "--no-progress", "--set", "warm_start.steps=0", f"model.pretrained={weights}"]
    )  # fmt: skip
    assert code == 2
    assert f"train.py: error: profiles.tiny.model.pretrained: {weights}: refused: it holds Python objects" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.json").exists()


def _method_and_optimizer(name: str):
    from benchmark.classes import NUM_CLASSES
    from benchmark.models import build_segmentor
    from methods.base import method_class

    torch.manual_seed(0)
    method = method_class(name)(build_segmentor("efficientvit_b0", "daformer", NUM_CLASSES, 16), seed=0)
    method.train()
    return method, torch.optim.AdamW(method.trainable_parameters(), lr=1e-3)


def _advance(method, optimizer, step: int) -> dict:
    """One training step as the loop takes it, on fixed random batches."""
    from benchmark.classes import NUM_CLASSES
    from methods.base import Batch

    generator = torch.Generator().manual_seed(step)
    images = torch.randn(4, 3, 64, 64, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (4, 64, 64), generator=generator)
    labels[:, :4] = 255
    target_labels = labels[2:] if method.uses_target_labels else None
    losses = method.step(Batch(images[:2], labels[:2]), Batch(images[2:], target_labels), step)
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    optimizer.step()
    if method.teacher is not None:
        method.teacher.update(method.model, step)
    return {name: value.detach() for name, value in losses.items()}


def _registered():
    from methods.base import registered

    return registered()


@pytest.mark.parametrize("name", _registered())
def test_every_method_continues_identically_from_what_a_checkpoint_saves(name, tmp_path):
    """A checkpoint saves a method's ``state_dict``, its generator and the global generators: a method
    keeping state anywhere else (a running statistic in a plain attribute, a memory bank in a Python
    list) would resume differently, and fails here."""
    original, original_optimizer = _method_and_optimizer(name)
    restored, restored_optimizer = _method_and_optimizer(name)
    for step in range(2):
        _advance(original, original_optimizer, step)
    path = tmp_path / "state.pt"
    rng = checkpoints.rng_state(original.generator, torch.device("cpu"))
    path.write_bytes(
        checkpoints.to_bytes(
            {"kind": checkpoints.KIND, "method": original.state_dict(), "optimizer": original_optimizer.state_dict(), "rng": rng}
        )
    )
    expected = _advance(original, original_optimizer, 2)

    state = checkpoints.load_trusted(path)
    checkpoints.restore({**state, "step": 2}, restored, restored_optimizer)
    checkpoints.set_rng_state(state["rng"], restored.generator, torch.device("cpu"))
    actual = _advance(restored, restored_optimizer, 2)
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), f"{name}: {key} differs after a checkpoint round trip"
    for (key, a), b in zip(original.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), f"{name}: {key} differs after a checkpoint round trip"
