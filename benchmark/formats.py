"""Reading and writing the on-disk formats of GTA5, SYNTHIA-RAND-CITYSCAPES and Cityscapes.

Every reader checks what it reads: a label in the wrong encoding raises ``DatasetFormatError``
naming the file and what was expected, never a silently wrong label (DESIGN.md section 6):

* Cityscapes ``*_gtFine_labelIds.png``: 8-bit single channel, labelIds 0..33.
* GTA5 ``labels/NNNNN.png``: 8-bit palette PNG whose palette *index* is the Cityscapes labelId.
  Read as indices with Pillow; converting to RGB or reading with OpenCV gives colours.
* SYNTHIA ``GT/LABELS/NNNNNNN.png``: 16-bit, 3-channel PNG, class id in the red channel, instance id
  in green. OpenCV with ``IMREAD_UNCHANGED`` returns BGR, so the class is channel 2 there; Pillow keeps
  only the high byte of each sample and returns zeros, so it must not be used.
* ``*_labelTrainIds.png`` (written by ``prepare.py``): 8-bit single channel, trainIds 0..18 and 255.

Every writer is atomic (temporary file in the same folder, then ``os.replace``), so an interrupted
run never leaves a half-written PNG behind.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from benchmark.classes import (
    CITYSCAPES_ID_TO_TRAIN_ID,
    CITYSCAPES_VALID_IDS,
    IGNORE_INDEX,
    NUM_CLASSES,
    SYNTHIA_ID_TO_TRAIN_ID,
    SYNTHIA_VALID_IDS,
    lookup_table,
)

FAMILIES = ("gta", "synthia", "cityscapes")

_CITYSCAPES_TABLE = lookup_table(CITYSCAPES_ID_TO_TRAIN_ID)
_SYNTHIA_TABLE = lookup_table(SYNTHIA_ID_TO_TRAIN_ID)

#: Cityscapes colours by labelId (cityscapesScripts ``labels.py``), used as the GTA5 palette.
_CITYSCAPES_COLOURS = {
    0: (0, 0, 0), 1: (0, 0, 0), 2: (0, 0, 0), 3: (0, 0, 0), 4: (0, 0, 0), 5: (111, 74, 0),
    6: (81, 0, 81), 7: (128, 64, 128), 8: (244, 35, 232), 9: (250, 170, 160), 10: (230, 150, 140),
    11: (70, 70, 70), 12: (102, 102, 156), 13: (190, 153, 153), 14: (180, 165, 180),
    15: (150, 100, 100), 16: (150, 120, 90), 17: (153, 153, 153), 18: (153, 153, 153),
    19: (250, 170, 30), 20: (220, 220, 0), 21: (107, 142, 35), 22: (152, 251, 152),
    23: (70, 130, 180), 24: (220, 20, 60), 25: (255, 0, 0), 26: (0, 0, 142), 27: (0, 0, 70),
    28: (0, 60, 100), 29: (0, 0, 90), 30: (0, 0, 110), 31: (0, 80, 100), 32: (0, 0, 230),
    33: (119, 11, 32),
}  # fmt: skip
GTA_PALETTE: list[int] = [
    channel for label_id in range(256) for channel in _CITYSCAPES_COLOURS.get(label_id, (0, 0, 0))
]


class DatasetFormatError(ValueError):
    """A dataset file is missing, unreadable or not in the format its dataset defines."""


# --------------------------------------------------------------------------------------------
# reading


def _open_pil(path: Path) -> Image.Image:
    if not path.is_file():
        raise DatasetFormatError(f"{path}: file not found")
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError) as error:
        raise DatasetFormatError(f"{path}: not a readable image ({error})") from error
    return image


def read_image(path: Path | str) -> np.ndarray:
    """An RGB image as a (H, W, 3) uint8 array."""
    return np.asarray(_open_pil(Path(path)).convert("RGB"))


def image_size(path: Path | str) -> tuple[int, int]:
    """(height, width) read from the file header only."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"{path}: file not found")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, SyntaxError) as error:
        raise DatasetFormatError(f"{path}: not a readable image ({error})") from error
    return height, width


def _describe(valid: frozenset[int]) -> str:
    ordered = sorted(valid)
    runs, start = [], ordered[0]
    for previous, current in zip(ordered, ordered[1:] + [None]):
        if current != previous + 1 if current is not None else True:
            runs.append(f"{start}..{previous}" if previous != start else f"{start}")
            start = current
    return ", ".join(runs)


def _check_ids(path: Path, ids: np.ndarray, valid: frozenset[int], what: str) -> np.ndarray:
    present = np.unique(ids)
    bad = [int(v) for v in present if int(v) not in valid]
    if bad:
        raise DatasetFormatError(
            f"{path}: label values {bad[:10]} are not valid {what}s (expected "
            f"{_describe(valid)}); is this file really in this dataset's label format?"
        )
    return ids


def read_cityscapes_label_ids(path: Path | str) -> np.ndarray:
    """Cityscapes ``*_gtFine_labelIds.png`` as (H, W) uint8 labelIds 0..33."""
    path = Path(path)
    image = _open_pil(path)
    if image.mode not in ("L", "P"):
        raise DatasetFormatError(
            f"{path}: expected an 8-bit single-channel labelIds PNG (mode L), got mode {image.mode}"
        )
    return _check_ids(path, np.asarray(image), CITYSCAPES_VALID_IDS, "Cityscapes labelId")


