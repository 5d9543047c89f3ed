"""Shared test fixtures: paths to the real-format samples and builders of tiny dataset roots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmark.formats import encode_gray_ids, encode_gta_label, encode_image, encode_synthia_label, write_bytes_atomic

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_FORMAT = SHARED / "fixtures" / "real_format"


@pytest.fixture
def real_format() -> Path:
    assert REAL_FORMAT.is_dir(), f"{REAL_FORMAT} is missing: the tests read the shared real-format samples"
    return REAL_FORMAT


def random_image(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)


def write_gta_root(root: Path, labels: list[np.ndarray], seed: int = 0) -> Path:
    """A GTA5-layout root whose i-th frame has label ids ``labels[i]`` and a random image of its size."""
    rng = np.random.default_rng(seed)
    for i, label_ids in enumerate(labels):
        write_bytes_atomic(root / "images" / f"{i + 1:05d}.png", encode_image(random_image(rng, label_ids.shape)))
        write_bytes_atomic(root / "labels" / f"{i + 1:05d}.png", encode_gta_label(label_ids))
    return root


def write_synthia_root(root: Path, labels: list[np.ndarray], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i, class_ids in enumerate(labels):
        instances = rng.integers(0, 500, size=class_ids.shape).astype(np.uint16)
        write_bytes_atomic(root / "RGB" / f"{i:07d}.png", encode_image(random_image(rng, class_ids.shape)))
        write_bytes_atomic(root / "GT" / "LABELS" / f"{i:07d}.png", encode_synthia_label(class_ids, instances))
    return root


def write_cityscapes_root(root: Path, train: list[np.ndarray], val: list[np.ndarray], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, labels, city in (("train", train, "aachen"), ("val", val, "frankfurt")):
        for i, label_ids in enumerate(labels):
            base = f"{city}_{i:06d}_000019"
            image = random_image(rng, label_ids.shape)
            write_bytes_atomic(root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png", encode_image(image))
            write_bytes_atomic(root / "gtFine" / split / city / f"{base}_gtFine_labelIds.png", encode_gray_ids(label_ids))
    return root
