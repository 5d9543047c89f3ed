"""Add-on composition: the registry of add-ons, composed classes and their parameters, configuration
errors, heads in the optimiser groups, and a base with its own hooks that every add-on follows.
The registry-wide tests in test_methods.py cover every composition's training step."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import methods
from benchmark.classes import NUM_CLASSES
from benchmark.config import ConfigError, load_yaml
from benchmark.profiles import method_params, resolve
from methods.base import AddOn, Batch, SearchRange, method_class, register, register_addon, registered, unregister
from methods.daformer import DAFormer, DAFormerParams
from methods.mic import MIC
from methods.pipa import PiPa
from methods.sepico import SePiCo

from conftest import REPO, tiny_model, two_class_batch

ADDONS = {"sepico": SePiCo, "pipa": PiPa, "mic": MIC}


def test_every_addon_is_composed_with_daformer_and_listed():
    names = registered()
    for addon, addon_class in ADDONS.items():
        assert f"daformer+{addon}" in names
        cls = method_class(f"daformer+{addon}")
        assert issubclass(cls, DAFormer) and issubclass(cls, addon_class)
        assert cls.name == f"daformer+{addon}"
        assert method_class(f"daformer+{addon}") is cls  # composed once, then cached
    bases = [name for name in names if "+" not in name]
    assert {"daformer", "source_only", "target_oracle"} <= set(bases) and names[: len(bases)] == sorted(bases)


def test_composed_params_merge_the_base_and_the_addon_fields_with_their_defaults():
    cls = method_class("daformer+sepico")
    params = cls.Params()
    assert isinstance(params, DAFormerParams)
    base_fields = {f.name for f in dataclasses.fields(DAFormerParams)}
    addon_fields = {f.name for f in dataclasses.fields(SePiCo.Params)}
    assert {f.name for f in dataclasses.fields(params)} == base_fields | addon_fields
    assert params.sepico_variant == "dist" and params.sepico_temperature == 100.0 and params.mix_weight == 1.0
    assert set(cls.search_space) == set(DAFormer.search_space) | set(SePiCo.search_space)
    stacked = method_class("daformer+pipa+mic")
    assert stacked.__mro__[1:3] == (PiPa, MIC) and stacked.Params().mic_mask_ratio == 0.7
    assert stacked.Params().pipa_temperature == 0.1


@pytest.mark.parametrize(
    "name, message",
    [
        ("source_only+mic", "add-on 'mic' does not support base 'source_only'; its bases: daformer, hrda"),
        ("daformer+mice", "unknown add-on 'mice' in 'daformer+mice'; registered methods: daformer, .*source_only"),
        ("dafomer+mic", "unknown method 'dafomer+mic'; registered methods: daformer"),
        ("daformer+mic+mic", "add-on 'mic' appears twice in 'daformer+mic+mic'"),
        ("sepico", "unknown method 'sepico'; registered methods: daformer, .*target_oracle; add-ons: mic .*; sepico"),
    ],
)
def test_unsupported_compositions_name_what_is_allowed(name, message):
    with pytest.raises(KeyError, match=message.replace("+", r"\+")):
        method_class(name)


def weight():
    return dataclasses.field(default=1.0)


@pytest.mark.parametrize(
    "name, fields, bases, message",
    [
        ("test_loose", [("weight", float, weight())], ("daformer",), r"must be named test_loose_\.\.\., got \['weight'\]"),
        ("test_required", [("test_required_weight", float)], ("daformer",), r"\['test_required_weight'\] need defaults"),
        ("test_baseless", [("test_baseless_weight", float, weight())], (), "declares no supported bases"),
        ("pipa", [("pipa_weight", float, weight())], ("daformer",), "'pipa' is already registered by methods.pipa.PiPa"),
    ],
)
def test_addon_registration_checks_its_declaration(name, fields, bases, message):
    addon = type("Declared", (AddOn,), {"name": name, "Params": dataclasses.make_dataclass("P", fields), "bases": bases})
    with pytest.raises(ValueError, match=message):
        register_addon(addon)
    assert not any(composed.endswith(f"+{name}") and name != "pipa" for composed in registered())


def test_addon_fields_must_not_clash_with_the_base():
    @dataclasses.dataclass
    class ClashParams:
        test_clash_weight: float = 1.0

    @register
    class Clashing(DAFormer):
        name = "test_clashing_base"

        @dataclasses.dataclass
        class Params(DAFormerParams):
            test_clash_weight: float = 2.0

    @register_addon
    class Clash(AddOn):
        name = "test_clash"
        Params = ClashParams
        bases = ("test_clashing_base",)

    try:
        assert "test_clashing_base+test_clash" in registered()
        with pytest.raises(ValueError, match=r"add-on hyperparameters \['test_clash_weight'\] clash with the base's"):
            method_class("test_clashing_base+test_clash")
    finally:
        unregister("test_clash")
        unregister("test_clashing_base")
    assert not any("test_clash" in name for name in registered())


def test_composed_methods_resolve_from_params_and_reject_bad_values_naming_the_key():
    params = load_yaml(REPO / "params.yaml")
    run = resolve(params, "mini-gta2cs", "daformer+sepico", 0, overrides=["method.sepico_variant=bank"])
    assert method_params(run).sepico_variant == "bank" and method_params(run).mix_weight == 1.0
    with pytest.raises(ConfigError, match=r"methods.daformer\+sepico.sepico_variant: 'bnak' is not one of dist, proto, bank"):
        resolve(params, "mini-gta2cs", "daformer+sepico", 0, overrides=["method.sepico_variant=bnak"])
    with pytest.raises(ConfigError, match=r"unknown key methods.daformer\+mic.mic_ratio; allowed keys"):
        resolve(params, "mini-gta2cs", "daformer+mic", 0, overrides=["method.mic_ratio=0.5"])
    with pytest.raises(ConfigError, match=r"methods.daformer\+pipa: pipa_crop_fraction must be in \(0.5, 1\], got 0.4"):
        resolve(params, "mini-gta2cs", "daformer+pipa", 0, overrides=["method.pipa_crop_fraction=0.4"])


@pytest.mark.parametrize("addon", sorted(ADDONS))
def test_addon_heads_train_in_the_head_group(addon):
    method = method_class(f"daformer+{addon}")(tiny_model())
    groups = {g["role"]: {id(p) for p in g["params"]} for g in method.parameter_groups()}
    encoder = {id(p) for p in method.model.encoder.parameters()}
    assert groups["encoder"] == encoder
    added = {
        id(p)
        for name, p in method.named_parameters()
        if name.startswith(f"{addon}_") and p.requires_grad
    }
    assert added <= groups["head"] and not added & encoder
    if addon != "mic":  # MIC adds a loss, no module
        assert added


# ---- a base with its own hooks: every add-on must go through them ------------------------------


class HalfResolution(DAFormer):
    """A test base whose student and teacher see every image at half resolution (features upsampled
    back, as HRDA aligns its features with the whole crop). A student forward pass that does not come
    through the hooks (an add-on calling the model itself) is counted in ``bypasses``."""

    name = "test_half_resolution"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hook_calls = {"forward_train": 0, "student_features": 0, "teacher_features": 0, "supervised_losses": 0}
        self.bypasses = 0
        self.inside_hook = False
        forward_features = self.model.forward_features

        def recording(images):
            self.bypasses += not self.inside_hook
            return forward_features(images)

        self.model.forward_features = recording

    def _half(self, encode, images):
        self.inside_hook = True
        features = encode(F.interpolate(images, scale_factor=0.5, mode="bilinear", align_corners=False))
        self.inside_hook = False
        return [F.interpolate(f, scale_factor=2.0, mode="bilinear", align_corners=False) for f in features]

    def forward_train(self, images):
        self.hook_calls["forward_train"] += 1
        features = self._half(self.model.forward_features, images)
        return self.model.head(features), features

    def student_features(self, images):
        self.hook_calls["student_features"] += 1
        return self._half(self.model.forward_features, images)

    @torch.no_grad()
    def teacher_features(self, images):
        self.hook_calls["teacher_features"] += 1
        return self._half(self.teacher.model.forward_features, images)

    def supervised_losses(self, prefix, images, labels, weights=None, prediction=None):
        """DAFormer's term plus one of this base's own, as HRDA adds its detail cross-entropy."""
        self.hook_calls["supervised_losses"] += 1
        losses, logits, features = super().supervised_losses(prefix, images, labels, weights, prediction)
        losses[f"{prefix}_extra_ce"] = 0.5 * losses[f"{prefix}_ce"]
        return losses, logits, features


@pytest.fixture
def half_resolution_base():
    register(HalfResolution)
    yield HalfResolution.name
    unregister(HalfResolution.name)


@pytest.mark.parametrize(
    "addon, settings, expected",
    [
        ("sepico", {}, {"forward_train": 2, "student_features": 0, "teacher_features": 1, "supervised_losses": 2}),
        (
            "sepico",
            {"sepico_target_view": "target"},
            {"forward_train": 2, "student_features": 1, "teacher_features": 1, "supervised_losses": 2},
        ),
        ("pipa", {}, {"forward_train": 2, "student_features": 1, "teacher_features": 0, "supervised_losses": 2}),
        (
            "pipa",
            {"pipa_as_released": True},
            {"forward_train": 2, "student_features": 0, "teacher_features": 1, "supervised_losses": 2},
        ),
        ("mic", {}, {"forward_train": 3, "student_features": 0, "teacher_features": 0, "supervised_losses": 3}),
    ],
)
def test_addons_reach_the_network_only_through_the_base_hooks(
    monkeypatch, half_resolution_base, addon, settings, expected
):
    monkeypatch.setattr(ADDONS[addon], "bases", (*ADDONS[addon].bases, half_resolution_base))
    cls = method_class(f"{half_resolution_base}+{addon}")
    method = cls(tiny_model(), cls.Params(**settings), seed=0)
    method.train()
    losses = method.step(two_class_batch(0), Batch(two_class_batch(1).image), 0)
    assert all(torch.isfinite(v) for v in losses.values())
    assert any(key.startswith(addon) for key in losses)
    assert {"source_extra_ce", "mix_extra_ce"} <= set(losses)
    if addon == "mic":  # the masked image is trained with all of the base's terms
        assert {"mic_masked_ce", "mic_masked_extra_ce"} <= set(losses)
    assert method.hook_calls == expected
    assert method.bypasses == 0


def test_a_new_addon_is_covered_by_registering_it():
    @dataclasses.dataclass
    class EntropyParams:
        test_entropy_weight: float = 0.5

    @register_addon
    class Entropy(AddOn):
        """Mean prediction entropy on the mixed batch: the smallest possible add-on."""

        name = "test_entropy"
        Params = EntropyParams
        search_space = {"test_entropy_weight": SearchRange(0.1, 1.0)}
        bases = ("daformer",)

        def addon_losses(self, context):
            losses = super().addon_losses(context)
            probabilities = context.mixed_logits.softmax(dim=1)
            entropy = -(probabilities * probabilities.clamp_min(1e-8).log()).sum(dim=1).mean()
            losses["entropy"] = self.params.test_entropy_weight * entropy
            return losses

    try:
        assert "daformer+test_entropy" in registered()
        method = method_class("daformer+test_entropy")(tiny_model())
        losses = method.step(two_class_batch(0), Batch(two_class_batch(1).image), 0)
        assert set(losses) == {"source_ce", "feature_distance", "mix_ce", "entropy"}
        assert 0 < losses["entropy"].item() <= 0.5 * torch.log(torch.tensor(float(NUM_CLASSES))).item()
    finally:
        unregister("test_entropy")
    assert "daformer+test_entropy" not in registered()


def test_the_methods_package_registers_the_addons():
    assert {"daformer+sepico", "daformer+pipa", "daformer+mic"} <= set(methods.registered())
