"""Segmentors: shapes, gradient flow, the DAFormer head's structure, local pretrained weights, profiles."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from benchmark.classes import NUM_CLASSES as CITYSCAPES_CLASSES
from benchmark.config import ConfigError, load_yaml
from benchmark.models import (
    HEADS,
    DAFormerHead,
    DilatedDepthwiseConv2d,
    SegFormerHead,
    build_segmentor,
    encoder_takes_drop_path,
    load_encoder_weights,
    register_head,
)
from benchmark.profiles import resolve
from benchmark.train import build_model

PARAMS = load_yaml(Path(__file__).resolve().parents[1] / "params.yaml")
NUM_CLASSES = 5
ENCODERS = sorted({PARAMS["profiles"]["embedded"]["model"]["encoder"], "resnet18", "efficientvit_b0", "pvt_v2_b0"})


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("encoder", ENCODERS)
def test_output_shape_and_gradients_reach_every_parameter(encoder, head):
    torch.manual_seed(0)
    model = build_segmentor(encoder, head, NUM_CLASSES, embed_dim=16)
    images = torch.randn(2, 3, 64, 96)
    features = model.forward_features(images)
    assert model.reductions[0] == 4, "the head's input starts at 1/4 resolution (stride-2 stems are skipped)"
    assert [f.shape[1] for f in features] == model.channels
    assert [(f.shape[2], f.shape[3]) for f in features] == [(64 // r, 96 // r) for r in model.reductions]

    # timm zero-initialises the last norm of residual blocks (ResNet's bn2), which makes the gradient of
    # the block's other weights exactly zero at init; a perturbation removes such exact zeros.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    logits = model(images)
    assert logits.shape == (2, NUM_CLASSES, 16, 24)
    labels = torch.randint(0, NUM_CLASSES, (2, 16, 24))
    nn.functional.cross_entropy(logits, labels).backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(name.startswith("encoder.") for name, _ in model.named_parameters())


def test_channels_come_from_feature_info():
    model = build_segmentor("resnet18", "daformer", NUM_CLASSES, embed_dim=8)
    info = model.encoder.feature_info
    assert model.channels == info.channels()[1:] and model.reductions == info.reduction()[1:]
    assert [m.in_channels for m in model.head.embeddings] == info.channels()[1:]


def test_daformer_head_follows_the_paper():
    head = DAFormerHead([8, 16, 24, 32], num_classes=NUM_CLASSES, embed_dim=12)
    # Per-level 1x1 linear embedding without norm or activation.
    assert all(isinstance(e, nn.Conv2d) and e.kernel_size == (1, 1) and e.out_channels == 12 for e in head.embeddings)
    fused_in = 4 * 12
    first, *separable = head.fusion.branches
    assert isinstance(first[0], nn.Conv2d) and first[0].kernel_size == (1, 1) and first[0].in_channels == fused_in
    assert [branch[0][0].dilation for branch in separable] == [(6, 6), (12, 12), (18, 18)]
    for branch in separable:
        depthwise, pointwise = branch[0][0], branch[1][0]
        assert depthwise.groups == fused_in and depthwise.kernel_size == (3, 3)
        assert pointwise.kernel_size == (1, 1) and pointwise.out_channels == 12
        assert isinstance(branch[0][1], nn.BatchNorm2d) and isinstance(branch[1][2], nn.ReLU)
    assert head.fusion.bottleneck[0].kernel_size == (3, 3) and head.fusion.bottleneck[0].in_channels == 4 * 12
    assert head.dropout.p == 0.1 and head.classifier.out_channels == NUM_CLASSES

    features = [torch.randn(2, c, 32 // 2**i, 48 // 2**i) for i, c in enumerate([8, 16, 24, 32])]
    assert head.decode(features).shape == (2, 12, 32, 48)
    assert head(features).shape == (2, NUM_CLASSES, 32, 48)
    with pytest.raises(ValueError, match="levels"):
        head(features[:3])


@pytest.mark.parametrize("size", [(16, 16), (16, 32), (5, 40), (40, 5), (64, 64)])
@pytest.mark.parametrize("dilation", [1, 6, 12, 18])
def test_dilated_depthwise_conv_that_skips_padding_taps_equals_the_full_convolution(size, dilation):
    torch.manual_seed(0)
    skipping = DilatedDepthwiseConv2d(6, 3, dilation)
    full = nn.Conv2d(6, 6, 3, padding=dilation, dilation=dilation, groups=6, bias=False)
    full.load_state_dict(skipping.state_dict())  # same parameters, same state-dict keys
    x = torch.randn(2, 6, *size, requires_grad=True)
    x_full = x.detach().clone().requires_grad_()
    out, out_full = skipping(x), full(x_full)
    assert out.shape == out_full.shape == x.shape
    grad = torch.randn_like(out)
    out.backward(grad)
    out_full.backward(grad)
    torch.testing.assert_close(out, out_full, rtol=0, atol=1e-6)
    torch.testing.assert_close(x.grad, x_full.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(skipping.weight.grad, full.weight.grad, rtol=0, atol=1e-5)
    if dilation >= max(size):  # only the centre tap sees the image: every other weight gets no gradient
        centre_only = torch.zeros(3, 3, dtype=torch.bool)
        centre_only[1, 1] = True
        assert skipping.weight.grad[:, :, ~centre_only].abs().max() == 0


def test_segformer_head_shapes():
    head = SegFormerHead([8, 16], num_classes=NUM_CLASSES, embed_dim=6).eval()
    features = [torch.randn(1, 8, 10, 12), torch.randn(1, 16, 5, 6)]
    assert head.decode(features).shape == (1, 6, 10, 12)
    assert head(features).shape == (1, NUM_CLASSES, 10, 12)
    assert head.fuse[0].kernel_size == (1, 1) and isinstance(head.fuse[1], nn.BatchNorm2d)


def test_registering_a_head_twice_is_an_error():
    with pytest.raises(KeyError, match="already registered"):
        register_head("daformer", DAFormerHead)
    with pytest.raises(KeyError, match="unknown head"):
        build_segmentor("resnet18", "nope", NUM_CLASSES, embed_dim=8)


def _timm_loaded_reference(encoder: str, path) -> dict[str, torch.Tensor]:
    """Encoder weights as timm's own pretrained loader puts them into a features_only model."""
    overlay = {"file": str(path)}
    return timm.create_model(encoder, features_only=True, pretrained=True, pretrained_cfg_overlay=overlay).state_dict()


