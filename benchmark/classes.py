"""The evaluation classes and the label-id tables of the three dataset families.

Facts from DESIGN.md sections 5 and 6: Cityscapes trainIds 0..18 (ignore 255), the Cityscapes/GTA5
labelId -> trainId table of cityscapesScripts' ``labels.py``, and the SYNTHIA-RAND-CITYSCAPES id ->
trainId table of the reference converter (DAFormer ``tools/convert_datasets/synthia.py``).
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255

#: Class names in Cityscapes trainId order 0..18.
CLASSES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic_light",
    "traffic_sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
NUM_CLASSES = len(CLASSES)
TRAIN_ID = {name: i for i, name in enumerate(CLASSES)}

#: Classes SYNTHIA does not annotate; mIoU16 averages the other 16.
SYNTHIA_ABSENT: tuple[str, ...] = ("terrain", "truck", "train")
#: mIoU13 additionally drops these from the 16 (computed from the same per-class IoUs).
MIOU13_DROPPED: tuple[str, ...] = ("wall", "fence", "pole")
CLASSES_16: tuple[str, ...] = tuple(c for c in CLASSES if c not in SYNTHIA_ABSENT)
CLASSES_13: tuple[str, ...] = tuple(c for c in CLASSES_16 if c not in MIOU13_DROPPED)

#: "Thing" classes (countable objects), used by the ImageNet feature distance.
THING_CLASSES: tuple[str, ...] = (
    "traffic_light",
    "traffic_sign",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

#: Cityscapes (and GTA5) labelId -> trainId; every other id in 0..33 maps to IGNORE_INDEX.
CITYSCAPES_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
#: Cityscapes labelIds that exist in the PNGs (-1 "license plate" never does).
CITYSCAPES_VALID_IDS = frozenset(range(34))

#: SYNTHIA-RAND-CITYSCAPES class id -> trainId; void 0, parking-slot 13, road-work 14 and
#: lanemarking 22 map to IGNORE_INDEX. Ids 16, 18, 20 (terrain, truck, train) do not occur in the data.
SYNTHIA_ID_TO_TRAIN_ID: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9,
    1: 10, 10: 11, 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}  # fmt: skip
#: Class ids documented in SYNTHIA's README.txt (0 void .. 22 lanemarking).
SYNTHIA_VALID_IDS = frozenset(range(23))
SYNTHIA_LANEMARKING_ID = 22


def lookup_table(id_to_train_id: dict[int, int], size: int = 65536) -> np.ndarray:
    """A dense uint8 table ``t`` with ``t[id] = trainId`` and IGNORE_INDEX for every unmapped id."""
    table = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in id_to_train_id.items():
        table[label_id] = train_id
    return table


def invert(id_to_train_id: dict[int, int]) -> dict[int, int]:
    """trainId -> dataset id (each trainId has exactly one id in both tables)."""
    inverse = {train_id: label_id for label_id, train_id in id_to_train_id.items()}
    assert len(inverse) == len(id_to_train_id), "id table is not one-to-one"
    return inverse
