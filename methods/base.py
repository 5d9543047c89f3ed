"""The method API and the registry.

A method is one class, registered by name, whose ``step`` receives a source batch, a target batch
and the step index and returns a dict of named, already-weighted loss tensors. The training loop
owns everything else: it sums the losses, runs backward, steps the optimiser and the schedule,
updates the EMA teacher (``Method.teacher``) and logs every key. A method never opens files, builds
optimisers, calls ``backward()`` or logs.

Hyperparameters are declared once per method as a dataclass (``Method.Params``: typed, with
defaults), next to the Optuna search space of its tunable loss weights (``Method.search_space``).
Subclasses extend both by inheritance.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from benchmark.models import Segmentor


@dataclass
class Batch:
    """A batch as the loop hands it to a method.

    image: (B, 3, H, W) float32, ImageNet-normalised. label: (B, H, W) int64 trainIds with 255 =
    ignore, or None for unlabelled target images.
    """

    image: Tensor
    label: Tensor | None = None


@dataclass(frozen=True)
class SearchRange:
    """Where Optuna searches one hyperparameter: uniform or log-uniform in [low, high]."""

    low: float
    high: float
    log: bool = False


@dataclass
class Params:
    """Hyperparameters every method has. The loop reads these two when it builds the run."""

    #: Linear learning-rate warm-up before the polynomial decay (DAFormer sec. 3.4).
    lr_warmup: bool = True
    #: Sample source crops by rare-class sampling (DAFormer sec. 3.3) instead of uniformly.
    rare_class_sampling: bool = False
    #: Temperature T of rare-class sampling, P(c) ~ exp((1 - f_c) / T).
    rcs_temperature: float = 0.01


class Method(nn.Module):
    """Base class of all methods. ``model`` is the student segmentor; subclasses add the rest."""

    name: ClassVar[str] = ""
    Params: ClassVar[type] = Params
    search_space: ClassVar[dict[str, SearchRange]] = {}
    #: The loop loads target-train labels only for methods that declare they need them.
    uses_target_labels: ClassVar[bool] = False

    def __init__(self, model: Segmentor, params: Params | None = None, seed: int = 0):
        super().__init__()
        self.model = model
        self.params = params if params is not None else self.Params()
        if not isinstance(self.params, self.Params):
            raise TypeError(f"{self.name}: params must be {self.Params.__name__}, got {type(self.params).__name__}")
        #: The method's own randomness (mixing masks, augmentations), seeded by the run.
        self.generator = torch.Generator().manual_seed(seed)
        #: The EMA teacher, if the method has one; the loop updates it after every optimiser step.
        self.teacher: nn.Module | None = None

    def step(self, source: Batch, target: Batch, step: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def parameter_groups(self) -> list[dict]:
        """Optimiser groups ``{"role": "encoder" | "head", "params": [...]}``: the loop trains heads
        (the decode head and any head a method adds) at its head learning-rate multiplier, as DAFormer
        trains the decoder at 10x the encoder's rate. Frozen modules (teacher, references) are left out."""
        encoder = [p for p in self.model.encoder.parameters() if p.requires_grad]
        encoder_ids = {id(p) for p in encoder}
        heads = [p for p in self.parameters() if p.requires_grad and id(p) not in encoder_ids]
        return [{"role": "encoder", "params": encoder}, {"role": "head", "params": heads}]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for group in self.parameter_groups() for p in group["params"] if p.requires_grad]


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``. A name registers once only: a
    silently replaced method would corrupt every table that names it."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if cls.name in _REGISTRY:
        existing = _REGISTRY[cls.name]
        raise ValueError(
            f"method {cls.name!r} is already registered by {existing.__module__}.{existing.__qualname__}"
        )
    missing = set(cls.search_space) - {f.name for f in dataclasses.fields(cls.Params)}
    if missing:
        raise ValueError(f"{cls.name}: search_space names unknown hyperparameters {sorted(missing)}")
    _REGISTRY[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; registered methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def registered() -> list[str]:
    return sorted(_REGISTRY)


def unregister(name: str) -> None:
    """Remove a method (tests that register throw-away methods clean up with this)."""
    _REGISTRY.pop(name, None)


def cross_entropy(logits: Tensor, label: Tensor, pixel_weight: Tensor | None = None) -> Tensor:
    """Pixel-wise cross-entropy with ignore 255, logits upsampled bilinearly to the label size.

    logits: (B, C, h, w); label: (B, H, W); pixel_weight: (B, H, W) or None. With weights, the
    loss is the mean over all pixels of weight x CE (ignored pixels count 0), as DAFormer's
    weighted pseudo-label loss is.
    """
    if logits.shape[-2:] != label.shape[-2:]:
        logits = nn.functional.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    per_pixel = nn.functional.cross_entropy(logits, label, ignore_index=255, reduction="none")
    if pixel_weight is None:
        # mean over labelled pixels; a batch with none gives 0, not NaN
        return per_pixel.sum() / (label != 255).sum().clamp_min(1)
    return (per_pixel * pixel_weight).mean()
