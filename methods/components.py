"""Small, tested building blocks of self-training UDA methods, shared by every method that needs them.

Sources: DAFormer (Hoyer et al., CVPR 2022) sections 3.1-3.4 and its DACS-based self-training
(Tranheden et al., WACV 2021); the facts are collected in DESIGN.md section 7.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn

from benchmark.classes import IGNORE_INDEX
from benchmark.data import denormalize, normalize
from benchmark.models import upsample


class EMATeacher(nn.Module):
    """Mean teacher: a frozen copy of the student updated as an exponential moving average.

    ``alpha_t = min(1 - 1 / (t + 1), alpha_max)`` (DAFormer eq. 5 with alpha_max = 0.999), so the
    teacher follows the student closely at first. Parameters and floating-point buffers (BatchNorm
    statistics) are averaged. The teacher runs without dropout or drop path; its BatchNorm layers
    normalise with their running statistics, or with ``batch_statistics`` with the statistics of the
    batch they see, as the released DAFormer code's teacher does (it stays in training mode with only
    dropout and drop path switched off, ``mmseg/models/uda/dacs.py``). Those batch statistics never
    move the running ones (momentum 0), so the averaged buffers stay the student's average.
    """

    def __init__(self, student: nn.Module, alpha_max: float = 0.999, batch_statistics: bool = False):
        super().__init__()
        self.alpha_max = alpha_max
        self.batch_statistics = batch_statistics
        self.model = copy.deepcopy(student)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        if batch_statistics:
            for module in self._batch_norms():
                module.momentum = 0.0
        self.train(self.training)

    def _batch_norms(self) -> list[nn.Module]:
        return [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True) -> EMATeacher:
        super().train(mode)
        self.model.eval()
        if self.batch_statistics:
            for module in self._batch_norms():
                module.train()
        return self

    def alpha(self, step: int) -> float:
        return min(1.0 - 1.0 / (step + 1), self.alpha_max)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        # one multi-tensor call per operation instead of two per tensor: the same element-wise
        # arithmetic, mean * alpha + (1 - alpha) * current, without the per-tensor Python overhead
        alpha = self.alpha(step)
        means, currents, counters, counts = self._pairs(student)
        if means:
            torch._foreach_mul_(means, alpha)
            torch._foreach_add_(means, currents, alpha=1.0 - alpha)
        if counters:
            torch._foreach_copy_(counters, counts)

    def _pairs(self, student: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Averaged teacher tensors and their student tensors (parameters, floating-point buffers),
        then integer buffers (copied) and theirs. Walking the module tree costs more than the update
        itself on a small model, so the lists are kept while the first tensors of both sides are still
        the ones they hold (load_state_dict copies in place and keeps them; a deep copy does not)."""
        cached = self.__dict__.get("_cached_pairs")
        first_mean = next(self.model.parameters(), None)
        first_current = next(student.parameters(), None)
        if cached is not None and cached[0] is first_mean and cached[1] is first_current:
            return cached[2]
        means, currents, counters, counts = [], [], [], []
        for mean, current in zip(self.model.parameters(), student.parameters()):
            means.append(mean)
            currents.append(current)
        for mean, current in zip(self.model.buffers(), student.buffers()):
            if mean.dtype.is_floating_point:
                means.append(mean)
                currents.append(current)
            else:
                counters.append(mean)
                counts.append(current)
        pairs = (means, currents, counters, counts)
        self.__dict__["_cached_pairs"] = (first_mean, first_current, pairs)
        return pairs

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def splits_batch_statistics(self) -> bool:
        """Whether ``batch_statistics_per_part`` can serve this teacher: its BatchNorm layers are
        plain ``nn.BatchNorm1d/2d/3d`` (a subclass may do more in its ``forward``, e.g. an activation)."""
        plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
        return all(type(module) in plain for module in self._batch_norms())

    def batch_statistics_per_part(self, parts: int) -> contextlib.AbstractContextManager:
        """Within this context every BatchNorm layer of a teacher on ``batch_statistics`` normalises
        each of ``parts`` equal consecutive parts of its batch with that part's own statistics
        (``batch_norm_per_part``). One pass over ``torch.cat`` of equally sized batches then gives
        what a pass over each gives (up to float rounding), at one pass's per-operation cost: two
        encoder passes over batches of two 64x64 crops took 1.6 times one pass over four on the
        embedded encoder. Nothing changes for a teacher on running statistics, whose outputs do not
        depend on the rest of the batch anyway."""
        if not self.batch_statistics or parts == 1:
            return contextlib.nullcontext()
        if not self.splits_batch_statistics():
            raise TypeError("batch_statistics_per_part needs plain BatchNorm layers in the teacher")
        return batch_norm_per_part(self.model, parts)


