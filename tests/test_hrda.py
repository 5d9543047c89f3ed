"""HRDA: the masked scale attention of training, multi-resolution and sliding-window inference, the
fused prediction and its gradients, and the data scales HRDA asks the loop for."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO

from benchmark.classes import NUM_CLASSES
from benchmark.config import ConfigError, load_yaml
from benchmark.metrics import predict_sliding, predict_whole
from benchmark.models import build_segmentor
from benchmark.profiles import resolve
from benchmark.train import method_settings
from methods.base import Batch
from methods.daformer import StepContext
from methods.hrda import HRDA, DetailBox, HRDAParams, HRDASegmentor, random_detail_box


def _segmentor():
    torch.manual_seed(0)
    return build_segmentor("efficientvit_b0", "daformer", NUM_CLASSES, 16)


def _images(height: int = 64, width: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_attention_is_zero_outside_the_detail_crop_in_training():
    model = HRDASegmentor(_segmentor())
    box = DetailBox(top=8, left=24, height=32, width=32)
    prediction = model.forward_crops(_images(), box)
    # context grid: 64 px / (output stride 4 / context scale 0.5) = 8 cells; the box covers rows 1-4, columns 3-6
    assert prediction.attention.shape == (2, NUM_CLASSES, 8, 8)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[1:5, 3:7] = True
    assert (prediction.attention[..., ~inside] == 0).all()
    assert (prediction.attention[..., inside] > 0).all()
    # on the fused grid (16 x 16) nothing outside the box depends on the detail view
    fine_inside = torch.zeros(16, 16, dtype=torch.bool)
    fine_inside[2:10, 6:14] = True
    outside = prediction.fused[..., ~fine_inside].sum()
    (outside_grad,) = torch.autograd.grad(outside, prediction.detail, retain_graph=True)
    assert (outside_grad == 0).all()
    (inside_grad,) = torch.autograd.grad(prediction.fused[..., fine_inside].sum(), prediction.detail)
    assert inside_grad.abs().sum() > 0


def test_fused_prediction_follows_the_paper_formula():
    context = torch.tensor([[[[1.0, 3.0]]]])  # (1, 1, 1, 2)
    attention = torch.tensor([[[[0.0, 1.0]]]])
    detail = torch.full((1, 1, 2, 4), 10.0)
    fused = HRDASegmentor.fuse(context, attention, detail)
    # zeta((1 - a) * y_c) + zeta(a) * y_d with bilinear zeta, align_corners=False: columns blend 0.75 / 0.25
    expected_context = torch.tensor([1.0, 0.75, 0.25, 0.0])
    expected_attention = torch.tensor([0.0, 0.25, 0.75, 1.0])
    assert torch.allclose(fused[0, 0, 0], expected_context + 10.0 * expected_attention)


def test_sliding_window_with_one_window_covering_the_image_equals_whole_image_inference():
    segmentor = _segmentor()
    whole_detail = HRDASegmentor(segmentor, detail_crop=1.0).eval()
    images = _images(64, 128)
    with torch.no_grad():
        # test time: one outer window over the whole image is whole-image inference
        sliding = predict_sliding(whole_detail, images, window=(64, 128), stride=(32, 64), num_classes=NUM_CLASSES)
        assert torch.allclose(sliding, predict_whole(whole_detail, images))
        # inside the multi-resolution inference: one detail window over the crop is the segmentor on the crop
        single_window = segmentor.head(segmentor.forward_features(images))
        assert torch.allclose(whole_detail.detail_sliding(images), single_window, atol=1e-6)


def test_overlapping_detail_windows_average_their_logits():
    segmentor = _segmentor()
    model = HRDASegmentor(segmentor, detail_crop=0.5, detail_stride=0.5).eval()
    images = _images(64, 64)
    with torch.no_grad():
        assembled = model.detail_sliding(images)
        # 32-pixel windows every 16 pixels: origins 0, 16, 32 per axis, 9 windows, logits on an 8-cell grid
        summed = torch.zeros(2, NUM_CLASSES, 16, 16)
        count = torch.zeros(16, 16)
        for top in (0, 16, 32):
            for left in (0, 16, 32):
                window = images[:, :, top : top + 32, left : left + 32]
                summed[:, :, top // 4 : top // 4 + 8, left // 4 : left // 4 + 8] += segmentor(window)
                count[top // 4 : top // 4 + 8, left // 4 : left // 4 + 8] += 1
    assert count.min() == 1 and count.max() == 4
    assert torch.allclose(assembled, summed / count, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 7, 100])
def test_detail_windows_in_chunks_give_the_prediction_of_one_batch(chunk):
    segmentor = _segmentor()
    whole = HRDASegmentor(segmentor, detail_crop=0.5, detail_stride=0.5, inference_chunk=1000).eval()
    chunked = HRDASegmentor(segmentor, detail_crop=0.5, detail_stride=0.5, inference_chunk=chunk).eval()
    chunked.attention.load_state_dict(whole.attention.state_dict())
    images = _images(64, 64)
    with torch.no_grad():
        torch.testing.assert_close(chunked.detail_sliding(images), whole.detail_sliding(images), rtol=0, atol=1e-5)
        torch.testing.assert_close(chunked(images), whole(images), rtol=0, atol=1e-5)


def test_fused_output_shape_and_gradients_reach_both_heads():
    method = HRDA(_segmentor(), seed=0)
    method.train()
    images = _images(64, 64)
    labels = torch.randint(0, NUM_CLASSES, (2, 64, 64), generator=torch.Generator().manual_seed(1))
    fused, features = method.forward_train(images)
    assert fused.shape == (2, NUM_CLASSES, 16, 16)
    assert features[0].shape[-2:] == (8, 8)  # context view: 32 x 32 pixels at stride 4
    assert method.last_detail.logits.shape == (2, NUM_CLASSES, 8, 8)
    losses = method.source_losses(StepContext(0, Batch(images, labels), Batch(images)))
    assert {"source_ce", "source_detail_ce"} <= set(losses)
    sum(losses.values()).backward()
    for head in (method.model.head, method.model.attention):
        gradients = [p.grad for p in head.parameters()]
        assert all(g is not None for g in gradients)
        assert sum(g.abs().sum() for g in gradients) > 0
    head_group = next(g for g in method.parameter_groups() if g["role"] == "head")
    assert {id(p) for p in method.model.attention.parameters()} <= {id(p) for p in head_group["params"]}


def test_loss_weights_are_one_minus_lambda_and_lambda():
    method = HRDA(_segmentor(), HRDAParams(detail_loss_weight=0.25, feature_distance=False), seed=0)
    method.eval()
    images = _images(64, 64)
    labels = torch.randint(0, NUM_CLASSES, (2, 64, 64), generator=torch.Generator().manual_seed(1))
    fused, _ = method.forward_train(images)
    losses = method.multi_resolution_losses("source", fused, labels)
    detail = method.last_detail
    plain_fused = torch.nn.functional.cross_entropy(
        torch.nn.functional.interpolate(fused, size=(64, 64), mode="bilinear", align_corners=False), labels
    )
    plain_detail = torch.nn.functional.cross_entropy(
        torch.nn.functional.interpolate(detail.logits, size=(32, 32), mode="bilinear", align_corners=False),
        detail.box.crop(labels),
    )
    assert losses["source_ce"].item() == pytest.approx(0.75 * plain_fused.item(), rel=1e-5)
    assert losses["source_detail_ce"].item() == pytest.approx(0.25 * plain_detail.item(), rel=1e-5)


def test_pseudo_labels_come_from_the_teachers_multi_resolution_inference():
    method = HRDA(_segmentor(), seed=0)
    images = _images(64, 64)
    labels, weights = method.target_pseudo_labels(Batch(images))
    assert isinstance(method.teacher.model, HRDASegmentor)
    with torch.no_grad():
        expected = predict_whole(method.teacher.model, images).argmax(dim=1)
    assert torch.equal(labels, expected) and weights.shape == (2, 64, 64)


def test_detail_boxes_take_every_aligned_position_and_stay_inside():
    generator = torch.Generator().manual_seed(0)
    boxes = [random_detail_box(64, 128, (32, 64), 8, generator) for _ in range(300)]
    assert {b.top for b in boxes} == {0, 8, 16, 24, 32}
    assert {b.left for b in boxes} == set(range(0, 65, 8))
    assert all(b.bottom <= 64 and b.right <= 128 for b in boxes)


def test_crops_off_the_alignment_grid_are_refused():
    model = HRDASegmentor(_segmentor())
    with pytest.raises(ValueError, match="multiples of 8 .* got 60x64"):
        model(_images(60, 64))


def test_hrda_trains_and_tests_at_twice_the_benchmark_resolution():
    params = load_yaml(REPO / "params.yaml")
    embedded = method_settings(resolve(params, "mini-gta2cs", "hrda", seed=0, profile="embedded"))
    assert embedded.data.source.scale == (144, 256) and embedded.data.target.scale == (128, 256)
    assert embedded.data.crop == (128, 128) and embedded.data.test_scale == (128, 256)
    assert embedded.data.rcs_min_crop_ratio == pytest.approx(2.0)
    assert (embedded.settings.eval.mode, embedded.settings.eval.window, embedded.settings.eval.stride) == (
        "sliding",
        (128, 128),
        (64, 64),
    )
    paper = method_settings(resolve(params, "gta2cs", "hrda", seed=0, profile="paper"))
    assert paper.data.source.scale == (1440, 2560) and paper.data.crop == (1024, 1024)
    assert paper.data.test_scale == (1024, 2048) and paper.settings.eval.stride == (512, 512)
    daformer = resolve(params, "mini-gta2cs", "daformer", seed=0)
    assert method_settings(daformer) == daformer


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.detail_crop=1.5", "methods.hrda.detail_crop must be in (0, 1], got 1.5"),
        ("method.detail_loss_weight=-0.1", "methods.hrda.detail_loss_weight must be in [0, 1]"),
        ("method.resolution_scale=0", "methods.hrda.resolution_scale must be > 0"),
        ("method.inference_chunk=0", "methods.hrda.inference_chunk must be >= 1, got 0"),
    ],
)
def test_bad_hrda_settings_stop_before_any_work(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        resolve(load_yaml(REPO / "params.yaml"), "mini-gta2cs", "hrda", seed=0, overrides=[override])


def test_add_on_features_are_the_context_views_on_the_grid_of_the_feature_stride():
    method = HRDA(_segmentor(), seed=0)
    method.train()
    images = _images(64, 64)
    assert method.feature_stride == 8
    _, context_features = method.forward_train(images)
    student = method.student_features(images)
    assert [tuple(f.shape) for f in student] == [tuple(f.shape) for f in context_features]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(student, context_features))
    assert student[0].shape[-2:] == (64 // 8, 64 // 8)
    teacher = method.teacher_features(images)
    assert [tuple(f.shape) for f in teacher] == [tuple(f.shape) for f in student]
    with torch.no_grad():
        expected = method.teacher.model.forward_features(method.model.context_view(images))
    assert all(torch.equal(a, b) for a, b in zip(teacher, expected))
    # the multi-resolution teacher keeps its own inference for the logits and gives the features apart
    logits, features = method.teacher_pass(images, _images(64, 64, seed=1))
    with torch.no_grad():
        assert torch.allclose(logits, method.teacher(images))
    assert features[0].shape[-2:] == (8, 8)
