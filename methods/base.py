"""The method API and the registry.

A method is one class, registered by name, whose ``step`` receives a source batch, a target batch
and the step index and returns a dict of named, already-weighted loss tensors. The training loop
owns everything else: it sums the losses, runs backward, steps the optimiser and the schedule,
updates the EMA teacher (``Method.teacher``) and logs every key. A method never opens files, builds
optimisers, calls ``backward()`` or logs.

Hyperparameters are declared once per method as a dataclass (``Method.Params``: typed, with
defaults), next to the Optuna search space of its tunable loss weights (``Method.search_space``).
Subclasses extend both by inheritance.

Add-ons (SePiCo, PiPa, MIC) are mixin classes registered with ``register_addon``: each declares its
own ``name``, ``Params`` (only its own fields, all named ``<name>_...``), ``search_space`` and the
``bases`` it supports. ``method_class("daformer+pipa")`` composes the class ``(PiPa, DAFormer)`` once
(cached) with a merged ``Params`` dataclass, so a leaderboard row is a base plus add-ons and each
add-on module holds only what it adds. ``registered()`` lists every base and every supported
composition, so registry-wide tests cover them without new test code.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from benchmark.models import Segmentor, upsample


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

    def __init__(self, model: Segmentor, params: Params | None = None, seed: int = 0, total_steps: int | None = None):
        super().__init__()
        self.model = model
        self.params = params if params is not None else self.Params()
        if not isinstance(self.params, self.Params):
            raise TypeError(f"{self.name}: params must be {self.Params.__name__}, got {type(self.params).__name__}")
        #: The method's own randomness (mixing masks, augmentations), seeded by the run.
        self.generator = torch.Generator().manual_seed(seed)
        #: Length of the run (the loop passes it), so that a start iteration can be a fraction of the
        #: schedule and scale with the profile; None (tests, interactive use): every term from step 0.
        self.total_steps = total_steps
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
_ADDONS: dict[str, type[AddOn]] = {}
#: Compositions built so far: each is made once, so every lookup returns the same class.
_COMPOSED: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``. A name registers once only: a
    silently replaced method would corrupt every table that names it."""
    if not cls.name or "+" in cls.name:
        raise ValueError(f"{cls.__qualname__}: a method needs a name without '+', got {cls.name!r}")
    if cls.name in _ADDONS:
        raise ValueError(f"method {cls.name!r} is already registered as an add-on by {_ADDONS[cls.name].__module__}")
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


