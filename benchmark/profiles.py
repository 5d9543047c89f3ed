"""The resolved configuration of one training run, and how it is read from ``params.yaml``.

``params.yaml`` holds ``profiles`` (model, optimiser, schedule, evaluation: ``embedded`` for the CPU
default, ``paper`` for the real datasets on a GPU), ``benchmarks`` (where each benchmark's data is
and at which scales it is trained and tested) and ``methods`` (per-method hyperparameter overrides).
``resolve`` turns a (profile, benchmark, method, seed, overrides) choice into one ``RunConfig`` and
checks everything it can before any data is read.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm

from benchmark.config import ConfigError, apply_overrides, from_mapping, load_yaml
from benchmark.formats import FAMILIES
from benchmark.metrics import PROTOCOLS
from benchmark.models import HEADS, encoder_takes_drop_path


@dataclass
class ModelConfig:
    encoder: str = "efficientvit_b0"
    head: str = "daformer"
    embed_dim: int = 64
    #: A local file with ImageNet weights of the encoder (nothing is downloaded); null: from scratch.
    pretrained: str | None = None
    #: Momentum of the segmentor's BatchNorm running statistics (what evaluation normalises with);
    #: null: each layer's own (PyTorch's 0.1). On batches of two small crops, 0.1 averages the last
    #: ten or so noisy batch statistics.
    batch_norm_momentum: float | None = None
    #: Stochastic depth in the encoder (timm's ``drop_path_rate``: the drop probability of its last
    #: block, rising linearly from 0 at the first); 0: none. MiT-B5 in SegFormer and DAFormer: 0.1.
    drop_path_rate: float = 0.0


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
    #: CPU threads of the training process (0: torch's default). CPU results depend on the thread count
    #: (reduction order), so a profile that promises the same figures on every machine fixes it.
    threads: int = 0


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


def _positive_pair(value: tuple[int, int] | None, key: str) -> None:
    if value is not None:
        _check(value[0] > 0 and value[1] > 0, f"{key}: expected two positive sizes (height, width), got {list(value)}")


#: Classes the SYNTHIA source does not have: a 19-class protocol would count them as IoU 0.
_SYNTHIA_MISSING = "terrain, truck and train"


def _validate(run: RunConfig, processes: int = 1) -> None:
    data, settings = run.data, run.settings
    where = f"benchmarks.{run.benchmark}"
    _check(run.data.protocol in PROTOCOLS, f"{where}.protocol: {data.protocol!r} is not one of {sorted(PROTOCOLS)}")
    for side in ("source", "target"):
        family = getattr(data, side).family
        _check(family in FAMILIES, f"{where}.{side}.family: {family!r} is not one of {list(FAMILIES)}")
    _check(data.target.family == "cityscapes", f"{where}.target.family must be cityscapes, got {data.target.family!r}")
    _check(
        not (data.source.family == "synthia" and data.protocol == "gta2cs"),
        f"{where}.protocol: gta2cs (mIoU19) needs all 19 classes, but a synthia source has no {_SYNTHIA_MISSING}; "
        "use protocol synthia2cs",
    )
    for key, value in (("crop", data.crop), ("test_scale", data.test_scale), ("source.scale", data.source.scale), ("target.scale", data.target.scale)):
        _positive_pair(value, f"{where}.{key}")
    for side in ("source", "target"):
        scale = getattr(data, side).scale
        _check(
            data.crop[0] <= scale[0] and data.crop[1] <= scale[1],
            f"{where}.crop {list(data.crop)} is larger than {side}.scale {list(scale)}",
        )
    _check(data.rcs_min_pixels >= 0, f"{where}.rcs_min_pixels must be >= 0, got {data.rcs_min_pixels}")
    _check(0.0 <= data.rcs_min_crop_ratio <= 1.0, f"{where}.rcs_min_crop_ratio must be in [0, 1], got {data.rcs_min_crop_ratio}")

    prefix = f"profiles.{run.profile}"
    model = settings.model
    _check(model.head in HEADS, f"{prefix}.model.head: {model.head!r} is not one of {sorted(HEADS)}")
    if not timm.is_model(model.encoder):
        close = difflib.get_close_matches(model.encoder, timm.list_models(), n=3)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ConfigError(f"{prefix}.model.encoder: {model.encoder!r} is not a timm model (see timm.list_models()){hint}")
    _check(model.embed_dim > 0, f"{prefix}.model.embed_dim must be > 0, got {model.embed_dim}")
    momentum = model.batch_norm_momentum
    _check(
        momentum is None or 0.0 < momentum <= 1.0,
        f"{prefix}.model.batch_norm_momentum must be in (0, 1] or null, got {momentum}",
    )
    _check(
        0.0 <= model.drop_path_rate < 1.0,
        f"{prefix}.model.drop_path_rate must be in [0, 1), got {model.drop_path_rate}",
    )
    if model.drop_path_rate > 0 and not encoder_takes_drop_path(model.encoder):
        raise ConfigError(
            f"{prefix}.model.drop_path_rate: the encoder {model.encoder!r} has no stochastic depth "
            "(timm's constructor takes no drop_path_rate); set it to 0"
        )

    optim = settings.optim
    _check(optim.steps > 0, f"{prefix}.optim.steps must be > 0, got {optim.steps}")
    _check(optim.batch_size > 0, f"{prefix}.optim.batch_size must be > 0, got {optim.batch_size}")
    _check(optim.lr > 0, f"{prefix}.optim.lr must be > 0, got {optim.lr}")
    _check(optim.head_lr_mult > 0, f"{prefix}.optim.head_lr_mult must be > 0, got {optim.head_lr_mult}")
    _check(optim.weight_decay >= 0, f"{prefix}.optim.weight_decay must be >= 0, got {optim.weight_decay}")
    _check(optim.warmup_steps >= 0, f"{prefix}.optim.warmup_steps must be >= 0, got {optim.warmup_steps}")
    _check(optim.poly_power >= 0, f"{prefix}.optim.poly_power must be >= 0, got {optim.poly_power}")
    _check(
        optim.batch_size % processes == 0,
        f"{prefix}.optim.batch_size: {optim.batch_size} images per step (all processes together) do not split "
        f"over {processes} processes; use a multiple of {processes}",
    )

    _check(settings.threads >= 0, f"{prefix}.threads must be >= 0 (0: torch's default), got {settings.threads}")

    evaluation = settings.eval
    _check(evaluation.mode in ("whole", "sliding"), f"{prefix}.eval.mode: {evaluation.mode!r} is not whole or sliding")
    if evaluation.mode == "sliding":
        _check(
            evaluation.window is not None and evaluation.stride is not None,
            f"{prefix}.eval.mode sliding needs eval.window and eval.stride",
        )
    _positive_pair(evaluation.window, f"{prefix}.eval.window")
    _positive_pair(evaluation.stride, f"{prefix}.eval.stride")
    _check(evaluation.batch_size > 0, f"{prefix}.eval.batch_size must be > 0, got {evaluation.batch_size}")
    _check(evaluation.interval >= 0, f"{prefix}.eval.interval must be >= 0 (0: at the end only), got {evaluation.interval}")

    warm = settings.warm_start
    _check(warm.steps >= 0, f"{prefix}.warm_start.steps must be >= 0, got {warm.steps}")
    if warm.steps > 0:
        _check(warm.lr > 0, f"{prefix}.warm_start.lr must be > 0, got {warm.lr}")
        _check(warm.warmup_steps >= 0, f"{prefix}.warm_start.warmup_steps must be >= 0, got {warm.warmup_steps}")
    _check(settings.checkpoint_interval >= 0, f"{prefix}.checkpoint_interval must be >= 0 (0: never), got {settings.checkpoint_interval}")
    _check(settings.log_interval > 0, f"{prefix}.log_interval must be > 0, got {settings.log_interval}")
    _check(settings.workers >= 0, f"{prefix}.workers must be >= 0, got {settings.workers}")
    _check(run.seed >= 0, f"seed must be >= 0, got {run.seed}")
    _check(processes >= 1, f"the number of processes must be >= 1, got {processes}")


def _method_class(name: str, where: str | None = None):
    """The registered class of ``name``; an unknown name or an unsupported combination of a base
    and add-ons is a ``ConfigError`` carrying the registry's message (with the allowed names)."""
    from methods import method_class

    try:
        return method_class(name)
    except KeyError as error:
        message = error.args[0] if error.args else f"unknown method {name!r}"
        raise ConfigError(f"{where}: {message}" if where else str(message)) from None


