"""The resolved configuration of one training run, and how it is read from ``params.yaml``.

``params.yaml`` holds ``profiles`` (model, optimiser, schedule, evaluation: ``embedded`` for the CPU
default, ``paper`` for the real datasets on a GPU), ``benchmarks`` (where each benchmark's data is
and at which scales it is trained and tested) and ``methods`` (per-method hyperparameter overrides).
``resolve`` turns a (profile, benchmark, method, seed, overrides) choice into one ``RunConfig`` and
checks everything it can before any data is read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.config import ConfigError, apply_overrides, from_mapping, load_yaml
from benchmark.formats import FAMILIES
from benchmark.metrics import PROTOCOLS


@dataclass
class ModelConfig:
    encoder: str = "efficientvit_b0"
    head: str = "daformer"
    embed_dim: int = 64
    #: A local file with ImageNet weights of the encoder (nothing is downloaded); null: from scratch.
    pretrained: str | None = None


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and polynomial decay (DAFormer sec. 3.4 / DESIGN.md section 7)."""

    lr: float = 6e-5
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    warmup_steps: int = 1500
    steps: int = 40000
    poly_power: float = 1.0
    #: Images per domain per step (2 source + 2 target in DAFormer).
    batch_size: int = 2


@dataclass
class EvalConfig:
    #: "whole" image or "sliding" window inference.
    mode: str = "whole"
    window: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    batch_size: int = 4
    #: Evaluate target_select every this many steps (0: at the end only).
    interval: int = 0


@dataclass
class WarmStartConfig:
    """Source-only steps trained once per benchmark and seed; every method then starts from them
    (the embedded stand-in for the ImageNet weights every paper-scale method shares)."""

    steps: int = 0
    lr: float = 1e-3
    warmup_steps: int = 0


@dataclass
class DomainConfig:
    family: str
    root: str
    #: Training resize (height, width) before cropping.
    scale: tuple[int, int]


@dataclass
class BenchmarkConfig:
    #: Evaluation protocol: "gta2cs" (mIoU19) or "synthia2cs" (mIoU16 and mIoU13).
    protocol: str
    source: DomainConfig
    target: DomainConfig
    #: Training crop (height, width), the same for source and target.
    crop: tuple[int, int]
    #: Image scale (height, width) at evaluation; predictions are compared at the label's size.
    test_scale: tuple[int, int]
    #: Rare-class sampling: a frame is a candidate for class c if it holds more than this many pixels.
    rcs_min_pixels: int = 3000
    #: ... and a crop is re-drawn until it holds more than min_pixels x this ratio of them.
    rcs_min_crop_ratio: float = 0.5
    #: Keep decoded frames in memory (small datasets only).
    cache: bool = False


@dataclass
class ProfileConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    #: Save a checkpoint every this many steps (0: never).
    checkpoint_interval: int = 0
    #: Log training losses every this many steps.
    log_interval: int = 10
    #: Data loader worker processes (0: load in the training process).
    workers: int = 0


@dataclass
class RunConfig:
    """Everything one run depends on; saved with its record."""

    benchmark: str
    method: str
    seed: int
    profile: str
    settings: ProfileConfig
    data: BenchmarkConfig
    #: Overrides of the method's hyperparameters (validated against ``Method.Params``).
    method_params: dict[str, Any] = field(default_factory=dict)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _validate(run: RunConfig) -> None:
    data, settings = run.data, run.settings
    _check(run.data.protocol in PROTOCOLS, f"benchmarks.{run.benchmark}.protocol: {data.protocol!r} is not one of {sorted(PROTOCOLS)}")
    for side in ("source", "target"):
        family = getattr(data, side).family
        _check(family in FAMILIES, f"benchmarks.{run.benchmark}.{side}.family: {family!r} is not one of {list(FAMILIES)}")
    _check(data.target.family == "cityscapes", f"benchmarks.{run.benchmark}.target.family must be cityscapes")
    for side in ("source", "target"):
        scale = getattr(data, side).scale
        _check(
            data.crop[0] <= scale[0] and data.crop[1] <= scale[1],
            f"benchmarks.{run.benchmark}.crop {list(data.crop)} is larger than {side}.scale {list(scale)}",
        )
    _check(settings.eval.mode in ("whole", "sliding"), f"eval.mode: {settings.eval.mode!r} is not whole or sliding")
    if settings.eval.mode == "sliding":
        _check(settings.eval.window is not None and settings.eval.stride is not None, "eval.mode sliding needs eval.window and eval.stride")
    _check(settings.optim.steps > 0, f"optim.steps must be > 0, got {settings.optim.steps}")
    _check(settings.optim.batch_size > 0, f"optim.batch_size must be > 0, got {settings.optim.batch_size}")
    _check(run.seed >= 0, f"seed must be >= 0, got {run.seed}")


def resolve(
    params: dict | Path | str,
    benchmark: str,
    method: str,
    seed: int,
    profile: str | None = None,
    overrides: list[str] | None = None,
) -> RunConfig:
    """One run's configuration from ``params.yaml`` content; raises ``ConfigError`` naming the key.

    Overrides are dotted keys relative to the run: ``optim.steps=100``, ``model.embed_dim=32``,
    ``data.crop=[64,64]`` (the benchmark's section) and ``method.mix_weight=0.5``.
    """
    from methods import method_class

    document = params if isinstance(params, dict) else load_yaml(params)
    profile = profile or document.get("profile", "embedded")
    profiles = document.get("profiles", {})
    benchmarks = document.get("benchmarks", {})
    _check(profile in profiles, f"unknown profile {profile!r}; profiles in params.yaml: {', '.join(sorted(profiles))}")
    _check(benchmark in benchmarks, f"unknown benchmark {benchmark!r}; benchmarks: {', '.join(sorted(benchmarks))}")
    try:
        method_cls = method_class(method)
    except KeyError as error:
        raise ConfigError(error.args[0]) from None
    tree = {
        **profiles[profile],
        "data": benchmarks[benchmark],
        "method": (document.get("methods") or {}).get(method, {}) or {},
    }
    tree = apply_overrides(tree, overrides or [])
    method_params = tree.pop("method")
    data = from_mapping(BenchmarkConfig, tree.pop("data"), f"benchmarks.{benchmark}")
    settings = from_mapping(ProfileConfig, tree, f"profiles.{profile}")
    from_mapping(method_cls.Params, method_params, f"methods.{method}")  # validate now, build later
    run = RunConfig(benchmark, method, seed, profile, settings, data, dict(method_params))
    _validate(run)
    return run


def method_params(run: RunConfig):
    """The run's method hyperparameters as the method's own typed ``Params``."""
    from methods import method_class

    return from_mapping(method_class(run.method).Params, run.method_params, f"methods.{run.method}")


def replace(run: RunConfig, **changes) -> RunConfig:
    return dataclasses.replace(run, **changes)