def read_gta_label_ids(path: Path | str) -> np.ndarray:
    """GTA5 ``labels/NNNNN.png`` as (H, W) uint8 Cityscapes labelIds (the palette indices)."""
    path = Path(path)
    image = _open_pil(path)
    if image.mode not in ("P", "L"):
        raise DatasetFormatError(
            f"{path}: expected an 8-bit palette PNG whose indices are Cityscapes labelIds, got mode "
            f"{image.mode} (a colour rendering of the label cannot be decoded reliably)"
        )
    return _check_ids(path, np.asarray(image), CITYSCAPES_VALID_IDS, "Cityscapes labelId")


def read_synthia_label_ids(path: Path | str) -> np.ndarray:
    """SYNTHIA ``GT/LABELS/*.png`` class channel as (H, W) uint16 SYNTHIA class ids 0..22."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"{path}: file not found")
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise DatasetFormatError(f"{path}: not a readable PNG")
    if raw.dtype != np.uint16 or raw.ndim != 3 or raw.shape[2] != 3:
        channels = 1 if raw.ndim == 2 else raw.shape[2]
        raise DatasetFormatError(
            f"{path}: expected a SYNTHIA GT/LABELS PNG with 16 bits per channel and 3 channels "
            f"(class id in red), got {raw.dtype.itemsize * 8}-bit with {channels} channel(s)"
        )
    class_ids = raw[:, :, 2]  # OpenCV returns BGR: red, the class channel, is last
    return _check_ids(path, class_ids, SYNTHIA_VALID_IDS, "SYNTHIA class id")


def read_train_ids(path: Path | str) -> np.ndarray:
    """A ``*_labelTrainIds.png`` as (H, W) uint8 trainIds 0..18 and 255."""
    path = Path(path)
    image = _open_pil(path)
    if image.mode != "L":
        raise DatasetFormatError(f"{path}: expected an 8-bit single-channel trainId PNG, got {image.mode}")
    return _check_ids(path, np.asarray(image), frozenset(range(NUM_CLASSES)) | {IGNORE_INDEX}, "trainId")


READ_LABEL_IDS = {
    "gta": read_gta_label_ids,
    "synthia": read_synthia_label_ids,
    "cityscapes": read_cityscapes_label_ids,
}


def to_train_ids(label_ids: np.ndarray, family: str) -> np.ndarray:
    """Map dataset label ids to trainIds (DESIGN.md section 6); unmapped ids become 255."""
    table = _SYNTHIA_TABLE if family == "synthia" else _CITYSCAPES_TABLE
    return table[label_ids]


def read_label_as_train_ids(path: Path | str, family: str) -> np.ndarray:
    """Read a label in its dataset's own format and convert it to (H, W) uint8 trainIds."""
    return to_train_ids(READ_LABEL_IDS[family](path), family)


# --------------------------------------------------------------------------------------------
# writing


def write_bytes_atomic(path: Path | str, data: bytes) -> bool:
    """Write ``data`` to ``path`` via a temporary file and rename; skip if the file already holds it.

    Returns True when the file was (re)written. Skipping identical content keeps re-runs idempotent
    down to the modification time, which DVC and make-like tools look at.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_image(rgb: np.ndarray) -> bytes:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.dtype} {rgb.shape}")
    return _png_bytes(Image.fromarray(rgb))


def _check_2d_uint8(ids: np.ndarray, what: str) -> None:
    if ids.ndim != 2 or ids.dtype != np.uint8:
        raise ValueError(f"expected an (H, W) uint8 {what} array, got {ids.dtype} {ids.shape}")


def encode_gray_ids(ids: np.ndarray) -> bytes:
    """8-bit single-channel PNG (Cityscapes labelIds and labelTrainIds)."""
    _check_2d_uint8(ids, "label")
    return _png_bytes(Image.fromarray(ids))


def encode_gta_label(label_ids: np.ndarray) -> bytes:
    """8-bit palette PNG: index = Cityscapes labelId, palette = Cityscapes colours (as GTA5 ships)."""
    _check_2d_uint8(label_ids, "labelId")
    height, width = label_ids.shape
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(label_ids).tobytes())
    image.putpalette(GTA_PALETTE)
    return _png_bytes(image)


def encode_synthia_label(class_ids: np.ndarray, instance_ids: np.ndarray | None = None) -> bytes:
    """16-bit 3-channel PNG: red = SYNTHIA class id, green = instance id, blue = 0."""
    if class_ids.ndim != 2:
        raise ValueError(f"expected an (H, W) class-id array, got {class_ids.shape}")
    if instance_ids is None:
        instance_ids = np.zeros_like(class_ids)
    bgr = np.stack(
        [np.zeros_like(class_ids), instance_ids, class_ids], axis=-1
    ).astype(np.uint16)
    ok, buffer = cv2.imencode(".png", bgr)
    if not ok:
        raise RuntimeError("OpenCV failed to encode a 16-bit PNG")
    return buffer.tobytes()
