"""Shared test fixtures: paths to the real-format samples and builders of tiny dataset roots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.formats import encode_gray_ids, encode_gta_label, encode_image, encode_synthia_label, write_bytes_atomic

# The test tensors are tiny: intra-op threads gain nothing on them and, on a CPU shared with other
# processes, spinning thread pools make each operator many times slower.
torch.set_num_threads(1)

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


def tiny_model():
    """The smallest segmentor the methods train in tests: efficientvit_b0 with a 16-wide DAFormer head."""
    from benchmark.classes import NUM_CLASSES
    from benchmark.models import build_segmentor

    torch.manual_seed(0)
    return build_segmentor("efficientvit_b0", "daformer", NUM_CLASSES, 16)


def two_class_batch(seed: int, size: int = 32):
    """Two random images labelled road on the left half and car on the right (255 in the top rows)."""
    from methods.base import Batch

    generator = torch.Generator().manual_seed(seed)
    label = torch.zeros(2, size, size, dtype=torch.long)
    label[:, :, size // 2 :] = 13
    label[:, :2] = 255
    return Batch(torch.randn(2, 3, size, size, generator=generator), label)
