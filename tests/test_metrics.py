"""The evaluation protocol against mmsegmentation's IoUMetric, the published tables and whole inference."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from benchmark.classes import CLASSES, CLASSES_13, CLASSES_16, IGNORE_INDEX, NUM_CLASSES
from benchmark.metrics import (
    ConfusionMatrix,
    evaluate,
    family_of,
    miou_over,
    predict_sliding,
    predict_whole,
    protocol_mious,
    window_starts,
)

PUBLISHED = Path(__file__).parents[1] / ".." / "shared" / "reference" / "published_results.csv"
BENCHMARK_FAMILY = {"GTA5->Cityscapes": "gta2cs", "SYNTHIA->Cityscapes": "synthia2cs"}
ABSENT_CLASS = 7
#: Published mIoUs and per-class IoUs are both rounded to 0.1: the reported mean is off by up to 0.05 and
#: the mean of the rounded per-class values by up to 0.05 more (DAFormer GTA: 68.247 vs printed 68.3).
PRINTED_TOLERANCE = 0.05 + 0.05 + 1e-9


def _mmseg_iou_metric():
    """mmsegmentation 1.x's ``IoUMetric`` (pure Python; imports with mmcv-lite and mmengine)."""
    from mmseg.evaluation.metrics import IoUMetric

    return IoUMetric


