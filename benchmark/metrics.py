"""Evaluation protocol of the UDA segmentation benchmarks (DESIGN.md section 5).

IoU is dataset-level: one confusion matrix is summed over every test image and the per-class IoU is
``TP / (TP + FP + FN)`` of that matrix, as in mmsegmentation's ``IoUMetric`` (per-image averaging, as
in torchmetrics' ``MeanIoU``, is a different metric). Class means follow mmsegmentation too: a class
whose union is empty (absent from both the labels and the predictions of the whole test set) has IoU
NaN and is left out of the mean (``np.nanmean``), so it neither counts as 0 nor as 100.

SYNTHIA->Cityscapes reports mIoU16 and mIoU13; both are means over subsets of the same per-class IoUs
(``CLASSES_16`` / ``CLASSES_13``), never the result of a 16- or 13-way confusion matrix.

Inference: ``predict_whole`` runs the model on the full image; ``predict_sliding`` averages logits of
overlapping windows (the mmsegmentation ``slide_inference`` scheme used by HRDA, MIC and PiPa-HRDA).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from benchmark.classes import CLASSES, CLASSES_13, CLASSES_16, IGNORE_INDEX

#: Benchmark family -> {metric name: classes averaged}. The mini benchmarks share their real twin's family.
PROTOCOLS: dict[str, dict[str, tuple[str, ...]]] = {
    "gta2cs": {"miou19": CLASSES},
    "synthia2cs": {"miou16": CLASSES_16, "miou13": CLASSES_13},
}

Model = Callable[[Tensor], Tensor]


class ConfusionMatrix:
    """Dataset-level confusion matrix: ``matrix[t, p]`` counts pixels of true class t predicted as p.

    Pixels whose target equals ``ignore_index`` are not counted. A target value that is neither a class
    nor ``ignore_index`` raises ``ValueError``: it means the label mapping is wrong, and silently dropping
    those pixels would change the metric. Counts are int64, so a test set of any realistic size
    (2^63 pixels) cannot overflow. Matrices of different processes or shards add up with ``merge`` / ``+``.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class id (num_classes={num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: Tensor, target: Tensor) -> ConfusionMatrix:
        """Add one batch. ``pred`` and ``target``: integer class maps of the same shape, (B, H, W) or (H, W)."""
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.dtype.is_floating_point or target.dtype.is_floating_point:
            raise TypeError("pred and target must be integer class maps (use logits.argmax(1) for predictions)")
        if pred.dim() not in (2, 3):
            raise ValueError(f"expected (B, H, W) or (H, W) maps, got shape {tuple(pred.shape)}")
        target = target.to(device=pred.device, dtype=torch.int64)
        pred = pred.to(torch.int64)
        valid = target != self.ignore_index
        target = target[valid]
        pred = pred[valid]
        bad = (target < 0) | (target >= self.num_classes)
        if bool(bad.any()):
            values = sorted(torch.unique(target[bad]).tolist())
            raise ValueError(
                f"target contains value(s) {values} outside classes 0..{self.num_classes - 1} and ignore index "
                f"{self.ignore_index}: the label mapping is wrong"
            )
        bad = (pred < 0) | (pred >= self.num_classes)
        if bool(bad.any()):
            values = sorted(torch.unique(pred[bad]).tolist())
            raise ValueError(f"prediction contains value(s) {values} outside classes 0..{self.num_classes - 1}")
        counts = torch.bincount(target * self.num_classes + pred, minlength=self.num_classes**2)
        self.matrix += counts.reshape(self.num_classes, self.num_classes).to(self.matrix.device)
        return self

    def _check_compatible(self, other: ConfusionMatrix) -> None:
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"cannot merge ConfusionMatrix with {type(other).__name__}")
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge matrices with (num_classes, ignore_index) = "
                f"{(self.num_classes, self.ignore_index)} and {(other.num_classes, other.ignore_index)}"
            )

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add ``other``'s counts into this matrix in place (e.g. one shard of a multi-process evaluation)."""
        self._check_compatible(other)
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        self._check_compatible(other)
        total = ConfusionMatrix(self.num_classes, self.ignore_index, device=self.matrix.device)
        total.matrix = self.matrix + other.matrix.to(self.matrix.device)
        return total

    def __iadd__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        return self.merge(other)

    def reset(self) -> None:
        self.matrix.zero_()

    @property
    def total(self) -> int:
        """Number of counted (non-ignored) pixels."""
        return int(self.matrix.sum())

    def _areas(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        matrix = self.matrix.cpu().numpy().astype(np.float64)
        intersection = np.diag(matrix)
        label_area = matrix.sum(axis=1)
        pred_area = matrix.sum(axis=0)
        return intersection, label_area, pred_area

    def per_class_iou(self) -> np.ndarray:
        """IoU in percent per class, float64 of shape (num_classes,); NaN where the union is empty."""
        intersection, label_area, pred_area = self._areas()
        union = label_area + pred_area - intersection
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, 100.0 * intersection / union, np.nan)

    def per_class_accuracy(self) -> np.ndarray:
        """Recall in percent per class (mmsegmentation's ``Acc``); NaN for a class absent from the labels."""
        intersection, label_area, _ = self._areas()
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(label_area > 0, 100.0 * intersection / label_area, np.nan)

    def pixel_accuracy(self) -> float:
        """Overall pixel accuracy in percent (mmsegmentation's ``aAcc``); NaN if nothing was counted."""
        intersection, label_area, _ = self._areas()
        total = label_area.sum()
        return float(100.0 * intersection.sum() / total) if total > 0 else math.nan

    def named_per_class_iou(self, class_names: Sequence[str] = CLASSES) -> dict[str, float]:
        """``{class name: IoU in percent}`` in class-id order, the form stored in a run record."""
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for a {self.num_classes}-class matrix")
        return {name: float(iou) for name, iou in zip(class_names, self.per_class_iou())}


