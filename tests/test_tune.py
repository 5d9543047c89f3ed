"""Tuning: several workers share one study without losing or repeating a trial, an interrupted study
resumes where it stopped, a seeded sampler repeats itself, the real objective trains on target select
only, and the tuned weights reach train.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from optuna.trial import TrialState

import tune_worker
from benchmark import train, tune
from benchmark.config import ConfigError, load_yaml
from methods import method_class

import conftest
from conftest import REPO

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "tune_worker.py"), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _trials(spec: str, name: str = "cheap") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=tune.open_storage(spec)).get_trials()


def _finished(trials) -> list[tuple]:
    return [(t.state, tuple(sorted(t.params.items())), t.value) for t in trials if t.state in FINISHED]


def test_two_worker_processes_on_one_journal_finish_n_trials_none_lost_or_repeated(tmp_path):
    journal, log = str(tmp_path / "study.journal"), tmp_path / "evaluated.jsonl"
    common = ["--storage", journal, "--trials", "12", "--log", str(log), "--sleep", "0.3"]
    workers = [_spawn(*common, "--barrier", str(tmp_path / "barrier"), "--workers", "2") for _ in range(2)]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], [err for _, err in outputs]

    trials = _trials(journal)
    assert [t.number for t in trials] == list(range(12))
    assert all(t.state in FINISHED for t in trials)  # nothing failed, nothing left running
    evaluated = [json.loads(line) for line in log.read_text().splitlines()]
    evaluated_params = sorted(tuple(sorted(e["params"].items())) for e in evaluated)
    assert evaluated_params == sorted(tuple(sorted(t.params.items())) for t in trials)  # each trial evaluated once
    assert len(set(evaluated_params)) == 12
    assert {e["pid"] for e in evaluated} == {w.pid for w in workers}  # both took part
    done = [json.loads(out) for out, _ in outputs]
    assert sum(d["complete"] + d["pruned"] for d in done) == 12
    assert {t.user_attrs["pid"] for t in trials} == {w.pid for w in workers}
    assert trials[0].user_attrs.get("baseline") and trials[0].params == tune_worker.DEFAULTS


def test_killed_worker_leaves_its_trial_failed_and_the_next_worker_completes_the_study(tmp_path):
    journal = str(tmp_path / "study.journal")
    killed = _spawn("--storage", journal, "--trials", "8", "--kill-at", "4")
    killed.communicate(timeout=300)
    assert killed.returncode == -9
    before = _trials(journal)
    assert len(before) == 4 and before[3].state == TrialState.RUNNING  # the dead worker's trial
    assert all(t.state in FINISHED for t in before[:3])

    tune_worker.work(journal, 8)

    after = _trials(journal)
    assert after[:3] == before[:3]  # the first k trials unchanged
    assert after[3].state == TrialState.FAIL and "died" in after[3].user_attrs["failed_because"]
    assert sum(t.state in FINISHED for t in after) == 8 and not any(t.state == TrialState.RUNNING for t in after)
    # the resumed study draws exactly what an uninterrupted one does
    tune_worker.work(str(tmp_path / "reference.journal"), 8)
    assert _finished(after) == _finished(_trials(str(tmp_path / "reference.journal")))


def test_interrupted_study_resumes_and_ends_with_n_trials_the_first_k_unchanged(tmp_path):
    journal = str(tmp_path / "study.journal")
    with pytest.raises(KeyboardInterrupt):
        tune_worker.work(journal, 9, objective=tune_worker.make_objective(interrupt_at=5))
    before = _trials(journal)
    assert len(before) == 5 and before[4].state == TrialState.FAIL
    assert before[4].user_attrs["failed_because"].startswith("KeyboardInterrupt")

    done = tune_worker.work(journal, 9)

    after = _trials(journal)
    assert after[:5] == before
    assert sum(t.state in FINISHED for t in after) == 9 and done["complete"] + done["pruned"] == 5
    assert tune_worker.work(journal, 9) == {"complete": 0, "pruned": 0, "failed": 0}  # a finished study stays so
    tune_worker.work(str(tmp_path / "reference.journal"), 9)
    assert _finished(after) == _finished(_trials(str(tmp_path / "reference.journal")))


def test_same_sampler_seed_gives_the_same_sequence_of_suggested_parameters(tmp_path):
    sequences = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        tune_worker.work(str(tmp_path / f"{name}.journal"), 10, seed=seed)
        sequences[name] = [t.params for t in _trials(str(tmp_path / f"{name}.journal"))]
    assert len(sequences["a"]) == 10
    assert sequences["a"] == sequences["b"]
    assert sequences["a"][0] == sequences["c"][0] == tune_worker.DEFAULTS  # the enqueued baseline
    assert sequences["a"][1:] != sequences["c"][1:]
    # past the startup trials TPE proposes, and the proposals are still identical
    assert len(sequences["a"]) > 3


def test_rdb_heartbeat_keeps_a_live_trial_running_and_fails_it_once_the_worker_is_gone(tmp_path):
    storage = tune.open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_s=1)
    study = tune.open_study(storage, "cheap", {"objective": "cheap"}, reduction_factor=3, min_resource=1)
    trial = tune.claim_trial(study, storage, tune_worker.DISTRIBUTIONS, 5, 0, 3, lock=None, defaults=None)
    assert trial.user_attrs["pid"] == os.getpid()  # alive: only the heartbeat can tell it is stale
    with tune._heartbeat(storage, trial):
        time.sleep(2.5)  # longer than the grace period of 2 heartbeats
        assert tune.fail_dead_trials(study, storage, include_unowned=False) == []
        assert study.get_trials()[0].state == TrialState.RUNNING
    time.sleep(2.5)
    tune.fail_dead_trials(study, storage, include_unowned=False)
    assert study.get_trials()[0].state == TrialState.FAIL


def test_a_study_is_never_extended_with_trials_of_another_configuration(tmp_path):
    storage = tune.open_storage(str(tmp_path / "study.journal"))
    tune.open_study(storage, "s", {"run": {"optim": {"steps": 4}}}, reduction_factor=3, min_resource=1)
    with pytest.raises(ConfigError, match=r"run.optim.steps: 4 -> 6.*--study-name"):
        tune.open_study(storage, "s", {"run": {"optim": {"steps": 6}}}, reduction_factor=3, min_resource=1)


# ------------------------------------------------------------------------------------------------
# the real objective: tiny training runs


@pytest.fixture(scope="module")
def tiny_params(data_root, tmp_path_factory):
    """The shared tiny parameter file (conftest), without warm start or checkpoints, with a tune section."""
    params = conftest.tiny_params(data_root)
    profile = params["profiles"]["tiny"]
    profile["warm_start"], profile["checkpoint_interval"] = {"steps": 0}, 0
    params["methods"] = {"daformer": {"pseudo_threshold": 0.9}}
    params["tune"] = {"trials": 3, "startup_trials": 2, "sampler_seed": 0}
    path = tmp_path_factory.mktemp("tune_params") / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_tuning_daformer_trains_on_select_only_and_train_applies_the_best_weights(tiny_params, tmp_path, monkeypatch, capsys):
    splits = []
    evaluate_on = train._eval_loader
    monkeypatch.setattr(train, "_eval_loader", lambda run, split, *rest: splits.append(split) or evaluate_on(run, split, *rest))
    out = tmp_path / "tuning"
    args = ["--benchmark", "mini-gta2cs", "--method", "daformer", "--params", str(tiny_params), "--out", str(out), "--no-progress"]

    assert tune.main(args) == 0
    assert set(splits) == {"target_select"}  # tuning never reads target test
    summary = json.loads(capsys.readouterr().out)
    table = load_yaml(out / "best.yaml")
    space = method_class("daformer").search_space
    assert set(table["params"]) == set(space)
    assert all(space[n].low <= v <= space[n].high for n, v in table["params"].items())
    assert table["trials"]["complete"] + table["trials"]["pruned"] == 3 and summary["study_trials"] == table["trials"]
    assert table["benchmark"] == "mini-gta2cs" and table["method"] == "daformer" and table["steps"] == 4
    assert table["best_select_miou"] >= table["baseline_select_miou"]
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("number,state,value,params_")
    trials = _trials(str(out / "study.journal"), "tiny/mini-gta2cs/daformer")
    # the baseline trial runs the configured weights (params.yaml's methods section included)
    assert trials[0].params["pseudo_threshold"] == 0.9 and trials[0].params["mix_weight"] == 1.0
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert all(sorted(t.intermediate_values) == [2, 4] and t.intermediate_values[4] == t.value for t in complete)
    for figure in ("history.png", "importances.png"):
        assert (out / figure).read_bytes().startswith(b"\x89PNG")

    # re-running resumes the finished study: no new trial, the same best weights
    assert tune.main(args) == 0
    assert load_yaml(out / "best.yaml")["params"] == table["params"]
    assert len(_trials(str(out / "study.journal"), "tiny/mini-gta2cs/daformer")) == 3
    assert tune.main([*args, "--set", "optim.steps=6"]) == 2
    assert "optim.steps: 4 -> 6" in capsys.readouterr().err

    run_dir = tmp_path / "run"
    code = train.main([
        "--benchmark", "mini-gta2cs", "--method", "daformer", "--params", str(tiny_params), "--out", str(run_dir),
        "--tuned", str(out / "best.yaml"), "--set", "method.mix_weight=0.5", "--no-progress",
    ])
    assert code == 0
    applied = json.loads((run_dir / "metrics.json").read_text())["config"]["method_params"]
    assert applied["mix_weight"] == 0.5  # an explicit --set wins over the tuned value
    for name in set(space) - {"mix_weight"}:
        assert applied[name] == table["params"][name]


def test_tuned_weights_are_refused_when_missing_or_made_for_another_run(tmp_path):
    best = tmp_path / "best.yaml"
    with pytest.raises(ConfigError, match="no tuned weights; make them with `python benchmark/tune.py --benchmark b --method daformer`"):
        tune.tuned_overrides(best, "b", "daformer")
    best.write_text(yaml.safe_dump({"benchmark": "b", "method": "daformer", "params": {"mix_weight": 0.3}}))
    assert tune.tuned_overrides(best, "b", "daformer") == ["method.mix_weight=0.3"]
    with pytest.raises(ConfigError, match="benchmark is 'b', this run's is 'c'"):
        tune.tuned_overrides(best, "c", "daformer")
    best.write_text(yaml.safe_dump({"benchmark": "b", "method": "daformer", "params": {"mix_wieght": 0.3}}))
    with pytest.raises(ConfigError, match="params.mix_wieght is not a hyperparameter of daformer"):
        tune.tuned_overrides(best, "b", "daformer")


def test_methods_without_a_search_space_cannot_be_tuned():
    with pytest.raises(ConfigError, match="'source_only' declares no search_space"):
        tune.search_distributions("source_only")


def test_pipeline_tunes_nothing_unless_params_name_methods():
    config = tune.load_tune_config(REPO / "params.yaml")
    assert config.methods == []
    stages = load_yaml(REPO / "dvc.yaml")["stages"]
    assert stages["tune"]["matrix"] == {"benchmark": "${tune.benchmarks}", "method": "${tune.methods}"}
    assert stages["train_tuned"]["matrix"]["method"] == "${tune.methods}"
    tuned_out = "results/tuning/${item.benchmark}/${item.method}"
    assert stages["tune"]["outs"] == [{tuned_out: {"persist": True}}]
    assert f"{tuned_out}/best.yaml" in stages["train_tuned"]["deps"]
    assert "--tuned" in stages["train_tuned"]["cmd"]
