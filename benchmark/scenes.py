"""Procedural street scenes: the renderer behind the embedded mini benchmarks.

:func:`render_scene` draws one perspective street view in the look and layout statistics of one
domain (:data:`STYLES`: ``"gta"``, ``"synthia"``, ``"cityscapes"``) and returns the RGB image, its
Cityscapes labelIds and the mask of painted lane markings.

Geometry. A pinhole camera stands ``camera_height`` metres above a flat ground plane and looks down
the street. World X is lateral (right positive), Y is up, Z is depth along the street. A point
(X, Y, Z) lands on pixel ``(vx + f X / Z, hy + f (h - Y) / Z)`` with ``hy`` the horizon row, ``vx``
the vanishing point column, ``f`` the focal length in pixels and ``h`` the camera height, so an
object's pixel size is proportional to how far its base lies below the horizon, and everything
parallel to the street converges to the vanishing point. Things are painted far to near: the ground
first, then building fronts, then walls and fences, then every compact object (trees, poles,
people, vehicles) in order of decreasing depth, then the ego vehicle's hood.

Randomness. The caller's generator seeds three private streams: *layout* (geometry, hence the
labels and the lane-marking mask), *paint* (colours and image-only detail such as windows, lamps
and asphalt repairs) and *sensor* (per-pixel texture and noise). Appearance knobs of
:class:`DomainStyle` never touch the layout stream, so :func:`restyle` can render the very same
labelled layout in another domain's look, which separates the appearance part of a domain gap from
its layout part.

Labels follow the drawn shapes exactly (same fixed-point polygons on both canvases, no
anti-aliasing); the one deliberate exception is a fence, whose whole plane is labelled fence while
the image shows what lies behind it between the slats, as in Cityscapes' annotation.

Besides the interface (:class:`DomainStyle`, :data:`STYLES`, :class:`Scene`, :func:`render_scene`)
the module exports the labelId tables (:data:`LABEL_ID`, :data:`UNEVALUATED_ID`,
:data:`ALLOWED_LABEL_IDS`) and the split of the style knobs (:data:`LAYOUT_FIELDS`,
:data:`APPEARANCE_FIELDS`, :func:`restyle`).
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import cv2
import numpy as np

from benchmark.classes import CITYSCAPES_ID_TO_TRAIN_ID, CLASSES, invert

#: Cityscapes labelId of every evaluated class, by class name (road 7, ..., bicycle 33).
LABEL_ID: dict[str, int] = {name: invert(CITYSCAPES_ID_TO_TRAIN_ID)[i] for i, name in enumerate(CLASSES)}
UNLABELED = 0
EGO_VEHICLE = 1
STATIC = 4
GROUND = 6
PARKING = 9
#: Names of the labelIds a scene may contain that are not evaluated (they become ignore).
UNEVALUATED_ID: dict[str, int] = {
    "unlabeled": UNLABELED,
    "ego_vehicle": EGO_VEHICLE,
    "static": STATIC,
    "ground": GROUND,
    "parking": PARKING,
}
#: Every labelId :func:`render_scene` can produce.
ALLOWED_LABEL_IDS: frozenset[int] = frozenset(LABEL_ID.values()) | frozenset(UNEVALUATED_ID.values())

ROAD, SIDEWALK, BUILDING, WALL, FENCE = (LABEL_ID[n] for n in ("road", "sidewalk", "building", "wall", "fence"))
POLE, LIGHT, SIGN = LABEL_ID["pole"], LABEL_ID["traffic_light"], LABEL_ID["traffic_sign"]
VEGETATION, TERRAIN, SKY = LABEL_ID["vegetation"], LABEL_ID["terrain"], LABEL_ID["sky"]
PERSON, RIDER, CAR, TRUCK, BUS = (LABEL_ID[n] for n in ("person", "rider", "car", "truck", "bus"))
TRAIN, MOTORCYCLE, BICYCLE = LABEL_ID["train"], LABEL_ID["motorcycle"], LABEL_ID["bicycle"]

#: Ground-level classes: cast shadows darken only these.
_GROUND_LEVEL = (ROAD, SIDEWALK, TERRAIN, PARKING, GROUND)

Range = tuple[float, float]
#: A colour range in HSV: (hue_lo, hue_hi) in degrees (hue_hi may exceed 360 to wrap through red),
#: (sat_lo, sat_hi) and (val_lo, val_hi) in [0, 1]; a colour is drawn uniformly in the box.
HSV = tuple[float, float, float, float, float, float]

#: Rows at which the pixel-valued knobs (blur, strip widths) are specified; they scale with height.
_REFERENCE_HEIGHT = 128
#: Near clipping plane (metres): geometry closer than this is flattened onto it.
_Z_NEAR = 0.5
#: Depth (metres) standing in for "infinitely far" in ground polygons.
_Z_FAR = 4000.0
#: Fractional bits of the fixed-point coordinates handed to OpenCV's drawing functions.
_SHIFT = 4
_ONE = 1 << _SHIFT


def _palette(**overrides: HSV) -> dict[str, HSV]:
    """The shared material palette with some entries replaced: each style starts from it."""
    palette = {
        "sky_zenith": (200.0, 225.0, 0.35, 0.65, 0.62, 0.92),
        "sky_horizon": (190.0, 220.0, 0.04, 0.22, 0.80, 0.98),
        "road": (180.0, 260.0, 0.00, 0.08, 0.26, 0.40),
        "lane_paint": (40.0, 55.0, 0.00, 0.18, 0.78, 0.95),
        "curb": (0.0, 360.0, 0.00, 0.05, 0.55, 0.75),
        "sidewalk": (15.0, 45.0, 0.03, 0.16, 0.48, 0.68),
        "parking": (15.0, 40.0, 0.05, 0.22, 0.36, 0.52),
        "ground": (22.0, 40.0, 0.25, 0.50, 0.28, 0.48),
        "terrain": (55.0, 100.0, 0.30, 0.60, 0.30, 0.55),
        "vegetation": (72.0, 135.0, 0.35, 0.72, 0.15, 0.42),
        "trunk": (18.0, 35.0, 0.30, 0.55, 0.16, 0.32),
        "building": (0.0, 60.0, 0.00, 0.35, 0.35, 0.80),
        "window": (190.0, 230.0, 0.08, 0.30, 0.10, 0.30),
        "window_lit": (38.0, 55.0, 0.25, 0.60, 0.70, 0.95),
        "wall": (0.0, 50.0, 0.00, 0.30, 0.35, 0.75),
        "fence": (0.0, 140.0, 0.00, 0.35, 0.18, 0.60),
        "pole": (0.0, 360.0, 0.00, 0.12, 0.22, 0.55),
        "signal": (0.0, 360.0, 0.00, 0.15, 0.06, 0.25),
        "lamp_off": (0.0, 360.0, 0.00, 0.10, 0.10, 0.22),
        "lamp_red": (355.0, 365.0, 0.75, 1.00, 0.85, 1.00),
        "lamp_amber": (35.0, 45.0, 0.75, 1.00, 0.85, 1.00),
        "lamp_green": (130.0, 165.0, 0.60, 0.95, 0.75, 1.00),
        "sign_red": (352.0, 365.0, 0.70, 0.95, 0.60, 0.90),
        "sign_blue": (205.0, 225.0, 0.70, 0.95, 0.45, 0.80),
        "sign_yellow": (42.0, 55.0, 0.70, 0.95, 0.75, 0.95),
        "sign_white": (0.0, 360.0, 0.00, 0.06, 0.85, 0.98),
        "metal": (0.0, 360.0, 0.00, 0.08, 0.42, 0.68),
        "vehicle": (0.0, 360.0, 0.00, 0.75, 0.12, 0.92),
        "glass": (195.0, 225.0, 0.10, 0.35, 0.08, 0.25),
        "tyre": (0.0, 360.0, 0.00, 0.10, 0.04, 0.12),
        "tail_light": (355.0, 365.0, 0.80, 1.00, 0.60, 0.90),
        "head_light": (45.0, 60.0, 0.05, 0.25, 0.85, 1.00),
        "skin": (15.0, 35.0, 0.25, 0.60, 0.35, 0.90),
        "hair": (15.0, 40.0, 0.20, 0.60, 0.05, 0.35),
        "clothing": (0.0, 360.0, 0.00, 0.70, 0.08, 0.85),
        "helmet": (0.0, 360.0, 0.00, 0.80, 0.10, 0.90),
        "static": (0.0, 360.0, 0.00, 0.40, 0.20, 0.60),
        "hood": (200.0, 240.0, 0.00, 0.25, 0.05, 0.22),
        "rail": (0.0, 360.0, 0.00, 0.05, 0.50, 0.70),
        "track_bed": (20.0, 40.0, 0.05, 0.20, 0.20, 0.33),
    }
    unknown = set(overrides) - set(palette)
    if unknown:
        raise KeyError(f"unknown palette materials: {sorted(unknown)}")
    palette.update(overrides)
    return palette


#: Field metadata: *layout* knobs decide geometry and labels, *appearance* knobs only pixels.
_LAYOUT = {"kind": "layout"}
_LOOK = {"kind": "appearance"}


@dataclass(frozen=True)
class DomainStyle:
    """Every layout and appearance knob of one domain.

    Lengths are metres in the world, counts are Poisson means per image, ``Range`` fields are
    (low, high) bounds of a uniform draw made once per image (or per object where said).
    Fields marked *layout* decide geometry and therefore labels; fields marked *appearance* only
    change pixels (see :func:`restyle`). Defaults are shared by all domains; :data:`STYLES` lists
    what each domain changes, which is the one place to tune the domain gap.
    """

    #: Domain name, informational.
    name: str = field(default="base", metadata={"kind": "name"})

    # --- camera (layout) ---------------------------------------------------------------------
    #: Horizon row as a fraction of the image height.
    horizon: Range = field(default=(0.42, 0.47), metadata=_LAYOUT)
    #: Camera height above the ground; a higher camera sees more ground and smaller objects.
    camera_height: Range = field(default=(1.3, 1.6), metadata=_LAYOUT)
    #: Focal length as a fraction of the image width (small = wide angle, objects smaller).
    focal: float = field(default=0.9, metadata=_LAYOUT)
    #: Standard deviation of the vanishing point's column offset (camera yaw), fraction of width.
    vanishing_jitter: float = field(default=0.05, metadata=_LAYOUT)

    # --- street cross-section (layout), |X| from the camera outwards, per side ---------------
    #: Distance from the camera to the left road edge.
    road_left: Range = field(default=(4.0, 8.0), metadata=_LAYOUT)
    #: Distance from the camera to the right road edge.
    road_right: Range = field(default=(3.0, 7.0), metadata=_LAYOUT)
    #: Nominal lane width: the road is split into ``round(width / lane_width)`` lanes.
    lane_width: float = field(default=3.3, metadata=_LAYOUT)
    #: Sidewalk width.
    sidewalk_width: Range = field(default=(3.0, 5.0), metadata=_LAYOUT)
    #: Probability that a side has a grass strip (terrain) beyond its sidewalk.
    terrain_prob: float = field(default=0.5, metadata=_LAYOUT)
    #: Width of that grass strip.
    terrain_width: Range = field(default=(1.0, 3.5), metadata=_LAYOUT)
    #: Ground between the wall/fence line and the building fronts (terrain or sidewalk material).
    setback: Range = field(default=(0.0, 3.0), metadata=_LAYOUT)
    #: Depth at which the side buildings end and the distant skyline begins.
    street_length: Range = field(default=(90.0, 200.0), metadata=_LAYOUT)
    #: Probability of a cross street (a gap in both building rows, road across, zebra before it).
    cross_street_prob: float = field(default=0.35, metadata=_LAYOUT)

    # --- buildings and boundaries (layout) -----------------------------------------------------
    #: Height of one building (drawn per building).
    building_height: Range = field(default=(8.0, 26.0), metadata=_LAYOUT)
    #: Length of one building along the street (drawn per building).
    building_length: Range = field(default=(8.0, 30.0), metadata=_LAYOUT)
    #: Probability that a stretch of the building row is an open gap (sky and distance show).
    building_gap_prob: float = field(default=0.08, metadata=_LAYOUT)
    #: Probability that a stretch of the building row is a park: hedge and big trees.
    park_prob: float = field(default=0.18, metadata=_LAYOUT)
    #: Height of the distant skyline blocks at the end of the street.
    skyline_height: Range = field(default=(4.0, 22.0), metadata=_LAYOUT)
    #: Probabilities that a stretch of the wall/fence line is a wall, resp. a fence (else open).
    wall_prob: float = field(default=0.22, metadata=_LAYOUT)
    fence_prob: float = field(default=0.25, metadata=_LAYOUT)
    #: Height of walls, resp. fences (drawn per stretch).
    wall_height: Range = field(default=(0.8, 2.2), metadata=_LAYOUT)
    fence_height: Range = field(default=(1.0, 2.0), metadata=_LAYOUT)

    # --- street furniture and vegetation (layout) ----------------------------------------------
    #: Street trees per side, their total height and crown radius (drawn per tree).
    trees_per_side: float = field(default=3.0, metadata=_LAYOUT)
    tree_height: Range = field(default=(5.0, 11.0), metadata=_LAYOUT)
    crown_radius: Range = field(default=(1.8, 3.8), metadata=_LAYOUT)
    #: Street lamps (bare poles with an arm) per side.
    lamps_per_side: float = field(default=1.6, metadata=_LAYOUT)
    #: Traffic lights per image; the share of them hanging from an arm over the road.
    traffic_lights: float = field(default=1.5, metadata=_LAYOUT)
    overhead_light_share: float = field(default=0.35, metadata=_LAYOUT)
    #: Traffic signs per image (discs, triangles, rectangles on poles).
    traffic_signs: float = field(default=2.5, metadata=_LAYOUT)
    #: Static clutter (bins, boxes, benches; labelId 4) per image.
    static_objects: float = field(default=0.8, metadata=_LAYOUT)
    #: Probability of a patch of bare ground (labelId 6), resp. a parking strip (labelId 9), per side.
    ground_patch_prob: float = field(default=0.12, metadata=_LAYOUT)
    parking_prob: float = field(default=0.12, metadata=_LAYOUT)

    # --- road users (layout) -----------------------------------------------------------------
    #: Pedestrians per image (on sidewalks, a few crossing the road).
    persons: float = field(default=4.5, metadata=_LAYOUT)
    #: Cars, trucks and buses per image.
    cars: float = field(default=5.0, metadata=_LAYOUT)
    trucks: float = field(default=0.15, metadata=_LAYOUT)
    buses: float = field(default=0.15, metadata=_LAYOUT)
    #: Probability of tram rails in the road, and of a train on them when there are rails.
    rail_prob: float = field(default=0.14, metadata=_LAYOUT)
    train_prob: float = field(default=0.6, metadata=_LAYOUT)
    #: Riders per image (a person on a two-wheeler); the share of them on motorcycles.
    riders: float = field(default=0.3, metadata=_LAYOUT)
    rider_motorcycle_share: float = field(default=0.45, metadata=_LAYOUT)
    #: Parked bicycles and parked motorcycles per image.
    parked_bicycles: float = field(default=0.5, metadata=_LAYOUT)
    parked_motorcycles: float = field(default=0.12, metadata=_LAYOUT)
    #: Objects whose characteristic size would be smaller than this fraction of the image height
    #: are not placed (a CNN cannot learn them at the mini benchmark's resolution).
    min_object_px: float = field(default=0.03, metadata=_LAYOUT)

    # --- markings, borders, ego vehicle (layout) ---------------------------------------------
    #: Probability that the road has painted lane markings (returned in ``Scene.lane_marking``).
    lane_marking_prob: float = field(default=0.5, metadata=_LAYOUT)
    #: Width of a painted line; (dash, gap) lengths of dashed lane boundaries.
    lane_marking_width: float = field(default=0.15, metadata=_LAYOUT)
    lane_dash: Range = field(default=(3.0, 6.0), metadata=_LAYOUT)
    #: Probability of a zebra crossing (before the cross street if any).
    zebra_prob: float = field(default=0.25, metadata=_LAYOUT)
    #: Probability of a thin unlabelled strip (labelId 0) along one image border; its width in
    #: pixels at 128 rows.
    unlabeled_strip_prob: float = field(default=0.2, metadata=_LAYOUT)
    unlabeled_strip_px: Range = field(default=(1.0, 3.0), metadata=_LAYOUT)
    #: Probability that the ego vehicle's hood (labelId 1) shows at the bottom; its height as a
    #: fraction of the image height at the centre column.
    hood_prob: float = field(default=0.0, metadata=_LAYOUT)
    hood_height: Range = field(default=(0.09, 0.14), metadata=_LAYOUT)

    # --- appearance: materials and lighting ------------------------------------------------------
    #: HSV colour ranges of every material (see ``_palette``); overlapping on purpose.
    palette: Mapping[str, HSV] = field(default_factory=_palette, hash=False, metadata=_LOOK)
    #: Aerial perspective: colours fade towards the horizon sky by ``1 - exp(-Z / haze_distance)``.
    haze_distance: float = field(default=250.0, metadata=_LOOK)
    #: Brightness of faces by orientation: facing the camera, sunlit side, shaded side, top.
    shading: tuple[float, float, float, float] = field(default=(1.0, 0.85, 0.65, 1.12), metadata=_LOOK)
    #: Multiplier of ground pixels in vehicle shadows.
    shadow_strength: float = field(default=0.55, metadata=_LOOK)
    #: Probability of a building's cast shadow across part of the street, and its darkness.
    sun_shadow_prob: float = field(default=0.5, metadata=_LOOK)
    sun_shadow: float = field(default=0.7, metadata=_LOOK)
    #: Probability that a window is lit (or reflects the sun).
    window_lit_prob: float = field(default=0.12, metadata=_LOOK)
    #: Height of one storey and horizontal window spacing on facades (metres).
    floor_height: Range = field(default=(3.0, 3.6), metadata=_LOOK)
    window_spacing: Range = field(default=(2.2, 3.6), metadata=_LOOK)
    #: Mean number of repaired-asphalt patches on the road.
    road_patches: float = field(default=0.5, metadata=_LOOK)
    #: Low-frequency (blotchy) brightness modulation amplitude, by class name.
    patchiness: Mapping[str, float] = field(
        default_factory=lambda: {
            "road": 0.05,
            "sidewalk": 0.05,
            "terrain": 0.12,
            "vegetation": 0.15,
            "building": 0.05,
            "sky": 0.04,
        },
        hash=False,
        metadata=_LOOK,
    )
    #: Per-pixel texture amplitude, by class name (foliage is grainy, paint is smooth).
    grain: Mapping[str, float] = field(
        default_factory=lambda: {"road": 0.03, "sidewalk": 0.04, "terrain": 0.10, "vegetation": 0.14, "building": 0.03},
        hash=False,
        metadata=_LOOK,
    )

    # --- appearance: camera response ---------------------------------------------------------
    #: White balance: per-channel RGB multipliers.
    tint: tuple[float, float, float] = field(default=(1.0, 1.0, 1.0), metadata=_LOOK)
    #: Per-image white-balance variation: red and blue gains drawn uniformly in [1 - j, 1 + j]
    #: (time of day and weather change the colour of light from frame to frame).
    white_balance_jitter: float = field(default=0.0, metadata=_LOOK)
    #: Colour mixing matrix applied to RGB (rows give output channels).
    colour_matrix: tuple[tuple[float, float, float], ...] = field(
        default=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)), metadata=_LOOK
    )
    #: Saturation factor (1 = unchanged, 0 = grey).
    saturation: float = field(default=1.0, metadata=_LOOK)
    #: Contrast around mid grey.
    contrast: float = field(default=1.0, metadata=_LOOK)
    #: Output = input ** gamma (below 1 lifts the shadows).
    gamma: float = field(default=1.0, metadata=_LOOK)
    #: Per-image exposure multiplier.
    brightness: Range = field(default=(0.92, 1.08), metadata=_LOOK)
    #: Corner darkening: brightness falls by this fraction at the image corners.
    vignette: float = field(default=0.0, metadata=_LOOK)
    #: Gaussian blur sigma in pixels at 128 rows.
    blur_sigma: float = field(default=0.0, metadata=_LOOK)
    #: Sensor noise standard deviation (on a 0..1 scale); share of it that is per channel.
    noise_sigma: float = field(default=0.01, metadata=_LOOK)
    chroma_noise: float = field(default=0.3, metadata=_LOOK)


LAYOUT_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(DomainStyle) if f.metadata["kind"] == "layout"
)
APPEARANCE_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(DomainStyle) if f.metadata["kind"] == "appearance"
)


def restyle(layout: DomainStyle, appearance: DomainStyle) -> DomainStyle:
    """``layout``'s layout knobs with ``appearance``'s appearance knobs.

    With the same generator state, ``render_scene`` then gives exactly ``layout``'s labels and
    lane markings, painted and photographed the way ``appearance`` paints them.
    """
    return dataclasses.replace(
        layout,
        name=f"{layout.name}+{appearance.name}",
        **{name: getattr(appearance, name) for name in APPEARANCE_FIELDS},
    )


STYLES: dict[str, DomainStyle] = {
    # Video-game look: saturated clean colours, warm sun with hard shadows, sharp edges, little
    # noise; a mid-height camera, wide roads, busy sidewalks and more trucks.
    "gta": DomainStyle(
        name="gta",
        horizon=(0.40, 0.45),
        camera_height=(1.4, 1.9),
        focal=0.85,
        road_left=(4.0, 7.5),
        road_right=(3.0, 6.5),
        lane_width=3.5,
        sidewalk_width=(3.5, 6.0),
        terrain_prob=0.55,
        trees_per_side=4.0,
        persons=5.5,
        trucks=0.25,
        riders=0.35,
        lane_marking_prob=0.45,
        palette=_palette(
            sky_zenith=(205.0, 225.0, 0.50, 0.80, 0.70, 0.95),
            sky_horizon=(30.0, 50.0, 0.05, 0.25, 0.85, 1.00),
            road=(200.0, 240.0, 0.02, 0.10, 0.20, 0.34),
            vegetation=(70.0, 125.0, 0.45, 0.80, 0.18, 0.45),
            terrain=(60.0, 95.0, 0.40, 0.70, 0.35, 0.60),
            building=(0.0, 60.0, 0.05, 0.45, 0.40, 0.85),
        ),
        haze_distance=300.0,
        shading=(1.0, 0.9, 0.55, 1.15),
        sun_shadow_prob=0.6,
        sun_shadow=0.6,
        road_patches=0.2,
        patchiness={"road": 0.04, "sidewalk": 0.04, "terrain": 0.10, "vegetation": 0.12, "building": 0.04, "sky": 0.03},
        grain={"road": 0.02, "sidewalk": 0.03, "terrain": 0.08, "vegetation": 0.12, "building": 0.02},
        tint=(1.08, 1.0, 0.86),
        white_balance_jitter=0.12,
        saturation=1.3,
        contrast=1.1,
        brightness=(0.92, 1.08),
        noise_sigma=0.006,
        chroma_noise=0.2,
    ),
    # Rendered city from a raised viewpoint: high horizon, wide-angle lens, everything smaller;
    # no terrain, trucks or trains ever; lane markings on most roads; cool flat lighting with its
    # own palette (beige pavements, pastel facades, teal-tinted foliage).
    "synthia": DomainStyle(
        name="synthia",
        horizon=(0.30, 0.35),
        camera_height=(2.5, 5.0),
        focal=0.55,
        road_left=(5.0, 10.0),
        road_right=(4.0, 9.0),
        sidewalk_width=(3.0, 6.0),
        terrain_prob=0.0,
        setback=(0.0, 2.0),
        trees_per_side=3.0,
        park_prob=0.25,
        persons=5.0,
        cars=6.0,
        trucks=0.0,
        buses=0.35,
        rail_prob=0.0,
        train_prob=0.0,
        riders=0.35,
        parked_bicycles=0.35,
        parked_motorcycles=0.15,
        lane_marking_prob=0.92,
        lane_marking_width=0.2,
        zebra_prob=0.45,
        palette=_palette(
            sky_zenith=(195.0, 215.0, 0.25, 0.50, 0.75, 0.95),
            sky_horizon=(190.0, 210.0, 0.05, 0.20, 0.85, 1.00),
            road=(20.0, 40.0, 0.04, 0.14, 0.30, 0.45),
            sidewalk=(30.0, 50.0, 0.10, 0.25, 0.55, 0.78),
            building=(10.0, 80.0, 0.10, 0.40, 0.50, 0.88),
            vegetation=(95.0, 160.0, 0.30, 0.60, 0.22, 0.50),
            vehicle=(0.0, 360.0, 0.10, 0.85, 0.20, 0.95),
            lane_paint=(0.0, 360.0, 0.00, 0.05, 0.85, 1.00),
        ),
        haze_distance=400.0,
        shading=(1.0, 0.92, 0.8, 1.05),
        sun_shadow_prob=0.2,
        sun_shadow=0.8,
        shadow_strength=0.7,
        window_lit_prob=0.05,
        floor_height=(2.8, 3.2),
        road_patches=0.0,
        patchiness={"road": 0.02, "sidewalk": 0.02, "terrain": 0.05, "vegetation": 0.06, "building": 0.02, "sky": 0.0},
        grain={"road": 0.01, "sidewalk": 0.01, "vegetation": 0.06, "building": 0.01},
        tint=(0.96, 1.0, 1.06),
        white_balance_jitter=0.12,
        saturation=1.05,
        contrast=0.95,
        gamma=1.1,
        brightness=(0.85, 1.1),
        noise_sigma=0.012,
        chroma_noise=0.3,
    ),
    # Real-camera look: colour mixing and white balance shift, lifted gamma, low saturation,
    # sensor noise, slight blur, varying exposure, patchy asphalt and grainy pavements; a low
    # camera with a long lens, narrow roads, and the ego vehicle's hood in the bottom rows.
    "cityscapes": DomainStyle(
        name="cityscapes",
        horizon=(0.45, 0.50),
        camera_height=(1.15, 1.3),
        focal=1.05,
        road_left=(3.5, 6.5),
        road_right=(2.5, 5.5),
        lane_width=3.0,
        sidewalk_width=(2.5, 4.5),
        terrain_prob=0.4,
        building_gap_prob=0.08,
        building_height=(10.0, 28.0),
        persons=5.5,
        cars=3.6,
        trucks=0.12,
        parking_prob=0.2,
        lane_marking_prob=0.35,
        unlabeled_strip_prob=0.5,
        hood_prob=0.85,
        hood_height=(0.06, 0.11),
        palette=_palette(
            sky_zenith=(200.0, 220.0, 0.05, 0.30, 0.70, 0.95),
            sky_horizon=(190.0, 230.0, 0.00, 0.10, 0.80, 0.98),
            road=(190.0, 250.0, 0.00, 0.08, 0.25, 0.38),
            building=(10.0, 60.0, 0.05, 0.35, 0.35, 0.80),
            vegetation=(70.0, 115.0, 0.25, 0.55, 0.12, 0.35),
            terrain=(50.0, 90.0, 0.25, 0.50, 0.28, 0.50),
            vehicle=(0.0, 360.0, 0.00, 0.45, 0.10, 0.90),
        ),
        haze_distance=300.0,
        shading=(1.0, 0.92, 0.82, 1.05),
        shadow_strength=0.7,
        sun_shadow_prob=0.15,
        sun_shadow=0.82,
        window_lit_prob=0.05,
        road_patches=3.0,
        patchiness={
            "road": 0.09,
            "sidewalk": 0.07,
            "terrain": 0.10,
            "vegetation": 0.10,
            "building": 0.05,
            "sky": 0.03,
            "wall": 0.05,
            "ego_vehicle": 0.04,
        },
        grain={"road": 0.06, "sidewalk": 0.09, "terrain": 0.12, "vegetation": 0.15, "building": 0.04, "wall": 0.05},
        # The colour response: a white balance halfway between the warm GTA and the cool SYNTHIA light,
        # a little channel mixing, slightly less saturation, lifted shadows. A source model trained
        # from scratch loses most classes entirely when this moves much further from its own look
        # (measured), which would leave self-training nothing to start from; noise, blur, vignetting
        # and exposure carry the rest of the camera shift.
        tint=(1.026, 1.0, 0.934),
        colour_matrix=((0.972, 0.022, 0.006), (0.01, 0.98, 0.01), (0.006, 0.024, 0.97)),
        saturation=1.2,
        contrast=1.0,
        gamma=0.95,
        brightness=(0.55, 1.0),
        vignette=0.25,
        blur_sigma=0.7,
        noise_sigma=0.03,
        chroma_noise=0.4,
    ),
}


@dataclass
class Scene:
    """One rendered street view."""

    #: (H, W, 3) uint8 RGB image.
    image: np.ndarray
    #: (H, W) uint8 Cityscapes labelIds (0..33), e.g. road 7, car 26.
    label_ids: np.ndarray
    #: (H, W) bool: pixels painted as lane markings (their labelId is road).
    lane_marking: np.ndarray


# ---------------------------------------------------------------------------------------------
# Drawing machinery
# ---------------------------------------------------------------------------------------------


def _fixed(points: np.ndarray) -> np.ndarray:
    """Pixel coordinates -> OpenCV fixed point with ``_SHIFT`` fractional bits."""
    return np.rint(np.asarray(points, dtype=np.float64) * _ONE).astype(np.int32)


def _fixed_point(point) -> tuple[int, int]:
    """One pixel position -> an OpenCV fixed-point (x, y) tuple."""
    return (round(float(point[0]) * _ONE), round(float(point[1]) * _ONE))


#: (length, width, height) ranges in metres of the road vehicles, drawn per vehicle.
_VEHICLE_SIZE: dict[str, tuple[Range, Range, Range]] = {
    "car": ((3.8, 4.9), (1.65, 1.9), (1.35, 1.75)),
    "truck": ((6.5, 10.0), (2.3, 2.5), (3.0, 3.8)),
    "bus": ((10.0, 13.0), (2.5, 2.55), (3.0, 3.4)),
}
#: Length range in metres of a tram.
_TRAIN_LENGTH: Range = (15.0, 30.0)

#: Corner indices of each box face; corner ``i`` is (x[i & 1], y[(i >> 1) & 1], z[i >> 2]).
_BOX_FACES = {
    "front": [0, 1, 3, 2],
    "+x": [1, 5, 7, 3],
    "-x": [0, 4, 6, 2],
    "top": [2, 3, 7, 6],
    "bottom": [0, 1, 5, 4],
}


class _Painter:
    """A pinhole camera and four canvases drawn in lockstep, so labels match pixels exactly.

    ``image`` holds surface colours (albedo times face shading, 8 bits), ``label`` the
    labelIds, ``marking`` the painted lane markings and ``shade`` the multiplier of cast shadows,
    applied to ground-level classes only when the image is developed. Every shape is rasterised
    with the same fixed-point polygon on each canvas it touches and without anti-aliasing.
    """

    def __init__(self, height: int, width: int, horizon: float, vanish_x: float, focal: float, cam_h: float):
        self.height, self.width = height, width
        self.hy, self.vx, self.f, self.cam_h = horizon, vanish_x, focal, cam_h
        self.image = np.zeros((height, width, 3), np.uint8)
        self.label = np.zeros((height, width), np.uint8)
        self.marking = np.zeros((height, width), np.uint8)
        self.shade = np.ones((height, width), np.float32)
        self.face_shade = {"front": 1.0, "+x": 1.0, "-x": 1.0, "top": 1.0, "bottom": 0.6}
        self.clip_margin = 4.0 + max(height, width)
        self.clip_limit = 4.0 + 2 * max(height, width)

    # --- projection ---
    def project(self, points) -> np.ndarray:
        """World (..., 3) -> pixel (..., 2); depths are clamped to the near plane."""
        if not isinstance(points, np.ndarray):
            # a handful of points: plain Python beats numpy's per-call overhead
            f, vx, hy, cam_h = self.f, self.vx, self.hy, self.cam_h
            out = []
            for x, y, z in points:
                inv = f / max(z, _Z_NEAR)
                out.append((vx + x * inv, hy + (cam_h - y) * inv))
            return np.array(out)
        inv = self.f / np.maximum(points[..., 2], _Z_NEAR)
        out = np.empty(points.shape[:-1] + (2,))
        out[..., 0] = self.vx + points[..., 0] * inv
        out[..., 1] = self.hy + (self.cam_h - points[..., 1]) * inv
        return out

    def point(self, x: float, y: float, z: float) -> np.ndarray:
        """One world point -> pixel (2,)."""
        inv = self.f / max(z, _Z_NEAR)
        return np.array((self.vx + x * inv, self.hy + (self.cam_h - y) * inv))

    def scale(self, z: float) -> float:
        """Pixels per metre at depth ``z``."""
        return self.f / max(z, _Z_NEAR)

    # --- rasterisation ---
    def rasterise(self, polygons: np.ndarray) -> list[np.ndarray] | np.ndarray | None:
        """Pixel-space polygons (k, 2) or (n, k, 2) -> fixed-point arrays for OpenCV.

        OpenCV walks every scanline of a polygon, even off-screen ones, so polygons reaching far
        outside the view (faces next to the camera) are clipped to a margin around it first.
        """
        if polygons.ndim == 2:
            polygons = polygons[None]
        if len(polygons) == 0:
            return None
        lo, hi = -self.clip_margin, self.clip_limit
        if polygons.min() >= lo and polygons.max() <= hi:
            return _fixed(polygons)
        pts = []
        for poly in polygons:
            if poly.min() < lo or poly.max() > hi:
                poly = _clip_to_rect(poly, lo, lo, hi, hi)
                if poly is None:
                    continue
            pts.append(_fixed(poly))
        return pts or None

    def fill(self, polygons, colour, label: int | None, marking: bool = False) -> None:
        """Fill pixel-space polygons (one (k, 2) array or several that do not overlap) with a
        colour (None: leave the image), a label (None: leave the labels), and the marking flag."""
        pts = self.rasterise(np.asarray(polygons, dtype=np.float64))
        if pts is None:
            return
        if colour is not None:
            cv2.fillPoly(self.image, pts, _rgb(colour), cv2.LINE_8, _SHIFT)
        if label is not None:
            cv2.fillPoly(self.label, pts, int(label), cv2.LINE_8, _SHIFT)
        if marking:
            cv2.fillPoly(self.marking, pts, 1, cv2.LINE_8, _SHIFT)

    def fill3d(self, corners, colour, label: int | None, marking: bool = False, min_px: float = 0.0) -> None:
        """Fill world-space polygons: one as a list of (x, y, z), or an (n, k, 3) array of several
        that do not overlap, of which those under ``min_px`` tall or off-screen are skipped."""
        pts = self.project(corners)
        if pts.ndim == 2:
            self.fill(pts, colour, label, marking)
            return
        if len(pts) == 0:
            return
        lo, hi = pts.min(axis=1), pts.max(axis=1)
        keep = (hi[:, 0] >= -1) & (lo[:, 0] <= self.width) & (hi[:, 1] >= -1) & (lo[:, 1] <= self.height)
        if min_px > 0:
            keep &= hi[:, 1] - lo[:, 1] >= min_px
        if keep.all():
            self.fill(pts, colour, label, marking)
        elif keep.any():
            self.fill(pts[keep], colour, label, marking)

    def circle(self, centre, radius: float, colour, label: int | None, thickness: int = -1) -> None:
        c = _fixed_point(centre)
        r = max(round(radius * _ONE), 1)
        cv2.circle(self.image, c, r, _rgb(colour), thickness, cv2.LINE_8, _SHIFT)
        if label is not None:
            cv2.circle(self.label, c, r, int(label), thickness, cv2.LINE_8, _SHIFT)

    def ellipse(self, centre, axes, colour, label: int | None, thickness: int = -1) -> None:
        c = _fixed_point(centre)
        ax = tuple(max(round(a * _ONE), 1) for a in axes)
        cv2.ellipse(self.image, c, ax, 0.0, 0.0, 360.0, _rgb(colour), thickness, cv2.LINE_8, _SHIFT)
        if label is not None:
            cv2.ellipse(self.label, c, ax, 0.0, 0.0, 360.0, int(label), thickness, cv2.LINE_8, _SHIFT)

    def line(self, p0, p1, width: float, colour, label: int | None) -> None:
        """A stroke ``width`` pixels wide (at least one)."""
        a, b = _fixed_point(p0), _fixed_point(p1)
        t = max(round(width), 1)
        cv2.line(self.image, a, b, _rgb(colour), t, cv2.LINE_8, _SHIFT)
        if label is not None:
            cv2.line(self.label, a, b, int(label), t, cv2.LINE_8, _SHIFT)

    def lines(self, segments: np.ndarray, colour, label: int | None) -> None:
        """One-pixel strokes between the two ends of each pixel-space segment (n, 2, 2)."""
        pts = list(_fixed(segments))
        cv2.polylines(self.image, pts, False, _rgb(colour), 1, cv2.LINE_8, _SHIFT)
        if label is not None:
            cv2.polylines(self.label, pts, False, int(label), 1, cv2.LINE_8, _SHIFT)

    def cast_shadow(self, corners, factor: float) -> None:
        """Darken the ground inside a world-space polygon by ``factor`` (applied when developing)."""
        pts = self.rasterise(self.project(corners))
        if pts is not None:
            cv2.fillPoly(self.shade, pts, float(factor), cv2.LINE_8, _SHIFT)

    def box(self, x0, x1, y0, y1, z0, z1, colour, label: int | None) -> None:
        """An axis-aligned box: each face the camera can see, shaded by its orientation.

        Visible faces of a convex box never overlap on screen, so their order does not matter.
        """
        z0 = max(z0, _Z_NEAR)
        if z1 <= z0:
            return
        colour = np.asarray(colour)
        c = self.project([(x, y, z) for z in (z0, z1) for y in (y0, y1) for x in (x0, x1)])
        faces = ["front"]
        if x1 < 0:
            faces.append("+x")
        if x0 > 0:
            faces.append("-x")
        if y1 < self.cam_h:
            faces.append("top")
        if y0 > self.cam_h:
            faces.append("bottom")
        for kind in faces:
            self.fill(c[_BOX_FACES[kind]], colour * self.face_shade[kind], label)

    def side_shade(self, x: float) -> float:
        """Shading of a street-parallel face at lateral position ``x`` as the camera sees it."""
        return self.face_shade["+x"] if x < 0 else self.face_shade["-x"]


def _clip_to_rect(poly: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray | None:
    """Sutherland-Hodgman: the part of a polygon inside an axis-aligned rectangle (None if empty)."""
    pts = poly.tolist()
    for axis, bound, sign in ((0, x0, 1.0), (0, x1, -1.0), (1, y0, 1.0), (1, y1, -1.0)):
        if len(pts) < 3:
            return None
        out = []
        prev = pts[-1]
        prev_in = sign * (prev[axis] - bound) >= 0
        for cur in pts:
            cur_in = sign * (cur[axis] - bound) >= 0
            if cur_in != prev_in:
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out.append([prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])])
            if cur_in:
                out.append(cur)
            prev, prev_in = cur, cur_in
        pts = out
    return np.array(pts) if len(pts) >= 3 else None


def _rgb(colour) -> tuple[float, float, float]:
    """A 0..1 colour as an OpenCV scalar for the 8-bit image canvas (OpenCV rounds and saturates)."""
    return (255.0 * float(colour[0]), 255.0 * float(colour[1]), 255.0 * float(colour[2]))


def _plane_grid(
    axis: str, plane: float, u0: float, u1: float, nu: int, y0: float, y1: float, nv: int, fill_u: float, fill_v: float
) -> np.ndarray:
    """Corners (nu * nv, 4, 3) of a grid of rectangles (windows, panes) on a vertical plane.

    The plane is ``X = plane`` (``u`` runs along Z) or ``Z = plane`` (``u`` runs along X); each
    rectangle covers the central ``fill_u`` x ``fill_v`` of its grid cell.
    """
    du, dv = (u1 - u0) / nu, (y1 - y0) / nv
    ua = u0 + (np.arange(nu) + 0.5 - fill_u / 2) * du
    va = (y0 + (np.arange(nv) + 0.5 - fill_v / 2) * dv)[:, None]
    u_axis, plane_axis = (2, 0) if axis == "x" else (0, 2)
    out = np.empty((nv, nu, 4, 3))
    out[..., plane_axis] = plane
    out[:, :, 0:2, u_axis] = ua[:, None]
    out[:, :, 2:4, u_axis] = (ua + fill_u * du)[:, None]
    out[:, :, 0, 1] = va
    out[:, :, 3, 1] = va
    out[:, :, 1:3, 1] = (va + fill_v * dv)[..., None]
    return out.reshape(nu * nv, 4, 3)


def _ground_quad(x0: float, x1: float, z0: float, z1: float) -> list[tuple[float, float, float]]:
    """A rectangle on the ground: lateral extent [x0, x1], depth extent [z0, z1]."""
    return [(x0, 0.0, z0), (x1, 0.0, z0), (x1, 0.0, z1), (x0, 0.0, z1)]


def _billboard(z: float, x0: float, x1: float, y0: float, y1: float) -> list[tuple[float, float, float]]:
    """A rectangle facing the camera at depth ``z``."""
    return [(x0, y0, z), (x1, y0, z), (x1, y1, z), (x0, y1, z)]


def _facade_quad(x: float, y0: float, y1: float, z0: float, z1: float) -> list[tuple[float, float, float]]:
    """A rectangle on the street-parallel plane ``X = x``."""
    return [(x, y0, z0), (x, y0, z1), (x, y1, z1), (x, y1, z0)]


class _Paint:
    """Draws colours from the style's palette with the paint stream; fades them with distance."""

    def __init__(self, rng: np.random.Generator, style: DomainStyle):
        self.rng = rng
        self.palette = style.palette
        self.haze_distance = style.haze_distance
        self.haze_colour = np.ones(3)

    def __call__(self, material: str, z: float | None = None) -> np.ndarray:
        h0, h1, s0, s1, v0, v1 = self.palette[material]
        u0, u1, u2 = self.rng.random(3).tolist()
        rgb = colorsys.hsv_to_rgb(((h0 + (h1 - h0) * u0) / 360.0) % 1.0, s0 + (s1 - s0) * u1, v0 + (v1 - v0) * u2)
        return np.array(rgb if z is None else self.haze(rgb, z))

    def haze(self, rgb, z: float) -> tuple[float, float, float]:
        """Blend towards the horizon colour with distance (aerial perspective)."""
        a = 1.0 - math.exp(-max(z, 0.0) / self.haze_distance)
        return tuple(c + (h - c) * a for c, h in zip(rgb, self.haze_colour))

    def jitter(self, rgb: np.ndarray, amount: float) -> np.ndarray:
        """The same colour, a little brighter or darker (wear, a second coat of paint)."""
        return np.clip(rgb * (1.0 + amount * (2.0 * self.rng.random() - 1.0)), 0.0, 1.0)


