"""Generate the embedded mini datasets in the real on-disk formats.

    python benchmark/generate.py --dataset gta --root data/mini/gta --count 600
    python benchmark/generate.py --dataset synthia --root data/mini/synthia --count 600
    python benchmark/generate.py --dataset cityscapes --root data/mini/cityscapes --train 600 --val 200

Scenes come from ``benchmark/scenes.py`` (one style per dataset, so sources and target differ in
appearance and layout) and are written exactly as the real datasets store them (DESIGN.md
section 6), so the real readers and ``prepare.py`` run on the default path:

* ``gta``: ``images/NNNNN.png`` (RGB) and ``labels/NNNNN.png`` (8-bit palette PNG, index = Cityscapes
  labelId). Like the real GTA5, a few labels have another size than their image
  (``--mismatched-labels``), which ``prepare.py`` resizes and reports.
* ``synthia``: ``RGB/NNNNNNN.png`` and ``GT/LABELS/NNNNNNN.png`` (16-bit, 3-channel; SYNTHIA class
  id in red, instance id in green); lane markings carry SYNTHIA's own ``lanemarking`` id (ignored).
* ``cityscapes``: ``leftImg8bit/{train,val}/{city}/{city}_{seq}_000019_leftImg8bit.png`` and
  ``gtFine/.../*_gtFine_labelIds.png``; the ego vehicle carries labelId 1 (ignored).

Every frame has its own seed derived from (``--seed``, dataset, split, index), so output does not
depend on the number of worker processes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from benchmark.classes import (
    CITYSCAPES_ID_TO_TRAIN_ID,
    IGNORE_INDEX,
    SYNTHIA_ID_TO_TRAIN_ID,
    SYNTHIA_LANEMARKING_ID,
    THING_CLASSES,
    TRAIN_ID,
    invert,
    lookup_table,
)
from benchmark.formats import (
    FAMILIES,
    encode_gray_ids,
    encode_gta_label,
    encode_image,
    encode_synthia_label,
    write_bytes_atomic,
)
from benchmark.scenes import STYLES, Scene, render_scene

MARKER = "GENERATED.json"
CITIES = {"train": ("aachen", "bochum", "bremen"), "val": ("frankfurt", "lindau", "munster")}
_FOLDERS = {"gta": ("images", "labels"), "synthia": ("RGB", "GT"), "cityscapes": ("leftImg8bit", "gtFine")}
_FAMILY_INDEX = {family: i for i, family in enumerate(FAMILIES)}
_SPLIT_INDEX = {"all": 0, "train": 1, "val": 2}

_CITYSCAPES_TO_TRAIN = lookup_table(CITYSCAPES_ID_TO_TRAIN_ID, size=256)
#: Cityscapes labelId -> SYNTHIA class id, through the shared trainId; ids Cityscapes does not
#: evaluate become SYNTHIA's own unevaluated classes (parking -> parking-slot, ground -> road-work,
#: everything else -> void).
_CITYSCAPES_TO_SYNTHIA = np.zeros(256, dtype=np.uint16)
for _label_id, _train_id in CITYSCAPES_ID_TO_TRAIN_ID.items():
    _CITYSCAPES_TO_SYNTHIA[_label_id] = invert(SYNTHIA_ID_TO_TRAIN_ID)[_train_id]
_CITYSCAPES_TO_SYNTHIA[9] = 13
_CITYSCAPES_TO_SYNTHIA[6] = 14
_THING_TRAIN_IDS = np.array([TRAIN_ID[name] for name in THING_CLASSES])


def intended_train_ids(scene: Scene, family: str) -> np.ndarray:
    """The trainIds a correct reader + converter must recover from this scene's written label."""
    train_ids = _CITYSCAPES_TO_TRAIN[scene.label_ids]
    if family == "synthia":
        train_ids = np.where(scene.lane_marking, IGNORE_INDEX, train_ids).astype(np.uint8)
    return train_ids


def synthia_label(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """(class ids, instance ids), both (H, W) uint16: SYNTHIA's two label channels."""
    class_ids = _CITYSCAPES_TO_SYNTHIA[scene.label_ids]
    class_ids[scene.lane_marking] = SYNTHIA_LANEMARKING_ID
    train_ids = _CITYSCAPES_TO_TRAIN[scene.label_ids]
    things = np.isin(train_ids, _THING_TRAIN_IDS).astype(np.uint8)
    _, instances = cv2.connectedComponents(things, connectivity=4)
    return class_ids, instances.astype(np.uint16)


@dataclass(frozen=True)
class _FrameJob:
    family: str
    root: Path
    image_path: str
    label_path: str
    split: str
    index: int
    seed: int
    height: int
    width: int
    label_size: tuple[int, int] | None = None  # (H, W) of a deliberately mismatched label


def frame_seed(seed: int, family: str, split: str, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, _FAMILY_INDEX[family], _SPLIT_INDEX[split], index])


def render_frame(family: str, seed: int, split: str, index: int, height: int, width: int) -> Scene:
    """The scene of one frame; the same arguments always give the same scene."""
    rng = np.random.default_rng(frame_seed(seed, family, split, index))
    return render_scene(rng, STYLES[family], height, width)


