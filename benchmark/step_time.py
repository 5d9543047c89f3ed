"""Training-step time of methods relative to each other, measured in one process.

    python benchmark/step_time.py --benchmark mini-gta2cs --methods daformer hrda
    python benchmark/step_time.py --benchmark mini-gta2cs --methods daformer hrda --steps 20 --warmup 3

Each method is built as the training loop builds it, at its own data scales (HRDA draws its crops at
twice the benchmark's resolution), and takes ``--warmup`` untimed and ``--steps`` timed steps. The
methods' steps are interleaved, alternating which one goes first, so that load on the machine from
elsewhere falls on all of them alike. A step is the loop's work per iteration once its batches are
drawn: the method's losses, backward, the optimiser step and the EMA update. Batches are drawn
beforehand, so data loading is not timed, and the models keep their initial weights (the step's cost
does not depend on them). Prints every method's median step time and its ratio to the first method's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from benchmark.config import ConfigError
from benchmark.data import Augment, InfiniteSampler, SegmentationDataset
from benchmark.profiles import RunConfig, method_params, resolve
from benchmark.train import REPO, build_model, method_settings
from methods import Batch, method_class


def _batches(run: RunConfig, with_target_labels: bool, count: int) -> list[tuple[Batch, Batch]]:
    """``count`` (source, target) batches of the run's crops, uniformly sampled."""
    data, size = run.data, run.settings.optim.batch_size
    domains = [
        SegmentationDataset(data.source.root, "source_train", augment=Augment(scale=data.source.scale, crop=data.crop)),
        SegmentationDataset(
            data.target.root,
            "target_train",
            with_labels=with_target_labels,
            augment=Augment(scale=data.target.scale, crop=data.crop),
        ),
    ]
    requests = [iter(InfiniteSampler(len(dataset), run.seed + i)) for i, dataset in enumerate(domains)]
    batches = []
    for _ in range(count):
        pair = []
        for dataset, stream in zip(domains, requests):
            items = [dataset[next(stream)] for _ in range(size)]
            labels = torch.stack([item["label"] for item in items]) if "label" in items[0] else None
            pair.append(Batch(torch.stack([item["image"] for item in items]), labels))
        batches.append(tuple(pair))
    return batches


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
) -> dict[str, list[float]]:
    """Seconds of each of ``steps`` timed training steps per method, after ``warmup`` untimed ones."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    contenders = []
    for name in methods:
        run = method_settings(resolve(params, benchmark, name, seed, profile, overrides))
        method_cls = method_class(name)
        torch.manual_seed(seed)
        method = method_cls(build_model(run), method_params(run), seed=seed)
        method.train()
        optimizer = torch.optim.AdamW(
            [{"params": group["params"]} for group in method.parameter_groups() if group["params"]],
            lr=run.settings.optim.lr,
            weight_decay=run.settings.optim.weight_decay,
        )
        contenders.append((name, method, optimizer, _batches(run, method_cls.uses_target_labels, warmup + steps)))
    times: dict[str, list[float]] = {name: [] for name in methods}
    for step in tqdm(range(warmup + steps), desc="step time", disable=None if progress else True, leave=False):
        for name, method, optimizer, batches in contenders if step % 2 == 0 else contenders[::-1]:
            source, target = batches[step]
            started = time.perf_counter()
            losses = method.step(source, target, step)
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
            if method.teacher is not None:
                method.teacher.update(method.model, step)
            if step >= warmup:
                times[name].append(time.perf_counter() - started)
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
