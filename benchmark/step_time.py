"""Training-step time of methods relative to each other, measured in one process.

    python benchmark/step_time.py --benchmark mini-gta2cs --methods daformer hrda
    python benchmark/step_time.py --benchmark mini-gta2cs --methods daformer hrda --steps 20 --warmup 3

Each method is built as the training loop builds it (``benchmark/train.py``: its data at the method's
own scales, so HRDA draws its crops at twice the benchmark's resolution; its samplers, loaders and
optimiser), and takes ``--warmup`` untimed and ``--steps`` timed steps. The methods' steps are
interleaved, alternating which one goes first, so that load on the machine from elsewhere falls on all
of them alike. A step is the loop's work per iteration once its batches are drawn: the method's
losses, backward, the optimiser step and the EMA update; taking the batches is timed apart
(``benchmark/cost.py`` reports it as the data loader's share). The models start from the weights
their runs start from (the profile's warm start), so that pseudo-labels select as many target cells
as in a run; their steps are numbered from the middle of the run on, where every loss term is active. Prints every method's median step time and its ratio to the
first method's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from benchmark.config import ConfigError
from benchmark.distributed import World
from benchmark.profiles import method_params, resolve
from benchmark.train import (
    REPO,
    WARM_START_DIR,
    _batches,
    _on_device,
    build_model,
    build_optimizer,
    ensure_warm_start,
    load_warm_start,
    method_settings,
    placed,
    training_data,
)
from methods import Method, method_class


@dataclass
class Contender:
    """One method as the training loop runs it: its optimiser and its two batch streams."""

    name: str
    method: Method
    optimizer: torch.optim.Optimizer
    source_batches: Iterator
    target_batches: Iterator
    device: torch.device
    #: The step number of the first timed round (mid-run, see ``build_contenders``).
    first_step: int = 0


def build_contenders(
    params: dict | Path | str,
    benchmark: str,
    methods: list[str],
    seed: int = 0,
    profile: str | None = None,
    overrides: list[str] | None = None,
    device: torch.device | None = None,
    warm_start_dir: Path = WARM_START_DIR,
    progress: bool = True,
) -> list[Contender]:
    """Every method of ``methods`` built as ``train.py`` builds it, from the weights its run starts
    from: the profile's shared source-only warm start where it has one (trained into
    ``warm_start_dir`` first if it is not cached there, as the first run would). Its steps are
    numbered from the middle of its run on, where every loss term is active (SePiCo's contrast starts
    after 7.5% of the run) and the step is the one the run mostly takes.

    The weights matter to the step's cost: a teacher at random weights is confident nowhere, so the
    pseudo-labels that select PiPa's and SePiCo's target cells are all ignored and those terms skip
    most of their work; from the warm start they do what they do in a run."""
    world = World() if device is None else World(device=device)
    contenders = []
    for name in methods:
        resolved = resolve(params, benchmark, name, seed, profile, overrides)
        run = method_settings(resolved)
        method_cls, hyper = method_class(name), method_params(run)
        source, source_sampler, target, target_sampler = training_data(run, method_cls.uses_target_labels, hyper)
        warm_start = None
        if run.settings.warm_start.steps > 0:
            # keyed on the benchmark's own run (HRDA shares daformer's warm start, as in train.py);
            # training one sets the profile's thread count, the caller's is kept for the measurement
            threads = torch.get_num_threads()
            warm_start = ensure_warm_start(resolved, progress, warm_start_dir)
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        model = build_model(run)
        if warm_start is not None:
            load_warm_start(model, warm_start)
        method = placed(method_cls(model, hyper, seed=seed, total_steps=run.settings.optim.steps), world.device)
        method.train()
        contenders.append(
            Contender(
                name,
                method,
                build_optimizer(method, run.settings),
                _batches(source, source_sampler, run.settings, 0, world),
                _batches(target, target_sampler, run.settings, 0, world),
                world.device,
                run.settings.optim.steps // 2,
            )
        )
    return contenders


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: The parts of a training iteration a breakdown reports (``StageTimer``, ``timed_parts``), each the
#: step hooks it times (``DAFormer.step`` calls them in this order; HRDA and the add-ons keep it):
#: the teacher's pass and pseudo-labels, the mixed batch, the student's joint pass over its inputs,
#: the add-ons' own terms. ``losses`` is the rest of ``Method.step`` (the source and mixed losses, and
#: the whole step of a method without these hooks); then backward, optimiser and EMA teacher update.
STEP_PARTS: dict[str, tuple[str, ...]] = {
    "teacher": ("teacher_pass", "target_pseudo_labels"),
    "mix": ("mixed_batch",),
    "student": ("student_inputs", "joint_student_pass"),
    "addon": ("addon_losses",),
}
PARTS = ("data", *STEP_PARTS, "losses", "backward", "optimizer", "ema")


class StageTimer:
    """Seconds a method spends in each part of ``STEP_PARTS`` during one step.

    It wraps the hooks on the method instance (its class and other instances are untouched): the
    outermost call of a hook is timed, so a hook that calls another, or itself through ``super()``,
    is counted once. ``take()`` returns the seconds per part since the last ``take()`` and resets them.
    """

    def __init__(self, method: Method, device: torch.device):
        self.device = device
        self._seconds: dict[str, float] = {}
        self._depth = 0
        for part, hooks in STEP_PARTS.items():
            for name in hooks:
                hook = getattr(method, name, None)
                if callable(hook):
                    setattr(method, name, self._timed(part, hook))

    def _timed(self, part: str, hook):
        def timed(*args, **kwargs):
            if self._depth:
                return hook(*args, **kwargs)
            self._depth += 1
            _synchronise(self.device)
            started = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                _synchronise(self.device)
                self._seconds[part] = self._seconds.get(part, 0.0) + time.perf_counter() - started
                self._depth -= 1

        return timed

    def take(self) -> dict[str, float]:
        seconds, self._seconds = {part: self._seconds.get(part, 0.0) for part in STEP_PARTS}, {}
        return seconds


def timed_parts(contender: Contender, index: int, stages: StageTimer | None = None) -> dict[str, float]:
    """One training iteration of ``contender`` (step ``first_step + index`` of its run), in seconds
    per part of ``PARTS``: waiting for its batches (drawn ahead by its loaders), the step's stages
    (timed by ``stages``, a ``StageTimer`` of the contender's method; without it ``losses`` is the
    whole of ``Method.step``), backward, optimiser step and EMA update."""
    step = contender.first_step + index
    method, device = contender.method, contender.device
    _synchronise(device)
    clock = [time.perf_counter()]

    def lap() -> float:
        _synchronise(device)
        clock.append(time.perf_counter())
        return clock[-1] - clock[-2]

    source = _on_device(next(contender.source_batches), device)
    target = _on_device(next(contender.target_batches), device)
    data = lap()
    losses = method.step(source, target, step)
    stepping = lap()
    contender.optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    backward = lap()
    contender.optimizer.step()
    optimizer = lap()
    if method.teacher is not None:
        method.teacher.update(method.model, step)
    ema = lap()
    seconds = stages.take() if stages is not None else {part: 0.0 for part in STEP_PARTS}
    # the stages are timed inside the step; float rounding must not make the rest negative
    seconds["losses"] = max(0.0, stepping - sum(seconds.values()))
    return {"data": data, **seconds, "backward": backward, "optimizer": optimizer, "ema": ema}


def timed_step(contender: Contender, index: int) -> tuple[float, float]:
    """One training iteration of ``contender`` (``timed_parts``): seconds waiting for its batches,
    seconds of its step (losses, backward, optimiser step, EMA update)."""
    parts = timed_parts(contender, index)
    data = parts.pop("data")
    return data, sum(parts.values())


def interleaved(contenders: list[Contender], rounds: int, progress: bool = True, description: str = "step time"):
    """``(round, contender)`` for every round and contender, the order reversed every other round."""
    for step in tqdm(range(rounds), desc=description, disable=None if progress else True, leave=False):
        for contender in contenders if step % 2 == 0 else contenders[::-1]:
            yield step, contender


def measure(
    params: dict | Path | str,
    benchmark: str,
    methods: list[str],
    steps: int = 20,
    warmup: int = 3,
    seed: int = 0,
    profile: str | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
    warm_start_dir: Path = WARM_START_DIR,
) -> dict[str, list[float]]:
    """Seconds of each of ``steps`` timed training steps per method, after ``warmup`` untimed ones."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    contenders = build_contenders(
        params, benchmark, methods, seed, profile, overrides, warm_start_dir=warm_start_dir, progress=progress
    )
    times: dict[str, list[float]] = {name: [] for name in methods}
    for step, contender in interleaved(contenders, warmup + steps, progress):
        _, seconds = timed_step(contender, step)
        if step >= warmup:
            times[contender.name].append(seconds)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", default="mini-gta2cs")
    parser.add_argument("--methods", nargs="+", default=["daformer", "hrda"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per method first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        times = measure(
            args.params, args.benchmark, args.methods, args.steps, args.warmup, args.seed, args.profile, args.set,
            progress=not args.no_progress,
        )
    except (ConfigError, ValueError) as error:
        print(f"step_time.py: error: {error}", file=sys.stderr)
        return 2
    reference = statistics.median(times[args.methods[0]])
    threads = torch.get_num_threads()
    print(f"{args.benchmark}: {args.steps} timed steps per method after {args.warmup} untimed, {threads} threads")
    for name in args.methods:
        median = statistics.median(times[name])
        print(f"{name}: median {median:.3f} s/step, {median / reference:.2f}x {args.methods[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
