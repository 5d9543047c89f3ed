"""End to end: `dvc repro` with the `smoke` profile in a temporary copy of the repository.

The copy holds the repository's files (tracked, and untracked ones git does not ignore) with a
params.yaml that asks for tiny mini datasets, a 2 x 2 x 2 training grid and one ablation variant;
`dvc repro` then generates the data, trains, aggregates and reports. The test checks the leaderboard,
the ablation table, the report and its figures, what `dvc metrics show` prints, and that a second
`dvc repro` has nothing to do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO

BENCHMARKS = ["mini-gta2cs", "mini-synthia2cs"]
METHODS = ["source_only", "daformer"]
SEEDS = [0, 1]
VARIANT = "daformer~no_class_mix"


def _copy_repository(destination: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file() and not source.is_symlink():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def _smoke_params(path: Path) -> None:
    params = yaml.safe_load(path.read_text())
    params["profile"] = "smoke"
    params["data"]["workers"] = 1
    params["data"]["gta"]["count"] = 10
    params["data"]["synthia"]["count"] = 10
    params["data"]["cityscapes"].update(train=12, val=4, select_fraction=0.25)
    params["train"] = {"benchmarks": list(BENCHMARKS), "methods": list(METHODS), "seeds": list(SEEDS)}
    params["ablations"] = {"benchmarks": ["mini-gta2cs"], "seeds": list(SEEDS), "variants": {VARIANT: {"method": {"class_mix": False}}}}
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def _run(command: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(command, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def smoke_repo(tmp_path_factory):
    dvc = Path(sys.executable).parent / "dvc"
    if not dvc.is_file():
        pytest.fail(f"dvc is not installed beside {sys.executable} (pip install -e .)")
    repo = tmp_path_factory.mktemp("smoke") / "repo"
    _copy_repository(repo)
    _smoke_params(repo / "params.yaml")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(repo),  # the copy's code, not an installed one
        "DVC_NO_ANALYTICS": "1",
        # one thread per run: on a busy 2-core machine, several spinning threads per process slow a
        # smoke run down tenfold
        "OMP_NUM_THREADS": "1",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.org",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.org",
    }  # fmt: skip
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "smoke"], repo, env)
    first = _run([str(dvc), "repro"], repo, env)
    return repo, env, dvc, first


def test_smoke_repro_writes_the_leaderboard(smoke_repo):
    repo, _, _, _ = smoke_repo
    board = pd.read_csv(repo / "results" / "leaderboard.csv")
    assert sorted(zip(board["benchmark"], board["method"])) == sorted((b, m) for b in BENCHMARKS for m in METHODS)
    assert set(board["n"]) == {len(SEEDS)}
    assert set(board["profile"]) == {"smoke"}
    assert board.loc[board["benchmark"] == "mini-gta2cs", "miou19_mean"].notna().all()
    assert board.loc[board["benchmark"] == "mini-synthia2cs", "miou16_mean"].notna().all()
    markdown = (repo / "results" / "leaderboard.md").read_text()
    for benchmark in BENCHMARKS:
        assert f"## {benchmark} (protocol" in markdown
    ablations = pd.read_csv(repo / "results" / "ablations.csv")
    assert list(zip(ablations["method"], ablations["variant"], ablations["n"])) == [("daformer", "no_class_mix", len(SEEDS))]
    assert ablations["changes"].iloc[0] == "method.class_mix=false"


def test_smoke_repro_writes_the_report_and_figures(smoke_repo):
    repo, _, _, _ = smoke_repo
    text = (repo / "results" / "REPORT.md").read_text()
    runs = len(BENCHMARKS) * len(METHODS) * len(SEEDS) + len(SEEDS)
    assert f"{runs} of the {runs} runs of the grid" in text
    figures = sorted(p.name for p in (repo / "results" / "figures").glob("*.png"))
    assert figures == [
        "ablations.png", "cost_breakdown.png", "cost_vs_miou.png", "miou.png", "per_class_iou.png", "select_curves.png"
    ]
    assert "`cost.csv` not found" not in text  # the cost stage runs before the report
    assert "](figures/cost_breakdown.png)" in text  # its parts columns reach the report


def test_a_run_trained_beside_its_other_seeds_equals_one_trained_alone(smoke_repo, tmp_path):
    """The train stage runs the seeds side by side (benchmark/launch.py); the figures must not notice."""
    repo, env, _, _ = smoke_repo
    alone = tmp_path / "alone"
    _run([sys.executable, "benchmark/train.py", "--benchmark", "mini-gta2cs", "--method", "daformer", "--seed", "1",
          "--out", str(alone), "--no-progress"], repo, env)  # fmt: skip
    grid = json.loads((repo / "results" / "runs" / "mini-gta2cs" / "daformer" / "seed1" / "metrics.json").read_text())
    single = json.loads((alone / "metrics.json").read_text())
    for key in ("per_class_iou", "miou19", "select_curve", "split_hash"):
        assert single[key] == grid[key], key


def test_dvc_sees_metrics_and_plots_and_has_nothing_left_to_do(smoke_repo):
    repo, env, dvc, first = smoke_repo
    assert "Running stage 'report'" in first.stdout
    metrics = json.loads(_run([str(dvc), "metrics", "show", "--json"], repo, env).stdout)
    (workspace,) = metrics.values()
    summary = workspace["data"]["results/metrics.json"]["data"]
    board = pd.read_csv(repo / "results" / "leaderboard.csv").set_index(["benchmark", "method"])
    assert summary["leaderboard"]["mini-gta2cs"]["daformer"]["miou19"] == pytest.approx(board.loc[("mini-gta2cs", "daformer"), "miou19_mean"], abs=1e-4)
    assert summary["ablations"]["mini-gta2cs"][VARIANT]["n"] == len(SEEDS)
    plots = _run([str(dvc), "plots", "show", "--json"], repo, env).stdout
    assert "results/figures/miou.png" in plots
    again = _run([str(dvc), "repro"], repo, env)
    assert "Running stage" not in again.stdout