def miou_over(per_class_iou: Mapping[str, float], classes: Iterable[str]) -> float:
    """Mean IoU over the named classes, NaN entries left out (``np.nanmean``, as mmsegmentation does).

    A class missing from ``per_class_iou`` raises ``KeyError``: a protocol must never silently average
    fewer classes. Returns NaN when every named class is NaN.
    """
    classes = tuple(classes)
    if not classes:
        raise ValueError("no classes to average")
    missing = [c for c in classes if c not in per_class_iou]
    if missing:
        raise KeyError(f"per-class IoU lacks class(es) {missing}")
    values = np.array([per_class_iou[c] for c in classes], dtype=np.float64)
    if np.isnan(values).all():
        return math.nan
    return float(np.nanmean(values))


def family_of(benchmark: str) -> str:
    """The protocol family of a benchmark name: ``mini-gta2cs`` / ``mini_gta2cs`` -> ``gta2cs``."""
    for prefix in ("mini-", "mini_"):
        if benchmark.startswith(prefix):
            benchmark = benchmark[len(prefix) :]
    if benchmark not in PROTOCOLS:
        raise ValueError(f"unknown benchmark family {benchmark!r}; known: {sorted(PROTOCOLS)}")
    return benchmark


def protocol_mious(per_class_iou: Mapping[str, float], benchmark_family: str) -> dict[str, float]:
    """The mIoUs a benchmark reports, from per-class IoUs in percent (DESIGN.md section 5).

    ``"gta2cs"`` -> ``{"miou19"}``; ``"synthia2cs"`` -> ``{"miou16", "miou13"}``, both averaged from the
    same per-class values. Mini benchmark names (``"mini-gta2cs"``) resolve to their family.
    """
    family = family_of(benchmark_family)
    return {name: miou_over(per_class_iou, classes) for name, classes in PROTOCOLS[family].items()}


