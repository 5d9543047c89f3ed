"""Train one method on one benchmark with one seed, evaluate it, and write its run record.

    python benchmark/train.py --benchmark mini-gta2cs --method daformer --seed 0
    python benchmark/train.py --benchmark mini-gta2cs --method daformer --seed 0 --set optim.steps=200 method.mix_weight=0.5

The loop reads top to bottom: build data, model and method; for each step draw a source and a target
batch, let the method compute its named losses, sum them, backward, step the optimiser at the
learning rate of ``learning_rate(step)`` (a pure function of the step), update the EMA teacher, log.
Target ``select`` is evaluated every ``eval.interval`` steps (the curve), target ``test`` once at the
end (the leaderboard). The run record ``metrics.json`` is written last and atomically: a failed run
leaves none.

With ``warm_start.steps > 0`` (the embedded profile) every method starts from one source-only model
per benchmark and seed, trained once and cached under ``results/warm_start/``: the embedded stand-in
for the ImageNet weights that every method shares at paper scale.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from benchmark.classes import CLASSES, NUM_CLASSES
from benchmark.config import ConfigError, to_mapping
from benchmark.data import Augment, InfiniteSampler, RareClassSampler, SegmentationDataset
from benchmark.formats import DatasetFormatError, write_bytes_atomic
from benchmark.metrics import evaluate, protocol_mious
from benchmark.models import build_segmentor
from benchmark.profiles import RunConfig, method_params, resolve
from methods import Batch, method_class

REPO = Path(__file__).resolve().parents[1]
RECORD_VERSION = 1


def learning_rate(step: int, base_lr: float, warmup_steps: int, total_steps: int, power: float = 1.0) -> float:
    """Polynomial decay with linear warm-up, as DAFormer's schedule (mmcv ``poly`` + linear warm-up):

        lr(t) = base_lr * (1 - t / T)^power * w(t),  w(t) = r + (1 - r) * t / t_w for t < t_w, else 1

    with warm-up ratio r = 1e-6, t_w = ``warmup_steps`` and T = ``total_steps``.
    """
    decay = (1.0 - min(step, total_steps) / total_steps) ** power
    if step < warmup_steps:
        ratio = 1e-6
        return base_lr * decay * (ratio + (1.0 - ratio) * step / warmup_steps)
    return base_lr * decay


def _infinite(loader: DataLoader):
    while True:
        yield from loader


def _loader(dataset, sampler, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=True,
    )


def _eval_loader(run: RunConfig, split: str) -> DataLoader:
    dataset = SegmentationDataset(
        run.data.target.root, split, eval_scale=run.data.test_scale, cache=run.data.cache
    )
    return DataLoader(dataset, batch_size=run.settings.eval.batch_size, num_workers=run.settings.workers)


def _evaluate(model, loader, run: RunConfig):
    settings = run.settings.eval
    return evaluate(model, loader, NUM_CLASSES, mode=settings.mode, window=settings.window, stride=settings.stride)


def build_model(run: RunConfig) -> torch.nn.Module:
    model_config = run.settings.model
    return build_segmentor(
        model_config.encoder,
        model_config.head,
        NUM_CLASSES,
        model_config.embed_dim,
        pretrained_path=model_config.pretrained,
    )


def split_hashes(run: RunConfig) -> dict[str, str]:
    """The content hash of every manifest the run reads (DESIGN.md section 3)."""
    from benchmark.manifests import load_manifest

    hashes = {"source_train": load_manifest(run.data.source.root, "source_train").content_hash}
    for split in ("target_train", "target_select", "target_test"):
        hashes[split] = load_manifest(run.data.target.root, split).content_hash
    return hashes


def combined_hash(hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# the warm start


WARM_START_DIR = REPO / "results" / "warm_start"


def warm_start_path(run: RunConfig, directory: Path = WARM_START_DIR) -> Path:
    """Where the shared source-only warm start of this benchmark and seed is cached; the name holds
    a hash of everything it depends on, so a changed setting never reuses a stale one."""
    warm = warm_start_config(run)
    depends_on = {
        "seed": run.seed,
        "model": to_mapping(warm.settings.model),
        "optim": to_mapping(warm.settings.optim),
        "data": to_mapping(run.data),
        "splits": split_hashes(run),
    }
    digest = hashlib.sha256(json.dumps(depends_on, sort_keys=True).encode()).hexdigest()[:12]
    return Path(directory) / run.profile / run.benchmark / f"seed{run.seed}-{digest}.pt"


def warm_start_config(run: RunConfig) -> RunConfig:
    """The source-only run that makes the warm start."""
    from dataclasses import replace

    warm = run.settings.warm_start
    optim = replace(run.settings.optim, steps=warm.steps, lr=warm.lr, warmup_steps=warm.warmup_steps)
    settings = replace(run.settings, optim=optim, warm_start=replace(warm, steps=0), checkpoint_interval=0)
    settings = replace(settings, eval=replace(settings.eval, interval=0))
    return replace(run, method="source_only", settings=settings, method_params={})


def ensure_warm_start(run: RunConfig, progress: bool = True, directory: Path = WARM_START_DIR) -> Path:
    path = warm_start_path(run, directory)
    if path.is_file():
        return path
    state = _train_steps(warm_start_config(run), progress=progress, description="warm start")["model_state"]
    buffer = _serialise({"kind": "uda-seg-bench warm start", "model": state})
    write_bytes_atomic(path, buffer)
    return path


def _serialise(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def load_warm_start(model: torch.nn.Module, path: Path) -> None:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") != "uda-seg-bench warm start":
        raise DatasetFormatError(f"{path}: not a warm-start checkpoint of this harness")
    model.load_state_dict(checkpoint["model"])


# ------------------------------------------------------------------------------------------------
# the loop


def _train_steps(
    run: RunConfig,
    progress: bool = True,
    description: str = "train",
    live=None,
    checkpoint: Path | None = None,
    warm_start_dir: Path = WARM_START_DIR,
) -> dict:
    """Train ``run`` from its initial weights; returns the method and the final model state.

    Every ``checkpoint_interval`` steps the whole training state (method with teacher, optimiser,
    sampler and generator states) is written atomically to ``checkpoint``.
    """
    torch.manual_seed(run.seed)
    method_cls = method_class(run.method)
    params = method_params(run)
    data, settings = run.data, run.settings

    source = SegmentationDataset(
        data.source.root,
        "source_train",
        augment=Augment(scale=data.source.scale, crop=data.crop),
        min_crop_class_pixels=int(data.rcs_min_pixels * data.rcs_min_crop_ratio),
        cache=data.cache,
    )
    target = SegmentationDataset(
        data.target.root,
        "target_train",
        with_labels=method_cls.uses_target_labels,
        augment=Augment(scale=data.target.scale, crop=data.crop),
        cache=data.cache,
    )
    # distinct, seed-derived streams for the two samplers
    source_seed, target_seed = np.random.SeedSequence([run.seed, 1]).generate_state(2)
    if params.rare_class_sampling:
        source_sampler = RareClassSampler(source.manifest, params.rcs_temperature, data.rcs_min_pixels, int(source_seed))
    else:
        source_sampler = InfiniteSampler(len(source), int(source_seed))
    target_sampler = InfiniteSampler(len(target), int(target_seed))
    batch_size = settings.optim.batch_size
    source_batches = _infinite(_loader(source, source_sampler, batch_size, settings.workers))
    target_batches = _infinite(_loader(target, target_sampler, batch_size, settings.workers))

    model = build_model(run)
    if settings.warm_start.steps > 0:
        load_warm_start(model, ensure_warm_start(run, progress, warm_start_dir))
    method = method_cls(model, params, seed=run.seed, total_steps=settings.optim.steps)
    method.train()
    groups = method.parameter_groups()
    head_mult = settings.optim.head_lr_mult
    for group in groups:
        group["lr_mult"] = head_mult if group["role"] == "head" else 1.0
    optimizer = torch.optim.AdamW(
        [{"params": g["params"], "lr_mult": g["lr_mult"]} for g in groups if g["params"]],
        lr=settings.optim.lr,
        weight_decay=settings.optim.weight_decay,
    )
    select_loader = _eval_loader(run, "target_select") if settings.eval.interval > 0 else None
    # the global generator drives dropout; re-seed it so a run that first had to train its warm start
    # continues exactly as one that loaded it from the cache
    torch.manual_seed(run.seed)
    steps = settings.optim.steps
    warmup = settings.optim.warmup_steps if params.lr_warmup else 0
    select_curve: list[tuple[int, float]] = []
    bar = tqdm(range(steps), desc=f"{description} {run.method} {run.benchmark} seed {run.seed}", disable=None if progress else True, leave=False)
    for step in bar:
        lr = learning_rate(step, settings.optim.lr, warmup, steps, settings.optim.poly_power)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        source_batch, target_batch = next(source_batches), next(target_batches)
        losses = method.step(
            Batch(source_batch["image"], source_batch["label"]),
            Batch(target_batch["image"], target_batch.get("label")),
            step,
        )
        total = sum(losses.values())
        if not torch.isfinite(total):
            bad = [name for name, value in losses.items() if not torch.isfinite(value)]
            raise FloatingPointError(f"{run.method}: non-finite loss at step {step} in term(s) {', '.join(bad)}")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if method.teacher is not None:
            method.teacher.update(method.model, step)

        if step % settings.log_interval == 0 or step == steps - 1:
            values = {name: float(value.detach()) for name, value in losses.items()}
            bar.set_postfix({name: f"{v:.3f}" for name, v in values.items()}, refresh=False)
            if live is not None:
                live.step = step
                for name, value in values.items():
                    live.log_metric(f"train/{name}", value)
                live.log_metric("train/lr", lr)
        if select_loader is not None and ((step + 1) % settings.eval.interval == 0 or step == steps - 1):
            per_class = _evaluate(method.model, select_loader, run).named_per_class_iou()
            miou = _headline(per_class, run)
            select_curve.append((step + 1, miou))
            if live is not None:
                live.step = step
                live.log_metric("select/miou", miou)
            method.train()
        if checkpoint is not None and settings.checkpoint_interval and (step + 1) % settings.checkpoint_interval == 0:
            state = {
                "kind": "uda-seg-bench checkpoint",
                "step": step + 1,
                "method": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "samplers": [source_sampler.state_dict(), target_sampler.state_dict()],
                "method_generator": method.generator.get_state(),
                "select_curve": select_curve,
            }
            write_bytes_atomic(checkpoint, _serialise(state))
    return {"method": method, "model_state": method.model.state_dict(), "select_curve": select_curve}


def _headline(per_class: dict[str, float], run: RunConfig) -> float:
    """The protocol's first mIoU (mIoU19 for gta2cs, mIoU16 for synthia2cs)."""
    return next(iter(protocol_mious(per_class, run.data.protocol).values()))


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "timm", "numpy", "opencv-python-headless", "pillow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _clean(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 4)


