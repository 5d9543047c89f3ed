"""Segmentors: a timm encoder (``features_only=True``) plus a decode head.

The encoder's channel counts and reductions are read from ``encoder.feature_info``, so any timm model
with feature extraction can be combined with either head. Heads:

- ``DAFormerHead``: Hoyer et al., "DAFormer", CVPR 2022, section 3.2 (context-aware feature fusion).
- ``SegFormerHead``: Xie et al., "SegFormer", NeurIPS 2021, section 3.2 (lightweight all-MLP decoder).

Which encoder, head and width a run uses is its profile's ``model`` section in ``params.yaml``
(``benchmark/profiles.py``; ``train.build_model`` builds it). Pretrained weights are read only from
local files (``load_encoder_weights``); nothing is downloaded.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)


def _channels_last(grad: Tensor) -> Tensor:
    return grad.contiguous(memory_format=torch.channels_last)


def upsample(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize (``align_corners=False``) of a (B, C, h, w) map to ``size`` whose gradient
    reaches the resize in the input's layout. Losses and concatenations downstream hand gradients
    back channels-first (the cross-entropy) or as channel slices (``torch.cat``), and the CPU's
    bilinear backward on a channels-last input with such a gradient takes a generic path: 0.48
    against 0.18 ms for (2, 19, 16, 16) -> 64 x 64, 0.18 against 0.01 ms for (4, 32, 8, 8) -> 16 x 16
    (one thread). The copy into the channels-last layout costs microseconds."""
    resized = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    if resized.requires_grad and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        resized.register_hook(_channels_last)
    return resized


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1, groups: int = 1):
    """Conv (no bias: BN follows) + BN + ReLU, the ConvModule of mmsegmentation's decode heads."""
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            padding=dilation * (kernel_size - 1) // 2,
            dilation=dilation,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _embed_and_upsample(embeddings: nn.ModuleList, features: Sequence[Tensor]) -> Tensor:
    """Per-level 1x1 embedding, bilinear upsampling to the finest level, channel concatenation.

    features: L tensors (B, C_i, H_i, W_i), finest first -> (B, L * E, H_0, W_0).
    """
    if len(features) != len(embeddings):
        raise ValueError(f"head built for {len(embeddings)} levels got {len(features)} features")
    size = features[0].shape[-2:]
    levels = []
    for embed, feature in zip(embeddings, features):
        level = embed(feature)
        if level.shape[-2:] != size:
            level = upsample(level, size)
        levels.append(level)
    return torch.cat(levels, dim=1)


class DecodeHead(nn.Module):
    """Common interface: ``decode`` gives the fused feature map, ``forward`` the class logits.

    ``decode(features) -> (B, embed_dim, H_0, W_0)``; ``forward(features) -> (B, num_classes, H_0, W_0)``,
    where ``features`` are the encoder's levels, finest first, and (H_0, W_0) is the finest level's size.
    The fused map is exposed because auxiliary heads (e.g. contrastive projections) read it.
    """

    def __init__(self, embed_dim: int, num_classes: int, dropout: float):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(embed_dim, num_classes, kernel_size=1)

    def decode(self, features: Sequence[Tensor]) -> Tensor:
        raise NotImplementedError

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.classifier(self.dropout(self.decode(features)))


