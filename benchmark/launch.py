"""Run the seeds of one grid cell side by side, one process per seed.

A CPU training step at the embedded profile runs on one thread (``threads: 1``, which keeps runs
bit-reproducible), so one run uses one core. ``train.py --all-seeds`` and ``ablate.py --all-seeds``
start one child process per seed of the grid (``train.seeds`` or ``ablations.seeds`` in params.yaml)
and keep at most ``jobs`` of them running (``train.jobs``; 0: every seed at once). The figures do not
depend on ``jobs``: every run still has its own seed, thread count and checkpoint; only the wall time
of each run grows when more runs than cores share the machine.

A child is either a command (a new Python process) or a function run in a forked copy of the
launcher (``os.fork``, where the platform has it). Forking skips the child's imports of torch, timm and
the harness, several CPU-seconds per run that a grid of short runs on a small machine would otherwise
spend again for every seed; the run itself is the same code on the same arguments, so its figures are
those of a new process (tested). The launcher forks before it has started any thread of its own or run
any tensor operation.

Each child's output is collected and printed, prefixed with its seed, when it ends, so the lines of
different runs never interleave. A failing run does not stop the others (their records are written);
the launcher then exits with the first failure's status and names the failed seeds.
"""

from __future__ import annotations

import functools
import os
import selectors
import subprocess
import sys
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from benchmark.config import ConfigError, load_yaml


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


#: What a child runs: a command (argv of a new process) or a function (in a forked copy of this
#: process; its return value or ``SystemExit`` code is the exit status).
Child = Sequence[str] | Callable[[], int | None]


@dataclass
class _Running:
    seed: int
    pipe: int  # read end of the child's stdout and stderr
    finish: Callable[[], int]  # closes the pipe, waits for the child, returns its exit status
    chunks: list[bytes] = field(default_factory=list)


def _exit_status(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message") prints it and fails, as the interpreter does
    return 1


def _forked(function: Callable[[], int | None], write: int) -> None:
    """In the forked child: run ``function`` with stdout and stderr on ``write``; never returns."""
    status = 1
    try:
        os.dup2(write, 1)
        os.dup2(write, 2)
        os.close(write)
        # fresh writers on the new descriptors: the inherited ones may write elsewhere (a test's capture)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 (flushed below, the descriptor outlives it)
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        status = _exit_status(function())
    except SystemExit as exit:
        status = _exit_status(exit.code)
    except BaseException:  # noqa: BLE001 (whatever the run raised, the child reports it and exits)
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


def _start(seed: int, child: Child, env: Mapping[str, str]) -> _Running:
    if callable(child):
        sys.stdout.flush()  # nothing buffered in this process may be written twice
        sys.stderr.flush()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            _forked(child, write)
        os.close(write)

        def finish_fork() -> int:
            os.close(read)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

        return _Running(seed, read, finish_fork)
    process = subprocess.Popen(list(child), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def finish_process() -> int:
        process.stdout.close()
        return process.wait()

    return _Running(seed, process.stdout.fileno(), finish_process)


def run_seeds(
    commands: Mapping[int, Child],
    jobs: int,
    progress: bool = True,
    label: str = "runs",
    stream=None,
) -> int:
    """Run ``commands`` (seed -> command or function, ``Child``), at most ``jobs`` at once (0: all at
    once); 0 if every one succeeded, else the first failure's exit status (after every run has ended)."""
    stream = stream or sys.stdout
    if not commands:
        return 0
    workers = len(commands) if jobs == 0 else min(jobs, len(commands))
    env = dict(os.environ)
    waiting = deque(commands.items())
    failed: list[tuple[int, int]] = []
    bar = tqdm(total=len(commands), desc=f"{label} ({workers} at once)", unit="run", disable=None if progress else True)
    with selectors.DefaultSelector() as selector:
        while waiting or selector.get_map():
            while waiting and len(selector.get_map()) < workers:
                running = _start(*waiting.popleft(), env)
                selector.register(running.pipe, selectors.EVENT_READ, running)
            for key, _ in selector.select():
                running = key.data
                data = os.read(running.pipe, 1 << 16)
                if data:
                    running.chunks.append(data)
                    continue
                selector.unregister(running.pipe)
                status = running.finish()
                out = stream if status == 0 else sys.stderr
                bar.clear()
                for line in b"".join(running.chunks).decode(errors="replace").splitlines():
                    print(f"[seed {running.seed}] {line}", file=out)
                out.flush()
                bar.update(1)
                if status != 0:
                    failed.append((running.seed, status))
    bar.close()
    if failed:
        failed.sort()
        seeds = ", ".join(str(seed) for seed, _ in failed)
        print(f"{label}: seed(s) {seeds} failed; the other runs wrote their records", file=sys.stderr)
        return failed[0][1]
    return 0


def can_fork() -> bool:
    """Whether children can be forked copies of this process (POSIX); else they are new processes."""
    return hasattr(os, "fork")


def child_command(script: Path, argv: Sequence[str]) -> list[str]:
    return [sys.executable, str(script), *argv]


def seed_children(
    script: Path, main: Callable[[list[str]], int | None], argvs: Mapping[int, Sequence[str]]
) -> dict[int, Child]:
    """Per seed, ``main(argv)`` in a forked copy of this process where the platform can fork, else
    ``python script argv`` in a new process: the same run either way."""
    if can_fork():
        return {seed: functools.partial(main, list(argv)) for seed, argv in argvs.items()}
    return {seed: child_command(script, argv) for seed, argv in argvs.items()}
