"""Tune a method's loss weights with Optuna on target select (never target test).

    python benchmark/tune.py --benchmark mini-gta2cs --method daformer --trials 20
    python benchmark/tune.py --benchmark gta2cs --method daformer --profile paper --trials 40 \\
        --storage postgresql://user:password@db-host/tuning

Each trial trains the method with the weights a seeded TPE sampler suggests from the method's declared
``search_space`` and scores the final target-select mIoU; the select mIoU evaluated every
``eval.interval`` steps goes to a successive-halving pruner, which stops trials that trail the others
at the same step. The study is persistent: by default a journal file
``results/tuning/<benchmark>/<method>/study.journal`` (several worker processes on one machine), or any
SQLAlchemy URL given with ``--storage`` (workers on several machines; with a heartbeat, so the trial of
a worker that died is failed by the next one). Re-running the command resumes the study; every worker,
wherever it runs, works until the study holds ``--trials`` finished (complete or pruned) trials in
total. The study's results are written next to the journal: ``best.yaml`` (read by
``train.py --tuned``), ``trials.csv``, ``history.png`` and ``importances.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import io
import json
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import optuna
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from tqdm import tqdm

from benchmark.config import ConfigError, from_mapping, load_yaml, to_mapping
from benchmark.formats import DatasetFormatError, write_bytes_atomic

if TYPE_CHECKING:
    from benchmark.profiles import RunConfig

# The modules that load torch (profiles, methods, train) are imported where they are used, so that a
# worker with an injected objective and the trial bookkeeping start without it.

REPO = Path(__file__).resolve().parents[1]
TUNING_DIR = REPO / "results" / "tuning"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: Trials that hold one of the study's ``--trials`` slots.
CLAIMED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)

#: ``report(steps_done, value, final=False)`` records an evaluation of the trial; unless it is the
#: final one (the trial's value) the pruner looks at it and ``optuna.TrialPruned`` is raised when the
#: trial should stop.
Report = Callable[..., None]
#: An objective maps the suggested parameters to the value to maximise, reporting on the way.
Objective = Callable[[dict[str, float], Report], float]


@dataclass
class TuneConfig:
    """The ``tune:`` section of ``params.yaml``; command-line options override single values."""

    #: The pipeline's ``tune`` stage tunes every method here on every benchmark here (none by default).
    benchmarks: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    #: Finished (complete or pruned) trials the study ends with.
    trials: int = 20
    #: Seed of the TPE sampler.
    sampler_seed: int = 0
    #: Trials drawn at random before TPE models the results.
    startup_trials: int = 5
    #: The training seed of every trial.
    train_seed: int = 0
    #: Successive halving keeps the best 1/reduction_factor of the trials at each rung.
    reduction_factor: int = 3
    #: Steps trained before the first pruning decision (null: the first select evaluation).
    min_resource: int | None = None
    #: Run the method's configured weights as the first trial, the baseline every other is compared with.
    enqueue_defaults: bool = True
    #: Overrides of every trial's run (``train.py --set`` syntax), e.g. a shorter schedule.
    overrides: list[str] = field(default_factory=list)


def load_tune_config(params_path: Path | str) -> TuneConfig:
    return from_mapping(TuneConfig, load_yaml(params_path).get("tune"), "tune")


def study_dir(benchmark: str, method: str, root: Path | str = TUNING_DIR) -> Path:
    return Path(root) / benchmark / method


# ------------------------------------------------------------------------------------------------
# storage, study and the objective's identity


def open_storage(spec: str | Path, heartbeat_s: int = 60) -> optuna.storages.BaseStorage:
    """A SQLAlchemy URL (``postgresql://...``; anything with ``://``) opens an RDB storage whose
    workers record a heartbeat, so a dead worker's trial is failed after 2 x ``heartbeat_s``; anything
    else is the path of a journal file."""
    spec = str(spec)
    if "://" in spec:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(spec, heartbeat_interval=heartbeat_s)
    from optuna.storages.journal import JournalFileBackend

    Path(spec).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(spec))


def describe_storage(spec: str | Path) -> str:
    """The storage as it may be written into results: a URL without its password."""
    spec = str(spec)
    if "://" not in spec:
        path = Path(spec).resolve()
        return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
    from sqlalchemy.engine import make_url

    return make_url(spec).render_as_string(hide_password=True)


def search_distributions(method: str) -> dict[str, FloatDistribution]:
    from methods import method_class

    space = method_class(method).search_space
    if not space:
        raise ConfigError(f"method {method!r} declares no search_space: there is nothing to tune")
    return {name: FloatDistribution(r.low, r.high, log=r.log) for name, r in space.items()}


def objective_identity(run: RunConfig, distributions: dict[str, FloatDistribution]) -> dict:
    """What a study's values depend on: a study is only ever extended with trials of the same one."""
    return json.loads(
        json.dumps(
            {
                "run": to_mapping(run),
                "search_space": {n: [d.low, d.high, d.log] for n, d in distributions.items()},
                "objective": "final target_select mIoU, maximised",
            }
        )
    )


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def open_study(
    storage: optuna.storages.BaseStorage, name: str, identity: dict, reduction_factor: int, min_resource: int
) -> optuna.Study:
    """Create the study or load it; refuse to extend a study made for another objective."""
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=reduction_factor)
    study = optuna.create_study(
        storage=storage, study_name=name, direction="maximize", pruner=pruner, load_if_exists=True
    )
    existing = study.user_attrs.get("identity")
    if existing is None:
        study.set_user_attr("identity", identity)
    elif existing != identity:
        changed = _differences(existing, identity)
        raise ConfigError(
            f"study {name!r} was made for another configuration ({'; '.join(changed[:5])}); "
            "delete its storage or pass --study-name to start a new study"
        )
    return study


