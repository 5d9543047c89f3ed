"""Where each dataset keeps its images and labels (DESIGN.md section 6).

The same layouts hold for the real datasets and the embedded mini ones:

==========  ==============================================  =====================================================
family      image                                            label (dataset format) -> converted trainIds
==========  ==============================================  =====================================================
gta         ``images/NNNNN.png``                             ``labels/NNNNN.png`` -> ``labels/NNNNN_labelTrainIds.png``
synthia     ``RGB/NNNNNNN.png``                              ``GT/LABELS/NNNNNNN.png`` -> ``..._labelTrainIds.png``
cityscapes  ``leftImg8bit/{split}/{city}/X_leftImg8bit.png``  ``gtFine/{split}/{city}/X_gtFine_labelIds.png``
                                                             -> ``X_gtFine_labelTrainIds.png``
==========  ==============================================  =====================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmark.formats import FAMILIES, DatasetFormatError

TRAIN_ID_SUFFIX = "_labelTrainIds.png"
CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit.png"
CITYSCAPES_LABEL_SUFFIX = "_gtFine_labelIds.png"
CITYSCAPES_TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"

#: What a root of each family must contain, for error messages.
EXPECTED_LAYOUT = {
    "gta": "images/NNNNN.png and labels/NNNNN.png",
    "synthia": "RGB/NNNNNNN.png and GT/LABELS/NNNNNNN.png",
    "cityscapes": "leftImg8bit/{train,val}/CITY/*_leftImg8bit.png and gtFine/{train,val}/CITY/*_gtFine_labelIds.png",
}


@dataclass(frozen=True)
class Frame:
    """One image and its label, as paths relative to the dataset root."""

    image: str
    label: str
    train_ids: str


def _require_dir(root: Path, relative: str, family: str) -> Path:
    if not root.is_dir():
        raise DatasetFormatError(
            f"dataset root {root} does not exist (expected the {family} layout: {EXPECTED_LAYOUT[family]})"
        )
    folder = root / relative
    if not folder.is_dir():
        raise DatasetFormatError(
            f"{folder}: folder not found (expected the {family} layout under {root}: {EXPECTED_LAYOUT[family]})"
        )
    return folder


def _flat_frames(root: Path, family: str, image_dir: str, label_dir: str) -> list[Frame]:
    images = _require_dir(root, image_dir, family)
    _require_dir(root, label_dir, family)
    frames = []
    for image in sorted(images.glob("*.png")):
        frames.append(
            Frame(
                image=f"{image_dir}/{image.name}",
                label=f"{label_dir}/{image.name}",
                train_ids=f"{label_dir}/{image.stem}{TRAIN_ID_SUFFIX}",
            )
        )
    if not frames:
        raise DatasetFormatError(f"{images}: no PNG images found (expected {EXPECTED_LAYOUT[family]})")
    return frames


def _cityscapes_frames(root: Path, split: str) -> list[Frame]:
    images = _require_dir(root, f"leftImg8bit/{split}", "cityscapes")
    _require_dir(root, f"gtFine/{split}", "cityscapes")
    frames = []
    for image in sorted(images.glob(f"*/*{CITYSCAPES_IMAGE_SUFFIX}")):
        city = image.parent.name
        base = image.name[: -len(CITYSCAPES_IMAGE_SUFFIX)]
        frames.append(
            Frame(
                image=f"leftImg8bit/{split}/{city}/{image.name}",
                label=f"gtFine/{split}/{city}/{base}{CITYSCAPES_LABEL_SUFFIX}",
                train_ids=f"gtFine/{split}/{city}/{base}{CITYSCAPES_TRAIN_ID_SUFFIX}",
            )
        )
    if not frames:
        raise DatasetFormatError(f"{images}: no *{CITYSCAPES_IMAGE_SUFFIX} images found in its city folders")
    return frames


def list_frames(family: str, root: Path | str, split: str | None = None) -> list[Frame]:
    """All frames of a dataset root, sorted; ``split`` ("train", "val") is for Cityscapes only.

    Labels are not checked here: a missing label is reported per frame by ``prepare.py``.
    """
    root = Path(root)
    if family == "gta":
        return _flat_frames(root, family, "images", "labels")
    if family == "synthia":
        return _flat_frames(root, family, "RGB", "GT/LABELS")
    if family == "cityscapes":
        if split is None:
            raise ValueError("Cityscapes frames are listed per split: pass split='train' or 'val'")
        return _cityscapes_frames(root, split)
    raise ValueError(f"unknown dataset family {family!r}; expected one of {', '.join(FAMILIES)}")