class AddOn:
    """Base of add-on mixins: what an add-on adds to a base method, and nothing else.

    An add-on class sets ``name``, ``Params`` (a dataclass of its own fields only, each named
    ``<name>_...`` so that add-ons never collide with a base or with each other), ``search_space`` and
    ``bases`` (the registered bases it works with), and overrides the hooks of its bases cooperatively
    (``super().__init__(...)``, ``super().addon_losses(context)``). It is never a method on its own:
    ``method_class("<base>+<name>")`` composes it with a base.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type] = Params
    search_space: ClassVar[dict[str, SearchRange]] = {}
    bases: ClassVar[tuple[str, ...]] = ()


def register_addon(cls: type[AddOn]) -> type[AddOn]:
    """Class decorator: make an add-on available as ``<base>+<name>`` for each of its ``bases``."""
    if not cls.name or "+" in cls.name:
        raise ValueError(f"{cls.__qualname__}: an add-on needs a name without '+', got {cls.name!r}")
    if cls.name in _ADDONS or cls.name in _REGISTRY:
        existing = _ADDONS.get(cls.name) or _REGISTRY[cls.name]
        raise ValueError(f"{cls.name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
    if not cls.bases:
        raise ValueError(f"add-on {cls.name}: declares no supported bases")
    if not dataclasses.is_dataclass(cls.Params) or cls.Params is Params:
        raise ValueError(f"add-on {cls.name}: Params must be a dataclass of the add-on's own fields")
    fields = {f.name for f in dataclasses.fields(cls.Params)}
    foreign = sorted(f for f in fields if not f.startswith(f"{cls.name}_"))
    if foreign:
        raise ValueError(f"add-on {cls.name}: hyperparameters must be named {cls.name}_..., got {foreign}")
    required = [f.name for f in dataclasses.fields(cls.Params) if f.default is f.default_factory is dataclasses.MISSING]
    if required:
        raise ValueError(f"add-on {cls.name}: hyperparameters {required} need defaults")
    missing = set(cls.search_space) - fields
    if missing:
        raise ValueError(f"add-on {cls.name}: search_space names unknown hyperparameters {sorted(missing)}")
    _ADDONS[cls.name] = cls
    return cls


def _merged_params(base: type[Method], addons: list[type[AddOn]], name: str) -> type:
    """``base.Params`` extended by every add-on's fields (types resolved, defaults kept); the
    add-ons' ``__post_init__`` checks run after the base's."""
    fields = []
    for addon in addons:
        hints = typing.get_type_hints(addon.Params)
        for f in dataclasses.fields(addon.Params):
            default = {"default": f.default} if f.default is not dataclasses.MISSING else {"default_factory": f.default_factory}
            fields.append((f.name, hints[f.name], dataclasses.field(**default)))
    clash = {f[0] for f in fields} & {f.name for f in dataclasses.fields(base.Params)}
    if clash:
        raise ValueError(f"{name}: add-on hyperparameters {sorted(clash)} clash with the base's")
    checks = [c.__post_init__ for c in (base.Params, *(a.Params for a in addons)) if hasattr(c, "__post_init__")]

    def __post_init__(self):
        for check in checks:
            check(self)

    class_name = "".join(part.title().replace("_", "") for part in name.split("+")) + "Params"
    namespace = {"__post_init__": __post_init__} if checks else {}
    return dataclasses.make_dataclass(class_name, fields, bases=(base.Params,), namespace=namespace)


def _unknown(name: str, why: str) -> KeyError:
    addons = "; ".join(f"{a} (over {', '.join(cls.bases)})" for a, cls in sorted(_ADDONS.items()))
    return KeyError(f"{why}; registered methods: {', '.join(sorted(_REGISTRY))}; add-ons: {addons or 'none'}")


def _compose(name: str) -> type[Method]:
    base_name, *addon_names = name.split("+")
    if base_name not in _REGISTRY:
        raise _unknown(name, f"unknown method {name!r}")
    base = _REGISTRY[base_name]
    addons = []
    for addon_name in addon_names:
        if addon_name not in _ADDONS:
            raise _unknown(name, f"unknown add-on {addon_name!r} in {name!r}")
        addon = _ADDONS[addon_name]
        if base_name not in addon.bases:
            raise KeyError(f"add-on {addon_name!r} does not support base {base_name!r}; its bases: {', '.join(addon.bases)}")
        if addon in addons:
            raise KeyError(f"add-on {addon_name!r} appears twice in {name!r}")
        addons.append(addon)
    search_space = dict(base.search_space)
    for addon in addons:
        search_space.update(addon.search_space)
    namespace = {
        "name": name,
        "Params": _merged_params(base, addons, name),
        "search_space": search_space,
        "__module__": addons[0].__module__,
        "__doc__": f"{base.__name__} with {', '.join(a.__name__ for a in addons)} (composed by methods.base).",
    }
    # the first add-on named comes first in the MRO: its hooks run first and reach the rest through super()
    return type(f"{base.__name__}With{''.join(a.__name__ for a in addons)}", (*addons, base), namespace)


def method_class(name: str) -> type[Method]:
    """The method class registered as ``name``, or the composition ``<base>+<addon>[+<addon>...]``
    (built once, then cached). Unknown names and unsupported combinations raise ``KeyError`` naming
    what is registered."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if "+" not in name:
        raise _unknown(name, f"unknown method {name!r}")
    if name not in _COMPOSED:
        _COMPOSED[name] = _compose(name)
    return _COMPOSED[name]


def registered() -> list[str]:
    """Every registered base and every supported ``<base>+<addon>`` composition."""
    compositions = [f"{base}+{name}" for name, addon in _ADDONS.items() for base in addon.bases if base in _REGISTRY]
    return sorted(_REGISTRY) + sorted(compositions)


def unregister(name: str) -> None:
    """Remove a method or an add-on (tests that register throw-away ones clean up with this)."""
    _REGISTRY.pop(name, None)
    _ADDONS.pop(name, None)
    for composed in [c for c in _COMPOSED if name in c.split("+")]:
        del _COMPOSED[composed]


def cross_entropy(logits: Tensor, label: Tensor, pixel_weight: Tensor | None = None) -> Tensor:
    """Pixel-wise cross-entropy with ignore 255, logits upsampled bilinearly to the label size.

    logits: (B, C, h, w); label: (B, H, W); pixel_weight: (B, H, W) or None. With weights, the
    loss is the mean over all pixels of weight x CE (ignored pixels count 0), as DAFormer's
    weighted pseudo-label loss is.
    """
    if logits.shape[-2:] != label.shape[-2:]:
        logits = upsample(logits, label.shape[-2:])
    per_pixel = nn.functional.cross_entropy(logits, label, ignore_index=255, reduction="none")
    if pixel_weight is None:
        # mean over labelled pixels; a batch with none gives 0, not NaN
        return per_pixel.sum() / (label != 255).sum().clamp_min(1)
    return (per_pixel * pixel_weight).mean()