def train(run: RunConfig, out: Path | str, progress: bool = True, warm_start_dir: Path = WARM_START_DIR) -> dict:
    """Train, evaluate on target_test and write ``out/metrics.json``; returns the record."""
    from dvclive import Live

    out = Path(out)
    started = time.perf_counter()
    hashes = split_hashes(run)
    (out / "metrics.json").unlink(missing_ok=True)  # never leave a stale record beside a new run
    with Live(str(out / "dvclive"), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        result = _train_steps(
            run, progress=progress, live=live, checkpoint=out / "checkpoint.pt", warm_start_dir=warm_start_dir
        )
        method = result["method"]
        test = _evaluate(method.model, _eval_loader(run, "target_test"), run)
    per_class = test.named_per_class_iou()
    record = {
        "record_version": RECORD_VERSION,
        "benchmark": run.benchmark,
        "method": run.method,
        "seed": run.seed,
        "profile": run.profile,
        "per_class_iou": {name: _clean(per_class[name]) for name in CLASSES},
        **{name: _clean(value) for name, value in protocol_mious(per_class, run.data.protocol).items()},
        "select_miou": _clean(result["select_curve"][-1][1]) if result["select_curve"] else None,
        "select_curve": [[step, _clean(m)] for step, m in result["select_curve"]],
        "test_inference": run.settings.eval.mode,
        "split_hash": combined_hash(hashes),
        "split_hashes": hashes,
        "steps": run.settings.optim.steps,
        "wall_time_s": round(time.perf_counter() - started, 2),
        "config": to_mapping(run),
        "versions": _versions(),
        "git_commit": _git_commit(),
    }
    write_bytes_atomic(out / "metrics.json", (json.dumps(record, indent=1) + "\n").encode())
    return record


def default_out(run: RunConfig) -> Path:
    return REPO / "results" / "runs" / run.benchmark / run.method / f"seed{run.seed}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", required=True, help="a benchmark in params.yaml, e.g. mini-gta2cs")
    parser.add_argument("--method", default="source_only", help="a registered method, e.g. daformer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", default=None, help="profile in params.yaml (default: its `profile` key)")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="parameter file")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. optim.steps=100")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default results/runs/B/M/seedS)")
    parser.add_argument("--warm-start-only", action="store_true", help="only make the shared warm start")
    parser.add_argument("--warm-start-dir", type=Path, default=WARM_START_DIR, help="cache of shared warm starts")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        run = resolve(args.params, args.benchmark, args.method, args.seed, args.profile, args.set)
        if args.warm_start_only:
            if run.settings.warm_start.steps <= 0:
                raise ConfigError(f"profile {run.profile} has no warm start (warm_start.steps is 0)")
            print(ensure_warm_start(run, progress=not args.no_progress, directory=args.warm_start_dir))
            return 0
        record = train(
            run, args.out or default_out(run), progress=not args.no_progress, warm_start_dir=args.warm_start_dir
        )
    except (ConfigError, DatasetFormatError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    headline = {k: record[k] for k in ("miou19", "miou16", "miou13") if k in record}
    print(json.dumps({"benchmark": run.benchmark, "method": run.method, "seed": run.seed, **headline, "wall_time_s": record["wall_time_s"]}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("DVCLIVE_LOGLEVEL", "WARNING")
    sys.exit(main())
