"""Train one method on one benchmark with one seed, evaluate it, and write its run record.

    python benchmark/train.py --benchmark mini-gta2cs --method daformer --seed 0
    python benchmark/train.py --benchmark mini-gta2cs --method daformer --seed 0 --set optim.steps=200 method.mix_weight=0.5
    python benchmark/train.py --benchmark mini-gta2cs --method daformer --seed 0 --tuned   # weights from benchmark/tune.py
    python benchmark/train.py --benchmark mini-gta2cs --method daformer --all-seeds   # train.seeds side by side
    torchrun --nproc-per-node=4 benchmark/train.py --benchmark gta2cs --method daformer --seed 0 --profile paper

The loop reads top to bottom: build data, model and method; for each step draw a source and a target
batch, let the method compute its named losses, sum them, backward, step the optimiser at the
learning rate of ``learning_rate(step)`` (a pure function of the step), update the EMA teacher, log.
Target ``select`` is evaluated every ``eval.interval`` steps (the curve), target ``test`` once at the
end (the leaderboard). The run record ``metrics.json`` is written last and atomically: a failed run
(a non-finite loss stops it, naming the method, the step and the loss term) leaves none.

Every ``checkpoint_interval`` steps the whole training state is saved (``benchmark/checkpoint.py``,
outside the run folder by default: ``results/checkpoints/B/M/seedS/``, which ``dvc repro`` does not
delete). The same command started again after a kill, SIGKILL included, continues from it and writes
the record an uninterrupted run would have written; a checkpoint of another configuration, data or
code is not resumed (the run starts fresh and says so). Under ``torchrun`` the processes share every
step's batch (``benchmark/distributed.py``); process 0 logs and writes.

With ``warm_start.steps > 0`` (the embedded profile) every method starts from one source-only model
per benchmark and seed, trained once and cached under ``results/warm_start/``: the embedded stand-in
for the ImageNet weights that every method shares at paper scale.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from benchmark import checkpoint as checkpoints
from benchmark import distributed, launch
from benchmark.checkpoint import CheckpointError
from benchmark.classes import CLASSES, NUM_CLASSES
from benchmark.config import ConfigError, to_mapping
from benchmark.data import Augment, InfiniteSampler, Prefetcher, RareClassSampler, SegmentationDataset
from benchmark.distributed import BatchShare, World, process_seed
from benchmark.formats import DatasetFormatError, write_bytes_atomic
from benchmark.metrics import evaluate, protocol_mious
from benchmark.models import build_segmentor, classifier_state_keys, load_encoder_weights
from benchmark.profiles import RunConfig, check_files, method_params, resolve
from methods import Batch, Method, method_class

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


def _loader(dataset, sampler, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=True,
    )


def _batches(dataset, sampler, settings, start_step: int, world: World):
    """This process's share of every step's batch, from ``start_step`` on (``BatchShare``)."""
    batch_size = settings.optim.batch_size
    share = BatchShare(sampler, batch_size, world.rank, world.size, skip_steps=start_step)
    batches = iter(_loader(dataset, share, batch_size // world.size, settings.workers))
    # loader workers draw ahead in their own processes; without them a thread does (``Prefetcher``)
    return batches if settings.workers > 0 else Prefetcher(batches)


def placed(method: Method, device: torch.device) -> Method:
    """``method`` on ``device`` with its 4-D weights in the channels-last layout, so that convolutions
    keep their activations channels-last too: oneDNN's CPU convolutions then skip the reorder to and
    from their blocked layout around every call (the embedded daformer step 7% faster, measured side by
    side in one process), and GPU convolutions under mixed precision prefer it as well."""
    return method.to(device, memory_format=torch.channels_last)


def _on_device(samples: dict, device: torch.device) -> Batch:
    label = samples.get("label")
    return Batch(samples["image"].to(device), None if label is None else label.to(device))


def _eval_loader(run: RunConfig, split: str, world: World | None = None) -> DataLoader:
    """The split's images; with several processes, every ``world.size``-th image from ``world.rank``."""
    world = world or World()
    dataset = SegmentationDataset(
        run.data.target.root, split, eval_scale=run.data.test_scale, cache=run.data.cache
    )
    if world.distributed:
        dataset = torch.utils.data.Subset(dataset, range(world.rank, len(dataset), world.size))
    return DataLoader(dataset, batch_size=run.settings.eval.batch_size, num_workers=run.settings.workers)


def _evaluate(model, loader, run: RunConfig, world: World | None = None):
    """The confusion matrix over the whole split (each process's share, summed: exact counts)."""
    settings = run.settings.eval
    confusion = evaluate(model, loader, NUM_CLASSES, mode=settings.mode, window=settings.window, stride=settings.stride)
    (world or World()).sum_(confusion.matrix)
    return confusion


