"""PiPa (Chen et al., "PiPa: Pixel- and Patch-wise Self-supervised Learning for Domain Adaptative
Semantic Segmentation", arXiv 2211.07609, 2022) as an add-on: ``daformer+pipa``, ``hrda+pipa``.

What it adds to its base, per step (sec. 3.2-3.3), both terms InfoNCE with temperature tau = 0.1 on
L2-normalised projections of the concatenated multi-level encoder features (``ProjectionHead``):

- pixel-wise contrast (weight 0.1): a supervised contrast over pixel embeddings, same class =
  positive, other classes = negatives (eq. 1),

      L_pixel = mean_i 1/|P_i| sum_{p in P_i} -log( e^{z_i.z_p/tau} / (e^{z_i.z_p/tau} + sum_{n in N_i} e^{z_i.z_n/tau}) ),

  on labelled source cells and, by default (the paper), pseudo-labelled target cells. The target cells
  are those of the base's mixed batch, whose non-pasted pixels carry the teacher's pseudo-labels, so
  the term needs no extra forward pass. Anchors are sampled per image and class, half "hard" (the
  segmentation network predicts another class there) and half "easy" (predicted right);
- patch-wise contrast (weight 0.1): two overlapping crops of each target image go through the network;
  the embeddings of one location in the overlap are a positive pair, embeddings whose pseudo-label is
  another class (in either crop) are the negatives (eq. 2-3, same form as above), symmetric in the two
  crops. The crops go through the base's ``student_features``, so they are seen as the base sees its
  training crops: on HRDA the context view (half resolution), whose features the pixel term and the
  base's own losses read too, on cells of the base's ``feature_stride``.

  Each crop covers ``pipa_crop_fraction`` of the target crop's side and is resized to the training
  crop's size (``pipa_crop_upscale``): the image scaled by 1 / fraction, then two windows of the
  training size, as the released code's pair loader cuts crops of the training size from a randomly
  scaled image. Crops of the training size join the base's student pass (``student_feature_inputs``),
  whose cost on the embedded encoder is mostly per pass, not per image. The contrast compares cells
  of ``pipa_patch_stride`` crop pixels (8: the released code average-pools its stride-4 output by 2
  before the projection), the features average-pooled to that grid where they are finer; the crops
  lie on a grid of fraction x that stride target pixels, so that a location in the overlap falls on
  one cell of each crop.

``pipa_as_released`` switches the patch term to the authors' released code: computed on the frozen
EMA teacher's features, so its gradient trains only the projection head and never the segmentation
network (a known defect). The released code also applies the pixel term to source cells only
(``pipa_pixel_target: false``). The default is the paper: student features, gradients reach the
network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmark.classes import IGNORE_INDEX, NUM_CLASSES
from methods.base import AddOn, SearchRange, register_addon
from methods.components import (
    ProjectionHead,
    labels_where_weighted,
    majority_labels,
    paired_contrastive_loss,
    projected_cells,
)


#: Where Optuna searches the weight of either term (the paper's 0.1 in the middle of the log range).
CONTRAST_WEIGHTS = SearchRange(0.01, 1.0, log=True)


@dataclass
class PiPaParams:
    #: Pixel-wise contrast: on, its weight, and on pseudo-labelled target cells too (the paper;
    #: false: on source cells only, as the released code).
    pipa_pixel: bool = True
    pipa_pixel_weight: float = 0.1
    pipa_pixel_target: bool = True
    #: Patch-wise contrast: on, its weight, and as released (on frozen teacher features, so that only
    #: the projection head learns from it).
    pipa_patch: bool = True
    pipa_patch_weight: float = 0.1
    pipa_as_released: bool = False
    #: Patch crops: their side as a fraction of the target crop (> 0.5, so the two overlap), resized to
    #: the training crop's size (false: kept at the image's resolution, in a student pass of their
    #: own), each colour-augmented on its own (the base's jitter and blur) so that the two views differ.
    pipa_crop_fraction: float = 0.75
    pipa_crop_upscale: bool = True
    pipa_patch_augment: bool = True
    #: Crop pixels per cell of the patch contrast (a multiple of the base's ``feature_stride``; finer
    #: features are average-pooled to it); null: the base's ``feature_stride``.
    pipa_patch_stride: int | None = 8
    #: Pixel anchors: at most this many per step, and this many per image and class.
    pipa_max_anchors: int = 1024
    pipa_views_per_class: int = 100
    #: InfoNCE temperature of both terms, embedding width of the projection heads (null: the decode
    #: head's width, as the released code's 256 with DAFormer's 256-wide head), and the share of a
    #: feature cell's pixels a class needs to label the cell.
    pipa_temperature: float = 0.1
    pipa_projection_dim: int | None = None
    pipa_label_min_ratio: float = 0.75

    def __post_init__(self):
        if not 0.5 < self.pipa_crop_fraction <= 1.0:
            raise ValueError(f"pipa_crop_fraction must be in (0.5, 1], got {self.pipa_crop_fraction}")
        if self.pipa_temperature <= 0:
            raise ValueError(f"pipa_temperature must be > 0, got {self.pipa_temperature}")
        if self.pipa_patch_stride is not None and self.pipa_patch_stride < 1:
            raise ValueError(f"pipa_patch_stride must be >= 1 or null, got {self.pipa_patch_stride}")


def hard_easy_anchors(
    labels: Tensor, predictions: Tensor, max_anchors: int, views_per_class: int, generator: torch.Generator
) -> Tensor:
    """Anchor cells for the pixel contrast, sampled per image and class (Wang et al., ICCV 2021,
    sec. 3.3, as PiPa uses it): v = min(max_anchors // #(image, class) pairs, views_per_class) cells
    of each pair, half hard (predicted as another class) and half easy (predicted right), the other
    kind filling in where one runs short. The cells of each group are drawn in a random order from one
    ``randperm`` of ``generator``; the result lists the pairs in (image, class) order, hard before easy.

    labels, predictions: (B, n) per-image cells (labels with the ignore index) -> (K,) indices into
    the flattened (B * n) cells.
    """
    flat = labels.reshape(-1)
    cells = (flat != IGNORE_INDEX).nonzero().flatten()
    if len(cells) == 0:
        return torch.zeros(0, dtype=torch.long)
    # index_select rather than tensor[index] throughout: advanced indexing costs several times as much
    # per call on the CPU (0.17 against 0.02 ms for 50,000 indices)
    classes = flat.index_select(0, cells)
    easy = (predictions.reshape(-1).index_select(0, cells) == classes).long()
    # one group per (image, class, hard/easy); shuffled, then stably sorted by group: each group's
    # cells in random order
    key = ((cells // labels.shape[1]) * (IGNORE_INDEX + 1) + classes) * 2 + easy
    shuffle = torch.randperm(len(cells), generator=generator).to(cells.device)
    order = shuffle.index_select(0, torch.sort(key.index_select(0, shuffle), stable=True).indices)
    group_keys, group_of, group_sizes = torch.unique_consecutive(key.index_select(0, order), return_inverse=True, return_counts=True)
    pair_of_group = torch.unique_consecutive(group_keys // 2, return_inverse=True)[1]
    pairs = int(pair_of_group[-1]) + 1
    hard_group = group_keys % 2 == 0
    sizes = torch.zeros(pairs, 2, dtype=torch.long, device=cells.device)  # [hard, easy] cells per pair
    sizes[pair_of_group, (~hard_group).long()] = group_sizes
    views = max(1, min(max_anchors // pairs, views_per_class))
    hard = torch.clamp(sizes[:, 0], max=views // 2)
    easy_taken = torch.minimum(sizes[:, 1], views - hard)
    hard = torch.minimum(sizes[:, 0], views - easy_taken)
    quota = torch.where(hard_group, hard.index_select(0, pair_of_group), easy_taken.index_select(0, pair_of_group))
    starts = torch.cumsum(group_sizes, 0) - group_sizes
    rank = torch.arange(len(cells), device=cells.device) - starts.index_select(0, group_of)
    return cells.index_select(0, order.masked_select(rank < quota.index_select(0, group_of)))


def class_run_pairs(classes: Tensor) -> tuple[Tensor, Tensor]:
    """Every ordered pair (i, j), i != j, of positions with the same class in ``classes`` sorted so
    that each class is one run: (P,), (P,) indices, grouped by i in order, j ascending. Counted
    from the runs' lengths instead of searched in an (N, N) mask, whose ``nonzero`` alone took
    0.2 ms for 500 anchors.

    classes: (N,) sorted by class -> anchors, partners."""
    runs = torch.unique_consecutive(classes, return_counts=True)[1]
    run_of = torch.repeat_interleave(runs)
    length = runs.index_select(0, run_of)  # each position's run length
    start = (torch.cumsum(runs, 0) - runs).index_select(0, run_of)  # and where its run starts
    anchors = torch.repeat_interleave(length - 1)
    first = torch.cumsum(length - 1, 0) - (length - 1)  # each anchor's first pair
    rank = torch.arange(len(anchors), device=classes.device) - first.index_select(0, anchors)
    own = (torch.arange(len(classes), device=classes.device) - start).index_select(0, anchors)
    partners = start.index_select(0, anchors) + rank + (rank >= own).long()
    return anchors, partners


def crop_grid(height: int, width: int, fraction: float, stride: int, upscale: bool) -> tuple[tuple[int, int], int]:
    """The side of the two crops of an (height, width) image, in image pixels, and the image pixels
    per feature cell side of a crop, so that offsets that are multiples of the cell put one image
    location on one cell of each crop.

    Kept at the image's resolution the crops' cells are ``stride`` pixels and the side is ``fraction``
    of the image's floored to that grid. Resized to (height, width) (``upscale``) a crop has the
    image's (height / stride, width / stride) cells, each round(fraction * stride) image pixels."""
    if not upscale:
        return tuple(max(stride, int(fraction * side) // stride * stride) for side in (height, width)), stride
    if height % stride or width % stride:
        raise ValueError(f"pipa: crops resized to {height}x{width} need sides that are multiples of the feature stride {stride}")
    cell = round(fraction * stride)
    if not 0.5 < cell / stride <= 1.0:
        raise ValueError(
            f"pipa_crop_fraction {fraction} gives crops of {cell}/{stride} of the image on a feature stride of "
            f"{stride}, which need not overlap; use a fraction whose product with {stride} rounds above {stride / 2:g}"
        )
    return (cell * (height // stride), cell * (width // stride)), cell


def overlapping_crops(height: int, width: int, size: tuple[int, int], cell: int, batch: int, generator: torch.Generator) -> Tensor:
    """The top-left corners (B, 2, 2) as [image, crop, (y, x)] of two crops of ``size`` per image, at
    offsets that are multiples of ``cell`` (``crop_grid``)."""
    return torch.stack(
        [
            torch.randint(0, (side - crop) // cell + 1, (batch, 2), generator=generator) * cell
            for side, crop in zip((height, width), size)
        ],
        dim=-1,
    )


def overlap_pairs(corners: Tensor, size: tuple[int, int], cell: int) -> tuple[Tensor, Tensor]:
    """Flattened feature-cell indices of the same image location in crop 1 and crop 2.

    corners: (B, 2, 2) from ``overlapping_crops``; size: the crops' size in image pixels; cell: image
    pixels per feature cell. Cells are indexed over the (2B, h, w) stack [crop 1 of every image, crop
    2 of every image] -> (K,), (K,) with cell a in crop 1 = cell b in crop 2."""
    batch = corners.shape[0]
    h, w = size[0] // cell, size[1] // cell
    first, second = [], []
    for b in range(batch):
        shift = ((corners[b, 1] - corners[b, 0]) // cell).tolist()  # crop 2 relative to crop 1, in cells
        rows = torch.arange(max(0, shift[0]), min(h, h + shift[0]))
        cols = torch.arange(max(0, shift[1]), min(w, w + shift[1]))
        r, c = torch.meshgrid(rows, cols, indexing="ij")
        first.append(((b * h + r) * w + c).flatten())
        second.append((((batch + b) * h + r - shift[0]) * w + c - shift[1]).flatten())
    return torch.cat(first), torch.cat(second)


@dataclass
class PatchViews:
    """The two crops of every target image of a step, as the network sees them, and where they lie.

    images: (2B, 3, H', W'), crop 1 of every image then crop 2 (resized and augmented as set);
    corners: (B, 2, 2) top-left corners in the image; size: the crops' size in image pixels; cell:
    image pixels per feature cell side."""

    images: Tensor
    corners: Tensor
    size: tuple[int, int]
    cell: int


def patch_contrast(embeddings: Tensor, labels: Tensor, first: Tensor, second: Tensor, temperature: float) -> Tensor:
    """PiPa's patch-wise contrast (eq. 2-3): each overlap cell of one crop is an anchor whose positive
    is the same location in the other crop and whose negatives are all cells (both crops) with
    another pseudo-label; symmetric in the two crops. Anchors without a pseudo-label are left out.

    embeddings: (2B, D, h, w) unit embeddings of [crops 1, crops 2]; labels: (2B, h, w) pseudo-labels
    of the same cells (ignore index allowed); first, second: (K,) paired cell indices."""
    rows = embeddings.permute(0, 2, 3, 1).reshape(-1, embeddings.shape[1])
    labels = labels.reshape(-1)
    anchors = torch.cat([first, second])
    partners = torch.cat([second, first])
    # anchors without a pseudo-label are left out
    labelled = labels.index_select(0, anchors) != IGNORE_INDEX
    anchors, partners = anchors.masked_select(labelled), partners.masked_select(labelled)
    anchor_labels = labels.index_select(0, anchors)
    negatives = (labels[None] != anchor_labels[:, None]) & (labels != IGNORE_INDEX)[None]
    pairs = torch.arange(len(anchors), device=rows.device)
    return paired_contrastive_loss(rows.index_select(0, anchors), rows, pairs, partners, negatives, temperature)


@register_addon
class PiPa(AddOn):
    """Pixel and patch contrast on top of a self-training base; two projection heads (module docstring)."""

    name = "pipa"
    Params = PiPaParams
    search_space = {"pipa_pixel_weight": CONTRAST_WEIGHTS, "pipa_patch_weight": CONTRAST_WEIGHTS}
    bases = ("daformer", "hrda")

    def __init__(self, model, params=None, seed: int = 0, total_steps: int | None = None):
        super().__init__(model, params, seed, total_steps)
        p = self.params
        width = p.pipa_projection_dim or self.model.head.embed_dim
        self.pipa_pixel_projection = ProjectionHead(self.model.channels, width) if p.pipa_pixel else None
        self.pipa_patch_projection = ProjectionHead(self.model.channels, width) if p.pipa_patch else None

    def student_feature_inputs(self, context) -> dict[str, Tensor]:
        """The base's plus the patch crops ("pipa_crops"), whose student features the patch term reads:
        crops of the training size join the base's student pass."""
        inputs = super().student_feature_inputs(context)
        p = self.params
        if p.pipa_patch and not p.pipa_as_released:
            inputs["pipa_crops"] = self.pipa_patch_views(context).images
        return inputs

    @property
    def pipa_patch_stride(self) -> int:
        """Crop pixels per cell of the patch contrast (``pipa_patch_stride``, checked against the base)."""
        stride, base = self.params.pipa_patch_stride, self.feature_stride
        if stride is None:
            return base
        if stride % base:
            raise ValueError(
                f"pipa_patch_stride {stride} is not a multiple of the base's feature stride {base}; "
                f"use a multiple of {base} or null"
            )
        return stride

    def pipa_patch_views(self, context) -> PatchViews:
        """The step's two overlapping crops of each target image (``PatchViews``), drawn once per step."""
        views = context.addon_state.get("pipa_patch_views")
        if views is not None:
            return views
        p = self.params
        images = context.target.image
        batch, _, height, width = images.shape
        size, cell = crop_grid(height, width, p.pipa_crop_fraction, self.pipa_patch_stride, p.pipa_crop_upscale)
        corners = overlapping_crops(height, width, size, cell, batch, self.generator)
        crops = torch.stack(
            [images[b, :, y : y + size[0], x : x + size[1]] for k in range(2) for b, (y, x) in enumerate(corners[:, k].tolist())]
        )
        if p.pipa_crop_upscale and size != (height, width):
            crops = F.interpolate(crops, size=(height, width), mode="bilinear", align_corners=False)
        if p.pipa_patch_augment:
            crops = self.augment(crops)
        views = context.addon_state["pipa_patch_views"] = PatchViews(crops, corners, size, cell)
        return views

    def addon_losses(self, context) -> dict[str, Tensor]:
        losses = super().addon_losses(context)
        p = self.params
        if p.pipa_pixel:
            losses["pipa_pixel"] = p.pipa_pixel_weight * self.pipa_pixel_loss(context)
        if p.pipa_patch:
            losses["pipa_patch"] = p.pipa_patch_weight * self.pipa_patch_loss(context)
        return losses

    def pipa_pixel_loss(self, context) -> Tensor:
        """Pixel contrast over the source batch and (``pipa_pixel_target``) the mixed batch."""
        p = self.params
        batches = [(context.source_features, context.source.label, context.source_logits)]
        if p.pipa_pixel_target:
            mixed_labels = labels_where_weighted(context.mixed_labels, context.mixed_weights)
            batches.append((context.mixed_features, mixed_labels, context.mixed_logits))
        labels, predictions = [], []
        for features, label, logits in batches:
            size = features[0].shape[-2:]  # the projection's grid
            labels.append(majority_labels(label, size, NUM_CLASSES, p.pipa_label_min_ratio).flatten(1))
            logits = logits.detach()
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            predictions.append(logits.argmax(dim=1).flatten(1))
        labels = torch.cat(labels)
        index = hard_easy_anchors(labels, torch.cat(predictions), p.pipa_max_anchors, p.pipa_views_per_class, self.generator)
        # the anchors ordered by class (the loss does not depend on their order), so that each class's
        # anchors are one run and an anchor's positives are the rest of its run
        classes, order = torch.sort(labels.reshape(-1).index_select(0, index), stable=True)
        index = index.index_select(0, order)
        # one projection-head call over the batches' features, each normalised by its own statistics,
        # that projects the anchors only past its BatchNorm
        rows = projected_cells(self.pipa_pixel_projection, [features for features, _, _ in batches], index)
        anchors, partners = class_run_pairs(classes)
        negatives = classes[:, None] != classes[None]
        return paired_contrastive_loss(rows, rows, anchors, partners, negatives, p.pipa_temperature)

    def pipa_patch_loss(self, context) -> Tensor:
        """Patch contrast between two overlapping crops of each target image (``pipa_patch_views``),
        pseudo-labelled by the teacher's labels of the whole image (cells of weight 0 unlabelled)."""
        p = self.params
        views = self.pipa_patch_views(context)
        if p.pipa_as_released:
            features = self.teacher_features(views.images)
        else:
            features = context.joint_features.get("pipa_crops")  # computed in the base's joint pass
            if features is None:
                features = self.student_features(views.images)
        cells = (views.size[0] // views.cell, views.size[1] // views.cell)
        expected = tuple(side // self.feature_stride for side in views.images.shape[-2:])
        if tuple(features[0].shape[-2:]) != expected:
            raise RuntimeError(
                f"pipa: crops of {tuple(views.images.shape[-2:])} gave a {tuple(features[0].shape[-2:])} feature grid, "
                f"expected {expected} (feature stride {self.feature_stride}); the base's student_features must give "
                "cells of its feature_stride"
            )
        # the contrast's grid: levels finer than it are averaged over its cells
        pooled = [
            F.adaptive_avg_pool2d(level, cells) if level.shape[-2] > cells[0] or level.shape[-1] > cells[1] else level
            for level in features
        ]
        embeddings = self.pipa_patch_projection(pooled)
        pseudo = labels_where_weighted(context.pseudo_labels, context.pseudo_weights)
        crop_labels = torch.stack(
            [
                pseudo[b, y : y + views.size[0], x : x + views.size[1]]
                for k in range(2)
                for b, (y, x) in enumerate(views.corners[:, k].tolist())
            ]
        )
        labels = majority_labels(crop_labels, cells, NUM_CLASSES, p.pipa_label_min_ratio)
        first, second = overlap_pairs(views.corners, views.size, views.cell)
        return patch_contrast(embeddings, labels, first, second, p.pipa_temperature)
