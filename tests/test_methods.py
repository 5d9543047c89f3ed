"""Registry-wide method tests (every registered method, no per-method test code) and the shared
self-training components against hand-computed examples."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

import methods
from benchmark.classes import NUM_CLASSES, TRAIN_ID
from benchmark.data import denormalize, normalize
from benchmark.models import build_segmentor
from methods.base import Batch, Method, cross_entropy, method_class, register, registered, unregister
from methods.components import (
    EMATeacher,
    batch_norm_per_part,
    class_mix_masks,
    feature_distance,
    majority_labels,
    mix,
    pseudo_labels,
    strong_augment,
)


def _tiny_model():
    torch.manual_seed(0)
    return build_segmentor("efficientvit_b0", "daformer", NUM_CLASSES, 16)


def _batch(seed: int, with_label: bool = True) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 3, 64, 64, generator=generator)
    label = torch.randint(0, NUM_CLASSES, (2, 64, 64), generator=generator)
    label[:, :4] = 255
    label[0, 32:48, 32:48] = TRAIN_ID["car"]  # a thing region for the feature distance
    return Batch(image, label if with_label else None)


@pytest.mark.parametrize("name", registered())
def test_every_method_takes_three_steps_with_finite_losses_and_full_gradients(name):
    cls = method_class(name)
    method = cls(_tiny_model(), seed=0)
    method.train()
    trainable = method.trainable_parameters()
    assert trainable, f"{name} trains no parameter"
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    frozen_before = [p.detach().clone() for p in method.parameters() if not p.requires_grad]
    for step in range(3):
        source = _batch(step)
        target = _batch(100 + step, with_label=cls.uses_target_labels)
        losses = method.step(source, target, step)
        assert losses and all(isinstance(k, str) for k in losses)
        for key, value in losses.items():
            assert value.dim() == 0 and torch.isfinite(value), f"{name}: loss {key} = {value}"
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        missing = [n for n, p in method.named_parameters() if p.requires_grad and (p.grad is None)]
        assert not missing, f"{name}: no gradient reaches {missing[:5]}"
        assert all(torch.isfinite(p.grad).all() for p in trainable)
        optimizer.step()
        if method.teacher is not None:
            method.teacher.update(method.model, step)
    if method.teacher is not None:
        teacher_params = list(method.teacher.parameters())
        assert teacher_params and not any(p.requires_grad for p in teacher_params)
        assert not {id(p) for p in teacher_params} & {id(p) for p in trainable}
    # frozen modules (teacher, reference encoder) are never trained by the optimiser: only EMA moves them
    if method.teacher is None:
        frozen_after = [p for p in method.parameters() if not p.requires_grad]
        assert all(torch.equal(a, b) for a, b in zip(frozen_before, frozen_after))


@pytest.mark.parametrize("name", registered())
def test_every_method_declares_typed_params_and_a_valid_search_space(name):
    cls = method_class(name)
    params = cls.Params()
    for f in dataclasses.fields(params):
        assert f.type is not None and hasattr(params, f.name)
    for key, space in cls.search_space.items():
        assert space.low < space.high, f"{name}.{key}: empty range"
        default = getattr(params, key)
        assert space.low <= default <= space.high, f"{name}.{key}: default {default} outside its search range"


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="'daformer' is already registered by methods.daformer.DAFormer"):

        @register
        class Impostor(Method):
            name = "daformer"


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(KeyError, match="unknown method 'daformr'; registered methods: daformer, hrda, source_only"):
        method_class("daformr")


def test_a_new_method_is_covered_by_registering_it():
    @register
    class Scaled(Method):
        name = "test_scaled_source"

        def step(self, source, target, step):
            return {"ce": 0.5 * cross_entropy(self.model(source.image), source.label)}

    try:
        assert "test_scaled_source" in registered()
        losses = method_class("test_scaled_source")(_tiny_model()).step(_batch(0), _batch(1, False), 0)
        assert set(losses) == {"ce"}
    finally:
        unregister("test_scaled_source")
    assert "test_scaled_source" not in registered()


# ---- components ------------------------------------------------------------------------------


def test_ema_teacher_follows_the_formula():
    student = torch.nn.Linear(2, 1)
    teacher = EMATeacher(student, alpha_max=0.999)
    assert teacher.alpha(0) == 0.0 and teacher.alpha(9) == pytest.approx(0.9) and teacher.alpha(10**6) == 0.999
    before = teacher.model.weight.detach().clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    teacher.update(student, step=3)  # alpha = 0.75
    expected = 0.75 * before + 0.25 * student.weight.detach()
    assert torch.allclose(teacher.model.weight, expected)
    assert not teacher.model.weight.requires_grad


def test_pseudo_labels_weight_is_the_confident_fraction_and_ignores_borders():
    logits = torch.zeros(1, 3, 4, 4)
    logits[0, 1, :2] = 10.0  # top half: class 1, softmax ~ 0.99991 >= 0.968
    logits[0, 2, 2:] = 1.0  # bottom half: class 2, softmax ~ 0.58
    labels, weights = pseudo_labels(logits, (4, 4), threshold=0.968, ignore_top=0.25, ignore_bottom=0.25)
    assert labels[0].tolist() == [[1] * 4] * 2 + [[2] * 4] * 2
    assert weights[0, 0].tolist() == [0.0] * 4 and weights[0, 3].tolist() == [0.0] * 4
    assert weights[0, 1:3].unique().tolist() == [0.5]


def test_class_mix_pastes_half_of_the_present_classes_whole():
    label = torch.tensor([[[0, 0, 1, 1], [2, 2, 3, 255], [4, 4, 4, 4]]])
    masks = class_mix_masks(label, torch.Generator().manual_seed(0))
    pasted = label[masks].unique().tolist()
    assert len(pasted) == math.ceil(5 / 2) and 255 not in pasted
    for cls in range(5):  # a class is pasted entirely or not at all
        assert masks[label == cls].all() or not masks[label == cls].any()
    mixed = mix(masks, label, torch.full_like(label, 9))
    assert torch.equal(mixed[masks], label[masks]) and (mixed[~masks] == 9).all()


def test_strong_augment_is_seeded_and_identity_when_switched_off():
    images = normalize(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    same = [strong_augment(images, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(same[0], same[1]) and not torch.allclose(same[0], images)
    off = strong_augment(images, torch.Generator().manual_seed(5), jitter_probability=0.0, blur_probability=0.0)
    assert torch.allclose(denormalize(off), denormalize(images), atol=1e-5)


@pytest.mark.parametrize("factor", [-0.5, -0.2, -0.03, 0.0, 0.1, 0.2, 0.45])
def test_adjust_hue_equals_torchvision(factor):
    import torchvision.transforms.v2.functional as TF

    from methods.components import adjust_hue

    generator = torch.Generator().manual_seed(3)
    image = torch.rand(3, 32, 40, generator=generator)
    image[:, :4] = 0.5  # grey: no hue
    image[:, 4, :8] = 0.0  # black
    image[1, 5] = image[0, 5]  # red and green tied
    image[2, 6] = image[1, 6]  # green and blue tied
    image[:, 7, :] = image[:, 7, :].round()  # saturated corners of the cube
    assert torch.allclose(adjust_hue(image, factor), TF.adjust_hue(image, factor), atol=1e-5)
    assert not torch.allclose(adjust_hue(image, 0.25), image, atol=1e-2)  # it does rotate


def test_gaussian_blur_equals_torchvision_per_image():
    import torchvision.transforms.v2.functional as TF

    from methods.components import gaussian_blur

    generator = torch.Generator().manual_seed(4)
    images = torch.rand(3, 3, 20, 13, generator=generator)
    sigmas = [0.15, 0.6, 1.15]
    blurred = gaussian_blur(images, sigmas, (5, 3))
    for image, sigma, result in zip(images, sigmas, blurred):
        # torchvision takes the kernel size as (width, height)
        assert torch.allclose(result, TF.gaussian_blur(image, kernel_size=[3, 5], sigma=[sigma, sigma]), atol=1e-6)
    assert not torch.allclose(blurred[2], images[2], atol=1e-2)


def test_majority_labels_and_feature_distance_by_hand():
    labels = torch.full((1, 4, 4), TRAIN_ID["road"])
    labels[0, :2, :2] = TRAIN_ID["car"]  # top-left cell: all car
    labels[0, 2:, 2:] = TRAIN_ID["person"]
    labels[0, 3, 3] = TRAIN_ID["road"]  # bottom-right: 3/4 person = 0.75, still counts
    labels[0, :2, 2:] = torch.tensor([[11, 13], [13, 0]])  # top-right: mixed, below the ratio
    cells = majority_labels(labels, (2, 2), NUM_CLASSES, min_ratio=0.75)
    assert cells[0].tolist() == [[TRAIN_ID["car"], 255], [TRAIN_ID["road"], TRAIN_ID["person"]]]
    features = torch.zeros(1, 2, 2, 2)
    reference = torch.zeros(1, 2, 2, 2)
    features[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # distance 5 at the car cell
    features[0, :, 1, 0] = torch.tensor([30.0, 40.0])  # road cell: not a thing, ignored
    things = torch.tensor([TRAIN_ID["car"], TRAIN_ID["person"]])
    assert feature_distance(features, reference, labels, things, NUM_CLASSES).item() == pytest.approx(2.5)
    road_only = torch.full((1, 4, 4), TRAIN_ID["road"])
    assert feature_distance(features.requires_grad_(), reference, road_only, things, NUM_CLASSES).item() == 0.0
    # a reference given as a function is computed only when some cell is a thing class
    calls = []

    def lazy_reference():
        calls.append(1)
        return reference

    assert feature_distance(features, lazy_reference, road_only, things, NUM_CLASSES).item() == 0.0
    assert calls == []
    assert feature_distance(features, lazy_reference, labels, things, NUM_CLASSES).item() == pytest.approx(2.5)
    assert calls == [1]


@pytest.mark.parametrize("shape, size", [((2, 64, 64), (16, 16)), ((4, 48, 48), (8, 8)), ((6, 64, 64), (2, 2)), ((2, 12, 18), (4, 6))])
@pytest.mark.parametrize("min_ratio", [0.75, 0.5, 0.3, 0.7])
def test_majority_labels_equal_the_pooled_one_hot_fractions(shape, size, min_ratio):
    """The counting path gives the cells and classes of the definition: pool the one-hot labels
    (ignore included) to the grid, take the largest class fraction, keep it if >= min_ratio."""
    generator = torch.Generator().manual_seed(int(min_ratio * 100))
    # one class per cell, a varying share of each cell's pixels replaced by random classes or the
    # ignore label: cells on both sides of the ratio
    cell_h, cell_w = shape[1] // size[0], shape[2] // size[1]
    labels = torch.randint(0, 3, (shape[0], *size), generator=generator).repeat_interleave(cell_h, 1).repeat_interleave(cell_w, 2)
    share = torch.rand((shape[0], *size), generator=generator).repeat_interleave(cell_h, 1).repeat_interleave(cell_w, 2) * 0.6
    noise = torch.rand(shape, generator=generator)
    labels = torch.where(noise < share, torch.randint(0, NUM_CLASSES, shape, generator=generator), labels)
    labels[noise > 1 - share / 4] = 255
    one_hot = torch.nn.functional.one_hot(labels.clamp(max=NUM_CLASSES), NUM_CLASSES + 1).permute(0, 3, 1, 2).double()
    fractions = torch.nn.functional.adaptive_avg_pool2d(one_hot, size)[:, :NUM_CLASSES]
    ratio, cell_class = fractions.max(dim=1)
    expected = torch.where(ratio >= min_ratio - 1e-9, cell_class, torch.full_like(cell_class, 255))
    cells = majority_labels(labels, size, NUM_CLASSES, min_ratio)
    assert cells.dtype == torch.int64 and cells.shape == (shape[0], *size)
    assert torch.equal(cells, expected)
    assert (cells != 255).any() and (cells == 255).any()  # both outcomes occur


def test_cross_entropy_ignores_255_and_handles_an_empty_batch():
    logits = torch.zeros(1, 3, 2, 2, requires_grad=True)
    label = torch.tensor([[[0, 1], [255, 255]]])
    assert cross_entropy(logits, label).item() == pytest.approx(math.log(3))
    empty = cross_entropy(logits, torch.full((1, 2, 2), 255))
    assert empty.item() == 0.0
    empty.backward()
    weights = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    assert cross_entropy(logits, label, weights).item() == pytest.approx(math.log(3) / 4)


def test_methods_package_registers_the_baselines():
    assert {"source_only", "target_oracle", "daformer", "hrda"} <= set(methods.registered())


def test_contrastive_loss_by_hand():
    from methods.components import contrastive_loss

    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    anchors = torch.stack([e1, e2, e1])
    candidates = torch.stack([e1, e2, -e1, torch.tensor([0.6, 0.8])])
    positives = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    negatives = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    # anchor 0 (tau = 1): positives s = 1 and 0.6, negatives s = 0 and -1; anchor 1 has no positive
    # (left out); anchor 2 has a positive and no negative: -log(e^s / e^s) = 0
    negative = math.log(math.exp(0) + math.exp(-1))
    first = (math.log1p(math.exp(negative - 1)) + math.log1p(math.exp(negative - 0.6))) / 2
    loss = contrastive_loss(anchors.requires_grad_(), candidates, positives, negatives, temperature=1.0)
    assert loss.item() == pytest.approx((first + 0) / 2)
    loss.backward()
    assert torch.isfinite(anchors.grad).all() and anchors.grad[1].abs().sum() == 0
    nothing = contrastive_loss(anchors, candidates, torch.zeros_like(positives), negatives, 1.0)
    assert nothing.item() == 0.0 and nothing.requires_grad


@pytest.mark.parametrize("same_shapes", [True, False])
def test_projected_cells_are_those_cells_of_the_head_per_part(same_shapes):
    """``projected_cells`` (the pixel anchors' embeddings, the layers past the BatchNorm on those cells
    only) gives the rows of ``head_per_part``'s embeddings, with the same gradients and statistics."""
    from methods.components import ProjectionHead, head_per_part, projected_cells

    generator = torch.Generator().manual_seed(2)
    sizes = [(8, 8), (8, 8)] if same_shapes else [(8, 8), (4, 4)]
    parts = [
        [torch.randn(2, 4, h, w, generator=generator), torch.randn(2, 6, h // 2, w // 2, generator=generator)]
        for h, w in sizes
    ]
    cells_per_part = [2 * h * w for h, w in sizes]
    cells = torch.randperm(sum(cells_per_part), generator=generator)[:30]
    results = []
    for fast in (True, False):
        head = ProjectionHead([4, 6], out_channels=5)
        torch.manual_seed(0)
        for parameter in head.parameters():
            parameter.data.normal_()
        levels = [[level.clone().requires_grad_() for level in part] for part in parts]
        if fast:
            rows = projected_cells(head, levels, cells)
        else:
            embeddings = head_per_part(head, levels)
            rows = torch.cat([e.permute(0, 2, 3, 1).reshape(-1, 5) for e in embeddings])[cells]
        (rows * torch.arange(5.0)).sum().backward()
        results.append((rows.detach(), [level.grad for part in levels for level in part], head.layers[1].running_mean.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    for fast_grad, reference_grad in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(fast_grad, reference_grad)
    torch.testing.assert_close(results[0][2], results[1][2])
    assert torch.allclose(results[0][0].norm(dim=1), torch.ones(30), atol=1e-5)


def test_projection_head_concatenates_levels_and_normalises():
    from methods.components import ProjectionHead, concat_levels, labels_where_weighted

    features = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4), torch.randn(2, 8, 2, 2)]
    joined = concat_levels(features)
    assert joined.shape == (2, 18, 8, 8) and torch.equal(joined[:, :4], features[0])
    assert torch.allclose(joined[:, 4:10, ::2, ::2].mean(), features[1].mean(), atol=0.5)
    head = ProjectionHead([4, 6, 8], out_channels=5)
    embeddings = head(features)
    assert embeddings.shape == (2, 5, 8, 8)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(2, 8, 8), atol=1e-5)
    # projecting each level on its own grid, then upsampling, is the head on the concatenation
    reference = copy.deepcopy(head)
    concatenated = torch.nn.functional.normalize(reference.layers(joined), dim=1)
    assert torch.allclose(embeddings, concatenated, atol=1e-5)
    weight = torch.randn_like(embeddings)
    (embeddings * weight).sum().backward()
    (concatenated * weight).sum().backward()
    for a, b in zip(head.parameters(), reference.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"levels of \[4, 6, 8\] channels"):
        head(features[:2] + [features[2][:, :3]])
    labels = torch.tensor([[[1, 2], [3, 4]]])
    weights = torch.tensor([[[0.5, 0.0], [1.0, 0.0]]])
    assert labels_where_weighted(labels, weights).tolist() == [[[1, 255], [3, 255]]]


def test_ema_teacher_on_batch_statistics_normalises_with_the_batch_and_keeps_the_running_ones():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        student[1].running_mean.fill_(0.3)
        student[1].running_var.fill_(2.0)
    images = torch.randn(2, 3, 5, 5)
    released, running = EMATeacher(student, batch_statistics=True), EMATeacher(student)
    for teacher in (released, running):
        teacher.train()
        teacher.eval()  # the module's mode never changes how the teacher normalises
    expected = copy.deepcopy(student).train()(images).detach()
    assert torch.allclose(released(images), expected, atol=1e-6)
    assert torch.allclose(running(images), student.eval()(images).detach(), atol=1e-6)
    assert not torch.allclose(released(images), running(images), atol=1e-3)
    # the batch statistics never move the running ones, which stay the student's average
    assert torch.equal(released.model[1].running_mean, torch.full((4,), 0.3))
    assert torch.equal(released.model[1].running_var, torch.full((4,), 2.0))
    # and the averaging reaches them as before
    with torch.no_grad():
        student[1].running_mean.fill_(1.3)
    released.update(student, step=1)  # alpha = 0.5
    assert torch.allclose(released.model[1].running_mean, torch.full((4,), 0.8))


def test_ema_teacher_normalises_each_part_of_a_batch_by_its_own_statistics_when_asked():
    torch.manual_seed(0)
    student = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1)
    )
    first, second = torch.randn(2, 3, 6, 6), 3.0 + 2.0 * torch.randn(2, 3, 6, 6)  # unlike statistics
    both = torch.cat([first, second]).contiguous(memory_format=torch.channels_last)
    released, running = EMATeacher(student, batch_statistics=True), EMATeacher(student)
    with released.batch_statistics_per_part(2):
        parts = released(both)
    assert torch.allclose(parts, torch.cat([released(first), released(second)]), atol=1e-5)
    assert not torch.allclose(released(both), parts, atol=1e-3)  # outside the context: one batch again
    assert "forward" not in vars(released.model[1])  # the class's forward is back
    with pytest.raises(ValueError, match="does not split into 3"):
        with released.batch_statistics_per_part(3):
            released(both)
    assert "forward" not in vars(released.model[1])
    with running.batch_statistics_per_part(2):  # running statistics: nothing to split, nothing patched
        assert "forward" not in vars(running.model[1])
        assert torch.allclose(running(both), torch.cat([running(first), running(second)]), atol=1e-5)
    assert released.splits_batch_statistics()


