"""Is the embedded benchmark a real adaptation problem? Train source-only, DAFormer, HRDA and the
target oracle on both mini benchmarks for several seeds and print the table.

    python benchmark/adaptation_gap.py                      # 3 seeds, both mini benchmarks
    python benchmark/adaptation_gap.py --seeds 0 --benchmarks mini-gta2cs --set optim.steps=200

Criteria (the training issue's acceptance): target-test mIoU of source-only at most 80% of the
oracle's; DAFormer closes at least 40% of the source-only -> oracle gap on the seed mean, with a gain
over source-only larger than twice the seed standard deviation. The shared warm starts are trained
first, so each run's wall time is its own; the median wall time of every adapting method's runs is
printed (``benchmark/step_time.py`` compares step times in one process).
Records go to ``--out`` (default ``results/adaptation_gap``), one folder per run. With ``--records
DIR`` nothing is trained: the table is made from finished records ``DIR/<benchmark>/<method>/seed<k>/
metrics.json``, e.g. those `dvc repro` wrote to ``results/runs``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmark.profiles import resolve
from benchmark.train import REPO, ensure_warm_start, train

METHODS = ("source_only", "daformer", "hrda", "target_oracle")
#: The acceptance criteria compare DAFormer with the two bounds.
GAP_METHODS = ("source_only", "daformer", "target_oracle")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmarks", nargs="+", default=["mini-gta2cs", "mini-synthia2cs"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=None, help=f"default: {' '.join(METHODS)}")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "adaptation_gap")
    parser.add_argument("--records", type=Path, default=None, help="read finished records here instead of training")
    args = parser.parse_args(argv)

    results: dict[tuple[str, str], list[dict]] = {}
    if args.records is not None:
        if args.methods is None:
            # by default tabulate the methods that have records; a method asked for by name must have them all
            args.methods = [m for m in METHODS if any((args.records / b / m).is_dir() for b in args.benchmarks)]
            left_out = sorted(set(METHODS) - set(args.methods))
            if left_out:
                print(f"no records of {', '.join(left_out)} under {args.records}: left out", file=sys.stderr)
        for benchmark in args.benchmarks:
            for method in args.methods:
                for seed in args.seeds:
                    path = args.records / benchmark / method / f"seed{seed}" / "metrics.json"
                    if not path.is_file():
                        print(f"adaptation_gap.py: error: {path} not found", file=sys.stderr)
                        return 2
                    results.setdefault((benchmark, method), []).append(json.loads(path.read_text()))
    args.methods = args.methods or list(METHODS)
    for benchmark in args.benchmarks if args.records is None else []:
        for seed in args.seeds:
            run = resolve(args.params, benchmark, "source_only", seed, overrides=args.set)
            if run.settings.warm_start.steps > 0:
                started = time.perf_counter()
                ensure_warm_start(run, progress=False)
                print(f"warm start {benchmark} seed {seed}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
            for method in args.methods:
                run = resolve(args.params, benchmark, method, seed, overrides=args.set)
                record = train(run, args.out / benchmark / method / f"seed{seed}", progress=False)
                headline = "miou19" if "miou19" in record else "miou16"
                print(
                    f"{benchmark} {method} seed {seed}: {headline} {record[headline]:.2f} "
                    f"({record['wall_time_s']:.1f} s)",
                    file=sys.stderr,
                )
                results.setdefault((benchmark, method), []).append(record)

    print(f"\n| benchmark | metric | {' | '.join(args.methods)} | SO/oracle | gap closed | gain / (2 std) |")
    print(f"|---|---|{'---|' * len(args.methods)}---|---|---|")
    verdicts = []
    for benchmark in args.benchmarks:
        headline = "miou19" if "miou19" in results[(benchmark, args.methods[0])][0] else "miou16"
        stats = {m: _mean_std([r[headline] for r in results[(benchmark, m)]]) for m in args.methods}
        cells = " | ".join(f"{mean:.2f} ± {std:.2f}" for mean, std in stats.values())
        if set(GAP_METHODS) <= set(args.methods):
            source, adapted, oracle = (stats[m] for m in GAP_METHODS)
            ratio = source[0] / oracle[0]
            closed = (adapted[0] - source[0]) / (oracle[0] - source[0])
            spread = 2 * max(source[1], adapted[1])
            gain_ratio = (adapted[0] - source[0]) / spread if spread > 0 else float("inf")
            verdicts.append((benchmark, ratio <= 0.8, closed >= 0.4, gain_ratio > 1))
            extra = f"{ratio:.2f} | {100 * closed:.0f}% | {gain_ratio:.1f}"
        else:
            extra = "- | - | -"
        print(f"| {benchmark} | {headline} (n={len(args.seeds)}) | {cells} | {extra} |")
    print()
    for method in [m for m in args.methods if m not in ("source_only", "target_oracle")]:
        times = [r["wall_time_s"] for (b, m), records in results.items() if m == method for r in records]
        print(f"{method} run wall time: median {statistics.median(times):.1f} s over {len(times)} runs")
    for benchmark, ratio_ok, closed_ok, gain_ok in verdicts:
        print(
            f"{benchmark}: source-only <= 80% of oracle: {'yes' if ratio_ok else 'NO'}; "
            f"DAFormer closes >= 40% of the gap: {'yes' if closed_ok else 'NO'}; "
            f"gain > 2 std: {'yes' if gain_ok else 'NO'}"
        )
    summary = {
        f"{b}/{m}": [r.get("miou19", r.get("miou16")) for r in records] for (b, m), records in results.items()
    }
    if args.records is None:
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