def _to_size(logits: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def predict_whole(model: Model, images: Tensor) -> Tensor:
    """Whole-image inference.

    images: (B, 3, H, W). ``model(images)`` returns logits (B, C, h', w') at any output stride; they are
    upsampled bilinearly (align_corners=False) to (B, C, H, W), which is returned.
    """
    return _to_size(model(images), tuple(images.shape[-2:]))


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window origins along one axis: every ``stride`` pixels, the last window flush with the far edge."""
    if window >= length:
        return [0]
    count = math.ceil((length - window) / stride) + 1
    return sorted({min(i * stride, length - window) for i in range(count)})


def predict_sliding(
    model: Model,
    images: Tensor,
    window: tuple[int, int],
    stride: tuple[int, int],
    num_classes: int,
) -> Tensor:
    """Sliding-window inference with overlapping windows (mmsegmentation ``slide_inference`` scheme).

    images: (B, 3, H, W); window = (h, w) and stride = (h, w) in pixels. Window origins step by the stride
    and the last row/column of windows is shifted to end exactly at the image border, so every pixel is
    covered. A window larger than the image is clipped to it. Each window's logits (B, C, h', w') are
    upsampled bilinearly (align_corners=False) to the window size; the result is the per-pixel sum of
    window logits divided by the number of windows covering the pixel, shape (B, num_classes, H, W).
    """
    (win_h, win_w), (stride_h, stride_w) = window, stride
    if min(win_h, win_w, stride_h, stride_w) < 1:
        raise ValueError(f"window {window} and stride {stride} must be positive")
    if stride_h > win_h or stride_w > win_w:
        raise ValueError(f"stride {stride} larger than window {window} would leave pixels uncovered")
    batch, _, height, width = images.shape
    crop_h, crop_w = min(win_h, height), min(win_w, width)
    summed = images.new_zeros((batch, num_classes, height, width), dtype=torch.float32)
    count = images.new_zeros((1, 1, height, width), dtype=torch.float32)
    for top in window_starts(height, crop_h, stride_h):
        for left in window_starts(width, crop_w, stride_w):
            crop = images[:, :, top : top + crop_h, left : left + crop_w]
            logits = _to_size(model(crop), (crop_h, crop_w))
            if logits.shape[1] != num_classes:
                raise ValueError(f"model returned {logits.shape[1]} channels, expected num_classes={num_classes}")
            summed[:, :, top : top + crop_h, left : left + crop_w] += logits.float()
            count[:, :, top : top + crop_h, left : left + crop_w] += 1
    return summed / count


def _module_device(model: Model) -> torch.device | None:
    if isinstance(model, torch.nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    return None


def evaluate(
    model: Model,
    loader: Iterable[Mapping[str, Tensor]],
    num_classes: int,
    mode: str = "whole",
    window: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    ignore_index: int = IGNORE_INDEX,
    device: torch.device | str | None = None,
) -> ConfusionMatrix:
    """Confusion matrix of ``model`` over ``loader`` (dataset-level, DESIGN.md section 5).

    The loader yields dicts with "image" (B, 3, H, W) float and "label" (B, H', W') int64. Logits are
    computed by ``predict_whole`` or ``predict_sliding`` (``mode="sliding"`` needs ``window`` and
    ``stride``) and, if the label has another size than the image, resized bilinearly to the label size
    before the argmax (mmsegmentation compares predictions at the label's resolution). Runs under
    ``torch.inference_mode`` with the module in eval mode, restoring its previous mode afterwards.
    ``device`` defaults to the device of the model's parameters.
    """
    if mode not in ("whole", "sliding"):
        raise ValueError(f"mode must be 'whole' or 'sliding', got {mode!r}")
    if mode == "sliding" and (window is None or stride is None):
        raise ValueError("sliding inference needs window and stride")
    if device is None:
        device = _module_device(model) or torch.device("cpu")
    confusion = ConfusionMatrix(num_classes, ignore_index, device=device)
    was_training = isinstance(model, torch.nn.Module) and model.training
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        with torch.inference_mode():
            for batch in loader:
                images = batch["image"].to(device, non_blocking=True)
                labels = batch["label"].to(device, non_blocking=True)
                if mode == "whole":
                    logits = predict_whole(model, images)
                else:
                    logits = predict_sliding(model, images, window, stride, num_classes)
                logits = _to_size(logits, tuple(labels.shape[-2:]))
                confusion.update(logits.argmax(dim=1), labels)
    finally:
        if was_training:
            model.train()
    return confusion