def check_files(run: RunConfig) -> None:
    """Files the configuration names must exist (checked before any data is read)."""
    pretrained = run.settings.model.pretrained
    if pretrained is not None:
        _check(
            Path(pretrained).is_file(),
            f"profiles.{run.profile}.model.pretrained: {pretrained} does not exist (ImageNet weights are a local "
            "file you provide; nothing is downloaded; null trains from scratch)",
        )


def resolve(
    params: dict | Path | str,
    benchmark: str,
    method: str,
    seed: int,
    profile: str | None = None,
    overrides: list[str] | None = None,
    processes: int = 1,
) -> RunConfig:
    """One run's configuration from ``params.yaml`` content; raises ``ConfigError`` naming the key.

    Overrides are dotted keys relative to the run: ``optim.steps=100``, ``model.embed_dim=32``,
    ``data.crop=[64,64]`` (the benchmark's section) and ``method.mix_weight=0.5``. ``processes``: how
    many processes share the run's steps (``torchrun``); the batch must split evenly over them.
    """
    document = params if isinstance(params, dict) else load_yaml(params)
    profile = profile or document.get("profile", "embedded")
    profiles = document.get("profiles") or {}
    benchmarks = document.get("benchmarks") or {}
    method_sections = document.get("methods") or {}
    for section, value in (("profiles", profiles), ("benchmarks", benchmarks), ("methods", method_sections)):
        _check(isinstance(value, dict), f"{section}: expected a mapping, got {value!r}")
    _check(profile in profiles, f"unknown profile {profile!r}; profiles in params.yaml: {', '.join(sorted(profiles))}")
    _check(benchmark in benchmarks, f"unknown benchmark {benchmark!r}; benchmarks: {', '.join(sorted(benchmarks))}")
    method_cls = _method_class(method)
    for name in method_sections:
        _method_class(name, where=f"methods.{name} in the parameter file")
    tree = {
        **profiles[profile],
        "data": benchmarks[benchmark],
        "method": method_sections.get(method, {}) or {},
    }
    tree = apply_overrides(tree, overrides or [])
    method_params = tree.pop("method")
    data = from_mapping(BenchmarkConfig, tree.pop("data"), f"benchmarks.{benchmark}")
    settings = from_mapping(ProfileConfig, tree, f"profiles.{profile}")
    typed = from_mapping(method_cls.Params, method_params, f"methods.{method}")  # validate now, build later
    _check(
        not typed.rare_class_sampling or typed.rcs_temperature > 0,
        f"methods.{method}.rcs_temperature must be > 0 with rare_class_sampling, got {typed.rcs_temperature}",
    )
    run = RunConfig(benchmark, method, seed, profile, settings, data, dict(method_params))
    _validate(run, processes)
    return run


def method_params(run: RunConfig):
    """The run's method hyperparameters as the method's own typed ``Params``."""
    return from_mapping(_method_class(run.method).Params, run.method_params, f"methods.{run.method}")


def replace(run: RunConfig, **changes) -> RunConfig:
    return dataclasses.replace(run, **changes)