def _random_batches(generator: torch.Generator, num_batches: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random (pred, target) maps over 19 classes with ~15% ignore pixels and one class never used."""
    batches = []
    for _ in range(num_batches):
        # Skewed class frequencies so that per-class IoUs differ widely.
        probabilities = torch.rand(NUM_CLASSES, generator=generator) ** 3
        probabilities[ABSENT_CLASS] = 0
        target = torch.multinomial(probabilities, 2 * 21 * 34, replacement=True, generator=generator)
        target = target.reshape(2, 21, 34)
        noise = torch.multinomial(probabilities, target.numel(), replacement=True, generator=generator)
        pred = torch.where(torch.rand(target.shape, generator=generator) < 0.6, target, noise.reshape(target.shape))
        target[torch.rand(target.shape, generator=generator) < 0.15] = IGNORE_INDEX
        batches.append((pred, target))
    return batches


def test_iou_matches_mmsegmentation_iou_metric():
    IoUMetric = _mmseg_iou_metric()
    batches = _random_batches(torch.Generator().manual_seed(0))
    confusion = ConfusionMatrix(NUM_CLASSES)
    metric = IoUMetric(ignore_index=IGNORE_INDEX, iou_metrics=["mIoU"])
    metric.dataset_meta = {"classes": CLASSES}
    for pred, target in batches:
        confusion.update(pred, target)
        samples = [
            {"pred_sem_seg": {"data": p[None]}, "gt_sem_seg": {"data": t[None]}} for p, t in zip(pred, target)
        ]
        metric.process({}, samples)

    # mmsegmentation's histograms are float32 holding exact integer counts (well below 2^24 here); in
    # float64 its divisions are exact to 1e-12, so the comparison tests the formula, not float32 rounding.
    totals = [sum(area).double() for area in zip(*metric.results)]
    intersection, union = totals[0].numpy(), totals[1].numpy()
    matrix = confusion.matrix.numpy()
    np.testing.assert_array_equal(intersection, np.diag(matrix))
    np.testing.assert_array_equal(union, matrix.sum(0) + matrix.sum(1) - np.diag(matrix))
    reference = IoUMetric.total_area_to_metrics(*totals, metrics=["mIoU"])
    ours = confusion.per_class_iou()
    assert ours.dtype == np.float64 and ours.shape == (NUM_CLASSES,)
    assert np.isnan(ours[ABSENT_CLASS]) and np.isnan(reference["IoU"][ABSENT_CLASS])
    np.testing.assert_allclose(ours, 100 * reference["IoU"], rtol=0, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(confusion.per_class_accuracy(), 100 * reference["Acc"], atol=1e-6, equal_nan=True)
    assert confusion.pixel_accuracy() == pytest.approx(100 * reference["aAcc"], abs=1e-6)
    assert confusion.total == sum(int((t != IGNORE_INDEX).sum()) for _, t in batches)

    # mmsegmentation's mIoU is the nanmean of the per-class IoUs, rounded to 2 decimals.
    summary = metric.compute_metrics(metric.results)
    miou = miou_over(confusion.named_per_class_iou(CLASSES), CLASSES)
    assert summary["mIoU"] == pytest.approx(miou, abs=0.005 + 1e-9)
    assert miou == pytest.approx(np.nanmean(100 * reference["IoU"]), abs=1e-9)


def test_iou_is_dataset_level_not_per_image_mean():
    confusion = ConfusionMatrix(2)
    # Image 1: class 0 everywhere, predicted right. Image 2: one class-0 pixel of 100 predicted as 1.
    confusion.update(torch.zeros(10, 10, dtype=torch.long), torch.zeros(10, 10, dtype=torch.long))
    pred = torch.ones(10, 10, dtype=torch.long)
    target = torch.ones(10, 10, dtype=torch.long)
    target[0, 0] = 0
    confusion.update(pred, target)
    # Class 0: intersection 100, union 101; a per-image mean would give (100 + 0) / 2 = 50.
    np.testing.assert_allclose(confusion.per_class_iou(), [100 * 100 / 101, 100 * 99 / 100])


def test_merge_and_add_sum_matrices():
    batches = _random_batches(torch.Generator().manual_seed(1), num_batches=4)
    whole, first, second = ConfusionMatrix(NUM_CLASSES), ConfusionMatrix(NUM_CLASSES), ConfusionMatrix(NUM_CLASSES)
    for index, (pred, target) in enumerate(batches):
        whole.update(pred, target)
        (first if index < 2 else second).update(pred, target)
    first_counts = first.matrix.clone()
    total = first + second
    assert torch.equal(total.matrix, whole.matrix)
    assert torch.equal(first.matrix, first_counts), "__add__ must not modify its operands"
    first.merge(second)
    assert torch.equal(first.matrix, whole.matrix)
    with pytest.raises(ValueError, match="num_classes"):
        whole.merge(ConfusionMatrix(NUM_CLASSES - 1))


@pytest.mark.parametrize("bad_value", [19, 254, -1])
def test_label_outside_class_set_raises_naming_the_value(bad_value):
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[1, 2, 3] = bad_value
    target[0, 0, 0] = IGNORE_INDEX
    with pytest.raises(ValueError, match=rf"\[{bad_value}\]"):
        ConfusionMatrix(NUM_CLASSES).update(torch.zeros_like(target), target)


def test_ignore_pixels_and_absent_class_give_nan_only_where_union_is_empty():
    confusion = ConfusionMatrix(3)
    target = torch.tensor([[0, 0, IGNORE_INDEX], [IGNORE_INDEX, 0, 0]])
    pred = torch.tensor([[0, 1, 2], [2, 0, 0]])
    confusion.update(pred, target)
    # Pixels under ignore labels (predicted 2) do not count; class 2 is absent from the rest.
    iou = confusion.per_class_iou()
    assert iou[0] == pytest.approx(75.0) and iou[1] == 0.0 and math.isnan(iou[2])


def _published_rows() -> list[dict[str, str]]:
    with open(PUBLISHED, newline="") as handle:
        return list(csv.DictReader(handle))


def test_published_per_class_rows_give_back_reported_mious():
    checked = 0
    for row in _published_rows():
        family = BENCHMARK_FAMILY[row["benchmark"]]
        per_class = {name: float(row[name]) for name in CLASSES if row[name].strip()}
        expected_classes = CLASSES if family == "gta2cs" else CLASSES_16
        if set(per_class) != set(expected_classes):
            continue  # a row with the mIoU only
        mious = protocol_mious(per_class, family)
        headline = "miou19" if family == "gta2cs" else "miou16"
        assert mious[headline] == pytest.approx(float(row["reported_mIoU"]), abs=PRINTED_TOLERANCE), row["method"]
        if row["reported_mIoU13"].strip():
            assert mious["miou13"] == pytest.approx(float(row["reported_mIoU13"]), abs=PRINTED_TOLERANCE), row["method"]
            checked += 1
        checked += 1
    # DAFormer and SePiCo on both benchmarks, two SYNTHIA rows with mIoU13 too.
    assert checked == 6


def test_protocol_keys_families_and_nan_policy():
    per_class = {name: float(i) for i, name in enumerate(CLASSES)}
    assert set(protocol_mious(per_class, "gta2cs")) == {"miou19"}
    assert set(protocol_mious(per_class, "synthia2cs")) == {"miou16", "miou13"}
    assert protocol_mious(per_class, "mini-synthia2cs") == protocol_mious(per_class, "synthia2cs")
    assert family_of("mini_gta2cs") == "gta2cs"
    assert protocol_mious(per_class, "synthia2cs")["miou13"] == pytest.approx(
        np.mean([per_class[c] for c in CLASSES_13])
    )
    with pytest.raises(ValueError, match="unknown benchmark family"):
        protocol_mious(per_class, "cityscapes")
    # NaN (class absent from test labels and predictions) is left out of the mean, as in mmsegmentation.
    assert miou_over({"road": 50.0, "sky": math.nan}, ["road", "sky"]) == 50.0
    assert math.isnan(miou_over({"road": math.nan}, ["road"]))
    with pytest.raises(KeyError, match="terrain"):
        miou_over({"road": 1.0}, ["road", "terrain"])


class _StridedNet(nn.Module):
    """A small net with output stride 4, so inference has to upsample its logits."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 3, stride=2, padding=1)
        )

    def forward(self, x):
        return self.body(x)