def method_settings(run: RunConfig) -> RunConfig:
    """The run as its method trains and tests it. A method that defines the class method
    ``run_settings(params, data, eval) -> (data, eval)`` trains and tests at its own data scales and
    test inference (HRDA: twice the benchmark's resolution, sliding windows); the shared warm start
    keeps the benchmark's own."""
    from dataclasses import replace

    adapt = getattr(method_class(run.method), "run_settings", None)
    if adapt is None:
        return run
    data, evaluation = adapt(method_params(run), run.data, run.settings.eval)
    return replace(run, data=data, settings=replace(run.settings, eval=evaluation))


def training_data(trained: RunConfig, with_target_labels: bool, params) -> tuple:
    """``(source, source_sampler, target, target_sampler)`` of a run at its method's data scales
    (``method_settings``): the source drawn by rare-class sampling when the method asks for it."""
    data = trained.data
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
        with_labels=with_target_labels,
        augment=Augment(scale=data.target.scale, crop=data.crop),
        cache=data.cache,
    )
    # distinct, seed-derived streams for the two samplers
    source_seed, target_seed = np.random.SeedSequence([trained.seed, 1]).generate_state(2)
    if params.rare_class_sampling:
        source_sampler = RareClassSampler(source.manifest, params.rcs_temperature, data.rcs_min_pixels, int(source_seed))
    else:
        source_sampler = InfiniteSampler(len(source), int(source_seed))
    target_sampler = InfiniteSampler(len(target), int(target_seed))
    return source, source_sampler, target, target_sampler


def build_optimizer(method, settings) -> torch.optim.Optimizer:
    """AdamW over the method's parameter groups, the head's at ``head_lr_mult`` times the rate (the
    loop sets every group's ``lr`` to ``learning_rate(step) * group["lr_mult"]``)."""
    groups = method.parameter_groups()
    head_mult = settings.optim.head_lr_mult
    for group in groups:
        group["lr_mult"] = head_mult if group["role"] == "head" else 1.0
    groups = [{"params": g["params"], "lr_mult": g["lr_mult"]} for g in groups if g["params"]]
    # the fused kernel makes the same update in one pass over all tensors (a third of the per-tensor
    # loop's time on the embedded model); it exists for CPU and CUDA tensors
    fused = all(p.device.type in ("cpu", "cuda") for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=settings.optim.lr, weight_decay=settings.optim.weight_decay, fused=fused)


def build_model(run: RunConfig) -> torch.nn.Module:
    """The run's segmentor, with ``model.drop_path_rate`` stochastic depth in its encoder, its
    BatchNorm layers on ``model.batch_norm_momentum`` when set and its encoder loaded from
    ``model.pretrained`` when set; a weights file that does not fit is a ``ConfigError`` naming the key."""
    model_config = run.settings.model
    # passed only when set: encoders without stochastic depth take no such argument
    encoder_kwargs = {"drop_path_rate": model_config.drop_path_rate} if model_config.drop_path_rate > 0 else {}
    model = build_segmentor(model_config.encoder, model_config.head, NUM_CLASSES, model_config.embed_dim, **encoder_kwargs)
    if model_config.batch_norm_momentum is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = model_config.batch_norm_momentum
    if model_config.pretrained is not None:
        try:
            load_encoder_weights(model.encoder, model_config.pretrained, model_keys=classifier_state_keys(model_config.encoder))
        except (OSError, ValueError) as error:
            raise ConfigError(f"profiles.{run.profile}.model.pretrained: {error}") from None
    return model


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
        "threads": run.settings.threads,
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


def ensure_warm_start(
    run: RunConfig, progress: bool = True, directory: Path = WARM_START_DIR, world: World | None = None
) -> Path:
    """The cached warm start of ``run``, trained first if missing (by this process alone)."""
    path = warm_start_path(run, directory)
    if path.is_file():
        return path
    alone = (world or World()).alone()
    state = _train_steps(warm_start_config(run), progress=progress, description="warm start", world=alone)["model_state"]
    write_bytes_atomic(path, checkpoints.to_bytes({"kind": checkpoints.WARM_START_KIND, "model": state}))
    return path


def load_warm_start(model: torch.nn.Module, path: Path) -> None:
    model.load_state_dict(checkpoints.load_trusted(path, checkpoints.WARM_START_KIND)["model"])


# ------------------------------------------------------------------------------------------------
# the loop