class DilatedDepthwiseConv2d(nn.Conv2d):
    """Depthwise k x k convolution (k odd) with dilation d and zero padding d (k - 1) / 2, so the output
    has the input's size, that leaves out the kernel rows and columns whose taps lie wholly in the
    padding. A tap at offset (i - k // 2) d reaches the image only if that offset is smaller than the
    input's side: on a 16 x 16 feature map at dilation 18 only the centre tap ever sees a pixel. The
    result is the full convolution's (the skipped taps multiply zeros) at a fraction of its cost, and
    the skipped weights get the zero gradient they would get anyway. The weight keeps its
    (C, 1, k, k) shape, so state dicts are those of ``nn.Conv2d``.

    x: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, kernel_size: int = 3, dilation: int = 1):
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(channels, channels, kernel_size, padding=padding, dilation=dilation, groups=channels, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        centre = self.kernel_size[0] // 2
        # taps kept on each side of the centre, per axis
        reach = [min(centre, (side - 1) // step) for side, step in zip(x.shape[-2:], self.dilation)]
        if reach == [centre, centre]:
            return super().forward(x)
        weight = self.weight[:, :, centre - reach[0] : centre + reach[0] + 1, centre - reach[1] : centre + reach[1] + 1]
        padding = (reach[0] * self.dilation[0], reach[1] * self.dilation[1])
        return F.conv2d(x, weight, None, self.stride, padding, self.dilation, self.groups)


class DepthwiseSeparableASPP(nn.Module):
    """Depthwise-separable ASPP used as DAFormer's fusion module (DAFormer, section 3.2, Fig. 3).

    Branch for dilation 1: 1x1 conv + BN + ReLU. Other dilations: depthwise 3x3 dilated conv + BN + ReLU,
    then pointwise 1x1 conv + BN + ReLU. Branch outputs (``out_channels`` each) are concatenated and
    reduced to ``out_channels`` by a bottleneck conv (3x3 as in the official configuration) + BN + ReLU.
    No image-pooling branch (the paper's configuration has none).

    x: (B, in_channels, H, W) -> (B, out_channels, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dilations: Sequence[int] = (1, 6, 12, 18),
        bottleneck_kernel: int = 3,
    ):
        super().__init__()
        branches = []
        for dilation in dilations:
            if dilation == 1:
                branches.append(_conv_bn_relu(in_channels, out_channels, kernel_size=1))
            else:
                branches.append(
                    nn.Sequential(
                        nn.Sequential(
                            DilatedDepthwiseConv2d(in_channels, 3, dilation),
                            nn.BatchNorm2d(in_channels),
                            nn.ReLU(inplace=True),
                        ),
                        _conv_bn_relu(in_channels, out_channels, kernel_size=1),
                    )
                )
        self.branches = nn.ModuleList(branches)
        self.bottleneck = _conv_bn_relu(len(dilations) * out_channels, out_channels, bottleneck_kernel)

    def forward(self, x: Tensor) -> Tensor:
        return self.bottleneck(torch.cat([branch(x) for branch in self.branches], dim=1))


class DAFormerHead(DecodeHead):
    """DAFormer decoder (Hoyer et al., CVPR 2022, section 3.2, "context-aware feature fusion").

    Each level i is embedded by a 1x1 "MLP" (linear, no norm or activation) to ``embed_dim`` channels,
    bilinearly upsampled to the finest level, concatenated (L * embed_dim channels) and fused by a
    depthwise-separable ASPP with ``dilations`` (so the fusion sees context at several rates), followed
    by dropout (0.1) and a 1x1 classifier.

    features: L tensors (B, in_channels[i], H_i, W_i), finest first -> logits (B, num_classes, H_0, W_0).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        embed_dim: int = 256,
        dilations: Sequence[int] = (1, 6, 12, 18),
        bottleneck_kernel: int = 3,
        dropout: float = 0.1,
    ):
        super().__init__(embed_dim, num_classes, dropout)
        self.embeddings = nn.ModuleList(nn.Conv2d(c, embed_dim, kernel_size=1) for c in in_channels)
        self.fusion = DepthwiseSeparableASPP(len(in_channels) * embed_dim, embed_dim, dilations, bottleneck_kernel)

    def decode(self, features: Sequence[Tensor]) -> Tensor:
        return self.fusion(_embed_and_upsample(self.embeddings, features))


class SegFormerHead(DecodeHead):
    """SegFormer all-MLP decoder (Xie et al., NeurIPS 2021, section 3.2, Eq. 4).

    Per-level linear embedding (1x1 conv) to ``embed_dim``, bilinear upsampling to the finest level,
    concatenation, a 1x1 fuse conv + BN + ReLU to ``embed_dim``, dropout (0.1), 1x1 classifier.

    features: L tensors (B, in_channels[i], H_i, W_i), finest first -> logits (B, num_classes, H_0, W_0).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, embed_dim: int = 256, dropout: float = 0.1):
        super().__init__(embed_dim, num_classes, dropout)
        self.embeddings = nn.ModuleList(nn.Conv2d(c, embed_dim, kernel_size=1) for c in in_channels)
        self.fuse = _conv_bn_relu(len(in_channels) * embed_dim, embed_dim, kernel_size=1)

    def decode(self, features: Sequence[Tensor]) -> Tensor:
        return self.fuse(_embed_and_upsample(self.embeddings, features))


