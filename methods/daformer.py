"""DAFormer (Hoyer, Dai, Van Gool, CVPR 2022): self-training with an EMA teacher and three training
strategies, each a switch for ablations.

Per step (sec. 3.1, eq. 1-4; sec. 3.3-3.4):

    L = CE(g(x_S), y_S)                                           source cross-entropy
      + lambda_fd * L_FD(x_S, y_S)                                thing-class ImageNet feature distance (eq. 7-8)
      + lambda_mix * mean_ij q_ij * CE(g(x_M), y_M)_ij             mixed pseudo-label loss (eq. 3-4)

with x_M = ClassMix(x_S, x_T) followed by colour jitter and blur, y_M = source labels on pasted pixels
and teacher pseudo-labels p_T = argmax h(x_T) elsewhere, q = 1 on pasted pixels and the batch's
confidence ratio |{max softmax h(x_T) >= tau}| / (H W) elsewhere. The teacher h is the EMA of the
student g (``EMATeacher``, updated by the loop). Rare-class sampling and the learning-rate warm-up
are switched by ``rare_class_sampling`` and ``lr_warmup`` (read by the loop).

The reference encoder of the feature distance is a frozen copy of the encoder as the run starts: the
ImageNet weights at paper scale, the shared source-trained warm start on the embedded profile (which
has no ImageNet weights).

The step is a fixed sequence of hooks that subclasses (HRDA) and add-ons (SePiCo, PiPa, MIC)
override; each records what it computed in the step's ``StepContext`` so that later hooks and
add-ons reuse it instead of computing it again:

    teacher_pass(target, extra)     teacher logits of the target batch and, for an add-on that sets
                                    ``wants_teacher_source_features``, teacher features of the source
                                    batch (context.teacher_source_features), in one encoder pass
    target_pseudo_labels(target)    teacher pseudo-labels and weights (context.pseudo_labels/_weights)
    mixed_batch(...)                ClassMix + strong augmentation (context.mixed_images/_labels/_weights)
    student_inputs(context)         the batches the student predicts, by name: "source", "mix" and an
                                    add-on's own (MIC's masked target, "mic_masked")
    student_feature_inputs(context) the batches of which an add-on needs only ``student_features``,
                                    by name (PiPa's patch crops, "pipa_crops"); {} here
    joint_student_pass(context)     the student's predictions of all of them in one pass
                                    (context.predictions), and the features of each feature input of
                                    the same image size in that pass too (context.joint_features),
                                    where ``joins_student_passes``
    source_losses(context)          student on the source batch (context.source_logits/_features)
    mixed_losses(context)           student on the mixed batch (context.mixed_logits/_features)
    addon_losses(context)           {} here; each add-on adds its terms and calls super()

Where the passes are not joined (batches of different sizes, or a subclass that changes how the
student predicts without a joint pass of its own), each loss hook runs its own pass, and an add-on
runs ``student_features`` on a feature input that the joint pass did not cover.

All student forward passes go through ``forward_train`` (logits and encoder features for the whole
input crop) or ``student_features``, every supervised loss through ``supervised_losses``, and teacher
features through ``teacher_features``: a base that changes them (HRDA's multi-resolution crops)
overrides those and every add-on follows. ``feature_stride`` is the input pixels per cell of those
features' finest level.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from benchmark.classes import NUM_CLASSES, THING_CLASSES, TRAIN_ID
from benchmark.models import Segmentor
from methods.base import Batch, Method, Params, SearchRange, cross_entropy, register
from methods.components import (
    EMATeacher,
    batch_norm_per_part,
    class_mix_masks,
    feature_distance,
    mix,
    pseudo_labels,
    strong_augment,
)


@dataclass
class DAFormerParams(Params):
    rare_class_sampling: bool = True
    #: Confidence threshold tau of the pseudo-label weight.
    pseudo_threshold: float = 0.968
    #: Weight the pseudo-labels by the confidence ratio (False: weight 1 everywhere).
    confidence_weighting: bool = True
    #: Fractions of the crop height whose pseudo-labels get weight 0 (15 and 120 of 512 rows).
    pseudo_ignore_top: float = 15 / 512
    pseudo_ignore_bottom: float = 120 / 512
    #: Weight of the mixed pseudo-label loss.
    mix_weight: float = 1.0
    #: Paste source classes into the target image (False: train on the plain target image).
    class_mix: bool = True
    #: Colour jitter and blur on the mixed image.
    strong_augment: bool = True
    jitter_strength: float = 0.2
    jitter_probability: float = 0.8
    blur_probability: float = 0.5
    #: Upper bound of the EMA momentum, alpha_t = min(1 - 1/(t+1), ema_alpha).
    ema_alpha: float = 0.999
    #: The teacher's BatchNorm layers normalise each pseudo-labelled batch with its own statistics, as
    #: the released code's teacher (kept in training mode, dropout and drop path off); the paper does not
    #: say. False: the running statistics averaged from the student (eval mode).
    teacher_batch_statistics: bool = True
    #: Thing-class feature distance to the frozen reference encoder.
    feature_distance: bool = True
    feature_distance_weight: float = 0.005
    #: A feature cell counts for a class when the class covers this fraction of its pixels.
    feature_distance_min_ratio: float = 0.75


@dataclass
class StepContext:
    """What one step has computed so far; filled in by the hooks in the order of ``DAFormer.step``.

    Shapes: images (B, 3, H, W); labels and weights (B, H, W); logits (B, C, h, w) and features (a
    list of (B, C_i, h_i, w_i), finest first) as ``forward_train`` returns them for the whole crop.
    """

    step: int
    source: Batch
    target: Batch
    source_logits: Tensor | None = None
    source_features: list[Tensor] = field(default_factory=list)
    #: The EMA teacher's encoder features of the source images, as ``teacher_features`` gives them; set
    #: by the step when the method declares ``wants_teacher_source_features``, else None.
    teacher_source_features: list[Tensor] | None = None
    pseudo_labels: Tensor | None = None
    pseudo_weights: Tensor | None = None
    mixed_images: Tensor | None = None
    mixed_labels: Tensor | None = None
    mixed_weights: Tensor | None = None
    mixed_logits: Tensor | None = None
    mixed_features: list[Tensor] = field(default_factory=list)
    #: The batches the student predicts this step, by name, in the order the loss hooks read them
    #: (``student_inputs``): "source", "mix" and any an add-on adds.
    student_inputs: dict[str, Tensor] = field(default_factory=dict)
    #: The base's prediction of each of ``student_inputs`` when ``joint_student_pass`` computed them
    #: together, as its ``supervised_losses`` takes it (``prediction=``): here ``forward_train``'s
    #: (logits, features); the loss hooks read them instead of running a pass.
    predictions: dict[str, tuple] = field(default_factory=dict)
    #: The batches of which add-ons need only the student's encoder features (``student_feature_inputs``).
    feature_inputs: dict[str, Tensor] = field(default_factory=dict)
    #: ``student_features`` of those of ``feature_inputs`` that the joint pass covered, by name.
    joint_features: dict[str, list[Tensor]] = field(default_factory=dict)
    #: What an add-on's hooks compute for its later hooks in the same step, under keys named
    #: ``<add-on>_...`` (PiPa's crop geometry).
    addon_state: dict[str, object] = field(default_factory=dict)


#: The hooks whose results a joint pass stands in for: a class joins its student passes only where the
#: class that defines ``joint_student_pass`` defines, or derives from the definer of, each of them.
PREDICTION_HOOKS = ("forward_train", "student_features", "supervised_losses", "source_losses", "mixed_losses")


def _defined_by(cls: type, name: str) -> type:
    return next(c for c in cls.__mro__ if name in vars(c))


@register
class DAFormer(Method):
    name = "daformer"
    Params = DAFormerParams
    search_space = {
        "mix_weight": SearchRange(0.1, 3.0, log=True),
        "feature_distance_weight": SearchRange(1e-4, 5e-2, log=True),
        "pseudo_threshold": SearchRange(0.8, 0.99),
    }
    #: An add-on that reads the teacher's features of the source batch sets this, so that the step
    #: computes them together with the teacher's target logits (``teacher_pass``).
    wants_teacher_source_features: ClassVar[bool] = False

    def __init__(self, model, params: DAFormerParams | None = None, seed: int = 0, total_steps: int | None = None):
        super().__init__(model, params, seed, total_steps)
        p = self.params
        self.teacher = EMATeacher(model, alpha_max=p.ema_alpha, batch_statistics=p.teacher_batch_statistics)
        self.reference_encoder = None
        if p.feature_distance:
            self.reference_encoder = copy.deepcopy(model.encoder).eval()
            for parameter in self.reference_encoder.parameters():
                parameter.requires_grad_(False)
        self.register_buffer("thing_ids", torch.tensor([TRAIN_ID[c] for c in THING_CLASSES]), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.reference_encoder is not None:
            self.reference_encoder.eval()
        return self

    # ---- hooks that subclasses override -------------------------------------------------------

    def forward_train(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Student logits (B, C, h, w) and encoder features of a training batch."""
        features = self.model.forward_features(images)
        return self.model.head(features), features

    def student_features(self, images: Tensor) -> list[Tensor]:
        """Student encoder features (with gradients) aligned like ``forward_train``'s, without the
        decode head, for add-ons that need features only."""
        return self.model.forward_features(images)

    @torch.no_grad()
    def teacher_features(self, images: Tensor) -> list[Tensor]:
        """EMA-teacher encoder features aligned like ``forward_train``'s (no gradients)."""
        return self.teacher.model.forward_features(images)

    @property
    def feature_stride(self) -> int:
        """Input pixels per cell of the finest level of ``forward_train``'s and ``student_features``'
        features (the encoder's finest reduction here)."""
        return self.model.reductions[0]

    @torch.no_grad()
    def teacher_pass(self, images: Tensor, extra: Tensor | None = None) -> tuple[Tensor, list[Tensor] | None]:
        """The EMA teacher's logits of ``images`` (B, 3, H, W) and, when ``extra`` is given, its
        ``teacher_features`` of ``extra`` (None otherwise).

        Where the logits are the decode head on ``teacher_features`` (this base's hooks) and both
        batches have one size, one encoder pass over the concatenated batch gives what two passes
        give, up to float rounding, at the cost of one pass's per-operation overhead: with running
        statistics every image's output is independent of the rest of the batch, and with batch
        statistics (``teacher_batch_statistics``) each batch is normalised by its own
        (``EMATeacher.batch_statistics_per_part``). A base whose teacher sees another view (HRDA's
        multi-resolution inference) gets the two passes."""
        if extra is None:
            return self.teacher(images), None
        one_pass = (
            type(self).teacher_features is DAFormer.teacher_features
            and type(self.teacher.model).forward is Segmentor.forward
            and images.shape[1:] == extra.shape[1:]
            and (
                not self.teacher.batch_statistics
                or (len(images) == len(extra) and self.teacher.splits_batch_statistics())
            )
        )
        if not one_pass:
            return self.teacher(images), self.teacher_features(extra)
        with self.teacher.batch_statistics_per_part(2):
            features = self.teacher.model.forward_features(torch.cat([images, extra]))
        batch = len(images)
        logits = self.teacher.model.head([level[:batch] for level in features])
        return logits, [level[batch:] for level in features]

    def supervised_losses(
        self,
        prefix: str,
        images: Tensor,
        labels: Tensor,
        weights: Tensor | None = None,
        prediction: tuple[Tensor, list[Tensor]] | None = None,
    ) -> tuple[dict[str, Tensor], Tensor, list[Tensor]]:
        """The base's segmentation loss terms on a labelled batch (pixel weights optional), named
        ``<prefix>_...``, with the logits and features it computed: here the cross-entropy of
        ``forward_train``'s logits, ``<prefix>_ce``; ``prediction`` is ``forward_train(images)`` when
        the step has it already (``joint_student_pass``). A base with other terms (HRDA's detail
        cross-entropy) overrides this, and every loss built on it follows."""
        logits, features = self.forward_train(images) if prediction is None else prediction
        return {f"{prefix}_ce": cross_entropy(logits, labels, weights)}, logits, features

    def student_inputs(self, context: StepContext) -> dict[str, Tensor]:
        """The batches the student predicts this step, by name, in the order the loss hooks take them:
        the source and the mixed batch; an add-on that trains on another view (MIC's masked target)
        adds its own through super(), so that it joins the pass. Images (B, 3, H, W)."""
        return {"source": context.source.image, "mix": context.mixed_images}

    def student_feature_inputs(self, context: StepContext) -> dict[str, Tensor]:
        """The batches of which an add-on needs only ``student_features`` this step, by name: none
        here; an add-on adds its own through super(). Those with the size of the student inputs join
        the joint pass (``joint_student_pass``), which skips the decode head on them and leaves their
        features in ``context.joint_features``; the add-on runs ``student_features`` on the others.
        Images (B', 3, H', W'), any B'."""
        return {}

    def joins_student_passes(self, context: StepContext) -> bool:
        """Whether ``joint_student_pass`` serves this step: it is defined by the class that defines
        the student's predictions and losses (``PREDICTION_HOOKS``; a subclass that predicts
        otherwise without a joint pass of its own gets one pass per batch), and every student input
        has one shape."""
        cls = type(self)
        joint = _defined_by(cls, "joint_student_pass")
        if not all(issubclass(joint, _defined_by(cls, hook)) for hook in PREDICTION_HOOKS):
            return False
        shapes = {tuple(images.shape) for images in context.student_inputs.values()}
        return len(shapes) == 1

    def joint_student_pass(self, context: StepContext) -> None:
        """The student's ``forward_train`` of every student input and its ``student_features`` of every
        feature input of the same image size (``student_feature_inputs``) in one encoder pass over
        their concatenation, the decode head on the student inputs' part only; every BatchNorm layer
        normalises (and moves its running statistics by) each input on its own
        (``batch_norm_per_part``). The predictions, features, losses and gradients of one pass per
        input up to float rounding, at one pass's per-operation overhead, which on the embedded
        encoder is most of its cost (forward and backward over four 64x64 crops 12.5 ms, over eight
        18.5 ms). Dropout draws its masks in one call instead of one per input. Fills
        ``context.predictions`` and ``context.joint_features``.

        student_inputs: P batches (B, 3, H, W); feature inputs: (B', 3, H, W) -> per student input
        logits (B, C, h, w) and features, per feature input its features."""
        inputs = context.student_inputs
        size = next(iter(inputs.values())).shape[1:]
        extra = {name: images for name, images in context.feature_inputs.items() if images.shape[1:] == size}
        batches = [*inputs.values(), *extra.values()]
        with batch_norm_per_part(self.model, [len(images) for images in batches]):
            features = self.model.forward_features(torch.cat(batches))
        predicted = sum(len(images) for images in inputs.values())
        with batch_norm_per_part(self.model.head, [len(images) for images in inputs.values()]):
            logits = self.model.head([level[:predicted] for level in features])
        start = 0
        for name, images in [*inputs.items(), *extra.items()]:
            part = [level[start : start + len(images)] for level in features]
            if name in inputs:
                context.predictions[name] = (logits[start : start + len(images)], part)
            else:
                context.joint_features[name] = part
            start += len(images)

    def source_losses(self, context: StepContext) -> dict[str, Tensor]:
        source = context.source
        losses, context.source_logits, context.source_features = self.supervised_losses(
            "source", source.image, source.label, prediction=context.predictions.get("source")
        )
        if self.reference_encoder is not None:
            losses["feature_distance"] = self.feature_distance_loss(source.image, source.label, context.source_features)
        return losses

    def feature_distance_loss(self, images: Tensor, labels: Tensor, features: list[Tensor]) -> Tensor:
        """Weighted thing-class feature distance (sec. 3.4, eq. 7-8) between the student's ``features``
        of ``images`` and the frozen reference encoder's features of the same images.

        images: (B, 3, H, W) as the student's encoder saw them; labels: (B, H', W') of the same field of
        view at any resolution; features: the student's levels, the last one compared.
        """
        @torch.no_grad()
        def reference() -> Tensor:  # run only when a cell of the batch is a thing class
            return self.reference_encoder(images)[self.model.levels[-1]]

        distance = feature_distance(
            features[-1], reference, labels, self.thing_ids, NUM_CLASSES, self.params.feature_distance_min_ratio
        )
        return self.params.feature_distance_weight * distance

    def target_pseudo_labels(self, target: Batch, teacher_logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Teacher pseudo-labels (B, H, W) and their weights (B, H, W) on the un-augmented target, from
        ``teacher_logits`` when the step has them (``teacher_pass``), else from a teacher pass here."""
        p = self.params
        labels, weights = pseudo_labels(
            self.teacher(target.image) if teacher_logits is None else teacher_logits,
            target.image.shape[-2:],
            threshold=p.pseudo_threshold,
            ignore_top=p.pseudo_ignore_top,
            ignore_bottom=p.pseudo_ignore_bottom,
        )
        if not p.confidence_weighting:
            weights = torch.where(weights > 0, torch.ones_like(weights), weights)
        return labels, weights

    def mixed_batch(self, source: Batch, target: Batch, labels: Tensor, weights: Tensor):
        """ClassMix of source into target plus strong augmentation: images, labels, pixel weights."""
        p = self.params
        if p.class_mix:
            masks = class_mix_masks(source.label, self.generator)
            images = mix(masks, source.image, target.image)
            labels = mix(masks, source.label, labels)
            weights = mix(masks, torch.ones_like(weights), weights)
        else:
            images = target.image
        return self.augment(images), labels, weights

    def augment(self, images: Tensor) -> Tensor:
        """DAFormer's strong augmentation (colour jitter and blur) with this run's settings; the
        images unchanged when ``strong_augment`` is off."""
        p = self.params
        if not p.strong_augment:
            return images
        return strong_augment(images, self.generator, p.jitter_strength, p.jitter_probability, p.blur_probability)

    def mixed_losses(self, context: StepContext) -> dict[str, Tensor]:
        losses, context.mixed_logits, context.mixed_features = self.supervised_losses(
            "mix", context.mixed_images, context.mixed_labels, context.mixed_weights, prediction=context.predictions.get("mix")
        )
        return {name: self.params.mix_weight * loss for name, loss in losses.items()}

    def addon_losses(self, context: StepContext) -> dict[str, Tensor]:
        """Terms of the add-ons composed with this base; each add-on extends this through super()."""
        return {}

    # ---- the step ----------------------------------------------------------------------------

    def step(self, source: Batch, target: Batch, step: int) -> dict[str, Tensor]:
        context = StepContext(step, source, target)
        teacher_logits, context.teacher_source_features = self.teacher_pass(
            target.image, source.image if self.wants_teacher_source_features else None
        )
        context.pseudo_labels, context.pseudo_weights = self.target_pseudo_labels(target, teacher_logits)
        context.mixed_images, context.mixed_labels, context.mixed_weights = self.mixed_batch(
            source, target, context.pseudo_labels, context.pseudo_weights
        )
        context.student_inputs = self.student_inputs(context)
        context.feature_inputs = self.student_feature_inputs(context)
        if self.joins_student_passes(context):
            self.joint_student_pass(context)
        losses = self.source_losses(context)
        losses.update(self.mixed_losses(context))
        losses.update(self.addon_losses(context))
        return losses