def _train_steps(
    run: RunConfig,
    progress: bool = True,
    description: str = "train",
    live=None,
    checkpoint: Path | None = None,
    warm_start_dir: Path = WARM_START_DIR,
    on_select: Callable[[int, float], None] | None = None,
    world: World | None = None,
    resume: dict | None = None,
    fingerprint: dict | None = None,
    started: float | None = None,
) -> dict:
    """Train ``run`` from its initial weights, or from ``resume`` (a checkpoint's state); returns the
    method, the final model state and the select curve.

    Every ``checkpoint_interval`` steps and after the last step the whole training state is written
    atomically to ``checkpoint`` with ``fingerprint`` (by process 0). ``started``: the
    ``time.perf_counter()`` reading the run's wall time counts from. ``on_select(steps_done,
    select_miou)`` is called after every select evaluation; tuning reports it to its pruner there, and
    an exception it raises (a pruned trial) ends the run.
    """
    world = world or World()
    started = time.perf_counter() if started is None else started
    if run.settings.threads > 0:
        torch.set_num_threads(run.settings.threads)
    torch.manual_seed(run.seed)
    method_cls = method_class(run.method)
    params = method_params(run)
    trained = method_settings(run)
    settings = trained.settings

    source, source_sampler, target, target_sampler = training_data(trained, method_cls.uses_target_labels, params)

    model = build_model(run)
    if settings.warm_start.steps > 0 and resume is None:
        if world.is_main:
            ensure_warm_start(run, progress, warm_start_dir, world)
        world.barrier()  # the other processes wait until process 0 has made it
        load_warm_start(model, warm_start_path(run, warm_start_dir))
    model = distributed.synchronise_batch_norm(model, world).to(world.device)
    method = method_cls(model, params, seed=process_seed(run.seed, world.rank), total_steps=settings.optim.steps)
    method = placed(method, world.device)
    method.train()
    optimizer = build_optimizer(method, settings)
    trained_parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    select_loader = _eval_loader(trained, "target_select", world) if settings.eval.interval > 0 else None
    steps = settings.optim.steps
    start_step, select_curve = 0, []
    if resume is not None:
        start_step = checkpoints.restore(resume, method, optimizer)
        select_curve = [tuple(point) for point in resume["select_curve"]]
    else:
        # the global generator drives dropout; re-seed it so a run that first had to train its warm
        # start continues exactly as one that loaded it from the cache
        torch.manual_seed(process_seed(run.seed, world.rank))
    world.broadcast_state(method)
    # creating a loader's iterator draws its base seed from the global generator: create them before
    # a resumed run puts the generators back where the checkpoint found them
    source_batches = _batches(source, source_sampler, settings, start_step, world)
    target_batches = _batches(target, target_sampler, settings, start_step, world)
    if resume is not None:
        checkpoints.set_rng_state(resume["rng"][world.rank], method.generator, world.device)

    warmup = settings.optim.warmup_steps if params.lr_warmup else 0
    bar = tqdm(
        range(start_step, steps),
        initial=start_step,
        total=steps,
        desc=f"{description} {run.method} {run.benchmark} seed {run.seed}",
        disable=None if progress and world.is_main else True,
        leave=False,
    )
    for step in bar:
        lr = learning_rate(step, settings.optim.lr, warmup, steps, settings.optim.poly_power)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        source_batch = _on_device(next(source_batches), world.device)
        target_batch = _on_device(next(target_batches), world.device)
        losses = method.step(source_batch, target_batch, step)
        terms = world.mean(torch.stack([value.detach().float() for value in losses.values()]))
        if not torch.isfinite(terms).all():
            bad = [name for name, value in zip(losses, terms) if not torch.isfinite(value)]
            raise FloatingPointError(f"{run.method}: non-finite loss at step {step} in term(s) {', '.join(bad)}")
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        world.average_gradients(trained_parameters)
        optimizer.step()
        world.average_buffers(method)
        if method.teacher is not None:
            method.teacher.update(method.model, step)

        if step % settings.log_interval == 0 or step == steps - 1:
            values = dict(zip(losses, terms.tolist()))
            bar.set_postfix({name: f"{v:.3f}" for name, v in values.items()}, refresh=False)
            if live is not None:
                live.step = step
                for name, value in values.items():
                    live.log_metric(f"train/{name}", value)
                live.log_metric("train/lr", lr)
        if select_loader is not None and ((step + 1) % settings.eval.interval == 0 or step == steps - 1):
            per_class = _evaluate(method.model, select_loader, trained, world).named_per_class_iou()
            miou = _headline(per_class, run)
            select_curve.append((step + 1, miou))
            if live is not None:
                live.step = step
                live.log_metric("select/miou", miou)
            method.train()
            if on_select is not None:
                on_select(step + 1, miou)
        interval = settings.checkpoint_interval
        if checkpoint is not None and interval and ((step + 1) % interval == 0 or step == steps - 1):
            rng = world.gather(checkpoints.rng_state(method.generator, world.device))
            if world.is_main:
                if live is not None:
                    live.make_summary()  # the log's summary file travels with the checkpoint too
                checkpoints.save(
                    checkpoint,
                    fingerprint=fingerprint,
                    step=step + 1,
                    method=method,
                    optimizer=optimizer,
                    rng=rng,
                    select_curve=select_curve,
                    log=checkpoints.read_log(live.dir) if live is not None else {},
                    wall_time_s=time.perf_counter() - started,
                )
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


