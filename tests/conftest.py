"""Shared test fixtures: paths to the real-format samples and builders of tiny dataset roots."""

from __future__ import annotations

import os
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

# One intra-op thread, here and in the processes tests start (train.py, torchrun): the tensors of the
# tests are tiny, and on a shared CPU a second thread spins against other processes (a 4-step run
# took 15x longer with two). Results also depend on the thread count, so a test comparing a run in
# this process with one in a child process needs both on the same count.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
# The tests run on the CPU even where a GPU is visible: runs they compare must share a device, and
# the torchrun test starts more processes than a one-GPU machine has GPUs.
os.environ["CUDA_VISIBLE_DEVICES"] = ""


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


TINY_SIZE = dict(height=64, width=128)


def tiny_params(data_root: Path) -> dict:
    """A parameter file's content for 4-step runs on the tiny data of ``data_root`` (seconds on a CPU)."""
    return {
        "profile": "tiny",
        "profiles": {
            "tiny": {
                "model": {"encoder": "efficientvit_b0", "head": "daformer", "embed_dim": 16},
                "optim": {"lr": 1e-3, "warmup_steps": 2, "steps": 4, "batch_size": 2},
                "warm_start": {"steps": 2, "lr": 1e-3},
                "eval": {"batch_size": 4, "interval": 2},
                "checkpoint_interval": 2,
                "log_interval": 1,
            }
        },
        "benchmarks": {
            "mini-gta2cs": {
                "protocol": "gta2cs",
                "source": {"family": "gta", "root": str(data_root / "gta"), "scale": [48, 96]},
                "target": {"family": "cityscapes", "root": str(data_root / "cityscapes"), "scale": [32, 64]},
                "crop": [32, 32],
                "test_scale": [32, 64],
                "rcs_min_pixels": 4,
                "cache": True,
            }
        },
        "methods": {"daformer": {}},
    }


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """Tiny GTA5-like and Cityscapes-like datasets, generated and prepared like the mini benchmarks."""
    from benchmark import generate, prepare

    root = tmp_path_factory.mktemp("mini")
    generate.generate("gta", root / "gta", count=8, seed=0, workers=1, **TINY_SIZE)
    prepare.prepare("gta", root / "gta")
    generate.generate("cityscapes", root / "cityscapes", train=10, val=4, seed=0, workers=1, **TINY_SIZE)
    prepare.prepare("cityscapes", root / "cityscapes", select_fraction=0.2)
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