def _write_frame(job: _FrameJob) -> None:
    scene = render_frame(job.family, job.seed, job.split, job.index, job.height, job.width)
    write_bytes_atomic(job.root / job.image_path, encode_image(scene.image))
    if job.family == "gta":
        label_ids = scene.label_ids
        if job.label_size is not None:
            label_ids = cv2.resize(label_ids, job.label_size[::-1], interpolation=cv2.INTER_NEAREST)
        encoded = encode_gta_label(label_ids)
    elif job.family == "synthia":
        encoded = encode_synthia_label(*synthia_label(scene))
    else:
        encoded = encode_gray_ids(scene.label_ids)
    write_bytes_atomic(job.root / job.label_path, encoded)


def frame_jobs(
    family: str,
    root: Path,
    *,
    count: int = 0,
    train: int = 0,
    val: int = 0,
    height: int,
    width: int,
    seed: int,
    mismatched_labels: int = 0,
) -> list[_FrameJob]:
    """Where each frame of the dataset goes and how it is made."""
    common = dict(family=family, root=root, seed=seed, height=height, width=width)
    if family == "gta":
        mismatched = set(np.linspace(0, count - 1, mismatched_labels + 2, dtype=int)[1:-1].tolist())
        return [
            _FrameJob(
                image_path=f"images/{i + 1:05d}.png",
                label_path=f"labels/{i + 1:05d}.png",
                split="all",
                index=i,
                label_size=(height + 4, width + 6) if i in mismatched else None,
                **common,
            )
            for i in range(count)
        ]
    if family == "synthia":
        return [
            _FrameJob(image_path=f"RGB/{i:07d}.png", label_path=f"GT/LABELS/{i:07d}.png", split="all", index=i, **common)
            for i in range(count)
        ]
    jobs = []
    for split, number in (("train", train), ("val", val)):
        cities = CITIES[split]
        for i in range(number):
            city = cities[i % len(cities)]
            base = f"{city}_{i // len(cities):06d}_000019"
            jobs.append(
                _FrameJob(
                    image_path=f"leftImg8bit/{split}/{city}/{base}_leftImg8bit.png",
                    label_path=f"gtFine/{split}/{city}/{base}_gtFine_labelIds.png",
                    split=split,
                    index=i,
                    **common,
                )
            )
    return jobs


def _clear(root: Path, family: str) -> None:
    """Remove a previous generation so no stale frame survives; refuse to touch anything else."""
    if not root.exists():
        return
    if any(root.iterdir()) and not (root / MARKER).is_file():
        raise FileExistsError(
            f"{root} exists and was not written by benchmark/generate.py (no {MARKER}); "
            "refusing to overwrite it: choose an empty or new --root"
        )
    for folder in (*_FOLDERS[family], "manifests"):
        shutil.rmtree(root / folder, ignore_errors=True)
    (root / MARKER).unlink(missing_ok=True)


def generate(family: str, root: Path | str, *, workers: int = 2, **sizes) -> int:
    """Write one mini dataset; returns the number of frames."""
    if family not in FAMILIES:
        raise ValueError(f"unknown dataset {family!r}; expected one of {', '.join(FAMILIES)}")
    root = Path(root)
    needed = ("train", "val") if family == "cityscapes" else ("count",)
    missing = [name for name in needed if sizes.get(name, 0) <= 0]
    if missing:
        raise ValueError(f"{family}: give a positive --{' and --'.join(missing)}")
    jobs = frame_jobs(family, root, **sizes)
    _clear(root, family)
    progress = dict(total=len(jobs), desc=f"generate {family}", unit="frame", disable=None, leave=False)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for _ in tqdm(pool.map(_write_frame, jobs, chunksize=16), **progress):
                pass
    else:
        for job in tqdm(jobs, **progress):
            _write_frame(job)
    marker = {"dataset": family, "frames": len(jobs)} | {k: v for k, v in sizes.items() if v}
    write_bytes_atomic(root / MARKER, (json.dumps(marker, indent=1) + "\n").encode())
    return len(jobs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=FAMILIES)
    parser.add_argument("--root", required=True, type=Path, help="output folder (created; replaced if generated before)")
    parser.add_argument("--count", type=int, default=0, help="gta/synthia: number of frames")
    parser.add_argument("--train", type=int, default=0, help="cityscapes: frames in the train split")
    parser.add_argument("--val", type=int, default=0, help="cityscapes: frames in the val split")
    parser.add_argument("--height", type=int, required=True)
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mismatched-labels", type=int, default=0, help="gta: labels written at another size")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        frames = generate(
            args.dataset,
            args.root,
            workers=args.workers,
            count=args.count,
            train=args.train,
            val=args.val,
            height=args.height,
            width=args.width,
            seed=args.seed,
            mismatched_labels=args.mismatched_labels,
        )
    except (ValueError, FileExistsError) as error:
        print(f"generate.py: error: {error}", file=sys.stderr)
        return 2
    print(f"{args.root}: {frames} {args.dataset} frames", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