def train(
    run: RunConfig,
    out: Path | str,
    progress: bool = True,
    warm_start_dir: Path = WARM_START_DIR,
    checkpoint: Path | str | None = None,
    world: World | None = None,
) -> dict | None:
    """Train, evaluate on target_test and write ``out/metrics.json``; returns the record (``None`` in
    processes other than process 0, which write nothing).

    ``checkpoint`` (default ``out/checkpoint.pt``): where the training state is saved. If it holds a
    checkpoint of this run (same configuration, data splits, code and number of processes), training
    continues from it, DVCLive log included; one of another run is replaced; a file that is not a
    checkpoint of this harness stops the run (``CheckpointError``). It is deleted once the record is
    written: a finished run needs none.
    """
    from dvclive import Live

    world = world or World()
    out = Path(out)
    checkpoint = Path(checkpoint) if checkpoint is not None else out / "checkpoint.pt"
    check_files(run)
    started = time.perf_counter()
    hashes = split_hashes(run)
    fingerprint = checkpoints.fingerprint(to_mapping(run), combined_hash(hashes), world.size)
    resume, message = checkpoints.resumable(checkpoint, fingerprint)
    if resume is not None:
        started -= resume["wall_time_s"]
    live = None
    if world.is_main:
        if message:
            print(f"train.py: {message}", file=sys.stderr)
        (out / "metrics.json").unlink(missing_ok=True)  # never leave a stale record beside a new run
        for path in (checkpoint, out / "metrics.json"):
            checkpoints.remove_stale_temporaries(path)
        if resume is not None:
            checkpoints.write_log(out / "dvclive", resume["log"])
        live = Live(str(out / "dvclive"), resume=resume is not None, save_dvc_exp=False, dvcyaml=None, report=None)
    with live if live is not None else contextlib.nullcontext():
        result = _train_steps(
            run,
            progress=progress,
            live=live,
            checkpoint=checkpoint,
            warm_start_dir=warm_start_dir,
            world=world,
            resume=resume,
            fingerprint=fingerprint,
            started=started,
        )
        method = result["method"]
        tested = method_settings(run)
        test = _evaluate(method.model, _eval_loader(tested, "target_test", world), tested, world)
    if not world.is_main:
        return None
    per_class = test.named_per_class_iou()
    record = {
        "record_version": RECORD_VERSION,
        "benchmark": run.benchmark,
        "method": run.method,
        "seed": run.seed,
        "threads": torch.get_num_threads(),  # CPU figures depend on it
        "profile": run.profile,
        "per_class_iou": {name: _clean(per_class[name]) for name in CLASSES},
        **{name: _clean(value) for name, value in protocol_mious(per_class, run.data.protocol).items()},
        "select_miou": _clean(result["select_curve"][-1][1]) if result["select_curve"] else None,
        "select_curve": [[step, _clean(m)] for step, m in result["select_curve"]],
        "test_inference": tested.settings.eval.mode,
        "test_scale": list(tested.data.test_scale),
        "split_hash": combined_hash(hashes),
        "split_hashes": hashes,
        "steps": run.settings.optim.steps,
        "processes": world.size,
        "device": world.device.type,
        "wall_time_s": round(time.perf_counter() - started, 2),
        "config": to_mapping(run),
        "versions": _versions(),
        "git_commit": _git_commit(),
    }
    write_bytes_atomic(out / "metrics.json", (json.dumps(record, indent=1) + "\n").encode())
    checkpoint.unlink(missing_ok=True)
    return record


def default_out(run: RunConfig) -> Path:
    return REPO / "results" / "runs" / run.benchmark / run.method / f"seed{run.seed}"


def default_checkpoint(run: RunConfig) -> Path:
    """Outside the run folder, which ``dvc repro`` deletes when it starts the stage again."""
    return REPO / "results" / "checkpoints" / run.benchmark / run.method / f"seed{run.seed}" / "checkpoint.pt"


