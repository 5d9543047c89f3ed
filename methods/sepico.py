"""SePiCo (Xie et al., "SePiCo: Semantic-Guided Pixel Contrast for Domain Adaptive Semantic
Segmentation", TPAMI 2023) as an add-on: ``daformer+sepico``, ``hrda+sepico``.

What it adds to its base, per step:

- a projection head g on the concatenated multi-level encoder features (1x1 conv, BN, ReLU, 1x1 conv,
  L2-normalised), and its EMA copy for the teacher;
- class statistics of the teacher's source embeddings: per class c a mean mu_c and a diagonal
  variance Sigma_c, updated from the cells whose downscaled label (area vote, >= 75% of the cell) is
  c, as a count-weighted running average (sec. 3.3, ``ClassStatistics``);
- a semantic-guided pixel contrast on the student's embeddings f of labelled source cells and of
  pseudo-labelled target cells, one of (sec. 3.2-3.3):

      ProtoCL  L = -log softmax_y( f . mu / tau )                                   (centroids)
      BankCL   InfoNCE against a memory bank of per-batch class means               (memory bank)
      DistCL   L = -f . mu_y / tau + log sum_c exp( f . mu_c / tau + f^T Sigma_c f / (2 tau^2) )
                 = CE(logits, y) + f^T Sigma_y f / (2 tau^2),
                 logits_c = f . mu_c / tau + f^T Sigma_c f / (2 tau^2)             (distribution, default)

  DistCL is the closed-form upper bound of the expected InfoNCE loss over infinitely many positives
  and negatives drawn from the class-conditional Gaussians N(mu_c, Sigma_c); with Sigma = 0 it is
  ProtoCL;
- the regulariser on the mean embedding f_bar of each contrasted batch,
  L_reg = sum_c log softmax_c( f_bar . mu / tau ) / (C log C), in the form and normalisation of the
  authors' released implementation;
- all of it from a start iteration on (3,000 of 40,000 steps: ``sepico_start_fraction`` of the run).

The target cells are by default those of the base's mixed batch (``sepico_target_view: mixed``):
colour-augmented target pixels with the teacher's pseudo-labels, plus the pasted source pixels with
their labels, whose embeddings the step has already computed. The released code instead forwards the
colour-augmented target image once more (``sepico_target_view: target``), which costs a student
forward and backward pass per step. The teacher's source features come from the base's teacher pass
over the target batch, run as one encoder pass over both batches where the base allows it
(``DAFormer.teacher_pass``: the eval-mode teacher gives every image the features it gives it alone).

The temperature follows the authors' convention: similarities are divided by tau = 100 (a large value
they chose on purpose). Loss: ``sepico_weight * (L_source + L_target + sepico_reg_weight * L_reg)``.
Each term and the variant are switches for ablations. The base keeps its own defaults: the released
SePiCo setup has no thing-class feature distance (``--set method.feature_distance=false``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.classes import NUM_CLASSES
from methods.base import AddOn, SearchRange, register_addon
from methods.components import (
    EMATeacher,
    ProjectionHead,
    contrastive_loss,
    flatten_labelled,
    head_per_part,
    labels_where_weighted,
    majority_labels,
)


@dataclass
class SePiCoParams:
    #: Contrast variant: DistCL ("dist", the paper's choice), ProtoCL ("proto") or BankCL ("bank").
    sepico_variant: Literal["dist", "proto", "bank"] = "dist"
    #: Weight of the contrastive terms (and of the regulariser, which it scales too).
    sepico_weight: float = 1.0
    #: Similarities are divided by this (the authors' tau = 100).
    sepico_temperature: float = 100.0
    #: Contrast labelled source cells.
    sepico_source: bool = True
    #: Contrast pseudo-labelled target cells, and from which view: the base's mixed batch ("mixed", no
    #: extra forward pass) or the colour-augmented target image forwarded again ("target", as released).
    sepico_target: bool = True
    sepico_target_view: Literal["mixed", "target"] = "mixed"
    #: The regulariser on the mean embedding, and its weight relative to the contrast.
    sepico_regularizer: bool = True
    sepico_reg_weight: float = 1.0
    #: The contrast starts after this fraction of the run (3,000 of 40,000 iterations in the paper).
    sepico_start_fraction: float = 3000 / 40000
    #: Class means kept per class by BankCL.
    sepico_bank_size: int = 200
    #: Embedding width of the projection head; null: twice the decode head's width, which is the
    #: released DAFormer-based setup's 512 with DAFormer's 256-wide head (its ``channels = 512``), and
    #: keeps the same ratio on a narrower profile (128 on the embedded profile's 64-wide head).
    sepico_projection_dim: int | None = None
    #: A feature cell gets a class when the class covers this fraction of its pixels.
    sepico_label_min_ratio: float = 0.75

    def __post_init__(self):
        if self.sepico_temperature <= 0:
            raise ValueError(f"sepico_temperature must be > 0, got {self.sepico_temperature}")
        if not 0.0 <= self.sepico_start_fraction <= 1.0:
            raise ValueError(f"sepico_start_fraction must be in [0, 1], got {self.sepico_start_fraction}")
        if self.sepico_projection_dim is not None and self.sepico_projection_dim <= 0:
            raise ValueError(f"sepico_projection_dim must be > 0 or null, got {self.sepico_projection_dim}")


# ---- the losses ------------------------------------------------------------------------------------


def proto_contrast(features: Tensor, labels: Tensor, means: Tensor, temperature: float) -> Tensor:
    """ProtoCL (SePiCo eq. 4): mean over cells of -log softmax_y(f . mu / tau).

    features: (N, D) unit embeddings; labels: (N,) classes; means: (C, D)."""
    return F.cross_entropy(features @ means.T / temperature, labels)


def dist_contrast(features: Tensor, labels: Tensor, means: Tensor, variances: Tensor, temperature: float) -> Tensor:
    """DistCL (SePiCo eq. 8-10), the closed-form upper bound of the expected InfoNCE loss:

        L = CE(logits, y) + f^T Sigma_y f / (2 tau^2),  logits_c = f . mu_c / tau + f^T Sigma_c f / (2 tau^2)

    averaged over cells; equal to ProtoCL when every Sigma_c is 0.
    features: (N, D); labels: (N,); means, variances: (C, D) (diagonal covariances)."""
    spread = (features * features) @ variances.T / (2 * temperature**2)  # (N, C)
    logits = features @ means.T / temperature + spread
    return F.cross_entropy(logits, labels) + spread.gather(1, labels[:, None]).mean()


def bank_contrast(features: Tensor, labels: Tensor, bank: Tensor, filled: Tensor, temperature: float) -> Tensor:
    """BankCL (SePiCo eq. 5): every stored mean b of the cell's class is a positive; each other class
    with stored means is one negative, the mean similarity to its means (= f . mean_b of that class,
    as in the authors' implementation):

        L = mean_{b in B_y} -log( e^{f.b/tau} / (e^{f.b/tau} + sum_{c != y} e^{f.bbar_c/tau}) )

    Cells whose class has no stored mean are left out. features: (N, D); labels: (N,);
    bank: (C, M, D) stored means; filled: (C, M) bool, which slots hold one."""
    num_classes, slots, dim = bank.shape
    counts = filled.sum(dim=1)
    class_means = (bank * filled[..., None]).sum(dim=1) / counts.clamp_min(1)[:, None]
    candidates = torch.cat([bank.reshape(-1, dim), class_means])  # (C*M + C, D)
    entry_class = torch.arange(num_classes, device=labels.device).repeat_interleave(slots)
    positives = (entry_class[None] == labels[:, None]) & filled.reshape(1, -1)
    negatives = (torch.arange(num_classes, device=labels.device)[None] != labels[:, None]) & (counts > 0)[None]
    # candidates are the stored means (positives only) followed by the class means (negatives only)
    return contrastive_loss(
        features,
        candidates,
        torch.cat([positives, torch.zeros_like(negatives)], dim=1),
        torch.cat([torch.zeros_like(positives), negatives], dim=1),
        temperature,
    )


def centroid_regularizer(features: Tensor, means: Tensor, temperature: float) -> Tensor:
    """SePiCo's regulariser on the mean embedding f_bar of a batch of cells:

        L_reg = sum_c log softmax_c( f_bar . mu / tau ) / (C log C)

    (the authors' form and normalisation). features: (N, D); means: (C, D)."""
    num_classes = means.shape[0]
    log_probabilities = F.log_softmax(features.mean(dim=0) @ means.T / temperature, dim=0)
    return log_probabilities.sum() / (num_classes * math.log(num_classes))


class ClassStatistics(nn.Module):
    """Per-class mean and diagonal variance of embeddings, as a count-weighted running estimate
    (SePiCo sec. 3.3), and BankCL's memory of per-batch class means.

    A batch with m_c cells of class c, mean m and (biased) variance v updates the running n_c, mu_c,
    Sigma_c with w = m_c / (n_c + m_c):

        mu_c <- (1 - w) mu_c + w m,  Sigma_c <- (1 - w) Sigma_c + w v + w (1 - w) (mu_c - m)^2,  n_c <- n_c + m_c

    which is exactly the mean and population variance of all cells seen so far. Buffers, so they are
    saved with the method's checkpoint.
    """

    def __init__(self, num_classes: int, dim: int, bank_size: int):
        super().__init__()
        self.register_buffer("count", torch.zeros(num_classes))
        self.register_buffer("mean", torch.zeros(num_classes, dim))
        self.register_buffer("variance", torch.zeros(num_classes, dim))
        self.register_buffer("bank", torch.zeros(num_classes, bank_size, dim))
        self.register_buffer("bank_filled", torch.zeros(num_classes, bank_size, dtype=torch.bool))
        self.register_buffer("bank_next", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """features: (N, D); labels: (N,) classes (no ignore index)."""
        num_classes = self.mean.shape[0]
        one_hot = F.one_hot(labels, num_classes).to(features.dtype)  # (N, C)
        batch_count = one_hot.sum(dim=0)
        present = batch_count > 0
        batch_mean = one_hot.T @ features / batch_count.clamp_min(1)[:, None]
        batch_variance = one_hot.T @ (features * features) / batch_count.clamp_min(1)[:, None] - batch_mean**2
        w = (batch_count / (self.count + batch_count).clamp_min(1))[:, None]
        self.variance.copy_(
            (1 - w) * self.variance + w * batch_variance.clamp_min(0) + w * (1 - w) * (self.mean - batch_mean) ** 2
        )
        self.mean.copy_((1 - w) * self.mean + w * batch_mean)
        self.count.add_(batch_count)
        # every present class writes its batch mean into its next slot (a ring buffer per class)
        classes = present.nonzero().flatten()
        slot = self.bank_next[classes] % self.bank.shape[1]
        self.bank[classes, slot] = batch_mean[classes]
        self.bank_filled[classes, slot] = True
        self.bank_next[classes] = slot + 1


# ---- the add-on ------------------------------------------------------------------------------------


@register_addon
class SePiCo(AddOn):
    """Semantic-guided pixel contrast on top of a self-training base (module docstring): a projection
    head, its EMA copy for the teacher, and the class statistics of the teacher's source embeddings."""

    name = "sepico"
    Params = SePiCoParams
    search_space = {"sepico_weight": SearchRange(0.1, 10.0, log=True)}
    bases = ("daformer", "hrda")
    wants_teacher_source_features = True

    def __init__(self, model, params=None, seed: int = 0, total_steps: int | None = None):
        super().__init__(model, params, seed, total_steps)
        p = self.params
        channels = self.model.channels
        width = p.sepico_projection_dim or 2 * self.model.head.embed_dim
        self.sepico_projection = ProjectionHead(channels, width, sum(channels) // len(channels))
        # the class statistics come from teacher embeddings: an EMA copy of the projection head
        self.sepico_teacher_projection = EMATeacher(self.sepico_projection, alpha_max=p.ema_alpha)
        self.sepico_statistics = ClassStatistics(NUM_CLASSES, width, p.sepico_bank_size)

    def sepico_contrast(self, features: Tensor, labels: Tensor) -> Tensor:
        """The chosen variant on (N, D) embeddings with (N,) labels."""
        p, stats = self.params, self.sepico_statistics
        if p.sepico_variant == "proto":
            return proto_contrast(features, labels, stats.mean, p.sepico_temperature)
        if p.sepico_variant == "bank":
            return bank_contrast(features, labels, stats.bank, stats.bank_filled, p.sepico_temperature)
        return dist_contrast(features, labels, stats.mean, stats.variance, p.sepico_temperature)

    def sepico_cells(self, embeddings: Tensor, labels: Tensor, cells: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The student embeddings (B, D, h, w) of the cells whose area-vote label is a class: (N, D),
        (N,). ``cells``: the area-vote labels (B, h, w) of ``labels`` when already computed for this grid."""
        if cells is None or cells.shape[-2:] != embeddings.shape[-2:]:
            cells = majority_labels(labels, embeddings.shape[-2:], NUM_CLASSES, self.params.sepico_label_min_ratio)
        return flatten_labelled(embeddings, cells)

    def sepico_update_statistics(self, context) -> Tensor:
        """Update the class statistics from the teacher's embeddings of the labelled source cells;
        returns those cells' area-vote labels (B, h, w). The teacher's source features are those the
        step computed in its teacher pass over the target batch (``wants_teacher_source_features``),
        or computed here when the context has none."""
        if context.step > 0:
            # the teacher head follows the student head as the loop's EMA teacher follows the model:
            # this is the update after step t - 1, applied before step t reads it
            self.sepico_teacher_projection.update(self.sepico_projection, context.step - 1)
        source = context.source
        features = context.teacher_source_features
        if features is None:
            features = self.teacher_features(source.image)
        teacher = self.sepico_teacher_projection(features)
        cells = majority_labels(source.label, teacher.shape[-2:], NUM_CLASSES, self.params.sepico_label_min_ratio)
        self.sepico_statistics.update(*flatten_labelled(teacher, cells))
        return cells

    def sepico_view(self, domain: str, context) -> tuple[list[Tensor], Tensor]:
        """Student encoder features and labels (B, H, W) of the cells contrasted for ``domain``."""
        if domain == "source":
            return context.source_features, context.source.label
        if self.params.sepico_target_view == "mixed":
            return context.mixed_features, labels_where_weighted(context.mixed_labels, context.mixed_weights)
        features = self.student_features(self.augment(context.target.image))
        return features, labels_where_weighted(context.pseudo_labels, context.pseudo_weights)

    def addon_losses(self, context) -> dict[str, Tensor]:
        losses = super().addon_losses(context)
        p = self.params
        source_cells = self.sepico_update_statistics(context)
        domains = [d for d, on in (("source", p.sepico_source), ("target", p.sepico_target)) if on]
        zero = context.source.image.new_zeros(())
        if self.total_steps is not None and context.step < int(p.sepico_start_fraction * self.total_steps):
            losses.update({f"sepico_{d}": zero for d in domains})
            if p.sepico_regularizer and domains:
                losses["sepico_reg"] = zero
            return losses
        regularizer = zero
        views = [self.sepico_view(domain, context) for domain in domains]
        # one projection-head call over the domains' features, each normalised by its own statistics
        projected = head_per_part(self.sepico_projection, [features for features, _ in views])
        for domain, (_, labels), embeddings in zip(domains, views, projected):
            embeddings, labels = self.sepico_cells(embeddings, labels, source_cells if domain == "source" else None)
            if len(labels) == 0:
                losses[f"sepico_{domain}"] = embeddings.sum() * 0.0
                continue
            losses[f"sepico_{domain}"] = p.sepico_weight * self.sepico_contrast(embeddings, labels)
            if p.sepico_regularizer:
                mean = self.sepico_statistics.mean
                regularizer = regularizer + centroid_regularizer(embeddings, mean, p.sepico_temperature)
        if p.sepico_regularizer and domains:
            losses["sepico_reg"] = p.sepico_weight * p.sepico_reg_weight * regularizer
        return losses
