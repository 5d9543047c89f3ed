"""MIC's block mask and masked consistency loss: a hand-computed mask, the mask statistics, the block
size scaled to the crop, and the limits of the loss (nothing masked, everything masked)."""

from __future__ import annotations

import pytest
import torch

from methods.base import Batch, cross_entropy, method_class
from methods.daformer import StepContext
from methods.mic import block_mask

from conftest import tiny_model, two_class_batch


def test_block_mask_by_hand():
    # a 5x6 image in 2x2 blocks: a 3x3 grid of draws, the last row and column cut at the border
    draws = torch.rand(1, 1, 3, 3, generator=torch.Generator().manual_seed(4))
    mask = block_mask((1, 5, 6), block=2, ratio=0.5, generator=torch.Generator().manual_seed(4))
    keep = (draws > 0.5).float()[0, 0]
    expected = keep.repeat_interleave(2, 0).repeat_interleave(2, 1)[:5, :6]
    assert mask.shape == (1, 1, 5, 6) and torch.equal(mask[0, 0], expected)


def test_block_mask_masks_the_ratio_of_blocks():
    mask = block_mask((4, 512, 512), block=8, ratio=0.7, generator=torch.Generator().manual_seed(0))
    blocks = mask[:, 0, ::8, ::8]
    assert torch.equal(mask[:, 0], blocks.repeat_interleave(8, 1).repeat_interleave(8, 2))
    assert (1 - blocks.mean()).item() == pytest.approx(0.7, abs=0.01)  # 16,384 blocks
    assert block_mask((2, 16, 16), 4, 0.0, torch.Generator()).min() == 1.0


def _context(method) -> StepContext:
    target = two_class_batch(1, size=64)
    context = StepContext(0, two_class_batch(0, size=64), Batch(target.image))
    context.pseudo_labels = target.label.clamp(max=13)
    context.pseudo_weights = torch.full((2, 64, 64), 0.6)
    context.pseudo_weights[:, :3] = 0.0
    return context


def test_mic_loss_limits_nothing_masked_and_everything_masked():
    method = method_class("daformer+mic")(tiny_model(), seed=0)
    method.params.mic_color_augment = False
    method.params.mic_weight = 2.0
    method.eval()  # no dropout, BatchNorm on running statistics: the same input gives the same logits
    context = _context(method)
    with torch.no_grad():
        method.params.mic_mask_ratio = 0.0
        context.student_inputs = method.student_inputs(context)
        unmasked = method.addon_losses(context)["mic_masked_ce"]
        plain = cross_entropy(method.model(context.target.image), context.pseudo_labels, context.pseudo_weights)
        assert unmasked.item() == pytest.approx(2.0 * plain.item(), rel=1e-5)
        method.params.mic_mask_ratio = 1.0 - 1e-9
        context.student_inputs = method.student_inputs(context)
        masked = method.addon_losses(context)["mic_masked_ce"]
        blank = cross_entropy(method.model(torch.zeros_like(context.target.image)), context.pseudo_labels, context.pseudo_weights)
        assert masked.item() == pytest.approx(2.0 * blank.item(), rel=1e-5)


def test_mic_masks_blocks_scaled_to_the_crop_and_uses_the_base_loss(monkeypatch):
    method = method_class("daformer+mic")(tiny_model(), seed=0)
    method.params.mic_color_augment = False
    seen = []

    def recording(prefix, images, labels, weights=None, prediction=None):
        seen.append((images, labels, weights))
        return {f"{prefix}_ce": torch.zeros(())}, None, []

    monkeypatch.setattr(method, "supervised_losses", recording)
    context = _context(method)
    context.student_inputs = method.student_inputs(context)
    assert list(context.student_inputs) == ["source", "mix", "mic_masked"]
    method.addon_losses(context)
    (images, labels, weights), = seen
    assert labels is context.pseudo_labels and weights is context.pseudo_weights
    kept = (images == context.target.image).all(dim=1)
    masked = (images == 0).all(dim=1)
    assert (kept | masked).all()
    # 64 px crops: 64 / 512 of the height = 8 px blocks
    assert torch.equal(kept, kept[:, ::8, ::8].repeat_interleave(8, 1).repeat_interleave(8, 2))
    assert 0.4 < masked.float().mean().item() < 0.95