# ------------------------------------------------------------------------------------------------
# workers


def _process_start(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (None if it does not exist): with the pid it names a
    process uniquely, where a pid alone may have been reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner() -> dict[str, object]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "process_start": _process_start(pid)}


def _owner_alive(attrs: dict) -> bool:
    if Path("/proc/self/stat").is_file():
        return _process_start(attrs["pid"]) == attrs.get("process_start")
    try:
        os.kill(attrs["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_trials(study: optuna.Study, storage, include_unowned: bool) -> list[int]:
    """Mark FAIL the RUNNING trials whose worker process on this host is gone (a journal has no
    heartbeat, so nothing else would); with ``include_unowned`` also those that never got an owner,
    which only a worker killed between creating a trial and naming itself leaves (the caller must hold
    the claim lock, or a trial being claimed right now would look the same). On an RDB storage the
    trials whose heartbeat stopped are failed too. Returns the numbers of the trials failed by owner."""
    if isinstance(storage, optuna.storages.RDBStorage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if "pid" in attrs:
            if attrs.get("host") != host or _owner_alive(attrs):
                continue
            reason = f"worker pid {attrs['pid']} on {host} died during the trial"
        elif include_unowned:
            reason = "the worker died before it recorded itself"
        else:
            continue
        storage.set_trial_user_attr(trial._trial_id, "failed_because", reason)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        failed.append(trial.number)
    return failed


@contextlib.contextmanager
def _claim_lock(path: Path | None) -> Iterator[None]:
    """Serialises claiming trial slots between processes sharing a journal file."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _heartbeat(storage, trial: optuna.Trial) -> Iterator[None]:
    """Records the trial's heartbeat while it runs (RDB storage with a heartbeat only)."""
    if not isinstance(storage, optuna.storages.RDBStorage) or storage.get_heartbeat_interval() is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            storage.record_heartbeat(trial._trial_id)
            if stop.wait(storage.get_heartbeat_interval()):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-trial-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _sampler(seed: int, finished: int, startup_trials: int) -> optuna.samplers.TPESampler:
    """A TPE sampler seeded by (seed, finished trials so far): a study resumed by one worker draws
    exactly what an uninterrupted one would have."""
    trial_seed = int(np.random.SeedSequence([seed, finished]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=trial_seed, n_startup_trials=startup_trials)


def _count(study: optuna.Study, states) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def claim_trial(
    study: optuna.Study,
    storage,
    distributions: dict[str, FloatDistribution],
    n_trials: int,
    seed: int,
    startup_trials: int,
    lock: Path | None,
    defaults: dict[str, float] | None,
) -> optuna.Trial | None:
    """Start the next trial if the study has a free slot, else None.

    A slot is taken by every complete, pruned or running trial. Under the journal's claim lock the
    count is exact; with an RDB shared by several machines two workers may claim the last slot at
    once, and the one whose trial has the higher number records it as a failed ``surplus`` trial
    without evaluating it."""
    with _claim_lock(lock):
        fail_dead_trials(study, storage, include_unowned=lock is not None)
        if _count(study, CLAIMED) >= n_trials:
            return None
        if defaults is not None and not study.get_trials(deepcopy=False):
            study.enqueue_trial(defaults, user_attrs={"baseline": True})
        study.sampler = _sampler(seed, _count(study, FINISHED), startup_trials)
        with warnings.catch_warnings():
            # Optuna warns that its heartbeat needs Study.optimize; run_worker records it itself
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            trial = study.ask(distributions)
        for key, value in _owner().items():
            trial.set_user_attr(key, value)
    ahead = [t for t in study.get_trials(deepcopy=False, states=CLAIMED) if t.number < trial.number]
    if len(ahead) >= n_trials:
        trial.set_user_attr("surplus", True)
        study.tell(trial, state=TrialState.FAIL)
        return None
    return trial


def _reporter(trial: optuna.Trial) -> Report:
    def report(steps_done: int, value: float, final: bool = False) -> None:
        trial.report(value, steps_done)
        if not final and trial.should_prune():
            raise optuna.TrialPruned(f"select mIoU {value:.2f} after {steps_done} steps")

    return report


def run_worker(
    study: optuna.Study,
    storage,
    objective: Objective,
    distributions: dict[str, FloatDistribution],
    n_trials: int,
    seed: int = 0,
    startup_trials: int = 5,
    lock: Path | None = None,
    defaults: dict[str, float] | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Run trials until the study holds ``n_trials`` finished ones; returns what this worker did.

    A trial whose training diverges (``FloatingPointError``) is failed and the worker goes on; any
    other exception fails the trial and stops the worker."""
    done = {"complete": 0, "pruned": 0, "failed": 0}
    bar = tqdm(
        total=n_trials,
        initial=min(_count(study, FINISHED), n_trials),
        desc=f"tune {study.study_name}",
        unit="trial",
        disable=None if progress else True,
    )
    with bar:
        while (trial := claim_trial(study, storage, distributions, n_trials, seed, startup_trials, lock, defaults)) is not None:
            try:
                with _heartbeat(storage, trial):
                    value = objective(dict(trial.params), _reporter(trial))
            except optuna.TrialPruned:
                study.tell(trial, state=TrialState.PRUNED)
                done["pruned"] += 1
            except FloatingPointError as error:
                trial.set_user_attr("failed_because", str(error))
                study.tell(trial, state=TrialState.FAIL)
                done["failed"] += 1
            except BaseException as error:
                trial.set_user_attr("failed_because", f"{type(error).__name__}: {error}")
                study.tell(trial, state=TrialState.FAIL)
                raise
            else:
                study.tell(trial, value)
                done["complete"] += 1
            bar.n = min(_count(study, FINISHED), n_trials)
            best = _best_trial(study)
            bar.set_postfix(best=f"{best.value:.2f}" if best else "-", pruned=_count(study, (TrialState.PRUNED,)))
    return done


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


# ------------------------------------------------------------------------------------------------
# the training objective


class TrainingObjective:
    """Train ``run`` with the trial's weights; the value is the final target-select mIoU.

    Every select evaluation is reported, those before the last to the pruner. The run never
    evaluates target test."""

    def __init__(self, run: RunConfig, progress: bool = True, warm_start_dir: Path | None = None):
        if run.settings.eval.interval <= 0:
            raise ConfigError(
                f"profiles.{run.profile}.eval.interval is {run.settings.eval.interval}: tuning scores the "
                "target-select mIoU, so it must be > 0"
            )
        self.run = run
        self.progress = progress
        self.warm_start_dir = warm_start_dir

    def __call__(self, params: dict[str, float], report: Report) -> float:
        from benchmark import train

        run = dataclasses.replace(self.run, method_params={**self.run.method_params, **params})
        steps = run.settings.optim.steps

        def on_select(steps_done: int, miou: float) -> None:
            report(steps_done, miou, final=steps_done >= steps)

        extra = {} if self.warm_start_dir is None else {"warm_start_dir": self.warm_start_dir}
        result = train._train_steps(run, progress=self.progress, description="trial", on_select=on_select, **extra)
        return result["select_curve"][-1][1]


# ------------------------------------------------------------------------------------------------
# results


def trials_table(study: optuna.Study):
    """One row per trial: number, state, value, parameters, owner and the reported select curve."""
    import pandas as pd

    rows = []
    for trial in study.get_trials(deepcopy=False):
        duration = (
            (trial.datetime_complete - trial.datetime_start).total_seconds()
            if trial.datetime_complete and trial.datetime_start
            else None
        )
        rows.append(
            {
                "number": trial.number,
                "state": trial.state.name,
                "value": trial.value,
                **{f"params_{k}": v for k, v in trial.params.items()},
                "baseline": bool(trial.user_attrs.get("baseline", False)),
                "duration_s": None if duration is None else round(duration, 2),
                "host": trial.user_attrs.get("host"),
                "pid": trial.user_attrs.get("pid"),
                "failed_because": trial.user_attrs.get("failed_because"),
                "select_curve": json.dumps(sorted(trial.intermediate_values.items())),
            }
        )
    return pd.DataFrame(rows)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def history_figure(study: optuna.Study) -> bytes:
    """Left: the value of every finished trial and the best so far; right: the select curves, pruned
    trials dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    figure, (history, curves) = plt.subplots(1, 2, figsize=(11, 4))
    history.scatter([t.number for t in complete], [t.value for t in complete], label="complete", color="tab:blue")
    last_pruned = [(t.number, t.intermediate_values[max(t.intermediate_values)]) for t in pruned if t.intermediate_values]
    if last_pruned:
        history.scatter(*zip(*last_pruned), marker="x", color="tab:red", label="pruned (last report)")
    baseline = [t for t in complete if t.user_attrs.get("baseline")]
    if baseline:
        history.axhline(baseline[0].value, color="gray", linestyle=":", label="baseline (configured weights)")
    best, best_so_far = -np.inf, []
    for trial in sorted(complete, key=lambda t: t.number):
        best = max(best, trial.value)
        best_so_far.append((trial.number, best))
    if best_so_far:
        history.step(*zip(*best_so_far), where="post", color="tab:green", label="best so far")
    history.set_xlabel("trial")
    history.set_ylabel("target-select mIoU")
    history.set_title("optimisation history")
    history.legend(fontsize=8)
    for trial in complete + pruned:
        points = sorted(trial.intermediate_values.items())
        if points:
            style = "-" if trial.state == TrialState.COMPLETE else "--"
            curves.plot(*zip(*points), style, marker=".", alpha=0.7)
    curves.set_xlabel("training steps")
    curves.set_ylabel("target-select mIoU")
    curves.set_title("select curves (dashed: pruned)")
    figure.suptitle(study.study_name)
    data = _png(figure)
    plt.close(figure)
    return data


def importance_figure(importances: dict[str, float], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(importances)[::-1]
    figure, axes = plt.subplots(figsize=(6, 0.5 * len(names) + 1.5))
    axes.barh(names, [importances[n] for n in names], color="tab:blue")
    axes.set_xlabel("importance (fANOVA, share of the value's variance)")
    axes.set_title(title)
    data = _png(figure)
    plt.close(figure)
    return data


def write_results(study: optuna.Study, out: Path, meta: dict) -> dict | None:
    """``best.yaml``, ``trials.csv``, ``history.png`` and (with two or more complete trials)
    ``importances.png`` in ``out``; returns the content of best.yaml (None without a complete trial)."""
    out = Path(out)
    write_bytes_atomic(out / "trials.csv", trials_table(study).to_csv(index=False).encode())
    best = _best_trial(study)
    if best is None:
        return None
    counts = {
        name: _count(study, (state,))
        for name, state in (("complete", TrialState.COMPLETE), ("pruned", TrialState.PRUNED), ("failed", TrialState.FAIL))
    }
    durations = [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in study.get_trials(deepcopy=False)
        if t.datetime_complete and t.datetime_start
    ]
    baseline = next((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.user_attrs.get("baseline")), None)
    summary = {
        **meta,
        "study": study.study_name,
        "objective": "target_select mIoU after the last step (maximised); target_test is never read",
        "trials": counts,
        "trial_time_s": round(sum(durations), 1),
        "best_trial": best.number,
        "best_select_miou": round(best.value, 4),
        "baseline_select_miou": None if baseline is None else round(baseline.value, 4),
        "params": {name: float(value) for name, value in best.params.items()},
    }
    text = "# Written by benchmark/tune.py; `train.py --tuned` applies `params` as method overrides.\n"
    write_bytes_atomic(out / "best.yaml", (text + yaml.safe_dump(summary, sort_keys=False)).encode())
    write_bytes_atomic(out / "history.png", history_figure(study))
    if counts["complete"] >= 2:
        importances = optuna.importance.get_param_importances(study)
        title = f"parameter importance, {study.study_name} ({counts['complete']} complete trials)"
        write_bytes_atomic(out / "importances.png", importance_figure(importances, title))
    return summary


def tuned_overrides(best_yaml: Path | str, benchmark: str, method: str) -> list[str]:
    """``method.<name>=<value>`` overrides from a ``best.yaml`` written for this benchmark and method."""
    path = Path(best_yaml)
    if not path.is_file():
        raise ConfigError(
            f"{path}: no tuned weights; make them with "
            f"`python benchmark/tune.py --benchmark {benchmark} --method {method}`"
        )
    best = load_yaml(path)
    for key, expected in (("benchmark", benchmark), ("method", method)):
        if best.get(key) != expected:
            raise ConfigError(f"{path}: {key} is {best.get(key)!r}, this run's is {expected!r}")
    params = best.get("params")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{path}: `params` must be a non-empty mapping of tuned values")
    from methods import method_class

    known = {f.name for f in dataclasses.fields(method_class(method).Params)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"{path}: params.{unknown[0]} is not a hyperparameter of {method}")
    return [f"method.{name}={value!r}" for name, value in params.items()]


# ------------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", required=True, help="a benchmark in params.yaml, e.g. mini-gta2cs")
    parser.add_argument("--method", required=True, help="a registered method with a search_space, e.g. daformer")
    parser.add_argument("--trials", type=int, default=None, help="finished trials the study ends with (default: tune.trials)")
    parser.add_argument("--sampler-seed", type=int, default=None, help="TPE seed (default: tune.sampler_seed)")
    parser.add_argument("--profile", default=None, help="profile in params.yaml (default: its `profile` key)")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="parameter file")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run overrides after tune.overrides")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default results/tuning/B/M)")
    parser.add_argument("--storage", default=None, help="journal file or SQLAlchemy URL (default OUT/study.journal)")
    parser.add_argument("--study-name", default=None, help="study in the storage (default PROFILE/B/M)")
    parser.add_argument("--heartbeat", type=int, default=60, help="seconds between heartbeats on an RDB storage")
    parser.add_argument("--warm-start-dir", type=Path, default=None, help="cache of shared warm starts")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    from benchmark.profiles import method_params, resolve

    try:
        config = load_tune_config(args.params)
        n_trials = config.trials if args.trials is None else args.trials
        seed = config.sampler_seed if args.sampler_seed is None else args.sampler_seed
        if n_trials < 1:
            raise ConfigError(f"tune.trials must be >= 1, got {n_trials}")
        run = resolve(args.params, args.benchmark, args.method, config.train_seed, args.profile, config.overrides + args.set)
        distributions = search_distributions(args.method)
        out = args.out or study_dir(args.benchmark, args.method)
        storage_spec = args.storage or out / "study.journal"
        storage = open_storage(storage_spec, args.heartbeat)
        lock = None if "://" in str(storage_spec) else Path(f"{storage_spec}.claims.lock")
        name = args.study_name or f"{run.profile}/{args.benchmark}/{args.method}"
        min_resource = config.min_resource or run.settings.eval.interval
        study = open_study(storage, name, objective_identity(run, distributions), config.reduction_factor, min_resource)
        objective = TrainingObjective(run, progress=not args.no_progress, warm_start_dir=args.warm_start_dir)
        params = method_params(run)
        defaults = {n: float(getattr(params, n)) for n in distributions} if config.enqueue_defaults else None
        done = run_worker(
            study, storage, objective, distributions, n_trials, seed, config.startup_trials, lock, defaults,
            progress=not args.no_progress,
        )
        meta = {"benchmark": args.benchmark, "method": args.method, "profile": run.profile,
                "train_seed": run.seed, "steps": run.settings.optim.steps, "storage": describe_storage(storage_spec)}
        summary = write_results(study, out, meta)
    except (ConfigError, DatasetFormatError) as error:
        print(f"tune.py: error: {error}", file=sys.stderr)
        return 2
    if summary is None:
        print(f"tune.py: error: study {name!r} has no complete trial", file=sys.stderr)
        return 1
    print(json.dumps({
        "study": name, "this_worker": done, "study_trials": summary["trials"],
        "best_select_miou": summary["best_select_miou"], "baseline_select_miou": summary["baseline_select_miou"],
        "params": summary["params"], "wall_time_s": round(time.perf_counter() - started, 1), "out": str(out),
    }))
    return 0


if __name__ == "__main__":
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("DVCLIVE_LOGLEVEL", "WARNING")
    sys.exit(main())