class Segmentor(nn.Module):
    """Encoder + decode head.

    ``encoder`` is a timm ``features_only`` model returning a list of levels; ``levels`` selects which of
    them feed the head (default: all), finest first. ``forward(x)``: (B, 3, H, W) -> logits
    (B, num_classes, H / r_0, W / r_0) where r_0 is the finest selected reduction (4 for the profiles).
    ``forward_features(x)`` returns the selected levels [(B, C_i, H / r_i, W / r_i)], which feature
    distance and contrastive heads consume. The optimizer groups use ``encoder`` and ``head``.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, levels: Sequence[int] | None = None):
        super().__init__()
        self.encoder = encoder
        self.head = head
        num_levels = len(encoder.feature_info.channels())
        self.levels = tuple(range(num_levels)) if levels is None else tuple(levels)
        if not self.levels or any(not 0 <= i < num_levels for i in self.levels):
            raise ValueError(f"levels {self.levels} invalid for an encoder with {num_levels} feature levels")

    @property
    def channels(self) -> list[int]:
        all_channels = self.encoder.feature_info.channels()
        return [all_channels[i] for i in self.levels]

    @property
    def reductions(self) -> list[int]:
        all_reductions = self.encoder.feature_info.reduction()
        return [all_reductions[i] for i in self.levels]

    def forward_features(self, x: Tensor) -> list[Tensor]:
        features = self.encoder(x)
        if isinstance(features, Mapping):  # timm's feature_cls="dict" wrappers
            features = list(features.values())
        return [features[i] for i in self.levels]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


HEADS: dict[str, Callable[..., DecodeHead]] = {}


def register_head(name: str, factory: Callable[..., DecodeHead]) -> None:
    """Add a head constructor ``factory(in_channels, num_classes, embed_dim=...)`` under ``name``."""
    if name in HEADS:
        raise KeyError(f"head {name!r} is already registered")
    HEADS[name] = factory


register_head("daformer", DAFormerHead)
register_head("segformer", SegFormerHead)


@dataclass(frozen=True)
class LoadReport:
    """What ``load_encoder_weights`` did. Encoder names for ``loaded``/``missing``, file keys otherwise."""

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    dropped: list[str]


_WRAPPER_PREFIXES = ("module.", "encoder.", "backbone.")
_IGNORED_MISSING_SUFFIXES = ("num_batches_tracked",)
#: create_model arguments that only the features_only wrapper understands.
_FEATURE_ONLY_KWARGS = ("out_indices", "feature_cls", "feature_cfg", "flatten_sequential")


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(
                f"{path}: refused: it holds Python objects besides tensors and plain containers, which are never "
                "loaded (unpickling them could run code); save the state dict alone"
            ) from None
    # Training checkpoints nest the weights; plain state dicts map names to tensors directly.
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping from names to tensors)")
    return dict(state)


def _strip_wrapper_prefix(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _candidate_names(key: str) -> list[str]:
    """Names ``key`` (a classifier-model name) may have in a timm features_only wrapper, most likely first.

    The wrappers keep the model's names, flatten leading nn.Sequential levels by joining names with "_"
    (``stages.0.x`` -> ``stages_0.x``), or hold the model as ``model``; checkpoints may add a
    ``module.``/``encoder.``/``backbone.`` prefix.
    """
    names = []
    for base in dict.fromkeys([key, _strip_wrapper_prefix(key)]):
        parts = base.split(".")
        flattened = ["_".join(parts[:n]) + "." + ".".join(parts[n:]) for n in range(2, len(parts))]
        for name in [base, *flattened]:
            names += [name, "model." + name]
    return names


def load_encoder_weights(
    encoder: nn.Module,
    path: str | Path,
    model_keys: Collection[str] | None = None,
    strict: bool = True,
) -> LoadReport:
    """Load ImageNet weights for a timm ``features_only`` encoder from a local file.

    ``path``: a ``torch.save``d state dict (read with ``weights_only=True``) or a ``.safetensors`` file,
    holding either the classifier model's state dict as timm saves it or the features_only encoder's own
    (a ``{"state_dict": ...}`` / ``{"model": ...}`` checkpoint and a ``module.`` prefix are accepted).
    Names are mapped onto the wrapper's names (see ``_candidate_names``). ``model_keys``: the state-dict
    keys of the full classifier model; file keys among them that the encoder lacks (classifier, pre-logits
    and final layers that features_only leaves out) are dropped. Other unmatched keys are unexpected.

    Raises ``ValueError`` if no file key matches the encoder, on a shape mismatch, and, when ``strict``,
    if an encoder tensor is missing from the file or a key is unexpected (e.g. a deeper variant's file,
    whose extra blocks would otherwise be ignored silently). Otherwise those are logged as warnings.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file {path} does not exist (weights are never downloaded)")
    source = _read_state_dict(path)
    target = encoder.state_dict()
    known = set(model_keys) if model_keys is not None else set()
    mapped: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    unexpected, dropped, mismatched = [], [], []
    for key, value in source.items():
        name = next((n for n in _candidate_names(key) if n in target), None)
        if name is None:
            (dropped if _strip_wrapper_prefix(key) in known else unexpected).append(key)
            continue
        if name in mapped:
            raise ValueError(f"{path}: keys {origin[name]!r} and {key!r} both map to encoder tensor {name!r}")
        if value.shape != target[name].shape:
            mismatched.append(f"{key} {tuple(value.shape)} -> {name} {tuple(target[name].shape)}")
            continue
        mapped[name] = value
        origin[name] = key
    if not mapped:
        raise ValueError(
            f"{path}: none of its {len(source)} keys (e.g. {list(source)[:3]}) matches the encoder "
            f"{type(encoder).__name__} (e.g. {list(target)[:3]}); wrong architecture or checkpoint format?"
        )
    if mismatched:
        raise ValueError(f"{path}: shape mismatch for {len(mismatched)} tensor(s): {mismatched[:5]}")
    missing = [k for k in target if k not in mapped and not k.endswith(_IGNORED_MISSING_SUFFIXES)]
    if strict and (missing or unexpected):
        raise ValueError(
            f"{path} does not fit the encoder: {len(missing)} encoder tensor(s) missing from the file "
            f"{missing[:10]}, {len(unexpected)} unexpected key(s) {unexpected[:10]} (strict=False loads anyway)"
        )
    encoder.load_state_dict(mapped, strict=False)
    if missing:
        logger.warning("%s: %d encoder tensors keep their random init: %s", path, len(missing), missing)
    if unexpected:
        logger.warning("%s: %d unexpected keys ignored: %s", path, len(unexpected), unexpected)
    logger.info("%s: loaded %d encoder tensors; dropped %d head keys %s", path, len(mapped), len(dropped), dropped)
    return LoadReport(loaded=sorted(mapped), missing=missing, unexpected=unexpected, dropped=dropped)