def test_sliding_with_one_window_equals_whole():
    torch.manual_seed(0)
    model = _StridedNet().eval()
    images = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        whole = predict_whole(model, images)
        single = predict_sliding(model, images, window=(24, 40), stride=(24, 40), num_classes=5)
        larger = predict_sliding(model, images, window=(32, 64), stride=(16, 32), num_classes=5)
    assert whole.shape == (2, 5, 24, 40)
    assert torch.equal(single, whole)
    assert torch.equal(larger, whole)


def test_sliding_with_overlapping_windows_equals_whole_for_translation_equivariant_model():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, kernel_size=1).eval()
    images = torch.randn(2, 3, 37, 53)
    with torch.no_grad():
        whole = predict_whole(model, images)
        sliding = predict_sliding(model, images, window=(16, 20), stride=(10, 13), num_classes=4)
    assert torch.isfinite(sliding).all()
    torch.testing.assert_close(sliding, whole, rtol=1e-5, atol=1e-5)


def test_window_starts_cover_the_last_row_and_column():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(5, 8, 3) == [0]
    for length, window, stride in [(37, 16, 10), (1024, 512, 341), (53, 20, 13)]:
        starts = window_starts(length, window, stride)
        covered = np.zeros(length, dtype=bool)
        for start in starts:
            covered[start : start + window] = True
        assert covered.all() and starts[-1] + window == length


def test_evaluate_matches_manual_confusion_and_restores_train_mode():
    torch.manual_seed(0)
    model = _StridedNet(num_classes=5)
    model.train()
    generator = torch.Generator().manual_seed(3)
    loader = [
        {
            "image": torch.randn(2, 3, 16, 24, generator=generator),
            "label": torch.randint(0, 5, (2, 16, 24), generator=generator),
        }
        for _ in range(3)
    ]
    loader[0]["label"][0, :4] = IGNORE_INDEX
    whole = evaluate(model, loader, num_classes=5)
    sliding = evaluate(model, loader, num_classes=5, mode="sliding", window=(8, 8), stride=(4, 4))
    assert model.training
    model.eval()
    expected_whole, expected_sliding = ConfusionMatrix(5), ConfusionMatrix(5)
    with torch.no_grad():
        for batch in loader:
            expected_whole.update(predict_whole(model, batch["image"]).argmax(1), batch["label"])
            logits = predict_sliding(model, batch["image"], (8, 8), (4, 4), num_classes=5)
            expected_sliding.update(logits.argmax(1), batch["label"])
    assert torch.equal(whole.matrix, expected_whole.matrix)
    assert torch.equal(sliding.matrix, expected_sliding.matrix)
    assert whole.total == 3 * 2 * 16 * 24 - 4 * 24
    with pytest.raises(ValueError, match="window and stride"):
        evaluate(model, loader, num_classes=5, mode="sliding")
