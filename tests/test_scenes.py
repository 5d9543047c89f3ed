"""The street-scene renderer: determinism, formats, class coverage, long tail, and domain shift."""

from __future__ import annotations

import dataclasses
import itertools

import cv2
import numpy as np
import pytest

from benchmark.classes import CITYSCAPES_ID_TO_TRAIN_ID
from benchmark.scenes import (
    ALLOWED_LABEL_IDS,
    APPEARANCE_FIELDS,
    EGO_VEHICLE,
    LABEL_ID,
    LAYOUT_FIELDS,
    STYLES,
    DomainStyle,
    render_scene,
    restyle,
)

SIZES = {"gta": (132, 240), "synthia": (152, 256), "cityscapes": (128, 256)}
COUNTS = {"gta": 240, "synthia": 120, "cityscapes": 240}
EVALUATED = frozenset(CITYSCAPES_ID_TO_TRAIN_ID)
SYNTHIA_NEVER = {LABEL_ID["terrain"], LABEL_ID["truck"], LABEL_ID["train"]}
RARE = ("traffic_light", "traffic_sign", "rider", "truck", "bus", "train", "motorcycle", "bicycle")


def _render(style: str | DomainStyle, seed: int, size: tuple[int, int] | None = None):
    style = STYLES[style] if isinstance(style, str) else style
    height, width = size or SIZES[style.name]
    return render_scene(np.random.default_rng(seed), style, height, width)


