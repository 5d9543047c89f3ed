"""SePiCo's losses against hand-computed examples of their equations and their limits, the class
statistics, and the add-on's switches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from benchmark.classes import NUM_CLASSES
from methods.base import Batch, method_class
from methods.components import majority_labels
from methods.daformer import StepContext
from methods.sepico import (
    ClassStatistics,
    bank_contrast,
    centroid_regularizer,
    dist_contrast,
    proto_contrast,
)

from conftest import tiny_model, two_class_batch

E1, E2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])


def test_proto_contrast_by_hand():
    # f = e1, mu_0 = e1, mu_1 = e2, tau = 1: -log(e^1 / (e^1 + e^0)) = log(1 + e^-1)
    loss = proto_contrast(E1, torch.tensor([0]), torch.cat([E1, E2]), temperature=1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))


def test_dist_contrast_by_hand():
    # f = e1, mu = (e1, e2), Sigma_0 = (0.5, 0), Sigma_1 = (0, 2), tau = 2:
    # logits = (1/2 + 0.5 / (2 * 4), 0 + 0), L = -f.mu_0 / tau + log(e^logit_0 + e^logit_1)
    variances = torch.tensor([[0.5, 0.0], [0.0, 2.0]])
    loss = dist_contrast(E1, torch.tensor([0]), torch.cat([E1, E2]), variances, temperature=2.0)
    assert loss.item() == pytest.approx(-0.5 + math.log(math.exp(0.5 + 0.0625) + 1.0))
    # label 1: spread of class 1 is f^T Sigma_1 f = 0 for f = e1, so L = -0 + log(e^0.5625 + e^0)
    loss = dist_contrast(E1, torch.tensor([1]), torch.cat([E1, E2]), variances, temperature=2.0)
    assert loss.item() == pytest.approx(math.log(math.exp(0.5625) + 1.0))


def test_dist_contrast_is_proto_without_variance_and_above_it_with():
    generator = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(50, 8, generator=generator), dim=1)
    means = F.normalize(torch.randn(5, 8, generator=generator), dim=1)
    labels = torch.randint(0, 5, (50,), generator=generator)
    proto = proto_contrast(features, labels, means, temperature=0.5)
    assert dist_contrast(features, labels, means, torch.zeros(5, 8), temperature=0.5).item() == pytest.approx(proto.item())
    spread = dist_contrast(features, labels, means, torch.rand(5, 8, generator=generator), temperature=0.5)
    assert spread.item() > proto.item()


def test_dist_contrast_bounds_the_expected_infonce_over_gaussian_samples():
    """DistCL is the Jensen bound of E_z[-f.z_y / tau + log sum_c e^{f.z_c / tau}], z_c ~ N(mu_c, Sigma_c)."""
    generator = torch.Generator().manual_seed(1)
    features = F.normalize(torch.randn(4, 3, generator=generator), dim=1)
    means = F.normalize(torch.randn(3, 3, generator=generator), dim=1)
    variances = 0.3 * torch.rand(3, 3, generator=generator)
    labels = torch.tensor([0, 1, 2, 0])
    tau = 0.7
    samples = means + variances.sqrt() * torch.randn(20000, 3, 3, generator=generator)  # (S, C, D)
    logits = torch.einsum("nd,scd->snc", features, samples) / tau
    expected = (torch.logsumexp(logits, dim=2) - logits.gather(2, labels[None, :, None].expand(20000, 4, 1))[..., 0]).mean()
    bound = dist_contrast(features, labels, means, variances, tau)
    assert expected.item() < bound.item() < expected.item() + 0.2


def test_bank_contrast_by_hand():
    # f = e1 of class 0; bank of class 0 = {e1, e2}; class 1 = {-e1, -e2} (mean (-0.5, -0.5)); tau = 1.
    # Positives s = 1 and 0, one negative s = f . (-0.5, -0.5) = -0.5:
    # L = mean_p log(1 + e^{-0.5 - s_p})
    bank = torch.zeros(2, 3, 2)
    filled = torch.zeros(2, 3, dtype=torch.bool)
    bank[0, :2] = torch.cat([E1, E2])
    bank[1, :2] = -torch.cat([E1, E2])
    filled[:, :2] = True
    loss = bank_contrast(E1, torch.tensor([0]), bank, filled, temperature=1.0)
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-1.5)) + math.log(1 + math.exp(-0.5))) / 2)
    # a class with nothing stored yet gives no positive: the cell is left out
    assert bank_contrast(E1, torch.tensor([1]), bank, filled & torch.tensor([[True], [False]]), 1.0).item() == 0.0


def test_centroid_regularizer_by_hand_and_at_uniform():
    # f_bar = e1, mu = (e1, e2), tau = 1: (log softmax_0 + log softmax_1) / (2 log 2)
    expected = (math.log(math.e / (math.e + 1)) + math.log(1 / (math.e + 1))) / (2 * math.log(2))
    assert centroid_regularizer(E1, torch.cat([E1, E2]), 1.0).item() == pytest.approx(expected)
    # a mean embedding equally similar to every centroid: uniform softmax, L_reg = C log(1/C) / (C log C) = -1
    means = torch.tensor([[0.0, 1.0], [0.0, -1.0], [0.0, 0.5]])
    assert centroid_regularizer(torch.cat([E1, -E1, E1]), means, 0.1).item() == pytest.approx(-1.0)


def test_class_statistics_equal_the_pooled_mean_and_variance_and_keep_the_latest_means():
    generator = torch.Generator().manual_seed(0)
    stats = ClassStatistics(num_classes=3, dim=4, bank_size=2)
    batches = []
    for _ in range(3):
        features = torch.randn(10, 4, generator=generator)
        labels = torch.tensor([0] * 6 + [1] * 4)
        stats.update(features, labels)
        batches.append((features, labels))
    everything = torch.cat([f for f, _ in batches])
    classes = torch.cat([y for _, y in batches])
    for c in (0, 1):
        pooled = everything[classes == c]
        assert torch.allclose(stats.mean[c], pooled.mean(dim=0), atol=1e-6)
        assert torch.allclose(stats.variance[c], pooled.var(dim=0, unbiased=False), atol=1e-5)
        assert stats.count[c] == len(pooled)
    assert stats.count[2] == 0 and not stats.mean[2].any() and not stats.bank_filled[2].any()
    # bank of 2 slots: the means of the last two batches (the first was overwritten)
    kept = {tuple(stats.bank[0, slot].tolist()) for slot in range(2)}
    latest = {tuple(f[y == 0].mean(dim=0).tolist()) for f, y in batches[1:]}
    assert {tuple(round(v, 5) for v in k) for k in kept} == {tuple(round(v, 5) for v in k) for k in latest}


def _context(method, step: int) -> StepContext:
    """What the base has computed by the time add-ons run: source features, pseudo-labels, the mixed
    batch's labels and features (here simply the target image's)."""
    source, target = two_class_batch(0), two_class_batch(1)
    context = StepContext(step, source, Batch(target.image))
    context.source_features = method.model.forward_features(source.image)
    context.pseudo_labels, context.pseudo_weights = target.label.clamp(max=13), torch.ones(2, 32, 32)
    context.mixed_labels, context.mixed_weights = context.pseudo_labels, context.pseudo_weights
    context.mixed_features = method.model.forward_features(target.image)
    return context


def test_sepico_starts_after_its_fraction_of_the_run_and_always_updates_the_statistics():
    # 100 steps: the contrast starts at step int(0.075 * 100) = 7
    early = method_class("daformer+sepico")(tiny_model(), total_steps=100)
    early.train()
    losses = early.addon_losses(_context(early, step=6))
    assert set(losses) == {"sepico_source", "sepico_target", "sepico_reg"}
    assert all(v.item() == 0.0 and not v.requires_grad for v in losses.values())
    # the teacher statistics were updated all the same, from the source cells with an area-vote label
    cells = majority_labels(two_class_batch(0).label, (8, 8), NUM_CLASSES, 0.75)
    assert early.sepico_statistics.count.sum().item() == (cells != 255).sum().item()
    assert early.sepico_statistics.count[0] > 0 and early.sepico_statistics.count[13] > 0
    started = method_class("daformer+sepico")(tiny_model(), total_steps=100)
    started.train()
    losses = started.addon_losses(_context(started, step=7))
    assert all(v.requires_grad and v.item() != 0.0 for v in losses.values())


def test_sepico_switches_select_the_terms_and_the_variant():
    method = method_class("daformer+sepico")(tiny_model())
    method.params.sepico_target = False
    method.params.sepico_regularizer = False
    method.train()
    losses = method.addon_losses(_context(method, step=0))
    assert set(losses) == {"sepico_source"}
    losses["sepico_source"].backward()
    assert method.sepico_projection.layers[0].weight.grad is not None
    # untrusted pseudo-labels (weight 0) contribute no target cell, in either view of the target
    method.params.sepico_target, method.params.sepico_variant = True, "proto"
    context = _context(method, step=1)
    context.mixed_weights = torch.zeros(2, 32, 32)
    assert method.addon_losses(context)["sepico_target"].item() == 0.0
    assert method.addon_losses(_context(method, step=2))["sepico_target"].item() > 0.0
    method.params.sepico_target_view = "target"
    context = _context(method, step=3)
    context.pseudo_weights = torch.zeros(2, 32, 32)
    assert method.addon_losses(context)["sepico_target"].item() == 0.0


def test_projection_width_is_twice_the_decode_head_width_unless_given():
    # the released DAFormer-based setup: 512-wide embeddings on a 256-wide head; the tiny head is 16 wide
    method = method_class("daformer+sepico")(tiny_model())
    assert method.sepico_projection.layers[-1].out_channels == 32
    assert method.sepico_statistics.mean.shape == (NUM_CLASSES, 32)
    params = method_class("daformer+sepico").Params(sepico_projection_dim=24)
    method = method_class("daformer+sepico")(tiny_model(), params)
    assert method.sepico_projection.layers[-1].out_channels == 24
    assert method.sepico_statistics.mean.shape == (NUM_CLASSES, 24)
    with pytest.raises(ValueError, match="sepico_projection_dim"):
        method_class("daformer+sepico").Params(sepico_projection_dim=0)


def test_class_statistics_bank_is_a_ring_per_class():
    stats = ClassStatistics(num_classes=3, dim=2, bank_size=2)
    means = []
    for value, classes in ((1.0, [0, 1]), (2.0, [1]), (3.0, [1, 2]), (4.0, [0])):
        labels = torch.tensor(classes)
        features = torch.full((len(classes), 2), value) + labels[:, None].float()
        stats.update(features, labels)
        means.append(features)
    # class 0 seen in batches 1 and 4 (slots 0, 1); class 1 in 1, 2, 3 (slot 0 overwritten by 3); class 2 once
    assert stats.bank[0].tolist() == [[1.0, 1.0], [4.0, 4.0]]
    assert stats.bank[1].tolist() == [[4.0, 4.0], [3.0, 3.0]]
    assert stats.bank[2, 0].tolist() == [5.0, 5.0] and stats.bank_filled[2].tolist() == [True, False]
    assert stats.bank_next.tolist() == [2, 1, 1]


def _sepico_with_trained_teacher(seed: int, batch_statistics: bool = False):
    """daformer+sepico whose teacher's BatchNorm running statistics are not the initial ones, so that a
    teacher running on batch statistics gives other features than one running on them."""
    cls = method_class("daformer+sepico")
    method = cls(tiny_model(), cls.Params(teacher_batch_statistics=batch_statistics), seed=seed)
    generator = torch.Generator().manual_seed(1)
    for name, buffer in method.teacher.model.named_buffers():
        if name.endswith("running_mean"):
            buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
        elif name.endswith("running_var"):
            buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
    method.train()
    return method


def test_one_teacher_pass_over_both_batches_gives_what_two_passes_give():
    method = _sepico_with_trained_teacher(seed=0)
    source, target = two_class_batch(0), two_class_batch(1)
    logits, features = method.teacher_pass(target.image, source.image)
    assert torch.allclose(logits, method.teacher(target.image), atol=1e-5)
    alone = method.teacher_features(source.image)
    assert len(features) == len(alone)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(features, alone))
    assert method.teacher_pass(target.image)[1] is None


def test_a_teacher_on_batch_statistics_normalises_each_batch_by_its_own():
    # as released: the source batch's features must not depend on the target batch beside it
    method = _sepico_with_trained_teacher(seed=0, batch_statistics=True)
    source, target = two_class_batch(0), two_class_batch(1)
    passes = []
    encoder_forward = method.teacher.model.forward_features
    method.teacher.model.forward_features = lambda x: passes.append(len(x)) or encoder_forward(x)
    logits, features = method.teacher_pass(target.image, source.image)
    del method.teacher.model.forward_features
    assert passes == [len(target.image) + len(source.image)]  # one encoder pass over both batches
    assert torch.allclose(logits, method.teacher(target.image), atol=1e-5)
    alone = method.teacher_features(source.image)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(features, alone))
    with torch.no_grad():
        together = method.teacher.model.forward_features(torch.cat([target.image, source.image]))
    assert not torch.allclose(together[-1][len(target.image) :], alone[-1], atol=1e-3)


@pytest.mark.parametrize("batch_statistics", [False, True])
def test_sepico_step_with_the_batched_teacher_pass_equals_the_separate_passes(batch_statistics):
    # the same method, seed and batches; one reads the teacher's source features from the step's teacher
    # pass over both batches, the other computes them in a teacher pass of its own
    batched = _sepico_with_trained_teacher(seed=0, batch_statistics=batch_statistics)
    separate = _sepico_with_trained_teacher(seed=0, batch_statistics=batch_statistics)
    separate.wants_teacher_source_features = False
    source, target = two_class_batch(0), Batch(two_class_batch(1).image)
    for step in range(2):
        torch.manual_seed(step)  # the decode head's dropout draws from the global generator
        first = batched.step(source, target, step)
        torch.manual_seed(step)
        second = separate.step(source, target, step)
        assert set(first) == set(second)
        for name in first:
            assert first[name].item() == pytest.approx(second[name].item(), rel=1e-4, abs=1e-6), name
    for name in ("count", "mean", "variance"):
        assert torch.allclose(
            getattr(batched.sepico_statistics, name), getattr(separate.sepico_statistics, name), atol=1e-5
        ), name
    assert batched.sepico_statistics.count.sum() > 0