@contextlib.contextmanager
def batch_norm_per_part(module: nn.Module, parts: int | Sequence[int]) -> Iterator[None]:
    """Within this context every BatchNorm layer of ``module`` that normalises with batch statistics
    (training mode, or no running statistics) treats each of ``parts`` consecutive parts of its batch
    as a batch of its own: it normalises the part with the part's statistics and, in training mode,
    moves its running statistics once per part, in order. ``parts`` is a number of equal parts or the
    parts' sizes. A forward pass over ``torch.cat([x_1, ..., x_P])`` then computes, up to float
    rounding, what P passes over x_1, ..., x_P compute, running statistics and their gradients
    included, with one pass's per-operation overhead. Layers on running statistics are left alone:
    their output for an image does not depend on the rest of the batch.

    x: (sum of the sizes, C, ...) -> per part p: (x_p - mean(x_p)) / sqrt(var(x_p) + eps) * weight + bias."""
    layers = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
    ]
    if (parts == 1 if isinstance(parts, int) else len(parts) == 1) or not layers:
        yield
        return
    sizes = parts if isinstance(parts, int) else tuple(parts)
    for layer in layers:
        layer.forward = functools.partial(_batch_norm_per_part, layer, sizes)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward


def _batch_norm_per_part(layer: nn.modules.batchnorm._BatchNorm, parts: int | tuple[int, ...], x: Tensor) -> Tensor:
    if isinstance(parts, int):
        if x.shape[0] % parts:
            raise ValueError(f"a batch of {x.shape[0]} does not split into {parts} equal parts")
        pieces = x.chunk(parts)
    else:
        if x.shape[0] != sum(parts):
            raise ValueError(f"a batch of {x.shape[0]} does not split into parts of {list(parts)}")
        pieces = x.split(parts)
    # the class's own forward on each part: what separate passes run, momentum and counters included
    return torch.cat([type(layer).forward(layer, part) for part in pieces])


