"""PiPa's pixel and patch contrast against hand-computed examples and their limits, the crop
geometry, and where the gradient of the patch term goes (paper default vs the released code)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from methods.base import Batch, method_class
from methods.daformer import StepContext
from methods.pipa import crop_grid, hard_easy_anchors, overlap_pairs, overlapping_crops, patch_contrast

from conftest import tiny_model, two_class_batch


def test_hard_easy_anchors_split_each_class_half_and_half_and_fill_in():
    labels = torch.tensor([[0] * 10 + [1] * 6 + [255] * 4])
    predictions = torch.tensor([[5, 5, 5] + [0] * 7 + [1] * 6 + [0] * 4])  # class 0: 3 hard, 7 easy; class 1: all easy
    chosen = hard_easy_anchors(labels, predictions, max_anchors=12, views_per_class=100, generator=torch.Generator().manual_seed(0))
    picked_0 = [i for i in chosen.tolist() if labels[0, i] == 0]
    picked_1 = [i for i in chosen.tolist() if labels[0, i] == 1]
    assert len(picked_0) == 6 and len(picked_1) == 6  # 12 anchors // 2 classes
    assert sum(predictions[0, i] != 0 for i in picked_0) == 3  # half hard
    assert all(predictions[0, i] == 1 for i in picked_1)  # no hard cell: easy ones fill in
    assert len(set(chosen.tolist())) == len(chosen) and all(labels[0, i] != 255 for i in chosen)
    capped = hard_easy_anchors(labels, predictions, 1000, views_per_class=4, generator=torch.Generator())
    assert len(capped) == 8
    assert len(hard_easy_anchors(torch.full((1, 5), 255), predictions[:, :5], 10, 10, torch.Generator())) == 0


@pytest.mark.parametrize("max_anchors, views_per_class", [(1024, 100), (100, 7), (30, 100)])
def test_hard_easy_anchors_take_each_group_s_quota_on_random_labels(max_anchors, views_per_class):
    generator = torch.Generator().manual_seed(max_anchors)
    labels = torch.randint(0, 6, (3, 64), generator=generator)
    labels[labels == 5] = 255
    right = torch.rand(3, 64, generator=generator) < 0.6
    predictions = torch.where(right, labels, (labels + 1) % 5)
    chosen = hard_easy_anchors(labels, predictions, max_anchors, views_per_class, generator)
    assert len(set(chosen.tolist())) == len(chosen)
    flat, predicted = labels.reshape(-1), predictions.reshape(-1)
    groups: dict[tuple[int, int], list[int]] = {}  # (image, class) -> [hard cells, easy cells]
    for cell in range(flat.numel()):
        if flat[cell] != 255:
            groups.setdefault((cell // 64, int(flat[cell])), [0, 0])[int(predicted[cell] == flat[cell])] += 1
    views = max(1, min(max_anchors // len(groups), views_per_class))
    taken: dict[tuple[int, int, int], int] = {}
    for cell in chosen.tolist():
        key = (cell // 64, int(flat[cell]), int(predicted[cell] == flat[cell]))
        taken[key] = taken.get(key, 0) + 1
    for (image, cls), (hard, easy) in groups.items():
        n_hard = min(hard, views // 2)
        n_easy = min(easy, views - n_hard)
        n_hard = min(hard, views - n_easy)
        assert (taken.get((image, cls, 0), 0), taken.get((image, cls, 1), 0)) == (n_hard, n_easy)
    # pairs in (image, class) order, hard before easy
    keys = [(cell // 64, int(flat[cell]), int(predicted[cell] == flat[cell])) for cell in chosen.tolist()]
    assert keys == sorted(keys)


@pytest.mark.parametrize("upscale, expected_size, expected_cell", [(False, (24, 36), 4), (True, (24, 36), 3)])
def test_overlap_pairs_point_at_the_same_image_location(upscale, expected_size, expected_cell):
    stride, height, width = 4, 32, 48
    size, cell = crop_grid(height, width, 0.75, stride, upscale)
    assert (size, cell) == (expected_size, expected_cell)
    # resized to the image's size, a crop has the image's grid: 8 x 12 cells of 3 pixels
    assert not upscale or (size[0] // cell, size[1] // cell) == (height // stride, width // stride)
    corners = overlapping_crops(height, width, size, cell, batch=3, generator=torch.Generator().manual_seed(3))
    assert (corners % cell == 0).all()
    assert (corners[..., 0] <= height - size[0]).all() and (corners[..., 1] <= width - size[1]).all()
    # every pixel holds its own coordinates; a feature cell is read at its top-left pixel
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    where = torch.stack([ys, xs])
    cells = torch.stack(
        [where[:, y : y + size[0] : cell, x : x + size[1] : cell] for k in range(2) for y, x in corners[:, k].tolist()]
    )  # (2B, 2, h, w), crops 1 of every image then crops 2
    flat = cells.permute(0, 2, 3, 1).reshape(-1, 2)
    first, second = overlap_pairs(corners, size, cell)
    assert torch.equal(flat[first], flat[second])
    expected = sum(
        (size[0] // cell - abs(int(c[1, 0] - c[0, 0])) // cell) * (size[1] // cell - abs(int(c[1, 1] - c[0, 1])) // cell)
        for c in corners
    )
    assert len(first) == expected > 0


def test_crop_grid_rejects_a_fraction_whose_crops_need_not_overlap():
    with pytest.raises(ValueError, match="pipa_crop_fraction 0.6 gives crops of 2/4"):
        crop_grid(32, 32, 0.6, 4, upscale=True)
    with pytest.raises(ValueError, match="multiples of the feature stride 8"):
        crop_grid(36, 32, 0.75, 8, upscale=True)
    assert crop_grid(32, 32, 0.6, 4, upscale=False) == ((16, 16), 4)


def _antipodal(labels: torch.Tensor) -> torch.Tensor:
    """Unit embeddings (2B, 2, h, w): (1, 0) for class 0 cells, (-1, 0) for class 1 cells."""
    sign = 1.0 - 2.0 * labels.double()
    return torch.stack([sign, torch.zeros_like(sign)], dim=1)


def test_patch_contrast_of_identical_crops_with_identical_features_is_minimal():
    labels = torch.zeros(2, 3, 3, dtype=torch.long)  # one image, two identical 3x3 crops
    labels[:, :, 2] = 1  # right column: class 1
    corners = torch.zeros(1, 2, 2, dtype=torch.long)
    first, second = overlap_pairs(corners, (12, 12), cell=4)
    assert len(first) == 9
    tau = 0.1
    identical = patch_contrast(_antipodal(labels), labels, first, second, tau)
    # class 0 anchors (12 of 18) have 6 negatives, class 1 anchors have 12, each at similarity -1:
    # L = mean log(1 + n e^{(-1 - 1) / tau})
    expected = (12 * math.log(1 + 6 * math.exp(-2 / tau)) + 6 * math.log(1 + 12 * math.exp(-2 / tau))) / 18
    assert identical.item() == pytest.approx(expected, rel=1e-4) and identical.item() < 1e-6
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        noisy = _antipodal(labels)
        noisy[1] = F.normalize(noisy[1] + 0.5 * torch.randn(2, 3, 3, generator=generator, dtype=torch.float64), dim=0)
        assert patch_contrast(noisy, labels, first, second, tau).item() > identical.item()


def test_patch_contrast_by_hand():
    # one image, crops 2 cells wide side by side with a one-cell overlap: crop 1 cells (a, b), crop 2
    # cells (b', c') with b = b'. Embeddings e1, e2 | e2, -e1; pseudo-labels 0, 1 | 1, 0; tau = 1.
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    embeddings = torch.stack([torch.stack([e1, e2], dim=1), torch.stack([e2, -e1], dim=1)])[:, :, None, :]  # (2, 2, 1, 2)
    labels = torch.tensor([[[0, 1]], [[1, 0]]])
    corners = torch.tensor([[[0, 0], [0, 4]]])
    first, second = overlap_pairs(corners, (4, 8), cell=4)
    assert first.tolist() == [1] and second.tolist() == [2]
    # anchor b (crop 1, class 1): positive b' (s = 1), negatives a and c' (class 0): s = 0 and 0
    # anchor b' is the same in mirror: both losses are log(1 + 2 e^{-1})
    loss = patch_contrast(embeddings, labels, first, second, temperature=1.0)
    assert loss.item() == pytest.approx(math.log(1 + 2 * math.exp(-1)))


def _patch_context() -> StepContext:
    target = two_class_batch(1, size=32)
    context = StepContext(0, two_class_batch(0), Batch(target.image))
    context.pseudo_labels = target.label.clamp(max=13)
    context.pseudo_weights = torch.ones(2, 32, 32)
    return context


def _gradients(method) -> dict[str, bool]:
    return {name: p.grad is not None and p.grad.abs().sum().item() > 0 for name, p in method.named_parameters()}


def test_patch_term_gradient_reaches_the_encoder_by_default():
    method = method_class("daformer+pipa")(tiny_model(), seed=0)
    method.train()
    method.pipa_patch_loss(_patch_context()).backward()
    flows = _gradients(method)
    assert any(flows[n] for n in flows if n.startswith("model.encoder."))
    assert all(flows[n] for n in flows if n.startswith("pipa_patch_projection.layers.3"))
    assert not any(flows[n] for n in flows if n.startswith(("teacher.", "pipa_pixel_projection.", "model.head.")))


def test_patch_crops_have_the_training_size_and_a_grid_of_the_patch_stride():
    method = method_class("daformer+pipa")(tiny_model(), seed=0)
    method.train()
    assert method.feature_stride == 4 and method.params.pipa_patch_stride == 8
    context = _patch_context()
    views = method.pipa_patch_views(context)
    assert method.pipa_patch_views(context) is views  # drawn once per step
    # 32x32 target: crops of 24x24 image pixels on a 6-pixel grid, resized to 32x32 (4 cells of 8)
    assert tuple(views.images.shape) == (4, 3, 32, 32) and views.size == (24, 24) and views.cell == 6
    assert (views.corners % 6 == 0).all()
    assert torch.isfinite(method.pipa_patch_loss(context))
    native = method_class("daformer+pipa")(tiny_model(), seed=0)
    native.params.pipa_crop_upscale = False
    views = native.pipa_patch_views(_patch_context())
    assert tuple(views.images.shape) == (4, 3, 24, 24) and views.cell == 8
    odd = method_class("daformer+pipa")(tiny_model(), seed=0)
    odd.params.pipa_patch_stride = 6
    with pytest.raises(ValueError, match="pipa_patch_stride 6 is not a multiple of the base's feature stride 4"):
        odd.pipa_patch_views(_patch_context())


def test_patch_term_as_released_trains_only_its_projection_head():
    method = method_class("daformer+pipa")(tiny_model(), seed=0)
    method.params.pipa_as_released = True
    method.train()
    method.pipa_patch_loss(_patch_context()).backward()
    flows = _gradients(method)
    trained = {n for n, flowed in flows.items() if flowed}
    assert trained and all(n.startswith("pipa_patch_projection.") for n in trained)
    assert all(flows[n] for n in flows if n.startswith("pipa_patch_projection.layers.3"))


def test_pixel_term_covers_the_mixed_batch_unless_switched_to_source_only():
    method = method_class("daformer+pipa")(tiny_model(), seed=0)
    method.train()
    source, target = two_class_batch(0), two_class_batch(1)
    context = StepContext(0, source, Batch(target.image))
    context.source_logits, context.source_features = method.forward_train(source.image)
    context.mixed_labels, context.mixed_weights = target.label, torch.ones(2, 32, 32)
    context.mixed_logits, context.mixed_features = method.forward_train(target.image)
    both = method.pipa_pixel_loss(context)
    both.backward()
    assert both.item() > 0 and method.pipa_pixel_projection.layers[0].weight.grad is not None
    method.params.pipa_pixel_target = False
    context.mixed_features = None  # not read when the term covers the source only
    assert method.pipa_pixel_loss(context).item() > 0


def test_class_run_pairs_are_the_same_class_pairs_off_the_diagonal():
    from methods.pipa import class_run_pairs

    generator = torch.Generator().manual_seed(0)
    for size in (0, 1, 7, 60):
        classes = torch.sort(torch.randint(0, 5, (size,), generator=generator)).values
        anchors, partners = class_run_pairs(classes)
        same = classes[:, None] == classes[None]
        expected = (same & ~torch.eye(size, dtype=torch.bool)).nonzero(as_tuple=True)
        assert torch.equal(anchors, expected[0]) and torch.equal(partners, expected[1])
