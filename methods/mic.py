"""MIC (Hoyer, Dai, Wang, Van Gool, "MIC: Masked Image Consistency for Context-Enhanced Domain
Adaptation", CVPR 2023) as an add-on: ``daformer+mic``, ``hrda+mic``.

What it adds to its base, per step (sec. 3.2, eq. 4-6): the colour-augmented target image with random
square blocks masked out,

    x^M = M * augment(x^T),  M_mb+i,nb+j = [v_mn > r],  v_mn ~ U(0, 1),

is trained against the teacher's pseudo-labels of the unmasked, un-augmented image with their
confidence weights q^T (the base's pseudo-labels and weights, DAFormer sec. 3.1):

    L_M = lambda_M * q^T * CE(g(x^M), p^T),   lambda_M = 1,

through the base's own supervised loss terms (``supervised_losses``: ``mic_masked_ce``, and HRDA's
detail term too), so a base with another loss applies it to the masked image as well. Masked pixels are 0 in the normalised
image (the ImageNet mean colour). The paper's blocks are 64 px on 512 px crops with mask ratio
r = 0.7; the block is a fraction of the crop height (``mic_block_fraction`` = 64/512) so that it
scales with the profile: 8 px blocks on the embedded 64x64 crops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from methods.base import AddOn, SearchRange, register_addon


@dataclass
class MICParams:
    #: Weight lambda_M of the masked consistency loss.
    mic_weight: float = 1.0
    #: Fraction r of the blocks that are masked.
    mic_mask_ratio: float = 0.7
    #: Block side as a fraction of the crop height (64 px blocks on 512 px crops).
    mic_block_fraction: float = 64 / 512
    #: Colour-augment the target image before masking (the base's jitter and blur).
    mic_color_augment: bool = True

    def __post_init__(self):
        if not 0.0 <= self.mic_mask_ratio < 1.0:
            raise ValueError(f"mic_mask_ratio must be in [0, 1), got {self.mic_mask_ratio}")
        if not 0.0 < self.mic_block_fraction <= 1.0:
            raise ValueError(f"mic_block_fraction must be in (0, 1], got {self.mic_block_fraction}")


def block_mask(shape: tuple[int, int, int], block: int, ratio: float, generator: torch.Generator) -> Tensor:
    """MIC's patch mask (eq. 4): the image is tiled in ``block`` x ``block`` squares (the last row and
    column cut at the border), each kept with probability 1 - ``ratio``.

    shape: (B, H, W) -> (B, 1, H, W) float, 1 = kept, 0 = masked."""
    batch, height, width = shape
    grid = (-(-height // block), -(-width // block))
    keep = (torch.rand(batch, 1, *grid, generator=generator) > ratio).float()
    return keep.repeat_interleave(block, dim=2).repeat_interleave(block, dim=3)[:, :, :height, :width]


@register_addon
class MIC(AddOn):
    """Masked image consistency on top of a self-training base: a loss term, no module."""

    name = "mic"
    Params = MICParams
    search_space = {"mic_weight": SearchRange(0.1, 3.0, log=True)}
    bases = ("daformer", "hrda")

    def student_inputs(self, context) -> dict[str, Tensor]:
        """The base's inputs plus the masked, colour-augmented target ("mic_masked"), which has the
        target's size and so joins the base's student pass (``DAFormer.joint_student_pass``)."""
        inputs = super().student_inputs(context)
        p = self.params
        images = context.target.image
        if p.mic_color_augment:
            images = self.augment(images)
        block = max(1, round(p.mic_block_fraction * images.shape[-2]))
        mask = block_mask((images.shape[0], *images.shape[-2:]), block, p.mic_mask_ratio, self.generator)
        inputs["mic_masked"] = images * mask.to(images.device)
        return inputs

    def addon_losses(self, context) -> dict[str, Tensor]:
        losses = super().addon_losses(context)
        masked, _, _ = self.supervised_losses(
            "mic_masked",
            context.student_inputs["mic_masked"],
            context.pseudo_labels,
            context.pseudo_weights,
            prediction=context.predictions.get("mic_masked"),
        )
        losses.update({name: self.params.mic_weight * loss for name, loss in masked.items()})
        return losses