@pytest.mark.parametrize("encoder", ["resnet18", "efficientvit_b0"])
def test_pretrained_classifier_state_dict_gives_identical_encoder_weights(encoder, tmp_path):
    torch.manual_seed(1)
    classifier = timm.create_model(encoder, features_only=False, pretrained=False)
    path = tmp_path / "imagenet.pth"
    torch.save(classifier.state_dict(), path)

    torch.manual_seed(2)  # a different random init, so that equality below comes from loading
    model = build_segmentor(encoder, "daformer", NUM_CLASSES, embed_dim=8, pretrained_path=path)
    loaded = model.encoder.state_dict()
    reference = _timm_loaded_reference(encoder, path)
    assert loaded.keys() == reference.keys()
    different = [k for k in loaded if not torch.equal(loaded[k], reference[k])]
    assert not different, f"tensors differ from timm's own loading: {different[:5]}"
    # Every classifier tensor outside the classification head is now in the encoder, value for value.
    encoder_values = [v for k, v in loaded.items() if not k.endswith("num_batches_tracked")]
    head_prefix = timm.models.get_pretrained_cfg_value(encoder, "classifier").split(".")[0] + "."
    body = {k: v for k, v in classifier.state_dict().items() if not k.startswith(head_prefix)}
    body = {k: v for k, v in body.items() if not k.endswith("num_batches_tracked")}
    assert len(body) == len(encoder_values)
    assert all(any(v.shape == e.shape and torch.equal(v, e) for e in encoder_values) for v in body.values())


def test_pretrained_safetensors_and_wrapped_checkpoints(tmp_path):
    torch.manual_seed(3)
    classifier = timm.create_model("resnet18", pretrained=False)
    state = {k: v.contiguous() for k, v in classifier.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "ckpt.pth")
    reference = _timm_loaded_reference("resnet18", tmp_path / "ckpt.pth")
    for name in ("w.safetensors", "ckpt.pth"):
        model = build_segmentor("resnet18", "segformer", NUM_CLASSES, embed_dim=8, pretrained_path=tmp_path / name)
        loaded = model.encoder.state_dict()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference), name

    encoder = timm.create_model("resnet18", features_only=True, pretrained=False)
    report = load_encoder_weights(encoder, tmp_path / "w.safetensors", model_keys=set(state))
    assert sorted(report.dropped) == ["fc.bias", "fc.weight"] and not report.missing and not report.unexpected


def test_weights_that_match_nothing_raise_a_clear_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"blocks.0.weight": torch.zeros(3, 3), "fc.weight": torch.zeros(10, 4)}, path)
    with pytest.raises(ValueError, match="none of its 2 keys"):
        build_segmentor("resnet18", "daformer", NUM_CLASSES, embed_dim=8, pretrained_path=path)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_segmentor("resnet18", "daformer", NUM_CLASSES, embed_dim=8, pretrained_path=tmp_path / "absent.pth")


