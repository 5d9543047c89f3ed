"""A tuning worker process with a cheap, injected objective (used by tests/test_tune.py).

    python tests/tune_worker.py --storage STUDY.journal --trials 10 --log EVALUATED.jsonl

The objective is a smooth function of two parameters that reports two intermediate values, so the
sampler, the pruner and the bookkeeping of slots work exactly as with training. Every evaluation is
appended to ``--log``; ``--kill-at K`` makes the process kill itself (SIGKILL, no clean-up) as its
K-th evaluation starts, as a worker killed by the machine would. With ``--barrier DIR --workers N``
the process starts working only once N workers are ready, so that they really run side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import optuna
from optuna.distributions import FloatDistribution

from benchmark import tune

DISTRIBUTIONS = {"weight": FloatDistribution(0.1, 10.0, log=True), "threshold": FloatDistribution(0.0, 1.0)}
DEFAULTS = {"weight": 1.0, "threshold": 0.5}


def value_of(params: dict[str, float]) -> float:
    return 50.0 - 10.0 * abs(params["weight"] - 2.0) - 20.0 * (params["threshold"] - 0.7) ** 2


def make_objective(log: Path | None = None, sleep_s: float = 0.0, kill_at: int | None = None,
                   interrupt_at: int | None = None):
    evaluations = 0

    def objective(params: dict[str, float], report) -> float:
        nonlocal evaluations
        evaluations += 1
        if kill_at is not None and evaluations == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if interrupt_at is not None and evaluations == interrupt_at:
            raise KeyboardInterrupt
        if log is not None:
            with open(log, "a") as handle:
                handle.write(json.dumps({"pid": os.getpid(), "params": params}) + "\n")
        value = value_of(params)
        for steps_done in (1, 2):
            time.sleep(sleep_s / 3)
            report(steps_done, value * steps_done / 3)
        time.sleep(sleep_s / 3)
        report(3, value, final=True)
        return value

    return objective


def work(storage_spec: str, trials: int, seed: int = 0, objective=None, heartbeat_s: int = 60,
         study_name: str = "cheap") -> dict[str, int]:
    storage = tune.open_storage(storage_spec, heartbeat_s)
    study = tune.open_study(storage, study_name, {"objective": "cheap"}, reduction_factor=3, min_resource=1)
    lock = None if "://" in storage_spec else Path(f"{storage_spec}.claims.lock")
    return tune.run_worker(
        study, storage, objective or make_objective(), DISTRIBUTIONS, trials, seed=seed,
        startup_trials=3, lock=lock, defaults=DEFAULTS, progress=False,
    )


def wait_for_workers(barrier: Path, workers: int, timeout_s: float = 120.0) -> None:
    barrier.mkdir(parents=True, exist_ok=True)
    (barrier / f"{os.getpid()}.ready").touch()
    deadline = time.monotonic() + timeout_s
    while len(list(barrier.glob("*.ready"))) < workers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(barrier.glob('*.ready')))} of {workers} workers came up")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--storage", required=True)
    parser.add_argument("--trials", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", type=Path, default=None)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--heartbeat", type=int, default=60)
    parser.add_argument("--barrier", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.barrier is not None:
        wait_for_workers(args.barrier, args.workers)
    objective = make_objective(args.log, args.sleep, args.kill_at)
    print(json.dumps(work(args.storage, args.trials, args.seed, objective, args.heartbeat)))


if __name__ == "__main__":
    main()
