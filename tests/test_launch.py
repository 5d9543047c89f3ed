"""The seed launcher: runs at once, output, failures, and the errors of `--all-seeds` before any run starts."""

from __future__ import annotations

import functools
import io
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO

from benchmark import launch
from benchmark.config import ConfigError

SLEEPER = "import pathlib, sys, time; d = pathlib.Path(sys.argv[1]); (d / f'start{sys.argv[2]}').write_text(str(time.time())); time.sleep(0.6); (d / f'end{sys.argv[2]}').write_text(str(time.time())); print('done', sys.argv[2])"


def _most_at_once(directory, seeds) -> int:
    spans = [(float((directory / f"start{s}").read_text()), float((directory / f"end{s}").read_text())) for s in seeds]
    return max(sum(start <= moment < end for start, end in spans) for moment, _ in spans)


@pytest.mark.parametrize(("jobs", "expected"), [(1, 1), (2, 2), (0, 3)])
def test_at_most_jobs_runs_at_once(tmp_path, jobs, expected):
    seeds = [0, 1, 2]
    commands = {s: [sys.executable, "-c", SLEEPER, str(tmp_path), str(s)] for s in seeds}
    stream = io.StringIO()
    assert launch.run_seeds(commands, jobs, progress=False, stream=stream) == 0
    assert _most_at_once(tmp_path, seeds) == expected
    # each run's output arrives whole, prefixed with its seed
    assert sorted(stream.getvalue().splitlines()) == [f"[seed {s}] done {s}" for s in seeds]


def _sleeper(directory, seed):
    (directory / f"start{seed}").write_text(str(time.time()))
    time.sleep(0.6)
    (directory / f"end{seed}").write_text(str(time.time()))
    print("done", seed)


@pytest.mark.parametrize(("jobs", "expected"), [(1, 1), (2, 2), (0, 3)])
def test_forked_children_keep_to_jobs_and_send_their_output(tmp_path, jobs, expected):
    seeds = [0, 1, 2]
    children = {s: functools.partial(_sleeper, tmp_path, s) for s in seeds}
    stream = io.StringIO()
    assert launch.run_seeds(children, jobs, progress=False, stream=stream) == 0
    assert _most_at_once(tmp_path, seeds) == expected
    assert sorted(stream.getvalue().splitlines()) == [f"[seed {s}] done {s}" for s in seeds]


def _fails_with_status():
    print("boom")
    sys.exit(3)


def _raises():
    raise ValueError("broken input")


def _exits_with_message():
    sys.exit("a message")


def test_forked_children_that_fail_are_named_with_their_status_and_output(tmp_path, capsys):
    children = {
        0: _fails_with_status,
        1: _raises,
        2: _exits_with_message,
        3: lambda: (tmp_path / "three").write_text("ok") and None,
        4: lambda: 0,
    }
    stream = io.StringIO()
    assert launch.run_seeds(children, 2, progress=False, stream=stream) == 3
    assert (tmp_path / "three").read_text() == "ok"
    error = capsys.readouterr().err
    assert "[seed 0] boom" in error
    assert "[seed 1] ValueError: broken input" in error and "[seed 1] Traceback" in error
    assert "[seed 2] a message" in error
    assert "seed(s) 0, 1, 2 failed" in error
    assert "[seed 3]" not in error and "[seed 4]" not in error


def test_seed_children_fork_where_possible_and_are_commands_elsewhere(monkeypatch):
    def main(argv):
        return int(argv[-1])

    forked = launch.seed_children(REPO / "benchmark" / "train.py", main, {0: ["--seed", "0"], 5: ["--seed", "5"]})
    assert [child() for child in forked.values()] == [0, 5]
    monkeypatch.delattr(launch.os, "fork")
    commands = launch.seed_children(REPO / "benchmark" / "train.py", main, {1: ["--seed", "1"]})
    assert commands == {1: [sys.executable, str(REPO / "benchmark" / "train.py"), "--seed", "1"]}


def test_a_failed_run_lets_the_others_finish_and_is_named(tmp_path, capsys):
    commands = {
        0: [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
        1: [sys.executable, "-c", f"import time, pathlib; time.sleep(0.3); pathlib.Path(r'{tmp_path}/one').write_text('ok')"],
    }
    assert launch.run_seeds(commands, 0, progress=False) == 3
    assert (tmp_path / "one").read_text() == "ok"
    error = capsys.readouterr().err
    assert "[seed 0] boom" in error
    assert "seed(s) 0 failed" in error


@pytest.mark.parametrize(
    ("seeds", "message"),
    [([], "non-empty list"), ([0, 0], "repeats a seed"), ([0, "one"], "list of integers"), (3, "list of integers")],
)
def test_grid_seeds_are_checked(tmp_path, seeds, message):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"seeds": seeds}}))
    with pytest.raises(ConfigError, match=f"train.seeds .*{message}"):
        launch.grid_seeds(params, "train")


@pytest.mark.parametrize(("jobs", "ok"), [(None, True), (0, True), (2, True), (-1, False), ("two", False)])
def test_grid_jobs_are_checked(tmp_path, jobs, ok):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {} if jobs is None else {"jobs": jobs}}))
    if ok:
        assert launch.grid_jobs(params, None) == (jobs or 0)
    else:
        with pytest.raises(ConfigError, match="train.jobs"):
            launch.grid_jobs(params, None)


@pytest.mark.parametrize(
    ("script", "arguments", "message"),
    [
        ("train.py", ["--method", "no_such_method"], "no_such_method"),
        ("train.py", ["--method", "daformer", "--out", "somewhere"], "drop --out"),
        ("train.py", ["--method", "daformer", "--set", "optim.stepz=3"], "optim.stepz"),
        ("ablate.py", ["--variant", "daformer~no_such_variant"], "no_such_variant"),
    ],
)
def test_all_seeds_stops_bad_input_before_any_run_starts(tmp_path, script, arguments, message):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmark" / script), "--benchmark", "mini-gta2cs", *arguments, "--all-seeds",
         "--no-progress", "--warm-start-dir", str(tmp_path / "warm")],
        cwd=tmp_path, capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "[seed" not in result.stdout + result.stderr  # no child was started
    assert not (tmp_path / "warm").exists()