def test_batch_norm_per_part_equals_separate_passes_with_running_statistics_and_gradients():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.3), torch.nn.ReLU())
    split = copy.deepcopy(net)
    first, second = torch.randn(2, 3, 6, 6), 3.0 + 2.0 * torch.randn(2, 3, 6, 6)  # unlike statistics
    weight = torch.randn(4, 4, 4)
    separate = sum((net(x) * weight).sum() for x in (first, second))
    separate.backward()
    with batch_norm_per_part(split, 2):
        joint = (split(torch.cat([first, second])) * weight).sum()
    joint.backward()
    assert joint.item() == pytest.approx(separate.item(), rel=1e-5)
    for (name, a), b in zip(net.named_parameters(), split.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5), name
    for (name, a), b in zip(net.named_buffers(), split.buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name  # moved once per part, in order
    assert int(split[1].num_batches_tracked) == 2
    assert "forward" not in vars(split[1])  # the class's forward is back
    with pytest.raises(ValueError, match="does not split into 3"):
        with batch_norm_per_part(split, 3):
            split(torch.cat([first, second]))
    # parts of other sizes: the same as a pass over each
    uneven, reference = copy.deepcopy(net), copy.deepcopy(net)
    parts = [first[:1], torch.cat([second, first[1:]])]
    expected = torch.cat([reference(part) for part in parts])
    with batch_norm_per_part(uneven, [1, 3]):
        assert torch.allclose(uneven(torch.cat(parts)), expected, atol=1e-5)
    for a, b in zip(reference.buffers(), uneven.buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    with pytest.raises(ValueError, match=r"does not split into parts of \[1, 2\]"):
        with batch_norm_per_part(uneven, [1, 2]):
            uneven(torch.cat(parts))
    split.eval()  # on running statistics: nothing is split, nothing patched
    with batch_norm_per_part(split, 2):
        assert "forward" not in vars(split[1])


def _without_dropout(method: Method) -> Method:
    for module in method.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0  # the joint pass draws one mask where two passes draw two
    return method.train()


@pytest.mark.parametrize("name", registered())
def test_the_joint_student_pass_gives_what_separate_passes_give(name):
    # same method, seed and batches; one takes the step's student passes one by one
    cls = method_class(name)
    if not hasattr(cls, "joins_student_passes"):
        return
    joint, separate = (_without_dropout(cls(_tiny_model(), seed=0)) for _ in range(2))
    source, target = _batch(0), _batch(100, with_label=cls.uses_target_labels)
    joined, inputs, feature_inputs, passes = [], [], [], []
    decide, collect, encode = joint.joins_student_passes, joint.student_inputs, joint.model.forward_features
    collect_features = joint.student_feature_inputs
    joint.joins_student_passes = lambda context: joined.append(decide(context)) or joined[-1]
    joint.student_inputs = lambda context: inputs.append(collect(context)) or inputs[-1]
    joint.student_feature_inputs = lambda context: feature_inputs.append(collect_features(context)) or feature_inputs[-1]
    joint.model.forward_features = lambda x: passes.append(len(x)) or encode(x)
    separate.joins_student_passes = lambda context: False
    first = joint.step(source, target, 0)
    del joint.model.forward_features
    second = separate.step(source, target, 0)
    # every self-training method joins; one student pass covers every input (HRDA: both views of each)
    # and every feature input (PiPa's patch crops: the training crop's size, one view)
    assert joined == [True], name
    assert len(inputs[0]) >= 2 + name.endswith("+mic")
    assert ("pipa_crops" in feature_inputs[0]) == ("+pipa" in name)
    images = sum(len(batch) for batch in inputs[0].values())
    features_only = sum(len(batch) for batch in feature_inputs[0].values())
    assert max(passes) == images * (2 if name.startswith("hrda") else 1) + features_only, passes
    assert list(first) == list(second)
    for key in first:
        assert first[key].item() == pytest.approx(second[key].item(), rel=1e-4, abs=1e-6), key
    sum(first.values()).backward()
    sum(second.values()).backward()
    for (key, a), b in zip(joint.named_parameters(), separate.parameters()):
        assert (a.grad is None) == (b.grad is None), key
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-5), key
    for (key, a), b in zip(joint.named_buffers(), separate.buffers()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-6), key


def test_head_per_part_equals_a_call_per_part():
    from methods.components import ProjectionHead, head_per_part

    torch.manual_seed(0)
    head = ProjectionHead([3, 5], 4, 6).train()
    split = copy.deepcopy(head)
    parts = [[torch.randn(2, 3, 4, 4) * scale, torch.randn(2, 5, 2, 2) + scale] for scale in (1.0, 3.0)]
    separate = [head(levels) for levels in parts]
    joint = head_per_part(split, parts)
    weights = [torch.randn_like(output) for output in separate]
    sum((o * w).sum() for o, w in zip(separate, weights)).backward()
    sum((o * w).sum() for o, w in zip(joint, weights)).backward()
    for a, b in zip(separate, joint):
        assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(head.parameters(), split.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    for a, b in zip(head.buffers(), split.buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    # parts of other shapes get a call each
    uneven = head_per_part(split, [parts[0], [level[:1] for level in parts[1]]])
    assert [tuple(o.shape) for o in uneven] == [(2, 4, 4, 4), (1, 4, 4, 4)]


def test_ema_teacher_averages_every_parameter_and_float_buffer_and_copies_counters():
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    teacher = EMATeacher(student)
    generator = torch.Generator().manual_seed(0)
    for step in (1, 5, 50):
        before = {name: t.clone() for name, t in teacher.model.state_dict().items()}
        with torch.no_grad():
            for tensor in student.state_dict().values():
                if tensor.dtype.is_floating_point:
                    tensor.add_(torch.randn(tensor.shape, generator=generator))
                else:
                    tensor.add_(step)
        teacher.update(student, step)
        alpha = teacher.alpha(step)
        for name, current in student.state_dict().items():
            if current.dtype.is_floating_point:
                # the per-tensor in-place arithmetic the update has always done, to the bit
                expected = before[name].mul_(alpha).add_(current, alpha=1 - alpha)
                assert torch.equal(teacher.model.state_dict()[name], expected), name
            else:
                assert torch.equal(teacher.model.state_dict()[name], current), name
    # a deep copy of the teacher (its own tensors) averages into its own tensors, not the original's
    twin = copy.deepcopy(teacher)
    original = teacher.model[0].weight.clone()
    twin.update(student, 100)
    assert torch.equal(teacher.model[0].weight, original) and not torch.equal(twin.model[0].weight, original)


def test_contrastive_loss_gradient_matches_finite_differences():
    from methods.components import contrastive_loss

    generator = torch.Generator().manual_seed(1)
    anchors = torch.randn(6, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    candidates = torch.randn(7, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    positives = torch.rand(6, 7, generator=generator) < 0.4
    negatives = ~positives & (torch.rand(6, 7, generator=generator) < 0.7)
    positives[0], negatives[1] = False, False  # an anchor without positives, one without negatives
    positives[1, 0] = True
    assert torch.autograd.gradcheck(
        lambda a, c: contrastive_loss(a, c, positives, negatives, 0.5), (anchors, candidates)
    )


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_contrastive_loss_equals_the_dense_formula_with_its_gradient(scale):
    """On unit embeddings (scale 1) the exponentials are shifted by the norm bound; on embeddings
    of norm 30 at temperature 0.1 the bound (9000) is too loose and each row's largest negative
    shifts them: both give the formula's loss and gradient."""
    from methods.components import contrastive_loss

    def dense(anchors, candidates, positives, negatives, temperature):
        similarity = anchors @ candidates.T / temperature
        losses = []
        for i in range(len(anchors)):
            if not positives[i].any():
                continue
            negative = torch.logsumexp(similarity[i][negatives[i]], dim=0) if negatives[i].any() else None
            terms = [
                -similarity[i, p] + (similarity[i, p] if negative is None else torch.logaddexp(similarity[i, p], negative))
                for p in positives[i].nonzero().flatten()
            ]
            losses.append(torch.stack(terms).mean())
        return torch.stack(losses).mean()

    generator = torch.Generator().manual_seed(0)
    features = scale * torch.nn.functional.normalize(torch.randn(40, 8, generator=generator, dtype=torch.float64), dim=1)
    classes = torch.randint(0, 4, (40,), generator=generator)
    same = classes[:, None] == classes[None]
    positives = same & ~torch.eye(40, dtype=torch.bool) & (torch.rand(40, 40, generator=generator) < 0.5)
    negatives = ~same
    negatives[:5] = False  # anchors without negatives
    positives[35:] = False  # anchors without positives
    results = []
    for loss_fn in (contrastive_loss, dense):
        anchors = features.clone().requires_grad_()
        loss = loss_fn(anchors, anchors, positives, negatives, 0.1)
        loss.backward()
        results.append((loss.detach(), anchors.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