@dataclass
class _Side:
    """The street cross-section on one side, as distances |X| from the camera."""

    sign: int
    road: float
    sidewalk: float
    boundary: float
    facade: float
    terrain: bool
    parking: tuple[float, float] | None = None


class _Track:
    """Occupied depth intervals along one line (a lane, a curb): keeps objects from interpenetrating."""

    def __init__(self):
        self.spans: list[tuple[float, float]] = []

    def claim(self, z0: float, z1: float, gap: float = 0.5) -> bool:
        if any(z0 < b + gap and a - gap < z1 for a, b in self.spans):
            return False
        self.spans.append((z0, z1))
        return True


# ---------------------------------------------------------------------------------------------
# The scene
# ---------------------------------------------------------------------------------------------


class _SceneBuilder:
    """Samples one street layout and paints it; see the module docstring for the drawing order.

    ``rng`` is the layout stream: everything that decides a label or the lane-marking mask is
    drawn from it, and nothing drawn from it depends on an appearance knob. Colours and
    image-only detail come from ``paint.rng``.
    """

    def __init__(self, style: DomainStyle, height: int, width: int, layout_rng, paint_rng):
        self.style, self.height, self.width = style, height, width
        self.rng = layout_rng
        self.paint = _Paint(paint_rng, style)
        r = self.rng
        horizon = r.uniform(*style.horizon) * height
        yaw = float(np.clip(r.normal(0.0, 1.0), -2.5, 2.5)) * style.vanishing_jitter
        vanish_x = (width - 1) / 2 + yaw * width
        self.p = _Painter(height, width, horizon, vanish_x, style.focal * width, r.uniform(*style.camera_height))
        self.min_px = style.min_object_px * height
        self.objects: list[tuple[float, int, Callable[[], None]]] = []
        front, lit, shaded, top = style.shading
        self.sun_left = paint_rng.random() < 0.5
        faces = {"+x": lit, "-x": shaded} if self.sun_left else {"+x": shaded, "-x": lit}
        self.p.face_shade.update(front=front, top=top, **faces)

    # --- helpers ---
    def u(self, bounds: Range) -> float:
        return float(self.rng.uniform(*bounds))

    def depth_for(self, size: float, z_lo: float, z_hi: float) -> float | None:
        """A log-uniform depth in [z_lo, z_hi] at which ``size`` metres are at least ``min_px`` tall
        (None if there is none). Log-uniform: as many objects near the camera as far from it."""
        z_hi = min(z_hi, self.p.f * size / self.min_px)
        if z_hi <= z_lo:
            return None
        return float(z_lo * (z_hi / z_lo) ** self.rng.random())

    def later(self, z: float, draw: Callable, *args) -> None:
        """Queue a compact object; queued objects are painted in order of decreasing depth."""
        self.objects.append((z, len(self.objects), functools.partial(draw, *args)))

    def side_of(self, x: float) -> _Side:
        return self.sides[0] if x < 0 else self.sides[1]

    def random_side(self) -> _Side:
        return self.sides[int(self.rng.integers(2))]

    # --- layout ---
    def build(self) -> None:
        self.sample_street()
        self.draw_sky()
        self.draw_skyline()
        self.draw_ground()
        for side in self.sides:
            self.draw_building_row(side)
        for side in self.sides:
            self.draw_boundaries(side)
        self.plan_vegetation()
        self.plan_poles()
        self.plan_static()
        self.plan_vehicles()
        self.plan_people()
        for _, _, draw in sorted(self.objects, key=lambda t: (-t[0], t[1])):
            draw()
        self.draw_hood()
        self.draw_unlabeled_strip()

    def sample_street(self) -> None:
        """The cross-section of both sides, the lanes, a cross street, rails and parking strips."""
        s, r = self.style, self.rng
        self.sides = []
        for sign, road in ((-1, s.road_left), (1, s.road_right)):
            road_edge = self.u(road)
            sidewalk = road_edge + self.u(s.sidewalk_width)
            terrain = bool(r.random() < s.terrain_prob)
            boundary = sidewalk + (self.u(s.terrain_width) if terrain else 0.0)
            facade = boundary + self.u(s.setback) + 0.5
            self.sides.append(_Side(sign, road_edge, sidewalk, boundary, facade, terrain))
        self.street_end = self.u(s.street_length)
        self.cross = None
        if r.random() < s.cross_street_prob:
            z0 = r.uniform(12.0, 55.0)
            self.cross = (z0, z0 + r.uniform(8.0, 15.0))
        left, right = self.sides
        n = max(1, round((left.road + right.road) / s.lane_width))
        self.lane_edges = np.linspace(-left.road, right.road, n + 1)
        # right-hand traffic: the left half of the lanes comes towards the camera
        self.lanes = [
            ((a + b) / 2, -1 if i < n // 2 else 1) for i, (a, b) in enumerate(zip(self.lane_edges, self.lane_edges[1:]))
        ]
        self.lane_tracks = [_Track() for _ in self.lanes]
        self.rails = None
        if r.random() < s.rail_prob:
            self.rails = self.lanes[int(r.integers(len(self.lanes)))][0]
        for side in self.sides:
            if r.random() < s.parking_prob:
                z0 = r.uniform(4.0, 30.0)
                side.parking = (z0, z0 + r.uniform(10.0, 40.0))
        self.curb_tracks = {side.sign: _Track() for side in self.sides}
        self.zebra = None
        if r.random() < s.zebra_prob:
            z0 = max(self.cross[0] - r.uniform(5.0, 7.0) if self.cross else r.uniform(8.0, 40.0), 3.0)
            self.zebra = (z0, z0 + 4.0)

    def in_cross(self, z0: float, z1: float) -> bool:
        return self.cross is not None and z0 < self.cross[1] and self.cross[0] < z1

    def open_stretches(self, z0: float, z1: float) -> list[tuple[float, float]]:
        """[z0, z1] minus the cross street."""
        if self.cross is None:
            return [(z0, z1)]
        return [(a, b) for a, b in ((z0, min(z1, self.cross[0])), (max(z0, self.cross[1]), z1)) if b > a]

    # --- background ---
    def draw_sky(self) -> None:
        """A vertical gradient from the zenith colour to a pale horizon, and a base colour for the
        ground that the bands drawn next cover almost entirely."""
        p = self.p
        zenith, horizon = self.paint("sky_zenith"), self.paint("sky_horizon")
        self.paint.haze_colour = horizon
        rows = int(min(max(math.ceil(p.hy), 0), self.height))
        t = ((np.arange(rows) + 0.5) / max(p.hy, 1.0)) ** 0.6
        gradient = zenith[None, :] * (1.0 - t[:, None]) + horizon[None, :] * t[:, None]
        p.image[:rows] = np.rint(255.0 * np.clip(gradient, 0.0, 1.0))[:, None, :]
        p.label[:rows] = SKY
        p.image[rows:] = np.rint(255.0 * self.paint("sidewalk", _Z_FAR))
        p.label[rows:] = SIDEWALK

    def draw_skyline(self) -> None:
        """Distant blocks and tree rows facing the camera where the street ends; the street's
        own corridor stays open half of the time."""
        r, p = self.rng, self.p
        z = self.street_end + r.uniform(10.0, 60.0)
        left, right = self.sides
        open_end = r.random() < 0.35
        x = -r.uniform(100.0, 130.0)
        while x < 120.0:
            x0, x1 = x, x + r.uniform(6.0, 25.0)
            x = x1
            if open_end and x1 > -left.road and x0 < right.road:
                continue
            if r.random() < 0.3:
                h = r.uniform(5.0, 12.0)
                colour = self.paint("vegetation", z)
                centre = p.point((x0 + x1) / 2, h * 0.55, z)
                p.ellipse(centre, (p.f * (x1 - x0) / z / 2, p.f * h * 0.45 / z), colour, VEGETATION)
                p.fill3d(_billboard(z, x0, x1, 0.0, h * 0.55), colour, VEGETATION)
            else:
                p.fill3d(
                    _billboard(z, x0, x1, 0.0, self.u(self.style.skyline_height)), self.paint("building", z), BUILDING
                )

    # --- ground ---
    def draw_ground(self) -> None:
        """Ground bands parallel to the street (road, sidewalks, grass), the cross street, patches
        of bare ground and parking, asphalt repairs, rails, lane markings and a building shadow."""
        p, r, s, pr = self.p, self.rng, self.style, self.paint.rng
        left, right = self.sides
        for side in self.sides:
            g = side.sign
            outer, outer_label = ("terrain", TERRAIN) if side.terrain else ("sidewalk", SIDEWALK)
            p.fill3d(_ground_quad(g * side.boundary, g * 300.0, _Z_NEAR, _Z_FAR), self.paint(outer, 60.0), outer_label)
            if side.terrain:
                band = _ground_quad(g * side.sidewalk, g * side.boundary, _Z_NEAR, _Z_FAR)
                p.fill3d(band, self.paint("terrain", 40.0), TERRAIN)
            band = _ground_quad(g * side.road, g * side.sidewalk, _Z_NEAR, _Z_FAR)
            p.fill3d(band, self.paint("sidewalk", 30.0), SIDEWALK)
            p.fill3d(
                _ground_quad(g * side.road, g * (side.road + 0.2), _Z_NEAR, _Z_FAR), self.paint("curb", 30.0), None
            )
            if r.random() < s.ground_patch_prob:
                z0 = r.uniform(3.0, 40.0)
                x0 = side.road + r.uniform(0.3, max(side.boundary - side.road, 0.5))
                patch = _ground_quad(g * x0, g * (x0 + r.uniform(1.0, 4.0)), z0, z0 + r.uniform(2.0, 10.0))
                p.fill3d(patch, self.paint("ground", z0), GROUND)
        road = self.paint("road", 30.0)
        p.fill3d(_ground_quad(-left.road, right.road, _Z_NEAR, _Z_FAR), road, ROAD)
        if self.cross is not None:
            p.fill3d(_ground_quad(-300.0, 300.0, *self.cross), self.paint.jitter(road, 0.05), ROAD)
        for side in self.sides:
            if side.parking is not None:
                strip = _ground_quad(side.sign * (side.road - 2.3), side.sign * side.road, *side.parking)
                p.fill3d(strip, self.paint("parking", side.parking[0]), PARKING)
        for _ in range(pr.poisson(s.road_patches)):
            z0 = pr.uniform(2.0, 50.0)
            x0 = pr.uniform(-left.road, right.road - 1.0)
            patch = _ground_quad(x0, min(x0 + pr.uniform(1.0, 4.0), right.road), z0, z0 + pr.uniform(1.5, 12.0))
            p.fill3d(patch, self.paint.jitter(road, 0.35), None)
        if self.rails is not None:
            self.draw_rails(self.rails)
        if r.random() < s.lane_marking_prob:
            self.draw_lane_markings()
        if self.zebra is not None:
            self.draw_zebra(*self.zebra)
        if pr.random() < s.sun_shadow_prob:
            side = self.sides[0] if self.sun_left else self.sides[1]
            reach = side.facade - pr.uniform(4.0, side.facade + right.road + left.road)
            p.cast_shadow(_ground_quad(side.sign * 300.0, side.sign * reach, _Z_NEAR, _Z_FAR), s.sun_shadow)

    def draw_rails(self, x: float) -> None:
        """Tram tracks: a darker bed and two rails, part of the road."""
        p = self.p
        p.fill3d(_ground_quad(x - 1.1, x + 1.1, _Z_NEAR, _Z_FAR), self.paint("track_bed", 40.0), None)
        rail = self.paint("rail", 40.0)
        quads = [_ground_quad(x + dx - 0.05, x + dx + 0.05, _Z_NEAR, _Z_FAR) for dx in (-0.72, 0.72)]
        p.fill3d(np.array(quads), rail, None)

    def draw_lane_markings(self) -> None:
        """Dashed lines between lanes (the centre line sometimes solid) and solid edge lines."""
        r, s = self.rng, self.style
        w = s.lane_marking_width / 2
        dash = self.u(s.lane_dash)
        period = dash * (1.0 + r.uniform(1.0, 2.0))
        quads = []
        for i, x in enumerate(self.lane_edges[1:-1]):
            if i == len(self.lanes) // 2 - 1 and r.random() < 0.3:
                starts, length = [_Z_NEAR], 90.0
            else:
                starts, length = np.arange(r.uniform(0.0, period), 90.0, period), dash
            for a in starts:
                if not self.in_cross(a, a + length):
                    quads.append(_ground_quad(x - w, x + w, max(a, _Z_NEAR), a + length))
        if r.random() < 0.7:
            for x in (self.lane_edges[0] + 0.3, self.lane_edges[-1] - 0.3):
                quads.extend(_ground_quad(x - w, x + w, a, b) for a, b in self.open_stretches(_Z_NEAR, 90.0))
        if quads:
            self.p.fill3d(np.array(quads), self.paint("lane_paint", 20.0), ROAD, marking=True)

    def draw_zebra(self, z0: float, z1: float) -> None:
        """Stripes across the road, each parallel to the street."""
        left, right = self.sides
        quads = [_ground_quad(x, x + 0.5, z0, z1) for x in np.arange(-left.road + 0.4, right.road - 0.5, 1.0)]
        if quads:
            self.p.fill3d(np.array(quads), self.paint("lane_paint", z0), ROAD, marking=True)

    # --- buildings ---
    def draw_building_row(self, side: _Side) -> None:
        """Buildings, parks and gaps along one side, painted far to near."""
        r, s = self.rng, self.style
        segments = []
        z = r.uniform(-15.0, 0.0)
        while z < self.street_end:
            if self.cross is not None and self.cross[0] <= z < self.cross[1]:
                z = self.cross[1]
                continue
            z1 = min(z + self.u(s.building_length), self.street_end)
            if self.cross is not None and z < self.cross[0] < z1:
                z1 = self.cross[0]
            kind = r.random()
            if kind < s.building_gap_prob:
                pass
            elif kind < s.building_gap_prob + s.park_prob:
                segments.append((self.draw_park, side, z, z1))
            else:
                inset = r.uniform(0.0, 1.5) if r.random() < 0.3 else 0.0
                segments.append((self.draw_building, side, side.facade + inset, z, z1, self.u(s.building_height)))
            z = z1
        for draw, *args in reversed(segments):
            draw(*args)

    def draw_building(self, side: _Side, facade: float, z0: float, z1: float, height: float) -> None:
        """A block: its street front and near end, windows in storeys, shop windows at street
        level, a darker cornice."""
        p, pr = self.p, self.paint.rng
        zm = max((z0 + z1) / 2, 1.0)
        colour = self.paint("building", zm)
        x_near, x_far = side.sign * facade, side.sign * (facade + 15.0)
        x_lo, x_hi = min(x_near, x_far), max(x_near, x_far)
        p.box(x_lo, x_hi, 0.0, height, z0, z1, colour, BUILDING)
        storey = pr.uniform(*self.style.floor_height)
        spacing = pr.uniform(*self.style.window_spacing)
        fill_u, fill_v = pr.uniform(0.35, 0.7), pr.uniform(0.35, 0.65)
        glass, lit = self.paint("window", zm), self.paint("window_lit", zm)
        ground_floor = pr.uniform(3.2, 4.5)
        floors = max(int((height - ground_floor - 0.6) / storey), 0)
        upper = (ground_floor, ground_floor + floors * storey, floors, fill_u, fill_v)
        zs = max(z0, _Z_NEAR + 0.5)
        # beyond this depth windows would be under a pixel tall or, foreshortened along the street,
        # under half a pixel wide: the facade reads as plain there
        z_visible = min(p.f * storey * fill_v, math.sqrt(2.0 * p.f * facade * spacing * fill_u))
        if min(z1, z_visible) - zs > spacing:
            nu = min(int((min(z1, z_visible) - zs) / spacing), 40)
            zw = zs + nu * spacing
            grids = [_plane_grid("x", x_near, zs, zw, max(nu // 2, 1), 0.4, ground_floor - 0.5, 1, 0.75, 0.85)]
            if floors:
                grids.append(_plane_grid("x", x_near, zs, zw, nu, *upper))
            self.windows(np.concatenate(grids), glass, lit, p.side_shade(x_near))
        if _Z_NEAR < z0 < z_visible and floors:
            front = _plane_grid("z", z0, x_lo, x_hi, max(int(15.0 / spacing), 1), *upper)
            self.windows(front, glass, lit, p.face_shade["front"])
        p.fill3d(_facade_quad(x_near, height - 0.5, height, zs, z1), colour * p.side_shade(x_near) * 0.75, None)

    def windows(self, quads: np.ndarray, glass: np.ndarray, lit: np.ndarray, shade: float) -> None:
        """Window panes, a few of them lit; panes under a pixel tall, under half a pixel wide or
        off-screen are left out."""
        p = self.p
        pts = p.project(quads)
        lo, hi = pts.min(axis=1), pts.max(axis=1)
        size = hi - lo
        keep = (
            (size[:, 1] >= 1.0)
            & (size[:, 0] >= 0.5)
            & (hi[:, 0] >= -1)
            & (lo[:, 0] <= p.width)
            & (lo[:, 1] <= p.height)
        )
        on = self.paint.rng.random(len(quads)) < self.style.window_lit_prob
        for chosen, colour in ((keep & ~on, glass), (keep & on, lit)):
            if chosen.any():
                p.fill(pts[chosen], colour * shade, None)

    def draw_park(self, side: _Side, z0: float, z1: float) -> None:
        """A hedge along the building line with large trees behind it, all vegetation."""
        r, g = self.rng, side.sign
        x0, x1 = sorted((g * side.facade, g * (side.facade + 1.5)))
        self.p.box(x0, x1, 0.0, r.uniform(1.0, 2.5), z0, z1, self.paint("vegetation", (z0 + z1) / 2), VEGETATION)
        n = max(int((z1 - z0) / r.uniform(5.0, 9.0)), 1)
        for z in np.linspace(z1, z0, n + 1)[:-1] - r.uniform(0.0, 2.0):
            x = g * (side.facade + r.uniform(1.0, 5.0))
            height, crown = r.uniform(8.0, 15.0), r.uniform(2.5, 5.0)
            if z > 2.0:
                self.draw_tree(x, z, height, crown)

    def draw_boundaries(self, side: _Side) -> None:
        """Walls (solid low blocks) and fences (lattices) along the wall/fence line, far to near."""
        r, s = self.rng, self.style
        z = r.uniform(-5.0, 5.0)
        stretches = []
        while z < self.street_end * 0.7:
            z1 = z + r.uniform(8.0, 35.0)
            kind = r.random()
            if not self.in_cross(z, z1):
                if kind < s.wall_prob:
                    stretches.append((self.draw_wall, side, z, z1, self.u(s.wall_height)))
                elif kind < s.wall_prob + s.fence_prob:
                    stretches.append((self.draw_fence, side, z, z1, self.u(s.fence_height)))
            z = z1 + r.uniform(0.0, 10.0)
        for draw, *args in reversed(stretches):
            draw(*args)

    def draw_wall(self, side: _Side, z0: float, z1: float, h: float) -> None:
        x = side.sign * side.boundary
        colour = self.paint("wall", (z0 + z1) / 2)
        self.p.box(*sorted((x, x + side.sign * 0.3)), 0.0, h, z0, z1, colour, WALL)
        self.p.fill3d(_facade_quad(x, h - 0.12, h, max(z0, _Z_NEAR), z1), colour * 0.8, None)

    def draw_fence(self, side: _Side, z0: float, z1: float, h: float) -> None:
        """The fence plane is labelled as a whole; its lattice (pickets or a diagonal mesh between
        two rails) is drawn over whatever lies behind, sometimes on a dark backing."""
        p, pr = self.p, self.paint.rng
        x = side.sign * side.boundary
        z0 = max(z0, _Z_NEAR)
        colour = self.paint("fence", (z0 + z1) / 2)
        p.fill(p.project(_facade_quad(x, 0.0, h, z0, z1)), colour * 0.35 if pr.random() < 0.4 else None, FENCE)
        # strokes stop just inside the labelled face so no lattice pixel falls outside it
        y0, y1 = 0.03 * h, 0.97 * h
        zs = np.arange(z0 + 0.05, z1 - 0.05, pr.uniform(0.15, 0.35))
        bottom = np.stack([np.full_like(zs, x), np.full_like(zs, y0), zs], -1)
        if pr.random() < 0.5:
            segments = np.stack([bottom, bottom + (0.0, y1 - y0, 0.0)], 1)
        else:
            rise = y1 - y0
            rising = np.stack([bottom, bottom + (0.0, rise, rise)], 1)
            falling = np.stack([bottom + (0.0, rise, 0.0), bottom + (0.0, 0.0, rise)], 1)
            segments = np.concatenate([rising, falling])
            segments[..., 2] = np.minimum(segments[..., 2], z1 - 0.05)
        p.lines(p.project(segments), colour, None)
        rails = [_facade_quad(x, y - 0.04, y + 0.04, z0, z1) for y in (0.1 * h, 0.95 * h)]
        p.fill3d(np.array(rails), colour, None)

    # --- vegetation and street furniture ---
    def plan_vegetation(self) -> None:
        """Street trees in the grass strip or at the outer edge of the sidewalk."""
        r, s = self.rng, self.style
        for side in self.sides:
            for _ in range(r.poisson(s.trees_per_side)):
                height, crown = self.u(s.tree_height), self.u(s.crown_radius)
                z = self.depth_for(height, 2.0, self.street_end * 0.6)
                if z is None or not self.curb_tracks[side.sign].claim(z - 1.0, z + 1.0):
                    continue
                x = (side.sidewalk + side.boundary) / 2 if side.terrain else side.sidewalk - 0.6
                self.later(z, self.draw_tree, side.sign * x, z, height, crown)

    def draw_tree(self, x: float, z: float, height: float, crown: float) -> None:
        """A trunk and a lumpy crown (overlapping discs) or a conifer cone; all vegetation."""
        p, r = self.p, self.rng
        k = p.scale(z)
        half = r.uniform(0.1, 0.2)
        colour = self.paint("vegetation", z)
        p.fill3d(_billboard(z, x - half, x + half, 0.0, height - crown * 0.8), self.paint("trunk", z), VEGETATION)
        if r.random() < 0.15:
            p.fill3d([(x - crown, height * 0.25, z), (x + crown, height * 0.25, z), (x, height, z)], colour, VEGETATION)
            return
        centre = p.point(x, height - crown, z)
        p.circle(centre, crown * k, colour, VEGETATION)
        n = int(r.integers(2, 6))
        angles = r.uniform(0.0, 2 * math.pi, n)
        offsets = r.uniform(0.4, 0.75, n) * crown * k
        radii = r.uniform(0.4, 0.65, n) * crown * k
        for a, d, rad in zip(angles, offsets, radii):
            lump = centre + np.array([math.cos(a), -0.8 * math.sin(a)]) * d
            p.circle(lump, rad, self.paint.jitter(colour, 0.25), VEGETATION)

    def plan_poles(self) -> None:
        """Street lamps, traffic lights (on poles or hanging over the road) and traffic signs."""
        r, s = self.rng, self.style
        for side in self.sides:
            for _ in range(r.poisson(s.lamps_per_side)):
                z = self.depth_for(7.0, 3.0, self.street_end * 0.7)
                if z is not None and self.curb_tracks[side.sign].claim(z - 0.5, z + 0.5):
                    self.later(z, self.draw_lamp, side, z, r.uniform(6.0, 9.0))
        for _ in range(r.poisson(s.traffic_lights)):
            side = self.random_side()
            z = self.depth_for(1.0, 5.0, 70.0)
            if self.cross is not None and r.random() < 0.6:
                z = self.cross[0] - r.uniform(0.5, 2.0)
            if z is None or z < 4.0 or not self.curb_tracks[side.sign].claim(z - 0.5, z + 0.5):
                continue
            self.later(z, self.draw_traffic_light_pole, side, z, r.random() < s.overhead_light_share)
        for _ in range(r.poisson(s.traffic_signs)):
            side = self.random_side()
            z = self.depth_for(0.75, 4.0, 70.0)
            if z is not None and self.curb_tracks[side.sign].claim(z - 0.4, z + 0.4):
                self.later(z, self.draw_sign_pole, side, z)

    def pole(self, x: float, z: float, height: float, width: float = 0.18) -> np.ndarray:
        """A vertical pole from the ground; returns its colour for arms and brackets."""
        colour = self.paint("pole", z)
        self.p.fill3d(_billboard(z, x - width / 2, x + width / 2, 0.0, height), colour, POLE)
        return colour

    def draw_lamp(self, side: _Side, z: float, height: float) -> None:
        """A street lamp: pole, an arm over the road and the lamp head, all labelled pole."""
        x = side.sign * (side.road + 0.4)
        colour = self.pole(x, z, height)
        tip = x - side.sign * self.rng.uniform(1.0, 2.5)
        self.p.fill3d(_billboard(z, min(x, tip), max(x, tip), height - 0.12, height), colour, POLE)
        self.p.fill3d(_billboard(z, tip - 0.35, tip + 0.35, height - 0.25, height), colour * 0.8, POLE)

    def draw_traffic_light_pole(self, side: _Side, z: float, overhead: bool) -> None:
        """A short pole with the light on top (and sometimes a sign below it), or a mast with an
        arm reaching over the road and the light hanging from it."""
        r = self.rng
        x = side.sign * (side.road + 0.4)
        if overhead:
            height = r.uniform(5.5, 6.8)
            colour = self.pole(x, z, height, 0.22)
            tip = x - side.sign * r.uniform(2.5, min(6.0, side.road + 2.0))
            self.p.fill3d(_billboard(z, min(x, tip), max(x, tip), height - 0.15, height), colour, POLE)
            self.draw_traffic_light(tip, height - 1.25, z + 0.2)
        else:
            height = r.uniform(2.6, 3.6)
            self.pole(x, z, height + 0.1)
            self.draw_traffic_light(x, height, z - 0.25)
            if r.random() < 0.3:
                self.draw_sign(x, height - 0.9, z - 0.2, r.uniform(0.28, 0.4))

    def draw_traffic_light(self, x: float, y: float, z: float) -> None:
        """A housing with three lamps (one lit) facing the camera, or its blank back."""
        p, pr = self.p, self.paint.rng
        w, h = 0.4, 1.05
        p.box(x - w / 2, x + w / 2, y, y + h, z, z + 0.3, self.paint("signal", z), LIGHT)
        if pr.random() < 0.3:
            return
        on = int(pr.integers(3))
        radius = 0.12 * p.scale(z)
        for i, lamp in enumerate(("lamp_red", "lamp_amber", "lamp_green")):
            p.circle(
                p.point(x, y + h * (0.82 - 0.32 * i), z), radius, self.paint(lamp if i == on else "lamp_off", z), None
            )

    def draw_sign_pole(self, side: _Side, z: float) -> None:
        x = side.sign * (side.road + self.rng.uniform(0.3, 0.8))
        top = self.rng.uniform(2.2, 3.2)
        size = self.rng.uniform(0.32, 0.48)
        self.pole(x, z, top, 0.1)
        self.draw_sign(x, top, z - 0.05, size)

    def draw_sign(self, x: float, y: float, z: float, size: float) -> None:
        """A plate centred at (x, y): disc, triangle (either way up) or rectangle; the face
        colourful with a rim or band, the back plain grey."""
        p, r, pr = self.p, self.rng, self.paint.rng
        shape = r.random()
        back = pr.random() < 0.25
        face = self.paint(
            "metal" if back else str(pr.choice(["sign_red", "sign_blue", "sign_yellow", "sign_white"])), z
        )
        rim = self.paint("sign_white" if pr.random() < 0.6 else "sign_red", z)
        if shape < 0.45:
            centre, radius = p.point(x, y, z), size * p.scale(z)
            p.circle(centre, radius, face, SIGN)
            if not back:
                p.circle(centre, radius, rim, None, max(round(0.15 * radius), 1))
        elif shape < 0.75:
            flip = -1.0 if r.random() < 0.3 else 1.0
            base, apex = y - flip * size * 0.7, y + flip * size * 1.2
            tri = np.array([(x - size * 1.1, base, z), (x + size * 1.1, base, z), (x, apex, z)])
            p.fill3d(tri, face if back else rim, SIGN)
            if not back:
                inner = tri.copy()
                inner[:, :2] += (np.array([x, y]) - tri[:, :2]) * 0.35
                p.fill3d(inner, self.paint("sign_white", z), None)
        else:
            hw, hh = (size * 1.4, size * 0.7) if r.random() < 0.5 else (size * 0.8, size)
            p.fill3d(_billboard(z, x - hw, x + hw, y - hh, y + hh), face, SIGN)
            if not back:
                p.fill3d(_billboard(z, x - 0.7 * hw, x + 0.7 * hw, y - 0.2 * hh, y + 0.2 * hh), rim, None)

    def plan_static(self) -> None:
        """Bins, boxes and benches on sidewalks (labelId 4, not evaluated)."""
        r, s = self.rng, self.style
        for _ in range(r.poisson(s.static_objects)):
            side = self.random_side()
            z = self.depth_for(0.8, 3.0, 60.0)
            if z is None:
                continue
            x = side.sign * r.uniform(side.road + 0.5, side.sidewalk - 0.3)
            w, h, d = r.uniform(0.5, 1.8), r.uniform(0.6, 1.3), r.uniform(0.4, 0.8)
            self.later(z, self.p.box, x - w / 2, x + w / 2, 0.0, h, z, z + d, self.paint("static", z), STATIC)

    # --- vehicles ---
    def plan_vehicles(self) -> None:
        """A train on the rails; cars, trucks and buses in lanes (driving away on the right,
        towards the camera on the left) or parked in parking strips."""
        r, s = self.rng, self.style
        if self.rails is not None and r.random() < s.train_prob:
            length = self.u(_TRAIN_LENGTH)
            z = self.depth_for(3.5, 10.0, 60.0)
            lane = int(np.argmin([abs(c - self.rails) for c, _ in self.lanes]))
            if z is not None and self.lane_tracks[lane].claim(z, z + length, 2.0):
                self.later(z + length / 2, self.draw_train, self.rails, z, length, self.lanes[lane][1])
        kinds = ["car"] * r.poisson(s.cars) + ["truck"] * r.poisson(s.trucks) + ["bus"] * r.poisson(s.buses)
        draws = {"car": self.draw_car, "truck": self.draw_truck, "bus": self.draw_bus}
        ego_half_lane = (self.lane_edges[1] - self.lane_edges[0]) / 2
        for kind in kinds:
            length, width, height = (self.u(b) for b in _VEHICLE_SIZE[kind])
            lane = int(r.integers(len(self.lanes)))
            x, direction = self.lanes[lane]
            side = self.side_of(x)
            if kind == "car" and side.parking is not None and r.random() < 0.6:
                z = r.uniform(*side.parking)
                x, direction = side.sign * (side.road - 1.1), int(r.choice([-1, 1]))
            else:
                near = 8.0 if abs(x) < ego_half_lane else (5.0 if kind == "car" else 9.0)
                z = self.depth_for(height, near, 110.0)
                x += r.uniform(-0.3, 0.3)
            if z is not None and self.lane_tracks[lane].claim(z, z + length, 1.5):
                self.later(z + length / 2, draws[kind], x, z, length, width, height, direction)

    def wheels(self, x0: float, x1: float, radius: float, centres, label: int) -> None:
        """Tyres as dark boxes under the corners, drawn before the body so they peek out below it."""
        tyre = self.paint("tyre", centres[0])
        for zc in centres:
            for xa, xb in ((x0, x0 + 0.25), (x1 - 0.25, x1)):
                self.p.box(xa, xb, 0.0, 2 * radius, zc - radius, zc + radius, tyre, label)

    def vehicle_shadow(self, x0: float, x1: float, z0: float, z1: float) -> None:
        self.p.cast_shadow(_ground_quad(x0 - 0.15, x1 + 0.15, z0 - 0.2, z1 + 0.3), self.style.shadow_strength)

    def lights(self, x0: float, x1: float, y: float, z: float, facing_us: bool) -> None:
        """Head lights (white) or tail lights (red) on the face turned to the camera."""
        colour = self.paint("head_light" if facing_us else "tail_light", z)
        quads = [_billboard(z, xa, xa + 0.25, y, y + 0.15) for xa in (x0 + 0.08, x1 - 0.33)]
        self.p.fill3d(np.array(quads), colour, None)

    def glass_side(self, x0: float, x1: float) -> float | None:
        """The lateral position of the long side the camera sees, if any."""
        return x1 if x1 < 0 else (x0 if x0 > 0 else None)

    def draw_car(self, x, z, length, width, height, direction) -> None:
        """A lower body box and a narrower cabin box with glass, wheels, lights and a shadow."""
        p, r = self.p, self.rng
        x0, x1, z1 = x - width / 2, x + width / 2, z + length
        self.vehicle_shadow(x0, x1, z, z1)
        paint = self.paint("vehicle", z)
        body_top = height * r.uniform(0.5, 0.6)
        self.wheels(x0, x1, 0.32, (z + 0.75, z1 - 0.75), CAR)
        p.box(x0, x1, 0.28, body_top, z, z1, paint, CAR)
        near, far = r.uniform(0.15, 0.3), r.uniform(0.15, 0.35)
        if direction < 0:
            near, far = far, near
        cz0, cz1 = z + length * near, z1 - length * far
        p.box(x0 + 0.1, x1 - 0.1, body_top, height, cz0, cz1, paint, CAR)
        glass = self.paint("glass", z)
        y0, y1 = body_top + 0.06, height - 0.07
        p.fill3d([(x0 + 0.2, y0, cz0), (x1 - 0.2, y0, cz0), (x1 - 0.22, y1, cz0), (x0 + 0.22, y1, cz0)], glass, None)
        side_x = self.glass_side(x0 + 0.1, x1 - 0.1)
        if side_x is not None:
            p.fill3d(_facade_quad(side_x, y0, y1, cz0 + 0.15, cz1 - 0.15), glass * p.side_shade(side_x), None)
        self.lights(x0, x1, body_top - 0.3, z, direction < 0)

    def draw_truck(self, x, z, length, width, height, direction) -> None:
        """A cab and a taller cargo box on a dark chassis with wheels; seen from behind the cargo
        box hides most of the cab, seen from the front the cab comes first."""
        p, r = self.p, self.rng
        x0, x1, z1 = x - width / 2, x + width / 2, z + length
        self.vehicle_shadow(x0, x1, z, z1)
        cab_len, cab_h = r.uniform(2.0, 2.6), r.uniform(2.6, 3.0)
        self.wheels(x0, x1, 0.5, (z + 1.0, (z + z1) / 2, z1 - 1.0), TRUCK)
        cab_colour, cargo_colour = self.paint("vehicle", z), self.paint("vehicle", z)
        p.box(x0 + 0.2, x1 - 0.2, 0.45, 1.0, z, z1, self.paint("tyre", z) * 1.5, TRUCK)
        if direction < 0:
            p.box(x0, x1, 1.0, height, z + cab_len + 0.3, z1, cargo_colour, TRUCK)
            p.box(x0 + 0.05, x1 - 0.05, 0.5, cab_h, z, z + cab_len, cab_colour, TRUCK)
            p.fill3d(_billboard(z, x0 + 0.15, x1 - 0.15, 1.6, cab_h - 0.2), self.paint("glass", z), None)
        else:
            p.box(x0 + 0.05, x1 - 0.05, 0.5, cab_h, z1 - cab_len, z1, cab_colour, TRUCK)
            p.box(x0, x1, 1.0, height, z, z1 - cab_len - 0.3, cargo_colour, TRUCK)
            p.fill3d(_billboard(z, x - 0.02, x + 0.02, 1.1, height - 0.1), cargo_colour * 0.6, None)
        self.lights(x0, x1, 0.6 if direction < 0 else 1.05, z, direction < 0)

    def draw_bus(self, x, z, length, width, height, direction) -> None:
        """A long tall box with a row of side windows, a big front (or small rear) window and a
        destination display."""
        p = self.p
        x0, x1, z1 = x - width / 2, x + width / 2, z + length
        self.vehicle_shadow(x0, x1, z, z1)
        self.wheels(x0, x1, 0.5, (z + 2.0, z1 - 2.5), BUS)
        colour = self.paint("vehicle", z)
        p.box(x0, x1, 0.3, height, z, z1, colour, BUS)
        glass = self.paint("glass", z)
        side_x = self.glass_side(x0, x1)
        if side_x is not None:
            panes = _plane_grid(
                "x", side_x, z + 0.8, z1 - 0.8, max(int(length / 1.5), 1), 1.2, height - 0.35, 1, 0.88, 0.95
            )
            p.fill3d(panes, glass * p.side_shade(side_x), None)
        p.fill3d(_billboard(z, x0 + 0.12, x1 - 0.12, 1.0 if direction < 0 else 1.9, height - 0.35), glass, None)
        p.fill3d(
            _billboard(z, x0 + 0.4, x1 - 0.4, height - 0.3, height - 0.08), self.paint("lamp_amber", z) * 0.8, None
        )
        self.lights(x0, x1, 0.5, z, direction < 0)

    def draw_train(self, x, z, length, direction) -> None:
        """A very long tram on the rails: a row of windows and doors, a stripe, a big windscreen
        and a pantograph on the roof."""
        p, r = self.p, self.rng
        width, height = 2.6, r.uniform(3.3, 3.8)
        x0, x1, z1 = x - width / 2, x + width / 2, z + length
        colour = self.paint("vehicle", z)
        p.box(x0, x1, 0.35, height, z, z1, colour, TRAIN)
        glass = self.paint("glass", z)
        side_x = self.glass_side(x0, x1)
        if side_x is not None:
            shade = p.side_shade(side_x)
            panes = _plane_grid(
                "x", side_x, z + 0.5, z1 - 0.5, max(int(length / 2.2), 1), 1.3, height - 0.5, 1, 0.75, 0.95
            )
            p.fill3d(panes, glass * shade, None)
            doors = _plane_grid(
                "x", side_x, z + 3.0, z1 - 3.0, max(int(length / 7.0), 1), 0.5, height - 0.45, 1, 0.18, 1.0
            )
            p.fill3d(doors, colour * shade * 0.55, None)
            p.fill3d(_facade_quad(side_x, 0.6, 0.9, z, z1), colour * shade * 0.7, None)
        p.fill3d(_billboard(z, x0 + 0.2, x1 - 0.2, 1.4, height - 0.4), glass, None)
        self.lights(x0, x1, 0.7, z, direction < 0)
        mast = z + length * 0.3
        base, left, right = p.project([(x, height, mast), (x - 0.6, height + 0.9, mast), (x + 0.6, height + 0.9, mast)])
        frame = self.paint("pole", mast) * 0.5
        stroke = max(0.06 * p.scale(mast), 1.0)
        p.line(base, left, stroke, frame, TRAIN)
        p.line(base, right, stroke, frame, TRAIN)

    # --- people and two-wheelers ---
    def plan_people(self) -> None:
        """Pedestrians on sidewalks (some in small groups, some on the zebra), riders on the road,
        parked bicycles and motorcycles at the curb."""
        r, s = self.rng, self.style
        left, right = self.sides
        for _ in range(r.poisson(s.persons)):
            height = r.uniform(1.55, 1.92) if r.random() < 0.9 else r.uniform(1.1, 1.45)
            z = self.depth_for(height, 2.5, 70.0)
            if z is None:
                continue
            if self.zebra is not None and r.random() < 0.25:
                z, x = r.uniform(*self.zebra), r.uniform(-left.road, right.road)
            else:
                side = self.random_side()
                x = side.sign * r.uniform(side.road + 0.4, side.sidewalk - 0.2)
            group = 1 + (r.poisson(0.6) if r.random() < 0.3 else 0)
            for i in range(group):
                xi = x - math.copysign(i * r.uniform(0.5, 0.8), x)
                zi = z + r.uniform(-0.4, 0.4) * i
                self.later(zi, self.draw_person, xi, zi, r.uniform(1.55, 1.92) if i else height)
        for _ in range(r.poisson(s.riders)):
            moto = r.random() < s.rider_motorcycle_share
            z = self.depth_for(1.6, 3.0, 60.0)
            if z is None:
                continue
            if moto:
                lane = int(r.integers(len(self.lanes)))
                x = self.lanes[lane][0] + r.uniform(-0.8, 0.8)
                if not self.lane_tracks[lane].claim(z - 1.0, z + 1.0):
                    continue
            else:
                side = self.random_side()
                x = side.sign * (side.road - r.uniform(0.5, 1.2))
            self.later(z, self.draw_two_wheeler, x, z, moto, True)
        for mean, moto in ((s.parked_bicycles, False), (s.parked_motorcycles, True)):
            for _ in range(r.poisson(mean)):
                side = self.random_side()
                z = self.depth_for(1.0, 3.0, 50.0)
                if z is None:
                    continue
                x = side.sign * (side.road + r.uniform(0.5, 1.2))
                for i in range(1 + (0 if moto else r.poisson(1.5))):
                    self.later(z + 0.6 * i, self.draw_two_wheeler, x, z + 0.6 * i, moto, False)

    def draw_person(self, x: float, z: float, height: float) -> None:
        """A standing or walking figure seen from the front or back: legs (or a skirt), torso,
        swinging arms, neck and head, in the person's own clothing colours."""
        p, r = self.p, self.rng
        foot = p.point(x, 0.0, z)
        u = height / 1.75 * p.scale(z)

        def pt(a, b):
            return (foot[0] + a * u, foot[1] - b * u)

        top, bottom, skin = self.paint("clothing", z), self.paint("clothing", z), self.paint("skin", z)
        stride = r.uniform(0.0, 0.22)
        for sgn in (-1, 1):
            a = sgn * stride
            p.fill(
                [pt(sgn * 0.03, 0.92), pt(sgn * 0.16, 0.92), pt(a + sgn * 0.06, 0.0), pt(a - sgn * 0.06, 0.0)],
                bottom,
                PERSON,
            )
        if r.random() < 0.2:
            p.fill([pt(-0.18, 0.95), pt(0.18, 0.95), pt(0.28, 0.45), pt(-0.28, 0.45)], top, PERSON)
        swing = r.uniform(-0.1, 0.1)
        for sgn in (-1, 1):
            p.line(pt(sgn * 0.19, 1.40), pt(sgn * (0.24 + swing), 0.88), max(0.09 * u, 1.0), top, PERSON)
        p.fill([pt(-0.21, 1.46), pt(0.21, 1.46), pt(0.17, 0.88), pt(-0.17, 0.88)], top, PERSON)
        p.fill([pt(-0.05, 1.52), pt(0.05, 1.52), pt(0.05, 1.44), pt(-0.05, 1.44)], skin, PERSON)
        p.circle(pt(0.0, 1.63), 0.115 * u, skin, PERSON)
        if r.random() < 0.7:
            p.ellipse(pt(0.0, 1.68), (0.115 * u, 0.06 * u), self.paint("hair", z), None)

    def draw_two_wheeler(self, x: float, z: float, moto: bool, ridden: bool) -> None:
        """A bicycle (thin ring wheels, thin frame) or a motorcycle (thick wheels, solid body) in
        side view, foreshortened by its heading, with a seated rider when ridden."""
        p, r = self.p, self.rng
        k = p.scale(z)
        base = p.point(x, 0.0, z)
        squeeze = r.uniform(0.45, 1.0)
        along = (1.0 if r.random() < 0.5 else -1.0) * squeeze * k

        def pt(a, b):
            return (base[0] + a * along, base[1] - b * k)

        label = MOTORCYCLE if moto else BICYCLE
        frame, tyre = self.paint("vehicle", z), self.paint("tyre", z)
        if moto:
            radius, hub = 0.31, 0.7
            for sgn in (-1, 1):
                p.ellipse(pt(sgn * hub, radius), (radius * squeeze * k, radius * k), tyre, label)
                p.ellipse(
                    pt(sgn * hub, radius),
                    (0.45 * radius * squeeze * k, 0.45 * radius * k),
                    self.paint("metal", z),
                    None,
                )
            body = [
                pt(-0.75, 0.55),
                pt(-0.2, 0.82),
                pt(0.3, 0.95),
                pt(0.6, 0.98),
                pt(0.62, 0.7),
                pt(0.35, 0.3),
                pt(-0.25, 0.3),
            ]
            p.fill(body, frame, label)
            p.line(pt(0.58, 0.95), pt(hub, radius), max(0.07 * k, 1.0), self.paint("metal", z), label)
            p.line(pt(0.5, 1.1), pt(0.62, 0.95), max(0.05 * k, 1.0), tyre, label)
            seat, hand, foot = (-0.2, 0.85), (0.5, 1.08), (0.05, 0.35)
        else:
            radius, hub = 0.34, 0.52
            ring = max(round(0.07 * k), 1)
            for sgn in (-1, 1):
                p.ellipse(pt(sgn * hub, radius), (radius * squeeze * k, radius * k), tyre, label, ring)
            stroke = max(0.06 * k, 1.0)
            rear, front, crank = pt(-hub, radius), pt(hub, radius), pt(-0.05, 0.3)
            saddle, head = pt(-0.2, 0.9), pt(0.38, 0.92)
            for a, b in ((rear, crank), (rear, saddle), (saddle, crank), (crank, head), (saddle, head), (head, front)):
                p.line(a, b, stroke, frame, label)
            p.line(pt(0.33, 1.02), pt(0.45, 1.02), stroke, tyre, label)
            seat, hand, foot = (-0.2, 0.92), (0.4, 1.02), (0.0, 0.25)
        if ridden:
            self.draw_rider(pt, k, seat, hand, foot, moto, z)

    def draw_rider(self, pt, k: float, seat, hand, foot, moto: bool, z: float) -> None:
        """A person seated on the two-wheeler: hips on the seat, torso leaning to the handlebar,
        bent legs to the pedal or footpeg, a helmet on motorcycles; labelled rider."""
        p, r = self.p, self.rng
        lean = r.uniform(0.25, 0.7) if moto else r.uniform(0.15, 0.55)
        hip = np.array(seat) + (0.0, 0.05)
        spine = np.array([math.sin(lean), math.cos(lean)])
        shoulder = hip + 0.58 * spine
        head = shoulder + 0.2 * np.array([math.sin(lean / 2), math.cos(lean / 2)])
        knee = hip + (0.42, -0.05 if moto else -0.1)
        top, bottom = self.paint("clothing", z), self.paint("clothing", z)
        limb = max(0.13 * k, 1.0)
        p.line(pt(*hip), pt(*knee), limb, bottom, RIDER)
        p.line(pt(*knee), pt(*foot), limb * 0.85, bottom, RIDER)
        across = np.array([-spine[1], spine[0]]) * 0.17
        p.fill(
            [pt(*(hip + across)), pt(*(hip - across)), pt(*(shoulder - across)), pt(*(shoulder + across))], top, RIDER
        )
        p.line(pt(*shoulder), pt(*hand), max(0.09 * k, 1.0), top, RIDER)
        p.circle(pt(*head), (0.14 if moto else 0.115) * k, self.paint("helmet" if moto else "skin", z), RIDER)

    # --- foreground ---
    def draw_hood(self) -> None:
        """The ego vehicle's bonnet across the bottom rows, with a pale reflection band."""
        r, p = self.rng, self.p
        if r.random() >= self.style.hood_prob:
            return
        h, w = self.height, self.width
        rise = self.u(self.style.hood_height) * h
        bulge = r.uniform(0.3, 0.6)
        cx = w / 2 + r.uniform(-0.05, 0.05) * w
        xs = np.linspace(-0.05 * w, 1.05 * w, 33)
        ys = h - rise * (1.0 - bulge * ((xs - cx) / (0.55 * w)) ** 2)
        outline = np.concatenate([np.stack([xs, ys], 1), [[1.05 * w, h + 2.0], [-0.05 * w, h + 2.0]]])
        colour = self.paint("hood")
        p.fill(outline, colour, EGO_VEHICLE)
        band = np.concatenate([np.stack([xs, ys + 0.15 * rise], 1), np.stack([xs[::-1], ys[::-1] + 0.35 * rise], 1)])
        p.fill(band, colour * 0.5 + self.paint.haze_colour * 0.25, None)

    def draw_unlabeled_strip(self) -> None:
        """A thin dark border strip labelled 0, like the rectification border of a real camera."""
        r, p = self.rng, self.p
        if r.random() >= self.style.unlabeled_strip_prob:
            return
        width = max(round(self.u(self.style.unlabeled_strip_px) * self.height / _REFERENCE_HEIGHT), 1)
        where = int(r.integers(3))
        if where == 0:
            region = (slice(None), slice(0, width))
        elif where == 1:
            region = (slice(None), slice(self.width - width, None))
        else:
            region = (slice(0, width), slice(None))
        p.label[region] = UNLABELED
        p.image[region] = p.image[region] // 7


# ---------------------------------------------------------------------------------------------
# Developing the picture
# ---------------------------------------------------------------------------------------------


def _class_tables(style: DomainStyle) -> tuple[np.ndarray, np.ndarray]:
    """Per-labelId amplitude of low-frequency and per-pixel texture, from the style's dicts."""
    ids = LABEL_ID | UNEVALUATED_ID
    tables = []
    for amplitudes in (style.patchiness, style.grain):
        table = np.zeros(256, np.float32)
        for name, amplitude in amplitudes.items():
            table[ids[name]] = amplitude
        tables.append(table)
    return tables[0], tables[1]


@functools.lru_cache(maxsize=16)
def _camera_matrix(style: DomainStyle) -> np.ndarray:
    """White balance, colour mixing, saturation and contrast folded into one 3x4 affine map."""
    mix = np.asarray(style.colour_matrix, np.float64) * np.asarray(style.tint, np.float64)[None, :]
    luma = np.array([0.299, 0.587, 0.114])
    saturate = style.saturation * np.eye(3) + (1.0 - style.saturation) * np.outer(np.ones(3), luma)
    linear = style.contrast * saturate @ mix
    offset = (1.0 - style.contrast) * 0.5 * np.ones((3, 1))
    return np.hstack([linear, offset]).astype(np.float32)


_GROUND_TABLE = np.zeros(256, bool)
_GROUND_TABLE[list(_GROUND_LEVEL)] = True


@functools.lru_cache(maxsize=32)
def _vignette(height: int, width: int, strength: float) -> np.ndarray:
    """(H, W, 3) brightness falloff: 1 at the centre, ``1 - strength`` in the corners."""
    yy = (np.arange(height, dtype=np.float32) - (height - 1) / 2) / (height / 2)
    xx = (np.arange(width, dtype=np.float32) - (width - 1) / 2) / (width / 2)
    falloff = (1.0 - strength / 2 * (yy[:, None] ** 2 + xx[None, :] ** 2)).astype(np.float32)
    return cv2.merge((falloff, falloff, falloff))


#: Scales a uniform byte (0..255, minus its mean) to unit variance.
_BYTE_TO_UNIT = math.sqrt(12.0) / 256.0


def _develop(p: _Painter, style: DomainStyle, rng: np.random.Generator) -> np.ndarray:
    """Surface colours -> camera image: per-class texture, cast shadows, white balance and colour
    mixing, saturation and contrast, gamma, exposure and vignetting, blur, sensor noise.

    Per-pixel randomness is uniform bytes scaled to unit variance: far cheaper than Gaussian
    draws and indistinguishable from them at these amplitudes once quantised to 8 bits.
    """
    h, w = p.label.shape
    patch_table, grain_table = _class_tables(style)
    cell = max(h // 8, 2)
    coarse = rng.standard_normal((h // cell + 2, w // cell + 2)).astype(np.float32)
    blotch = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)
    planes = np.frombuffer(rng.bytes(5 * h * w), dtype=np.uint8).reshape(5, h, w)  # grain, luma, R, G, B
    grain = (planes[0].astype(np.float32) - np.float32(127.5)) * np.float32(_BYTE_TO_UNIT)
    modulation = 1.0 + patch_table[p.label] * blotch + grain_table[p.label] * grain
    modulation *= np.where(_GROUND_TABLE[p.label], p.shade, np.float32(1.0))
    image = cv2.multiply(p.image.astype(np.float32), cv2.merge((modulation,) * 3), scale=1.0 / 255.0)
    camera = _camera_matrix(style)
    if style.white_balance_jitter > 0:
        j = style.white_balance_jitter
        gains = np.array([rng.uniform(1 - j, 1 + j), 1.0, rng.uniform(1 - j, 1 + j)])
        camera = (gains[:, None] * camera).astype(np.float32)
    image = cv2.transform(image, camera)
    np.clip(image, 0.0, 1.0, out=image)
    if style.gamma != 1.0:
        image = cv2.pow(image, style.gamma)
    exposure = float(rng.uniform(*style.brightness))
    if style.vignette:
        image = cv2.multiply(image, _vignette(h, w, style.vignette), scale=exposure)
    else:
        image *= np.float32(exposure)
    if style.blur_sigma > 0:
        image = cv2.GaussianBlur(image, (0, 0), style.blur_sigma * h / _REFERENCE_HEIGHT)
    if style.noise_sigma > 0:
        luma = style.noise_sigma * (1.0 - style.chroma_noise) * _BYTE_TO_UNIT
        chroma = style.noise_sigma * style.chroma_noise * _BYTE_TO_UNIT
        grey, colour = cv2.merge((planes[1],) * 3), cv2.merge(tuple(planes[2:5]))
        noise = cv2.addWeighted(grey, luma, colour, chroma, -127.5 * (luma + chroma), dtype=cv2.CV_32F)
        image = cv2.add(image, noise)
    np.maximum(image, 0.0, out=image)
    return cv2.convertScaleAbs(image, alpha=255.0)


def render_scene(rng: np.random.Generator, style: DomainStyle, height: int, width: int) -> Scene:
    """Render one street scene of ``style`` at ``height`` x ``width`` pixels.

    The result depends only on the generator's state, the style and the size; the generator
    advances by a fixed amount (three seeds), whatever is drawn.
    """
    if height < 16 or width < 16:
        raise ValueError(f"scene size {height}x{width} is too small (at least 16x16)")
    seeds = rng.integers(0, np.iinfo(np.int64).max, size=3)
    layout_rng, paint_rng, sensor_rng = (np.random.default_rng(int(s)) for s in seeds)
    builder = _SceneBuilder(style, height, width, layout_rng, paint_rng)
    builder.build()
    image = _develop(builder.p, style, sensor_rng)
    label = builder.p.label.copy()
    marking = (builder.p.marking > 0) & (label == ROAD)
    return Scene(image=image, label_ids=label, lane_marking=marking)