class _Stats:
    """Per-labelId pixel counts and per-image presence over a batch of scenes of one style."""

    def __init__(self, style: str, count: int):
        self.count = count
        self.pixels = np.zeros(256, np.int64)
        self.images_with = np.zeros(256, np.int64)
        self.marked_images = 0
        self.hood_at_bottom = 0
        self.hood_in_top_half = 0
        self.road_top = []
        for seed in range(count):
            scene = _render(style, seed)
            label = scene.label_ids
            counts = np.bincount(label.ravel(), minlength=256)
            self.pixels += counts
            self.images_with += counts > 0
            self.marked_images += bool(scene.lane_marking.any())
            self.hood_at_bottom += bool((label[-1] == EGO_VEHICLE).mean() > 0.5)
            self.hood_in_top_half += bool((label[: label.shape[0] // 2] == EGO_VEHICLE).any())
            rows = np.flatnonzero((label == LABEL_ID["road"]).any(axis=1))
            self.road_top.append(rows[0] / label.shape[0])

    def share(self, name: str) -> float:
        return self.pixels[LABEL_ID[name]] / self.pixels.sum()

    def presence(self, name: str) -> float:
        return self.images_with[LABEL_ID[name]] / self.count

    def ids(self) -> set[int]:
        return set(np.flatnonzero(self.pixels).tolist())


@pytest.fixture(scope="module")
def stats() -> dict[str, _Stats]:
    return {style: _Stats(style, count) for style, count in COUNTS.items()}


# --- determinism and formats -------------------------------------------------------------------


@pytest.mark.parametrize("style", sorted(STYLES))
def test_same_generator_state_gives_identical_scene(style):
    np.random.seed(1)
    first = _render(style, 7)
    np.random.seed(2)  # global random state must not matter
    second = _render(style, 7)
    assert np.array_equal(first.image, second.image)
    assert np.array_equal(first.label_ids, second.label_ids)
    assert np.array_equal(first.lane_marking, second.lane_marking)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_different_seeds_give_different_scenes(style):
    scenes = [_render(style, seed) for seed in range(4)]
    for a, b in itertools.pairwise(scenes):
        assert not np.array_equal(a.image, b.image)
        assert not np.array_equal(a.label_ids, b.label_ids)


def test_generator_advances_by_a_fixed_amount():
    """Whatever a scene contains, the caller's generator ends in the same state."""
    ends = []
    for style in STYLES.values():
        rng = np.random.default_rng(3)
        render_scene(rng, style, 64, 128)
        ends.append(rng.random())
    assert len(set(ends)) == 1


@pytest.mark.parametrize("size", [(64, 128), (100, 150), (128, 256), (132, 240), (152, 256), (256, 512)])
@pytest.mark.parametrize("style", sorted(STYLES))
def test_shapes_dtypes_and_label_values(style, size):
    height, width = size
    for seed in range(2):
        scene = _render(style, seed, size)
        assert scene.image.shape == (height, width, 3) and scene.image.dtype == np.uint8
        assert scene.label_ids.shape == (height, width) and scene.label_ids.dtype == np.uint8
        assert scene.lane_marking.shape == (height, width) and scene.lane_marking.dtype == np.bool_
        assert set(np.unique(scene.label_ids).tolist()) <= ALLOWED_LABEL_IDS
        assert (scene.label_ids[scene.lane_marking] == LABEL_ID["road"]).all()
        assert scene.image.std() > 10, "a blank image"


def test_tiny_size_is_refused():
    with pytest.raises(ValueError, match="too small"):
        render_scene(np.random.default_rng(0), STYLES["gta"], 8, 8)


def test_style_table_is_complete_and_fields_are_classified():
    assert set(STYLES) == {"gta", "synthia", "cityscapes"}
    assert all(style.name == name for name, style in STYLES.items())
    names = {f.name for f in dataclasses.fields(DomainStyle)}
    assert set(LAYOUT_FIELDS) | set(APPEARANCE_FIELDS) | {"name"} == names
    assert not set(LAYOUT_FIELDS) & set(APPEARANCE_FIELDS)
    assert len({hash(style) for style in STYLES.values()}) == 3


# --- class coverage and frequencies ------------------------------------------------------------


@pytest.mark.parametrize("style", ["gta", "cityscapes"])
def test_every_evaluated_class_appears(stats, style):
    missing = EVALUATED - stats[style].ids()
    assert not missing, f"{style}: labelIds never drawn: {sorted(missing)}"


def test_synthia_has_no_terrain_truck_train_but_all_other_classes(stats):
    seen = stats["synthia"].ids()
    assert not seen & SYNTHIA_NEVER
    assert EVALUATED - SYNTHIA_NEVER <= seen


def test_synthia_paints_lane_markings(stats):
    assert stats["synthia"].marked_images / stats["synthia"].count > 0.8
    assert stats["synthia"].marked_images / stats["synthia"].count > stats["gta"].marked_images / stats["gta"].count


def test_unevaluated_ids_are_exercised(stats):
    seen = stats["gta"].ids() | stats["cityscapes"].ids()
    assert {0, 4, 6, 9} <= seen


def test_ego_hood_only_in_cityscapes_and_only_at_the_bottom(stats):
    city = stats["cityscapes"]
    assert city.hood_at_bottom / city.count > 0.6
    assert city.hood_in_top_half == 0
    for style in ("gta", "synthia"):
        assert stats[style].images_with[EGO_VEHICLE] == 0


@pytest.mark.parametrize("style", sorted(COUNTS))
def test_pixel_frequencies_are_long_tailed(stats, style):
    s = stats[style]
    rare = [name for name in RARE if LABEL_ID[name] not in SYNTHIA_NEVER or style != "synthia"]
    assert s.share("road") == max(s.share(name) for name in LABEL_ID)
    for big in ("road", "building"):
        for name in rare:
            assert s.share(big) > 10 * s.share(name), f"{style}: {big} vs {name}"
    for name in rare:
        assert s.share(name) < 0.012, f"{style}: {name} is not rare"
    for name in ("vegetation", "car", "sidewalk", "sky"):
        assert 0.02 < s.share(name) < 0.3, f"{style}: {name}"
    for name in ("train", "motorcycle", "rider"):
        if style == "synthia" and name == "train":
            continue
        assert 0 < s.presence(name) < 0.35, f"{style}: {name} in {s.presence(name):.0%} of images"


def test_small_objects_are_a_few_pixels_tall():
    heights = {LABEL_ID["traffic_light"]: [], LABEL_ID["traffic_sign"]: [], LABEL_ID["person"]: []}
    for seed in range(60):
        label = _render("cityscapes", seed).label_ids
        for label_id, found in heights.items():
            n, _, boxes, _ = cv2.connectedComponentsWithStats((label == label_id).astype(np.uint8))
            found.extend(boxes[1:n, cv2.CC_STAT_HEIGHT].tolist())
    for label_id, found in heights.items():
        assert len(found) > 20
        assert np.median(found) >= 4, f"labelId {label_id}: median height {np.median(found)} px"


# --- domain shift ------------------------------------------------------------------------------


def test_layouts_differ_between_domains(stats):
    """A higher camera puts the horizon (the far end of the road) higher in the image."""
    top = {style: float(np.mean(s.road_top)) for style, s in stats.items()}
    assert top["synthia"] + 0.05 < top["gta"] < top["cityscapes"]
    assert stats["gta"].share("road") > stats["cityscapes"].share("road")


def _saturation(image: np.ndarray) -> float:
    return float(cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[..., 1].mean())


def _noise(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute high-pass response inside ``mask`` (flat sky: texture there is noise)."""
    grey = image.astype(np.float32).mean(axis=2)
    high = grey - cv2.GaussianBlur(grey, (0, 0), 1.5)
    return float(np.abs(high[mask]).mean())


def test_same_layout_looks_different_in_each_style():
    """``restyle`` keeps the labels exactly and changes only the pixels, measurably."""
    city = STYLES["cityscapes"]
    as_gta = restyle(city, STYLES["gta"])
    sat = {"cityscapes": [], "gta": []}
    noise = {"cityscapes": [], "gta": []}
    for seed in range(12):
        real = _render(city, seed)
        game = _render(as_gta, seed, SIZES["cityscapes"])
        assert np.array_equal(real.label_ids, game.label_ids)
        assert np.array_equal(real.lane_marking, game.lane_marking)
        sky = cv2.erode((real.label_ids == LABEL_ID["sky"]).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        for name, scene in (("cityscapes", real), ("gta", game)):
            sat[name].append(_saturation(scene.image))
            if sky.sum() > 50:
                noise[name].append(_noise(scene.image, sky))
    assert np.mean(sat["gta"]) > 1.5 * np.mean(sat["cityscapes"])
    assert np.mean(noise["cityscapes"]) > 1.5 * np.mean(noise["gta"])


def test_styles_differ_in_colour_statistics():
    """On one shared layout, the mean colours of road, vegetation and sky differ between every
    pair of domain looks."""
    means = {}
    for name, look in STYLES.items():
        style = restyle(STYLES["gta"], look)
        per_class = []
        for seed in range(10):
            scene = _render(style, seed, SIZES["gta"])
            per_class.append(
                [scene.image[scene.label_ids == LABEL_ID[c]].mean(axis=0) for c in ("road", "vegetation", "sky")]
            )
        means[name] = np.mean(per_class, axis=0).ravel()
    for a, b in itertools.combinations(sorted(means), 2):
        assert np.abs(means[a] - means[b]).max() > 10, f"{a} and {b} look alike"