def head_per_part(head: nn.Module, parts: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """``[head(levels) for levels in parts]`` for a head on multi-level features (a decode, attention
    or projection head), computed where the parts have one shape in one call over their concatenation
    with every BatchNorm layer normalising each part on its own (``batch_norm_per_part``): the same
    outputs, gradients and running statistics up to float rounding, at one call's per-operation cost.

    parts: P lists of L levels (B, C_l, h_l, w_l), finest first -> P outputs (B, ...)."""
    shapes = {tuple(tuple(level.shape) for level in levels) for levels in parts}
    if len(parts) == 1 or len(shapes) > 1:
        return [head(levels) for levels in parts]
    with batch_norm_per_part(head, len(parts)):
        output = head([torch.cat(level) for level in zip(*parts)])
    return list(output.chunk(len(parts)))


@torch.no_grad()
def pseudo_labels(
    teacher_logits: Tensor,
    size: tuple[int, int],
    threshold: float = 0.968,
    ignore_top: float = 0.0,
    ignore_bottom: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Teacher pseudo-labels with DAFormer's confidence weighting (DACS / DAFormer sec. 3.1).

    The label is the teacher's argmax; every pseudo-labelled pixel of the batch gets one scalar
    weight, the fraction of target pixels whose max softmax probability is >= ``threshold``. Rows
    in the top ``ignore_top`` and bottom ``ignore_bottom`` fraction of the crop get weight 0
    (DAFormer: 15 and 120 rows of a 512-row crop, i.e. 0.029 and 0.234, to skip the rectification
    border and the ego car).

    teacher_logits: (B, C, h, w) -> labels (B, H, W) int64, weights (B, H, W) float32.
    """
    logits = F.interpolate(teacher_logits, size=size, mode="bilinear", align_corners=False)
    probabilities = logits.softmax(dim=1)
    confidence, labels = probabilities.max(dim=1)
    batch_weight = (confidence >= threshold).float().mean()
    weights = torch.full_like(confidence, batch_weight.item())
    height = size[0]
    top, bottom = round(ignore_top * height), round(ignore_bottom * height)
    if top:
        weights[:, :top] = 0
    if bottom:
        weights[:, height - bottom :] = 0
    return labels, weights


def class_mix_masks(source_labels: Tensor, generator: torch.Generator) -> Tensor:
    """ClassMix masks (Olsson et al., WACV 2021; DAFormer sec. 3.1): per source image, half of the
    classes present in its label (rounded up; the ignore label is not a class) are pasted.

    source_labels: (B, H, W) int64 -> masks (B, H, W) bool, True where the source pixel is pasted.
    """
    masks = torch.zeros_like(source_labels, dtype=torch.bool)
    for i, label in enumerate(source_labels):
        classes = label.unique()
        classes = classes[classes != IGNORE_INDEX]
        if len(classes) == 0:
            continue
        chosen = classes[torch.randperm(len(classes), generator=generator)[: math.ceil(len(classes) / 2)]]
        masks[i] = torch.isin(label, chosen)
    return masks


def mix(masks: Tensor, pasted: Tensor, background: Tensor) -> Tensor:
    """Where ``masks`` is True take ``pasted``, elsewhere ``background``.

    masks: (B, H, W); pasted/background: (B, H, W) or (B, C, H, W)."""
    if pasted.dim() == 4:
        masks = masks[:, None]
    return torch.where(masks, pasted, background)


def strong_augment(
    images: Tensor,
    generator: torch.Generator,
    jitter_strength: float = 0.2,
    jitter_probability: float = 0.8,
    blur_probability: float = 0.5,
    blur_sigma: tuple[float, float] = (0.15, 1.15),
) -> Tensor:
    """DAFormer's strong augmentation of mixed images: colour jitter (brightness, contrast,
    saturation and hue, each factor drawn within ``jitter_strength``, in random order) with
    probability ``jitter_probability``, then Gaussian blur with sigma uniform in ``blur_sigma`` and a
    kernel about a tenth of the image size, with probability ``blur_probability``. Each image draws
    its own decisions from ``generator``.

    images: (B, 3, H, W) ImageNet-normalised -> same shape, normalised.
    """
    rgb = denormalize(images).clamp(0, 1)

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=generator).item()

    augmented, blurred, sigmas = [], [], []
    for index, image in enumerate(rgb):
        if torch.rand((), generator=generator).item() < jitter_probability:
            s = jitter_strength
            ops = [
                lambda x, f=uniform(1 - s, 1 + s): TF.adjust_brightness(x, f),
                lambda x, f=uniform(1 - s, 1 + s): TF.adjust_contrast(x, f),
                lambda x, f=uniform(1 - s, 1 + s): TF.adjust_saturation(x, f),
                lambda x, f=uniform(-s, s): adjust_hue(x, f),
            ]
            for op in torch.randperm(4, generator=generator).tolist():
                image = ops[op](image)
        if torch.rand((), generator=generator).item() < blur_probability:
            blurred.append(index)
            sigmas.append(uniform(*blur_sigma))
        augmented.append(image)
    augmented = torch.stack(augmented)
    if blurred:  # blur comes last for every image: one call for all the images that draw it
        chosen = torch.tensor(blurred, device=images.device)
        kernel = (_odd(0.1 * images.shape[-2]), _odd(0.1 * images.shape[-1]))
        augmented = augmented.index_copy(0, chosen, gaussian_blur(augmented.index_select(0, chosen), sigmas, kernel))
    return normalize(augmented)


def gaussian_blur(images: Tensor, sigmas: Sequence[float], kernel_size: tuple[int, int]) -> Tensor:
    """Gaussian blur of each image with its own sigma, borders reflected: torchvision's
    ``gaussian_blur`` (a (kernel_h, kernel_w) kernel of weights exp(-x^2 / (2 sigma^2)), normalised,
    over the image padded by reflection) up to float rounding (tested), for a batch in one call.

    The kernel is separable, and filtering one axis with reflected borders is a product with an
    (L, L) band matrix whose entries are the kernel's weights folded at the borders:
    out_b = R_b x_b C_b^T, R_b and C_b built from image b's sigma. Two batched matrix products
    instead of one padded depthwise convolution per image, whose call cost is most of its time on
    small images.

    images: (B, C, H, W); sigmas: B values; kernel_size: (kernel_h, kernel_w), odd -> (B, C, H, W).
    """
    sigma = torch.tensor(sigmas, dtype=images.dtype, device=images.device)

    def band(length: int, size: int) -> Tensor:
        radius = size // 2
        offsets = torch.arange(-radius, radius + 1, device=images.device)
        weights = torch.exp(-0.5 * (offsets.to(images.dtype)[None] / sigma[:, None]) ** 2)
        weights = weights / weights.sum(dim=1, keepdim=True)  # (B, size)
        source = torch.arange(length, device=images.device)[:, None] + offsets  # (L, size), reflected:
        source = torch.where(source < 0, -source, source)
        source = torch.where(source > length - 1, 2 * (length - 1) - source, source)
        matrix = torch.zeros(len(sigmas), length, length, dtype=images.dtype, device=images.device)
        return matrix.scatter_add_(2, source.expand(len(sigmas), -1, -1), weights[:, None].expand(-1, length, -1))

    rows, columns = band(images.shape[-2], kernel_size[0]), band(images.shape[-1], kernel_size[1])
    return rows[:, None] @ images @ columns.transpose(1, 2)[:, None]


#: The offsets n of the red, green and blue channels in ``adjust_hue``'s HSV-to-RGB formula.
_HUE_OFFSETS = (5.0, 3.0, 1.0)


def adjust_hue(image: Tensor, factor: float) -> Tensor:
    """Rotate the hue of an RGB image in [0, 1] by ``factor`` turns (in [-0.5, 0.5]), saturation and
    value kept: torchvision's ``adjust_hue`` up to float rounding (tested), in about 20 tensor
    operations instead of about 50: 0.06 against 0.29 ms on a 64x64 image, where every operation's
    cost is mostly its call.

    With value v = max(r, g, b), chroma c = v - min(r, g, b) and the hue in sixths of a turn,
    h6 = (g - b) / c, (b - r) / c + 2 or (r - g) / c + 4 for a maximum in red, green or blue, each
    channel of the rotated colour is v - c * clamp(min(k, 4 - k), 0, 1) with
    k = (n + h6 + 6 * factor) mod 6 and n = 5, 3, 1 for red, green, blue (the closed form of the
    piecewise HSV-to-RGB map; v * s = c). Grey pixels (c = 0) are left as they are.

    image: (3, H, W) -> (3, H, W).
    """
    red, green, blue = image
    value = torch.maximum(torch.maximum(red, green), blue)
    chroma = value - torch.minimum(torch.minimum(red, green), blue)
    # h6 * c, the maximum's channel chosen in torchvision's order (red, then green) where two tie
    sixths = torch.where(
        red == value, green - blue, torch.where(green == value, blue - red + 2 * chroma, red - green + 4 * chroma)
    )
    sixths = sixths.div_(chroma).nan_to_num_(0.0, 0.0, 0.0)
    offsets = torch.tensor(_HUE_OFFSETS, dtype=image.dtype, device=image.device).view(3, 1, 1)
    k = (offsets + sixths + 6 * factor).remainder_(6.0)
    return value - chroma * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def _odd(length: float) -> int:
    size = max(3, int(math.ceil(length)))
    return size if size % 2 == 1 else size + 1


def majority_labels(labels: Tensor, size: tuple[int, int], num_classes: int, min_ratio: float = 0.75) -> Tensor:
    """Downscale labels to a feature grid: a cell gets class c if c covers >= ``min_ratio`` of the
    cell's pixels, otherwise 255 (DAFormer's ``downscale_label_ratio`` for the feature distance).

    labels: (B, H, W) -> (B, h, w) int64. When H, W are not multiples of the grid, cells are the
    (overlapping) bins of adaptive average pooling.

    On a grid that divides the labels (every call of the harness) the cells' class counts come from
    one ``bincount`` over (cell, class) keys instead of pooling a (B, C + 1, H, W) one-hot tensor,
    whose allocation and fill alone took 0.3-0.7 ms per call on 64x64 label maps; a class qualifies
    when its count reaches ``min_ratio`` of the cell's pixels, the same cells and classes (tested).
    """
    batch, height, width = labels.shape
    rows, cols = size
    classes = labels.clamp(max=num_classes)  # the ignore label counts as class ``num_classes``
    if height % rows or width % cols:
        one_hot = F.one_hot(classes, num_classes + 1).permute(0, 3, 1, 2).float()
        fractions = F.adaptive_avg_pool2d(one_hot, size)[:, :num_classes]
        ratio, cell_class = fractions.max(dim=1)
        return torch.where(ratio >= min_ratio, cell_class, torch.full_like(cell_class, IGNORE_INDEX))
    cell_h, cell_w = height // rows, width // cols
    device = labels.device
    cell_row = torch.arange(height, device=device) // cell_h
    cell_col = torch.arange(width, device=device) // cell_w
    cell = (torch.arange(batch, device=device)[:, None, None] * rows + cell_row[:, None]) * cols + cell_col
    counts = torch.bincount(
        (cell * (num_classes + 1) + classes).flatten(), minlength=batch * rows * cols * (num_classes + 1)
    ).view(batch, rows, cols, num_classes + 1)
    top, cell_class = counts[..., :num_classes].max(dim=-1)
    # the least count that covers min_ratio of the cell (the tolerance absorbs min_ratio's rounding)
    needed = max(0, math.ceil(min_ratio * cell_h * cell_w - 1e-6))
    return torch.where(top >= needed, cell_class, torch.full_like(cell_class, IGNORE_INDEX))


def feature_distance(
    features: Tensor,
    reference: Tensor | Callable[[], Tensor],
    labels: Tensor,
    classes: Tensor,
    num_classes: int,
    min_ratio: float = 0.75,
) -> Tensor:
    """DAFormer's thing-class ImageNet feature distance (sec. 3.4, eq. 7-8): mean L2 distance between
    the student's and the frozen reference encoder's features, over feature cells dominated
    (>= ``min_ratio``) by one of ``classes``. Returns 0 (with a graph) when no cell qualifies.
    ``reference`` may be given as a function computing it, called only when some cell qualifies, so
    that a batch without thing cells costs no pass of the reference encoder.

    features, reference: (B, C, h, w); labels: (B, H, W); classes: (K,) trainIds.
    """
    cells = majority_labels(labels, features.shape[-2:], num_classes, min_ratio)
    mask = torch.isin(cells, classes.to(cells.device))
    if not mask.any():
        return features.sum() * 0.0
    if callable(reference):
        reference = reference()
    distance = (features - reference.detach()).norm(dim=1)
    return distance[mask].mean()


def labels_where_weighted(labels: Tensor, weights: Tensor) -> Tensor:
    """Pseudo-labels with the ignore index wherever their weight is 0 (DAFormer's untrusted top and
    bottom rows), for losses that use labels without weights.

    labels, weights: (B, H, W) -> (B, H, W) int64."""
    return torch.where(weights > 0, labels, torch.full_like(labels, IGNORE_INDEX))


def concat_levels(features: list[Tensor]) -> Tensor:
    """Encoder levels upsampled bilinearly to the finest one and concatenated along channels.

    features: L tensors (B, C_i, h_i, w_i), finest first -> (B, sum C_i, h_0, w_0)."""
    size = features[0].shape[-2:]
    return torch.cat(
        [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features],
        dim=1,
    )


class ProjectionHead(nn.Module):
    """Contrastive projection of the concatenated multi-level encoder features (SePiCo sec. 3.2, PiPa
    sec. 3.2): 1x1 conv, BatchNorm, ReLU, 1x1 conv to ``out_channels``, L2-normalised per pixel.

    ``in_channels`` are the encoder's level widths (read from ``Segmentor.channels``).
    features: L tensors (B, C_i, h_i, w_i), finest first -> (B, out_channels, h_0, w_0), unit norm.

    The first convolution W over the concatenation of the levels upsampled to the finest grid, W [up(x_1);
    ...; up(x_L)], is computed as sum_i up(W_i x_i), W_i the columns of W that read level i: a 1x1
    convolution and bilinear upsampling are both linear and act on different axes, so they commute,
    and each coarse level is projected on its own grid (on the embedded encoder 8 times fewer
    multiply-adds than on the finest grid). Same parameters, same result up to float rounding.
    """

    def __init__(self, in_channels: list[int], out_channels: int, hidden_channels: int | None = None):
        super().__init__()
        total = sum(in_channels)
        hidden = hidden_channels or total
        self.in_channels = list(in_channels)
        self.layers = nn.Sequential(
            nn.Conv2d(total, hidden, kernel_size=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, kernel_size=1),
        )

    def forward(self, features: list[Tensor], cells: Tensor | None = None) -> Tensor:
        """features -> (B, out_channels, h_0, w_0) unit embeddings; with ``cells`` ((K,) flat indices
        over the (B, h_0, w_0) cells, image-major) only those cells' embeddings, (K, out_channels): the
        BatchNorm still takes its statistics over every cell, and the layers after it act on each cell
        alone, so a caller that contrasts a sample of the cells (PiPa's pixel anchors) projects only
        those."""
        if [level.shape[1] for level in features] != self.in_channels:
            raise ValueError(
                f"projection head built for levels of {self.in_channels} channels got {[f.shape[1] for f in features]}"
            )
        first, norm, activation, last = self.layers
        size = features[0].shape[-2:]
        hidden = None
        for weight, level in zip(first.weight.split(self.in_channels, dim=1), features):
            projected = F.conv2d(level, weight)
            if projected.shape[-2:] != size:
                projected = upsample(projected, size)
            # in place: neither the convolution nor the upsampling keeps its output for the backward pass,
            # and a new (B, hidden, h, w) sum per level is one more large tensor to allocate and fill
            hidden = projected if hidden is None else hidden.add_(projected)
        hidden = activation(norm(hidden))
        if cells is None:
            return F.normalize(last(hidden), dim=1)
        rows = hidden.permute(0, 2, 3, 1).reshape(-1, hidden.shape[1]).index_select(0, cells)
        return F.normalize(F.linear(rows, last.weight.flatten(1), last.bias), dim=1)


def projected_cells(head: ProjectionHead, parts: Sequence[Sequence[Tensor]], cells: Tensor) -> Tensor:
    """The embeddings of ``cells`` of ``[head(levels) for levels in parts]``, each part's BatchNorm on
    its own statistics (``head_per_part``): (K,) flat indices over the parts' cells in order (part,
    image, row, column) -> (K, out_channels). One head call over the parts' concatenation where they
    have one shape, the layers after the BatchNorm on the K cells only."""
    shapes = {tuple(tuple(level.shape) for level in levels) for levels in parts}
    if len(parts) > 1 and len(shapes) > 1:
        embeddings = [head(levels) for levels in parts]
        rows = torch.cat([e.permute(0, 2, 3, 1).reshape(-1, e.shape[1]) for e in embeddings])
        return rows.index_select(0, cells)
    with batch_norm_per_part(head, len(parts)):
        return head([torch.cat(level) for level in zip(*parts)], cells=cells)


def flatten_labelled(embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel embeddings with a label, as rows: (B, D, h, w), (B, h, w) -> (N, D), (N,) where N counts
    the cells whose label is not the ignore index."""
    rows = embeddings.permute(0, 2, 3, 1).reshape(-1, embeddings.shape[1])
    labels = labels.reshape(-1)
    keep = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    return rows.index_select(0, keep), labels.index_select(0, keep)