def _create_without_memory(encoder: str, **kwargs) -> nn.Module:
    """timm's ``encoder`` built on the meta device (no memory, no initialisation)."""
    try:
        with torch.device("meta"):
            return timm.create_model(encoder, pretrained=False, **kwargs)
    except (NotImplementedError, RuntimeError):
        # Some constructors read tensor values (e.g. .tolist()), which meta tensors do not have.
        return timm.create_model(encoder, pretrained=False, **kwargs)


def classifier_state_keys(encoder: str, **encoder_kwargs) -> set[str]:
    """State-dict keys of timm's full classifier model ``encoder`` (built on the meta device: no memory)."""
    kwargs = {k: v for k, v in encoder_kwargs.items() if k not in _FEATURE_ONLY_KWARGS}
    return set(_create_without_memory(encoder, **kwargs).state_dict())


def encoder_takes_drop_path(encoder: str) -> bool:
    """Whether timm's ``encoder`` has stochastic depth, i.e. its constructor takes ``drop_path_rate``."""
    try:
        _create_without_memory(encoder, drop_path_rate=0.1)
    except TypeError:
        return False
    return True


def build_segmentor(
    encoder: str,
    head: str,
    num_classes: int,
    embed_dim: int,
    pretrained_path: str | Path | None = None,
    min_reduction: int = 4,
    **encoder_kwargs,
) -> Segmentor:
    """A ``Segmentor`` from a timm encoder name and a head name in ``HEADS``.

    The encoder is ``timm.create_model(encoder, features_only=True, pretrained=False, **encoder_kwargs)``;
    its levels with reduction < ``min_reduction`` (e.g. the stride-2 stem of ResNets and MobileNets) are
    not fed to the head, so logits come out at 1/4 resolution like DAFormer's. ``pretrained_path``: local
    ImageNet weights for the encoder, see ``load_encoder_weights``.
    """
    if head not in HEADS:
        raise KeyError(f"unknown head {head!r}; known: {sorted(HEADS)}")
    backbone = timm.create_model(encoder, features_only=True, pretrained=False, **encoder_kwargs)
    if pretrained_path is not None:
        load_encoder_weights(backbone, pretrained_path, model_keys=classifier_state_keys(encoder, **encoder_kwargs))
    reductions = backbone.feature_info.reduction()
    levels = [i for i, r in enumerate(reductions) if r >= min_reduction]
    if not levels:
        raise ValueError(f"{encoder} has no feature level with reduction >= {min_reduction} (has {reductions})")
    channels = backbone.feature_info.channels()
    decode_head = HEADS[head]([channels[i] for i in levels], num_classes, embed_dim=embed_dim)
    return Segmentor(backbone, decode_head, levels)
