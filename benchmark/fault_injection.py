"""Fault injection: kill a training run with SIGKILL at random steps, restart it each time with the
same command, and check that its record equals the record of an uninterrupted run.

    python benchmark/fault_injection.py                      # 5 kills of a short DAFormer run
    python benchmark/fault_injection.py --kills 10 --method source_only --set optim.steps=100

It trains the run once without interruption, then again in another folder, killing the process
``--kills`` times, each time once its DVCLive log shows it has reached the next of ``--kills`` distinct
steps drawn at random (seeded by ``--seed``), and starting it again until it finishes. Every key of
the two ``metrics.json`` must be equal except ``wall_time_s``; the exit status is 0 if they are.
Processes inherit this environment (set ``OMP_NUM_THREADS`` here to pin the thread count: results on
the CPU depend on it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: A short run that still has every piece of state: DAFormer from scratch (no warm start), select
#: evaluations, a checkpoint every 5 steps and a log line every step (the kills are timed by it).
DEFAULT_SETTINGS = [
    "optim.steps=60", "optim.warmup_steps=10", "warm_start.steps=0", "eval.interval=20",
    "checkpoint_interval=5", "log_interval=1",
]  # fmt: skip


def _last_logged_step(log: Path, since: float) -> int:
    """The last step in a DVCLive metric file written after ``since`` (-1 if none yet)."""
    try:
        if log.stat().st_mtime < since:
            return -1
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return -1
    return int(lines[-1].split("\t")[0]) if len(lines) > 1 else -1


def _resumed_step(stderr: str) -> int:
    for line in stderr.splitlines():
        if "resuming from" in line:
            return int(line.rsplit("at step", 1)[1])
    return 0


def _environment() -> dict[str, str]:
    """This checkout's harness code first on the path, whatever is installed."""
    path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def _start(command: list[str], log_file: Path) -> subprocess.Popen:
    with open(log_file, "w") as stderr:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPO, env=_environment())


def run_with_faults(command: list[str], out: Path, kill_steps: list[int], logs: Path, poll_s: float = 0.01) -> list[dict]:
    """Run ``command`` (writing to ``out``) and SIGKILL it once it has logged each of ``kill_steps``;
    restart it after every kill and let the last start finish. Returns what happened per start."""
    lr_log = out / "dvclive" / "plots" / "metrics" / "train" / "lr.tsv"
    attempts = []
    for attempt, target in enumerate([*kill_steps, None]):
        log_file = logs / f"attempt{attempt}.log"
        started = time.time()
        process = _start(command, log_file)
        killed_at = None
        if target is not None:
            while process.poll() is None:
                step = _last_logged_step(lr_log, started)
                if step >= target:
                    process.send_signal(signal.SIGKILL)
                    killed_at = step
                    break
                time.sleep(poll_s)
        process.wait()
        stderr = log_file.read_text()
        if target is not None and killed_at is None:
            raise RuntimeError(f"attempt {attempt} ended (status {process.returncode}) before step {target}:\n{stderr}")
        if target is None and process.returncode != 0:
            raise RuntimeError(f"the last attempt failed with status {process.returncode}:\n{stderr}")
        attempts.append(
            {"attempt": attempt, "resumed_from": _resumed_step(stderr), "killed_at": killed_at, "seconds": time.time() - started}
        )
    return attempts


def compare(reference: dict, record: dict, ignore: tuple[str, ...] = ("wall_time_s",)) -> list[str]:
    """Keys whose values differ between two records (besides ``ignore``)."""
    keys = (set(reference) | set(record)) - set(ignore)
    return sorted(key for key in keys if reference.get(key) != record.get(key))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", default="mini-gta2cs")
    parser.add_argument("--method", default="daformer")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--kill-seed", type=int, default=0, help="seed of the random kill steps")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--set", nargs="*", default=DEFAULT_SETTINGS, metavar="KEY=VALUE", help="train.py overrides")
    parser.add_argument("--workdir", type=Path, default=None, help="where the two runs go (default: a temporary folder)")
    args = parser.parse_args(argv)

    steps = next((int(s.split("=", 1)[1]) for s in args.set if s.startswith("optim.steps=")), None)
    if steps is None:
        parser.error("--set must give optim.steps (the kills are drawn below it)")
    if not 0 < args.kills < steps:
        parser.error(f"--kills must be between 1 and {steps - 1}")
    kill_steps = sorted(random.Random(args.kill_seed).sample(range(1, steps), args.kills))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fault_injection_"))
    workdir.mkdir(parents=True, exist_ok=True)

    def command(out: Path) -> list[str]:
        return [
            sys.executable, str(REPO / "benchmark" / "train.py"), "--params", str(args.params),
            "--benchmark", args.benchmark, "--method", args.method, "--seed", str(args.seed),
            "--out", str(out), "--no-progress", "--set", *args.set,
        ]  # fmt: skip

    print(f"run: {args.method} on {args.benchmark}, seed {args.seed}, {' '.join(args.set)}")
    kept = "" if args.workdir else " (deleted if the records match)"
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; work folder: {workdir}{kept}")
    started = time.time()
    reference = subprocess.run(
        command(workdir / "uninterrupted"), capture_output=True, text=True, cwd=REPO, env=_environment(), check=False
    )
    if reference.returncode != 0:
        print(reference.stderr, file=sys.stderr)
        return 2
    print(f"uninterrupted run: {time.time() - started:.1f} s")
    print(f"kill steps (random, seed {args.kill_seed}): {kill_steps}")
    attempts = run_with_faults(command(workdir / "faulty"), workdir / "faulty", kill_steps, workdir)
    for a in attempts:
        end = f"SIGKILL after step {a['killed_at']} was logged" if a["killed_at"] is not None else "finished"
        print(f"  start {a['attempt'] + 1}: from step {a['resumed_from']:>3} -> {end} ({a['seconds']:.1f} s)")

    expected = json.loads((workdir / "uninterrupted" / "metrics.json").read_text())
    record = json.loads((workdir / "faulty" / "metrics.json").read_text())
    differing = compare(expected, record)
    headline = [key for key in ("miou19", "miou16", "miou13", "select_miou") if key in expected]
    for key in headline:
        print(f"  {key}: uninterrupted {expected[key]}, killed {args.kills} times {record[key]}")
    print(f"  keys compared: {len(set(expected) - {'wall_time_s'})} (all but wall_time_s), per-class IoUs: {len(expected['per_class_iou'])}")
    if differing:
        print(f"DIFFERENT: {', '.join(differing)}")
        return 1
    print(f"IDENTICAL: the record after {args.kills} SIGKILLs and restarts equals the uninterrupted one")
    if args.workdir is None:
        shutil.rmtree(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