def _train_all_seeds(args: argparse.Namespace) -> int:
    """``--all-seeds``: this command once per seed of ``train.seeds``, in child processes."""
    try:
        if args.out is not None or args.checkpoint is not None or args.warm_start_only:
            raise ConfigError("--all-seeds writes every run to its default folder: drop --out, --checkpoint and --warm-start-only")
        if distributed.launched_processes() > 1:
            raise ConfigError("--all-seeds starts its own processes: start it without torchrun")
        seeds, jobs = launch.grid_seeds(args.params, "train"), launch.grid_jobs(args.params, args.jobs)
        # resolving every seed first stops a bad method, benchmark or override before any process starts
        for seed in seeds:
            resolve(args.params, args.benchmark, args.method, seed, args.profile, list(args.set))
    except ConfigError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    shared = ["--benchmark", args.benchmark, "--method", args.method, "--params", str(args.params)]
    shared += ["--warm-start-dir", str(args.warm_start_dir)]
    if args.profile:
        shared += ["--profile", args.profile]
    if args.tuned is not None:
        shared += ["--tuned", args.tuned] if args.tuned else ["--tuned"]
    shared.append("--no-progress")  # a child's output is collected, not shown live; the launcher's bar counts runs
    if args.set:
        shared += ["--set", *args.set]
    commands = launch.seed_children(Path(__file__), main, {seed: ["--seed", str(seed), *shared] for seed in seeds})
    label = f"{args.method} on {args.benchmark}"
    return launch.run_seeds(commands, jobs, progress=not args.no_progress, label=label)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", required=True, help="a benchmark in params.yaml, e.g. mini-gta2cs")
    parser.add_argument("--method", default="source_only", help="a registered method, e.g. daformer")
    launch.add_seed_arguments(parser, "train")
    parser.add_argument("--profile", default=None, help="profile in params.yaml (default: its `profile` key)")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="parameter file")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. optim.steps=100")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default results/runs/B/M/seedS)")
    parser.add_argument(
        "--tuned", nargs="?", const="", default=None, metavar="BEST_YAML",
        help="apply tuned method weights from results/tuning/B/M/best.yaml or the file given (--set still wins)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="the run's checkpoint file (default results/checkpoints/B/M/seedS/checkpoint.pt, or OUT/checkpoint.pt with --out)",
    )
    parser.add_argument("--warm-start-only", action="store_true", help="only make the shared warm start")
    parser.add_argument("--warm-start-dir", type=Path, default=WARM_START_DIR, help="cache of shared warm starts")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.all_seeds:
        return _train_all_seeds(args)
    processes, speaks = distributed.launched_processes(), distributed.launched_rank() == 0
    world = None
    try:
        overrides = list(args.set)
        if args.tuned is not None:
            from benchmark.tune import study_dir, tuned_overrides

            best = Path(args.tuned) if args.tuned else study_dir(args.benchmark, args.method) / "best.yaml"
            overrides = tuned_overrides(best, args.benchmark, args.method) + overrides
        run = resolve(args.params, args.benchmark, args.method, args.seed, args.profile, overrides, processes=processes)
        if args.warm_start_only:
            if run.settings.warm_start.steps <= 0:
                raise ConfigError(f"profile {run.profile} has no warm start (warm_start.steps is 0)")
            if processes > 1:
                raise ConfigError("--warm-start-only runs in one process: start it without torchrun")
            print(ensure_warm_start(run, progress=not args.no_progress, directory=args.warm_start_dir))
            return 0
        if args.checkpoint is None and args.out is None:
            args.checkpoint = default_checkpoint(run)
        world = distributed.start()
        record = train(
            run,
            args.out or default_out(run),
            progress=not args.no_progress,
            warm_start_dir=args.warm_start_dir,
            checkpoint=args.checkpoint,
            world=world,
        )
    except (ConfigError, DatasetFormatError, CheckpointError) as error:
        if speaks:
            print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    except FloatingPointError as error:
        if speaks:
            print(f"train.py: error: {error}; the run failed and wrote no record", file=sys.stderr)
        return 1
    finally:
        if world is not None:
            distributed.stop(world)
    if record is not None:
        headline = {k: record[k] for k in ("miou19", "miou16", "miou13") if k in record}
        print(json.dumps({"benchmark": run.benchmark, "method": run.method, "seed": run.seed, **headline, "wall_time_s": record["wall_time_s"]}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("DVCLIVE_LOGLEVEL", "WARNING")
    sys.exit(main())
