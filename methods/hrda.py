"""HRDA (Hoyer, Dai, Van Gool, "HRDA: Context-Aware High-Resolution Domain-Adaptive Semantic
Segmentation", ECCV 2022): multi-resolution training with a learned scale attention, as a base method
over DAFormer's self-training.

HRDA trains on crops taken at ``resolution_scale`` times the benchmark's resolution (the paper: 1024x1024
crops of 2048x1024 Cityscapes and 2560x1440 GTA images, where DAFormer takes 512x512 crops of 1024x512
and 1280x720). Per training crop x (B, 3, H, W), with the encoder f, the decode head h and the output
stride o of h (4):

    x_c = zeta(x, s)                           context view: the whole crop downscaled by s = 0.5 (sec. 3.2)
    x_d = x[b_d]                               detail view: a random sub-crop at full resolution (sec. 3.2);
                                               its corners lie on multiples of k = o / s, so it aligns with
                                               the context prediction grid
    y_c = h(f(x_c)),  y_d = h(f(x_d))          one encoder and one decode head for both views
    a_c = sigmoid(h_a(f(x_c)))                 scale attention from the context features, one map per
                                               class, on the grid of y_c (sec. 3.3)
    a_c' = a_c inside b_d, 0 outside           during training only: the detail view covers b_d only
    y_F = zeta((1 - a_c') * y_c, 1/s) + zeta(a_c', 1/s) * y_d'          fused prediction (sec. 3.3),
                                               y_d' = y_d placed at b_d on the fine grid, zero elsewhere
    L = (1 - lambda_d) CE(y_F, y) + lambda_d CE(y_d, y[b_d])            lambda_d = 0.1 (sec. 3.3)

L is applied to the source crop with its labels and to the ClassMix crop with its pseudo-labels and
pixel weights (cropped alike for the detail term). Pseudo-labels come from the teacher's full
multi-resolution inference (sec. 3.4): the attention is not masked and the detail prediction of the
whole crop is assembled from overlapping detail windows (stride half a window); this is
``HRDASegmentor.forward``, so the EMA teacher and the evaluation both run it unchanged. At test time
sliding windows of the training-crop size (stride half a crop) cover the full-resolution image, each
window predicted by that same multi-resolution inference (``HRDA.run_settings`` tells the loop).

Everything else is DAFormer's (``methods/daformer.py``): EMA teacher, confidence-weighted pseudo-labels,
ClassMix with colour jitter and blur, rare-class sampling (its crop criterion scaled by the pixel count,
resolution_scale^2 x 0.5 = 2.0 as the official configuration has it) and the thing-class feature
distance, computed on the context view as the official code does (``feature_scale=0.5``). The scale
attention head is a SegFormer-style head (per-level linear embedding, 1x1 fusion), the official code's
DAFormer head with its ASPP replaced by a 1x1 convolution. Known difference: the official code also
ignores a 30-pixel left and right margin of the pseudo-labels; here only DAFormer's top and bottom
fractions are, which at HRDA's full-height crops equal its 30 and 240 rows.

The encoder features add-ons read are those of the context view, as for the feature distance:
``forward_train`` returns them for a training crop, and ``student_features`` and ``teacher_features``
compute them for any other image (PiPa's patch crops, SePiCo's teacher statistics and its re-forwarded
target), so that all of them lie on one grid of ``feature_stride`` = o / s input pixels per cell.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmark.config import ConfigError
from benchmark.metrics import window_starts
from benchmark.models import SegFormerHead, Segmentor, upsample
from methods.base import SearchRange, cross_entropy, register
from methods.components import batch_norm_per_part, head_per_part
from methods.daformer import DAFormer, DAFormerParams, StepContext


@dataclass
class HRDAParams(DAFormerParams):
    #: Train and test at this multiple of the benchmark's resolution: its image scales, training crop and
    #: test scale (the paper's 1024x1024 crops of 2048x1024 images against DAFormer's 512 of 1024x512).
    resolution_scale: float = 2.0
    #: s: the context view is the training crop downscaled by this (paper: 1024 -> 512).
    context_scale: float = 0.5
    #: Side of the detail crop as a fraction of the training crop (paper: 512 of 1024).
    detail_crop: float = 0.5
    #: Stride of the overlapping detail windows of multi-resolution inference (pseudo-labels and test), as
    #: a fraction of the detail crop (paper: 0.5; 1.0: windows that do not overlap).
    detail_stride: float = 0.5
    #: lambda_d, the weight of the detail cross-entropy; the fused one gets 1 - lambda_d.
    detail_loss_weight: float = 0.1
    #: One attention map per class (paper) or one map shared by all classes.
    attention_classwise: bool = True
    #: Channels of the scale attention head; null: those of the decode head.
    attention_embed_dim: int | None = None
    #: Stride of the test-time sliding windows (each the size of the training crop) as a fraction of the
    #: crop (paper: 512 of 1024).
    test_stride: float = 0.5
    #: Most detail windows per forward pass in multi-resolution inference. The windows of a batch are cut
    #: into equal chunks of at most this many: on a CPU a batch of 144 small windows falls out of the
    #: cache and runs about 1.7 times as slowly as chunks of 24. Changes speed, not the prediction
    #: (beyond float rounding).
    inference_chunk: int = 24

    def __post_init__(self):
        fractions = {
            "context_scale": self.context_scale,
            "detail_crop": self.detail_crop,
            "detail_stride": self.detail_stride,
            "test_stride": self.test_stride,
        }
        for key, value in fractions.items():
            if not 0 < value <= 1:
                raise ConfigError(f"methods.hrda.{key} must be in (0, 1], got {value}")
        if not 0 <= self.detail_loss_weight <= 1:
            raise ConfigError(f"methods.hrda.detail_loss_weight must be in [0, 1], got {self.detail_loss_weight}")
        if self.resolution_scale <= 0:
            raise ConfigError(f"methods.hrda.resolution_scale must be > 0, got {self.resolution_scale}")
        if self.attention_embed_dim is not None and self.attention_embed_dim < 1:
            raise ConfigError(f"methods.hrda.attention_embed_dim must be >= 1, got {self.attention_embed_dim}")
        if self.inference_chunk < 1:
            raise ConfigError(f"methods.hrda.inference_chunk must be >= 1, got {self.inference_chunk}")


@dataclass(frozen=True)
class DetailBox:
    """Where the detail crop lies in the training crop, in input pixels."""

    top: int
    left: int
    height: int
    width: int

    @property
    def bottom(self) -> int:
        return self.top + self.height

    @property
    def right(self) -> int:
        return self.left + self.width

    def crop(self, tensor: Tensor) -> Tensor:
        """(..., H, W) -> (..., height, width)."""
        return tensor[..., self.top : self.bottom, self.left : self.right]

    def on_grid(self, stride: int) -> tuple[slice, slice]:
        """The box on a grid of cells of ``stride`` input pixels (its corners are multiples of it)."""
        return slice(self.top // stride, self.bottom // stride), slice(self.left // stride, self.right // stride)


def random_detail_box(
    height: int, width: int, size: tuple[int, int], alignment: int, generator: torch.Generator
) -> DetailBox:
    """A detail crop of ``size`` uniformly among the positions in a (height, width) crop whose corners
    are multiples of ``alignment`` (HRDA sec. 3.2), so the box falls on whole cells of the context grid."""
    top = alignment * int(torch.randint((height - size[0]) // alignment + 1, (), generator=generator))
    left = alignment * int(torch.randint((width - size[1]) // alignment + 1, (), generator=generator))
    return DetailBox(top, left, *size)


@dataclass
class TrainingPrediction:
    """What one multi-resolution training forward computes (shapes for a (B, 3, H, W) crop, output
    stride o, context grid stride k = o / s).

    fused: (B, C, H/o, W/o) y_F; detail: (B, C, h_d/o, w_d/o) y_d; attention: (B, C or 1, H/k, W/k) a_c',
    zero outside the detail box; context_features: the encoder levels of the context view.
    """

    fused: Tensor
    detail: Tensor
    attention: Tensor
    context_features: list[Tensor]


class HRDASegmentor(Segmentor):
    """A segmentor (its encoder and decode head, shared by both views) plus HRDA's scale attention head.

    ``forward(x)`` is HRDA's multi-resolution inference on a crop x (B, 3, H, W) -> fused logits
    (B, C, H/o, W/o): the context view x downscaled by ``context_scale``, the detail prediction
    assembled from overlapping windows of ``detail_crop`` x (H, W) at full resolution (stride
    ``detail_stride`` of a window, logits averaged where windows overlap, at most ``inference_chunk``
    windows per forward pass), fused by the unmasked scale attention (sec. 3.3-3.4). ``forward_crops`` is the training forward with one detail box. Crop sides
    must be multiples of ``alignment`` = o / s (8 for o = 4, s = 0.5). ``forward_features`` and ``head``
    are the wrapped segmentor's single-scale ones.
    """

    def __init__(
        self,
        segmentor: Segmentor,
        context_scale: float = 0.5,
        detail_crop: float = 0.5,
        detail_stride: float = 0.5,
        attention_classwise: bool = True,
        attention_embed_dim: int | None = None,
        inference_chunk: int = 24,
    ):
        super().__init__(segmentor.encoder, segmentor.head, segmentor.levels)
        if inference_chunk < 1:
            raise ValueError(f"inference_chunk must be >= 1, got {inference_chunk}")
        self.inference_chunk = inference_chunk
        self.context_scale = context_scale
        self.detail_crop = detail_crop
        self.detail_stride = detail_stride
        self.output_stride = self.reductions[0]
        alignment = self.output_stride / context_scale
        if abs(alignment - round(alignment)) > 1e-6:
            raise ValueError(
                f"context_scale {context_scale} must divide the output stride {self.output_stride} into a whole "
                "number of input pixels, so that the detail crop aligns with the context prediction grid"
            )
        self.alignment = round(alignment)
        num_classes = self.head.num_classes
        self.attention = SegFormerHead(
            self.channels,
            num_classes if attention_classwise else 1,
            embed_dim=attention_embed_dim or self.head.embed_dim,
        )

    # ---- building blocks ---------------------------------------------------------------------

    def context_view(self, images: Tensor) -> Tensor:
        """x_c: (B, 3, H, W) -> (B, 3, H s, W s), bilinear."""
        height, width = images.shape[-2:]
        size = (round(height * self.context_scale), round(width * self.context_scale))
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False)

    def scale_attention(self, context_features: list[Tensor]) -> Tensor:
        """a_c = sigmoid(h_a(f(x_c))): (B, C or 1, h, w) in [0, 1] on the context prediction grid."""
        return torch.sigmoid(self.attention(context_features))

    def detail_window(self, height: int, width: int) -> tuple[int, int]:
        """Size of the detail crop of a (height, width) crop, on the alignment grid."""
        k = self.alignment
        return tuple(max(k, round(self.detail_crop * side / k) * k) for side in (height, width))

    @staticmethod
    def fuse(context_logits: Tensor, attention: Tensor, detail_logits: Tensor) -> Tensor:
        """y_F = zeta((1 - a) * y_c, 1/s) + zeta(a, 1/s) * y_d (sec. 3.3), zeta bilinear.

        context_logits: (B, C, h, w); attention: (B, C or 1, h, w); detail_logits: (B, C, H', W') on the
        finer grid covering the same field of view -> (B, C, H', W').
        """
        size = detail_logits.shape[-2:]
        context = upsample((1 - attention) * context_logits, size)
        attention = upsample(attention, size)
        return attention * detail_logits + context

    def _check_crop(self, images: Tensor) -> None:
        height, width = images.shape[-2:]
        if height % self.alignment or width % self.alignment:
            raise ValueError(
                f"HRDA needs crop sides that are multiples of {self.alignment} (output stride "
                f"{self.output_stride} / context scale {self.context_scale}), got {height}x{width}"
            )

    def _logits(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = self.forward_features(images)
        return self._head_logits(features, images.shape[-2:]), features

    def _head_logits(self, features: list[Tensor], size: tuple[int, int]) -> Tensor:
        """The decode head on the features of (h, w) = ``size`` inputs, its output grid checked."""
        logits = self.head(features)
        expected = (size[0] // self.output_stride, size[1] // self.output_stride)
        if tuple(logits.shape[-2:]) != expected:
            raise ValueError(
                f"decode head gave a {tuple(logits.shape[-2:])} grid for a {tuple(size)} input, "
                f"expected {expected} (output stride {self.output_stride})"
            )
        return logits

    # ---- training and inference --------------------------------------------------------------

    def forward_crops(self, images: Tensor, box: DetailBox) -> TrainingPrediction:
        """The training forward: context view of the whole crop, detail view of ``box``, attention masked
        outside the box. images: (B, 3, H, W)."""
        return self.forward_crops_jointly([(images, box)])[0][0]

    def forward_crops_jointly(
        self, crops: Sequence[tuple[Tensor, DetailBox]], feature_images: Sequence[Tensor] = ()
    ) -> tuple[list[TrainingPrediction], list[list[Tensor]]]:
        """``forward_crops`` of each (images, box) of ``crops`` and the encoder features of the context
        view of each batch of ``feature_images`` (what ``HRDA.student_features`` gives), in as few
        passes as their shapes allow: where every context view and every detail crop has one shape
        (the default: both half the crop's side), one encoder pass over [context 1, detail 1,
        context 2, detail 2, ..., feature contexts], the decode head on the crops' views only and one
        attention-head pass over their contexts, each BatchNorm layer normalising every view on its
        own (``batch_norm_per_part``), in the order separate passes take them; else a pass per view.
        Equal to separate ``forward_crops`` and ``forward_features`` up to float rounding, gradients
        and running statistics included; the embedded encoder's cost is mostly per pass, not per image.

        Returns the predictions, one per crop, and the features, one list of levels per feature batch."""
        views = []
        for images, box in crops:
            self._check_crop(images)
            views += [self.context_view(images), box.crop(images)]
        feature_views = [self.context_view(images) for images in feature_images]
        joint = len({tuple(view.shape) for view in views}) == 1
        joined = feature_views if joint and all(v.shape[1:] == views[0].shape[1:] for v in feature_views) else []
        if joint:
            sizes = [len(view) for view in views + joined]
            with batch_norm_per_part(self, sizes):
                features = self.forward_features(torch.cat(views + joined))
            predicted = sum(sizes[: len(views)])
            with batch_norm_per_part(self.head, len(views)):
                logits = self._head_logits([level[:predicted] for level in features], views[0].shape[-2:])
            parts = [list(chunk) for chunk in zip(*(level.split(sizes) for level in features))]
            passes = list(zip(logits.chunk(len(views)), parts))
        else:
            passes = [self._logits(view) for view in views]
        extracted = parts[len(views) :] if joined else [self.forward_features(view) for view in feature_views]
        contexts, details = passes[0::2], passes[1::2]
        attentions = head_per_part(self.attention, [features for _, features in contexts])
        predictions = [
            self._training_prediction(images, box, context_logits, context_features, torch.sigmoid(attention), detail_logits)
            for (images, box), (context_logits, context_features), attention, (detail_logits, _) in zip(
                crops, contexts, attentions, details
            )
        ]
        return predictions, extracted

    def _training_prediction(
        self,
        images: Tensor,
        box: DetailBox,
        context_logits: Tensor,
        context_features: list[Tensor],
        attention: Tensor,
        detail_logits: Tensor,
    ) -> TrainingPrediction:
        """Mask the attention a_c outside ``box``, place the detail logits at the box and fuse (sec. 3.3)."""
        height, width = images.shape[-2:]
        mask = attention.new_zeros((1, 1, *attention.shape[-2:]))
        rows, columns = box.on_grid(self.alignment)
        mask[:, :, rows, columns] = 1
        attention = attention * mask
        o = self.output_stride
        margins = (box.left // o, (width - box.right) // o, box.top // o, (height - box.bottom) // o)
        placed = F.pad(detail_logits, margins)
        fused = self.fuse(context_logits, attention, placed)
        return TrainingPrediction(fused, detail_logits, attention, context_features)

    def detail_sliding(self, images: Tensor) -> Tensor:
        """Detail prediction of a whole crop from overlapping detail windows, all windows in one batch;
        logits are averaged where windows overlap (sec. 3.4). (B, 3, H, W) -> (B, C, H/o, W/o)."""
        self._check_crop(images)
        batch, _, height, width = images.shape
        o = self.output_stride
        window = self.detail_window(height, width)
        stride = tuple(max(o, round(self.detail_stride * side / o) * o) for side in window)
        origins = [
            (top, left)
            for top in window_starts(height, window[0], stride[0])
            for left in window_starts(width, window[1], stride[1])
        ]
        crops = torch.cat([images[:, :, top : top + window[0], left : left + window[1]] for top, left in origins])
        chunks = math.ceil(len(crops) / self.inference_chunk)
        logits = torch.cat([self._logits(chunk)[0] for chunk in crops.tensor_split(chunks)])
        summed = logits.new_zeros((batch, logits.shape[1], height // o, width // o))
        count = logits.new_zeros((1, 1, height // o, width // o))
        for index, (top, left) in enumerate(origins):
            box = DetailBox(top, left, *window)
            rows, columns = box.on_grid(o)
            summed[:, :, rows, columns] += logits[index * batch : (index + 1) * batch]
            count[:, :, rows, columns] += 1
        return summed / count

    def forward(self, images: Tensor) -> Tensor:
        """Multi-resolution inference: (B, 3, H, W) -> fused logits (B, C, H/o, W/o)."""
        self._check_crop(images)
        context_logits, context_features = self._logits(self.context_view(images))
        return self.fuse(context_logits, self.scale_attention(context_features), self.detail_sliding(images))


@dataclass
class DetailPrediction:
    """The detail view of the latest ``HRDA.forward_train``: logits (B, C, h_d/o, w_d/o) and its box."""

    logits: Tensor
    box: DetailBox


@register
class HRDA(DAFormer):
    """DAFormer's self-training with HRDA's multi-resolution predictions and losses (module docstring).

    ``self.model`` is an ``HRDASegmentor`` wrapping the segmentor the loop builds, so the EMA teacher
    (whose forward gives the pseudo-labels) and the evaluation run the multi-resolution inference.
    ``forward_train`` returns the fused logits of the whole crop (B, C, H/o, W/o) and the encoder
    features of the context view, and keeps the detail prediction in ``last_detail`` for the losses.
    """

    name = "hrda"
    Params = HRDAParams
    search_space = {**DAFormer.search_space, "detail_loss_weight": SearchRange(0.02, 0.5, log=True)}

    def __init__(self, model: Segmentor, params: HRDAParams | None = None, seed: int = 0, total_steps: int | None = None):
        params = params if params is not None else self.Params()
        wrapped = HRDASegmentor(
            model,
            context_scale=params.context_scale,
            detail_crop=params.detail_crop,
            detail_stride=params.detail_stride,
            attention_classwise=params.attention_classwise,
            attention_embed_dim=params.attention_embed_dim,
            inference_chunk=params.inference_chunk,
        )
        super().__init__(wrapped, params, seed, total_steps)
        self.last_detail: DetailPrediction | None = None

    @classmethod
    def run_settings(cls, params: HRDAParams, data, evaluation):
        """The data scales and test inference HRDA trains and tests with, from the benchmark's
        (``BenchmarkConfig``) and the profile's evaluation settings (``EvalConfig``): every image
        scale and the crop times ``resolution_scale``, the rare-class crop criterion times its square
        (pixels per crop), and sliding windows of the crop with stride ``test_stride`` of it."""
        factor = params.resolution_scale

        def scaled(size: tuple[int, int]) -> tuple[int, int]:
            return (round(size[0] * factor), round(size[1] * factor))

        crop = scaled(data.crop)
        data = dataclasses.replace(
            data,
            source=dataclasses.replace(data.source, scale=scaled(data.source.scale)),
            target=dataclasses.replace(data.target, scale=scaled(data.target.scale)),
            crop=crop,
            test_scale=scaled(data.test_scale),
            rcs_min_crop_ratio=data.rcs_min_crop_ratio * factor**2,
        )
        stride = (max(1, round(crop[0] * params.test_stride)), max(1, round(crop[1] * params.test_stride)))
        return data, dataclasses.replace(evaluation, mode="sliding", window=crop, stride=stride)

    # ---- DAFormer's hooks --------------------------------------------------------------------

    def detail_box(self, images: Tensor) -> DetailBox:
        """A random detail crop of a training crop (B, 3, H, W), drawn from the method's generator."""
        height, width = images.shape[-2:]
        size = self.model.detail_window(height, width)
        return random_detail_box(height, width, size, self.model.alignment, self.generator)

    def forward_train(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        box = self.detail_box(images)
        prediction = self.model.forward_crops(images, box)
        self.last_detail = DetailPrediction(prediction.detail, box)
        return prediction.fused, prediction.context_features

    def joint_student_pass(self, context: StepContext) -> None:
        """Every student input's multi-resolution prediction in one encoder pass over all their views
        (``HRDASegmentor.forward_crops_jointly``), one detail box drawn per input in input order, as
        separate ``forward_train`` calls draw them. Fills ``context.predictions`` with (fused logits,
        context features, ``DetailPrediction``), what ``supervised_losses`` takes as ``prediction``, and
        ``context.joint_features`` with the ``student_features`` of the feature inputs of the student
        inputs' size, computed in the same pass."""
        inputs = context.student_inputs
        crops = [(images, self.detail_box(images)) for images in inputs.values()]
        size = next(iter(inputs.values())).shape[1:]
        extra = {name: images for name, images in context.feature_inputs.items() if images.shape[1:] == size}
        predictions, features = self.model.forward_crops_jointly(crops, list(extra.values()))
        context.joint_features.update(zip(extra, features))
        for name, (_, box), prediction in zip(inputs, crops, predictions):
            context.predictions[name] = (
                prediction.fused,
                prediction.context_features,
                DetailPrediction(prediction.detail, box),
            )

    def student_features(self, images: Tensor) -> list[Tensor]:
        """Student encoder features of the context view of ``images``, the features ``forward_train``
        returns for a crop (what the feature distance and every add-on's contrast read), so that an
        add-on's features of an image lie on the same grid (``feature_stride``) as the step's."""
        return self.model.forward_features(self.model.context_view(images))

    @torch.no_grad()
    def teacher_features(self, images: Tensor) -> list[Tensor]:
        """EMA-teacher encoder features of the context view of ``images``, aligned like ``student_features``."""
        return self.teacher.model.forward_features(self.teacher.model.context_view(images))

    @property
    def feature_stride(self) -> int:
        """Input pixels per cell of the context features' finest level: the encoder's finest reduction
        over the context scale (the alignment of the detail crops, 8 for 4 and 0.5)."""
        return self.model.alignment

    def multi_resolution_losses(
        self,
        prefix: str,
        fused: Tensor,
        labels: Tensor,
        weights: Tensor | None = None,
        detail: DetailPrediction | None = None,
    ) -> dict[str, Tensor]:
        """(1 - lambda_d) CE(y_F, y) and lambda_d CE(y_d, y[b_d]) of one prediction: ``detail`` (by
        default the latest ``forward_train``'s) belongs to ``fused``.

        fused: (B, C, H/o, W/o); labels, weights: (B, H, W) of the whole crop."""
        detail = self.last_detail if detail is None else detail
        weight = self.params.detail_loss_weight
        detail_weights = None if weights is None else detail.box.crop(weights)
        return {
            f"{prefix}_ce": (1 - weight) * cross_entropy(fused, labels, weights),
            f"{prefix}_detail_ce": weight * cross_entropy(detail.logits, detail.box.crop(labels), detail_weights),
        }

    def supervised_losses(
        self,
        prefix: str,
        images: Tensor,
        labels: Tensor,
        weights: Tensor | None = None,
        prediction: tuple[Tensor, list[Tensor], DetailPrediction] | None = None,
    ) -> tuple[dict[str, Tensor], Tensor, list[Tensor]]:
        """HRDA's two terms (``multi_resolution_losses``) in place of DAFormer's single cross-entropy,
        so the mixed loss and every add-on loss built on this hook get the detail term too.
        ``prediction`` is (fused, context features, detail) of ``images`` when the step has it
        (``joint_student_pass``); else ``forward_train`` runs here."""
        if prediction is None:
            fused, features = self.forward_train(images)
            detail = self.last_detail
        else:
            fused, features, detail = prediction
        return self.multi_resolution_losses(prefix, fused, labels, weights, detail), fused, features

    def source_losses(self, context: StepContext) -> dict[str, Tensor]:
        source = context.source
        losses, context.source_logits, context.source_features = self.supervised_losses(
            "source", source.image, source.label, prediction=context.predictions.get("source")
        )
        if self.reference_encoder is not None:
            # the reference encoder sees what the student's context branch saw
            view = self.model.context_view(source.image)
            losses["feature_distance"] = self.feature_distance_loss(view, source.label, context.source_features)
        return losses
