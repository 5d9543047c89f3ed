"""Train one ablation variant declared in ``params.yaml`` under ``ablations.variants``.

    python benchmark/ablate.py --variant daformer~no_class_mix --benchmark mini-gta2cs --seed 0
    python benchmark/ablate.py --variant daformer~no_class_mix --benchmark mini-gta2cs --all-seeds

A variant is named ``<method>~<name>`` and maps to the settings it changes, as nested mappings of the
keys ``train.py --set`` takes (``method.*``, ``optim.*``, ``eval.*``, ``data.*``, ...)::

    ablations:
      benchmarks: [mini-gta2cs]
      seeds: [0, 1, 2]
      variants:
        daformer~no_class_mix: {method: {class_mix: false}}
        daformer~long_schedule: {optim: {steps: 600}}

Running it is exactly ``train.py --benchmark B --method <method> --seed S --set <changes>`` with the
record written to ``results/runs/B/<method>~<name>/seedS/``, beside the full method's runs; the
ablation tables (``benchmark/aggregate.py``) compare the two seed by seed. ``--all-seeds`` runs every
seed of ``ablations.seeds`` side by side, one process each (``benchmark/launch.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmark import launch
from benchmark.config import ConfigError, load_yaml

REPO = Path(__file__).resolve().parents[1]
#: Separates a method from the name of its ablation variant: ``daformer~no_class_mix``.
VARIANT_SEPARATOR = "~"


def split_variant(name: str, where: str = "ablations.variants") -> tuple[str, str]:
    """``"daformer~no_class_mix"`` -> ("daformer", "no_class_mix"); any other shape is a ConfigError."""
    method, separator, variant = str(name).partition(VARIANT_SEPARATOR)
    if not separator or not method or not variant or VARIANT_SEPARATOR in variant or "/" in str(name):
        raise ConfigError(
            f"{where}: variant name {name!r} must be <method>{VARIANT_SEPARATOR}<name>, e.g. daformer~no_class_mix"
        )
    return method, variant


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: ``{"method": {"class_mix": False}}`` -> ``{"method.class_mix": False}``
    (an empty mapping stays a value)."""
    if isinstance(value, Mapping) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def variant_overrides(document: Mapping[str, Any], name: str) -> tuple[str, list[str]]:
    """The method of variant ``name`` and its changes as ``train.py --set`` overrides."""
    variants = (document.get("ablations") or {}).get("variants") or {}
    if name not in variants:
        known = ", ".join(sorted(variants)) or "none"
        raise ConfigError(f"unknown ablation variant {name!r}; ablations.variants in params.yaml: {known}")
    method, _ = split_variant(name)
    changes = variants[name]
    if not isinstance(changes, Mapping) or not changes:
        raise ConfigError(
            f"ablations.variants.{name}: expected the settings it changes as a mapping, "
            f"e.g. {{method: {{class_mix: false}}}}, got {changes!r}"
        )
    return method, [f"{key}={json.dumps(value)}" for key, value in flatten(changes).items()]


def main(argv: list[str] | None = None) -> int:
    from benchmark import train

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", required=True, help="a key of ablations.variants, e.g. daformer~no_class_mix")
    parser.add_argument("--benchmark", required=True, help="a benchmark in params.yaml, e.g. mini-gta2cs")
    launch.add_seed_arguments(parser, "ablations")
    parser.add_argument("--profile", default=None, help="profile in params.yaml (default: its `profile` key)")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="parameter file")
    parser.add_argument("--runs", type=Path, default=REPO / "results" / "runs", help="where run folders go")
    parser.add_argument("--warm-start-dir", type=Path, default=REPO / "results" / "warm_start", help="cache of shared warm starts")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        method, overrides = variant_overrides(load_yaml(args.params), args.variant)
        if args.all_seeds:
            seeds, jobs = launch.grid_seeds(args.params, "ablations"), launch.grid_jobs(args.params, args.jobs)
    except ConfigError as error:
        print(f"ablate.py: error: {error}", file=sys.stderr)
        return 2
    if args.all_seeds:
        shared = ["--variant", args.variant, "--benchmark", args.benchmark, "--params", str(args.params)]
        shared += ["--runs", str(args.runs), "--warm-start-dir", str(args.warm_start_dir), "--no-progress"]
        if args.profile:
            shared += ["--profile", args.profile]
        commands = launch.seed_children(Path(__file__), main, {seed: [*shared, "--seed", str(seed)] for seed in seeds})
        return launch.run_seeds(commands, jobs, progress=not args.no_progress, label=f"{args.variant} on {args.benchmark}")
    out = args.runs / args.benchmark / args.variant / f"seed{args.seed}"
    train_args = [
        "--benchmark", args.benchmark, "--method", method, "--seed", str(args.seed),
        "--params", str(args.params), "--out", str(out), "--warm-start-dir", str(args.warm_start_dir),
        "--set", *overrides,
    ]  # fmt: skip
    if args.profile:
        train_args += ["--profile", args.profile]
    if args.no_progress:
        train_args.append("--no-progress")
    return train.main(train_args)


if __name__ == "__main__":
    import os

    os.environ.setdefault("DVCLIVE_LOGLEVEL", "WARNING")
    sys.exit(main())