def test_weights_of_another_variant_are_refused(tmp_path):
    # ResNet-34 holds every ResNet-18 tensor with the same shape plus extra blocks: without the
    # unexpected-key check it would load silently.
    path = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34", pretrained=False).state_dict(), path)
    with pytest.raises(ValueError, match="unexpected key"):
        build_segmentor("resnet18", "daformer", NUM_CLASSES, embed_dim=8, pretrained_path=path)
    # A different width is a shape mismatch.
    torch.save(timm.create_model("resnet50", pretrained=False).state_dict(), path)
    with pytest.raises(ValueError, match="shape mismatch"):
        build_segmentor("resnet18", "daformer", NUM_CLASSES, embed_dim=8, pretrained_path=path)


def test_embedded_profile_builds_and_runs_at_its_crop_size():
    # built as a training run builds it: params.yaml's embedded profile on the mini benchmark's crop
    run = resolve(PARAMS, "mini-gta2cs", "daformer", 0, profile="embedded")
    model = build_model(run).eval()
    height, width = run.data.crop
    with torch.no_grad():
        logits = model(torch.randn(1, 3, height, width))
    assert logits.shape == (1, CITYSCAPES_CLASSES, height // 4, width // 4)
    assert model.head.embed_dim == run.settings.model.embed_dim
    assert not any(type(module).__name__ == "DropPath" for module in model.modules())


def test_paper_profile_is_mit_b5_with_its_stochastic_depth_on_the_meta_device():
    # pvt_v2_b5 has ~82M parameters; on the meta device it is built and run for shapes only, in ~1 s.
    run = resolve(PARAMS, "gta2cs", "daformer", 0, profile="paper", overrides=["model.pretrained=null"])
    model_config = run.settings.model
    assert (model_config.encoder, model_config.head, model_config.embed_dim, run.data.crop) == (
        "pvt_v2_b5", "daformer", 256, (512, 512)
    )
    with torch.device("meta"):
        model = build_model(run)
        logits = model(torch.empty(2, 3, *run.data.crop))
    assert logits.shape == (2, CITYSCAPES_CLASSES, 128, 128)
    assert model.channels == [64, 128, 320, 512] and model.reductions == [4, 8, 16, 32]
    encoder_params = sum(p.numel() for p in model.encoder.parameters())
    assert 80e6 < encoder_params < 83e6
    assert isinstance(model.head, DAFormerHead) and model.head.embed_dim == 256
    # MiT-B5's stochastic depth (SegFormer, DAFormer): 0 at the first block rising to 0.1 at the last
    drop = [block.drop_path1.drop_prob if hasattr(block.drop_path1, "drop_prob") else 0.0
            for stage in (model.encoder.stages_0, model.encoder.stages_3) for block in stage.blocks]
    assert drop[0] == 0.0 and drop[-1] == pytest.approx(0.1)


def test_drop_path_rate_is_checked_against_the_encoder():
    assert encoder_takes_drop_path("pvt_v2_b0") and not encoder_takes_drop_path("efficientvit_b0")
    with pytest.raises(ConfigError, match=r"profiles\.embedded\.model\.drop_path_rate: the encoder 'efficientvit_b0'"):
        resolve(PARAMS, "mini-gta2cs", "daformer", 0, overrides=["model.drop_path_rate=0.1"])
    with pytest.raises(ConfigError, match=r"model\.drop_path_rate must be in \[0, 1\), got 1\.5"):
        resolve(PARAMS, "mini-gta2cs", "daformer", 0, overrides=["model.drop_path_rate=1.5"])
    run = resolve(PARAMS, "mini-gta2cs", "daformer", 0, overrides=["model.encoder=pvt_v2_b0", "model.drop_path_rate=0.2"])
    blocks = build_model(run).encoder.stages_3.blocks
    assert blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)


@pytest.mark.parametrize("channels_last", [True, False])
def test_upsample_equals_bilinear_interpolation_with_its_gradient(channels_last):
    """``models.upsample`` only changes the layout in which the gradient reaches the resize."""
    from benchmark.models import upsample

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, 6, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    label = torch.randint(0, 5, (2, 16, 24), generator=generator)
    grads = []
    for resize in (upsample, lambda t, size: torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)):
        leaf = x.clone().requires_grad_()
        out = resize(leaf, (16, 24))
        assert out.shape == (2, 5, 16, 24)
        torch.nn.functional.cross_entropy(out, label).backward()
        grads.append((out.detach(), leaf.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