class _PairedInfoNCE(torch.autograd.Function):
    """The sum over positive pairs (i, p) of w_ip * softplus(eta_i - s_ip), eta_i = log sum_{n in N_i}
    e^{s_in}, s = anchors . candidates^T / temperature, with its gradient written out:

        dL/ds_in = e^{s_in - eta_i} * sum_p w_ip sigmoid(eta_i - s_ip)   (n a negative of i)
        dL/ds_ip -= w_ip sigmoid(eta_i - s_ip)                            (p a positive of i)

    Autograd of the same expression keeps about ten (N, M) intermediates and passes over them (masked
    fill, log-sum-exp, its backward, the pair gather's scatter); this keeps one, the negatives'
    exponentials, and passes over it once each way.

    The exponentials are taken of s_ij - m_i, m_i = |a_i| max_j |c_j| / temperature, an upper bound of
    row i (Cauchy-Schwarz), so that they cannot overflow, and m_i is subtracted inside the one matrix
    product, [a_i / temperature, -m_i] . [c_j, 1], instead of by a masked maximum over the row. On unit embeddings (every caller's) the
    exponents lie in [-2 / temperature, 0]; where the bound is so loose that a row's terms could all
    underflow (2 m_i > 80), the row's largest negative is the shift instead.
    """

    @staticmethod
    def forward(ctx, anchors, candidates, rows, columns, pair_weights, negatives, temperature):
        inverse = 1.0 / temperature
        bound = anchors.norm(dim=1) * (candidates.norm(dim=1).max() * inverse)
        loose = bool((bound > 40.0).any())
        if loose:
            similarity = (anchors @ candidates.T).mul_(inverse)
            # rows without negatives get e^-inf = 0 terms and eta = -inf: their pairs cost softplus(-inf) = 0
            bound = similarity.masked_fill(~negatives, torch.finfo(similarity.dtype).min).amax(dim=1)
            shifted = similarity.sub_(bound[:, None])
        else:
            # [a_i / t, -m_i] . [c_j, 1] = s_ij - m_i: the shift rides in the product, no (N, M) pass
            shifted = torch.cat([anchors * inverse, -bound[:, None]], dim=1) @ F.pad(candidates, (0, 1), value=1.0).T
        pairs = rows * shifted.shape[1] + columns  # flat (row, column) indices: one gather, one scatter
        positive_shifted = shifted.view(-1).index_select(0, pairs)
        exponentials = shifted.exp_().masked_fill_(~negatives, 0.0)
        totals = exponentials.sum(dim=1)
        # eta_i - s_ip = log(totals_i) - (s_ip - m_i)
        gaps = totals.log().index_select(0, rows) - positive_shifted
        ctx.save_for_backward(anchors, candidates, rows, pairs, pair_weights, exponentials, totals, gaps)
        ctx.temperature = temperature
        # anchors that are their own candidates (the supervised pixel contrast): one gradient product
        ctx.shared = anchors is candidates
        return (F.softplus(gaps) * pair_weights).sum()

    @staticmethod
    def backward(ctx, grad):
        anchors, candidates, rows, pairs, pair_weights, exponentials, totals, gaps = ctx.saved_tensors
        inverse = 1.0 / ctx.temperature
        pair_grads = torch.sigmoid(gaps) * pair_weights * grad
        per_anchor = torch.zeros_like(totals).index_add_(0, rows, pair_grads)
        # rows without negatives have totals 0 and per-anchor 0 (their gaps are -inf)
        scale = per_anchor * inverse / totals.clamp_min(torch.finfo(totals.dtype).tiny)
        d_similarity = exponentials * scale[:, None]  # dL/ds_ij, times 1/temperature: dL/d(a_i . c_j)
        d_similarity.view(-1).index_add_(0, pairs, pair_grads, alpha=-inverse)  # pairs are distinct
        if ctx.shared:  # s = a a^T / temperature: dL/da = (dS + dS^T) a, returned once for the one tensor
            return (d_similarity + d_similarity.T) @ anchors, None, None, None, None, None, None
        d_anchors = d_similarity @ candidates if ctx.needs_input_grad[0] else None
        d_candidates = d_similarity.T @ anchors if ctx.needs_input_grad[1] else None
        return d_anchors, d_candidates, None, None, None, None, None


