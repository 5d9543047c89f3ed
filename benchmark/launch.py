"""Run the seeds of one grid cell side by side, one process per seed.

A CPU training step at the embedded profile runs on one thread (``threads: 1``, which keeps runs
bit-reproducible), so one run uses one core. ``train.py --all-seeds`` and ``ablate.py --all-seeds``
start one child process per seed of the grid (``train.seeds`` or ``ablations.seeds`` in params.yaml)
and keep at most ``jobs`` of them running (``train.jobs``; 0: every seed at once). The figures do not
depend on ``jobs``: every run still has its own seed, thread count and checkpoint; only the wall time
of each run grows when more runs than cores share the machine.

Each child's output is collected and printed, prefixed with its seed, when it ends, so the lines of
different runs never interleave. A failing run does not stop the others (their records are written);
the launcher then exits with the first failure's status and names the failed seeds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from benchmark.config import ConfigError, load_yaml


@dataclass(frozen=True)
class Finished:
    seed: int
    returncode: int
    output: str


def add_seed_arguments(parser, section: str) -> None:
    """``--seed``, ``--all-seeds`` (every seed of ``<section>.seeds``) and ``--jobs`` of a run script."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--all-seeds", action="store_true",
        help=f"every seed of params.yaml {section}.seeds, one process each, side by side (benchmark/launch.py)",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=None, help="with --all-seeds: runs at once (default train.jobs; 0: all)")


def grid_seeds(params: Path, section: str) -> list[int]:
    """The seed list ``<section>.seeds`` of params.yaml, checked: non-empty, integers, no repeats."""
    seeds = (load_yaml(params).get(section) or {}).get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{params}: {section}.seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{params}: {section}.seeds repeats a seed: {seeds}")
    return seeds


def grid_jobs(params: Path, requested: int | None) -> int:
    """``requested`` if given, else params.yaml ``train.jobs`` (default 0); 0 means one process per seed."""
    jobs = requested if requested is not None else (load_yaml(params).get("train") or {}).get("jobs", 0)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 0:
        raise ConfigError(f"train.jobs (or --jobs) must be an integer >= 0 (0: one process per seed), got {jobs!r}")
    return jobs


def _run_child(seed: int, argv: Sequence[str], env: Mapping[str, str]) -> Finished:
    done = subprocess.run(list(argv), check=False, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return Finished(seed, done.returncode, done.stdout)


def run_seeds(
    commands: Mapping[int, Sequence[str]],
    jobs: int,
    progress: bool = True,
    label: str = "runs",
    stream=None,
) -> int:
    """Run ``commands`` (seed -> argv), at most ``jobs`` at once (0: all at once); 0 if every one
    succeeded, else the first failure's exit status (after every run has ended)."""
    stream = stream or sys.stdout
    if not commands:
        return 0
    workers = len(commands) if jobs == 0 else min(jobs, len(commands))
    env = dict(os.environ)
    lock = threading.Lock()
    failed: list[Finished] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_run_child, seed, argv, env) for seed, argv in commands.items()]
        bar = tqdm(total=len(futures), desc=f"{label} ({workers} at once)", unit="run", disable=None if progress else True)
        for future in as_completed(futures):
            finished = future.result()
            out = stream if finished.returncode == 0 else sys.stderr
            with lock:
                bar.clear()
                for line in finished.output.splitlines():
                    print(f"[seed {finished.seed}] {line}", file=out)
                out.flush()
                bar.update(1)
            if finished.returncode != 0:
                failed.append(finished)
        bar.close()
    if failed:
        failed.sort(key=lambda finished: finished.seed)
        seeds = ", ".join(str(finished.seed) for finished in failed)
        print(f"{label}: seed(s) {seeds} failed; the other runs wrote their records", file=sys.stderr)
        return failed[0].returncode
    return 0


def child_command(script: Path, argv: Sequence[str]) -> list[str]:
    return [sys.executable, str(script), *argv]