def contrastive_loss(
    anchors: Tensor, candidates: Tensor, positives: Tensor, negatives: Tensor, temperature: float
) -> Tensor:
    """InfoNCE with one denominator per positive pair (Wang et al., ICCV 2021, eq. 2; PiPa eq. 1-3):

        L = mean_i  1/|P_i| sum_{p in P_i}  -log( e^{s_ip} / (e^{s_ip} + sum_{n in N_i} e^{s_in}) ),
        s_ij = a_i . c_j / temperature,

    averaged over the anchors that have at least one positive (0, with a graph, if none has). Each
    term is softplus(eta_i - s_ip) with eta_i the log-sum-exp over the negatives, evaluated at the
    positive pairs only, with a hand-written gradient (``_PairedInfoNCE``): about twice as fast as
    autograd of the dense (N, M) expression on the CPU.

    anchors: (N, D); candidates: (M, D); positives, negatives: (N, M) bool masks.
    """
    rows, columns = positives.nonzero(as_tuple=True)
    return paired_contrastive_loss(anchors, candidates, rows, columns, negatives, temperature)


def paired_contrastive_loss(
    anchors: Tensor, candidates: Tensor, rows: Tensor, columns: Tensor, negatives: Tensor, temperature: float
) -> Tensor:
    """``contrastive_loss`` with the positive pairs given as indices, (anchor rows[k], candidate
    columns[k]) for each k, each pair once: what a caller that knows its pairs (PiPa's patch term, one
    partner per anchor) passes instead of an (N, M) mask for this function to search.

    anchors: (N, D); candidates: (M, D); rows, columns: (P,) int64; negatives: (N, M) bool."""
    if len(rows) == 0:
        return (anchors.sum() + candidates.sum()) * 0.0
    per_anchor = torch.bincount(rows, minlength=len(anchors))
    # each pair's share of the mean: 1 / (|P_i| * #anchors with a positive)
    pair_weights = 1.0 / (per_anchor.index_select(0, rows) * (per_anchor > 0).sum()).to(anchors.dtype)
    return _PairedInfoNCE.apply(anchors, candidates, rows, columns, pair_weights, negatives, temperature)
