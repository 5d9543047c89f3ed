"""Prepare a dataset root: trainId labels, per-class pixel statistics and split manifests.

    python benchmark/prepare.py --dataset {gta,synthia,cityscapes} --root DIR

Works the same on the real datasets and the embedded mini ones. For every frame it reads the label
in the dataset's own format (checked: wrong encodings and unknown ids are errors naming the file),
maps it to trainIds (DESIGN.md section 6), writes ``*_labelTrainIds.png`` next to the original,
counts the pixels of each class and hashes the image and label bytes. It then writes the split
manifests (see ``benchmark/manifests.py``). Re-running it is idempotent: files whose content would
not change are not rewritten.

An image whose label has a different size (real GTA5 has such frames) gets its label resized with
nearest-neighbour interpolation by default, and the frames are listed; ``--on-size-mismatch skip``
leaves them out instead and ``error`` stops.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from benchmark.classes import NUM_CLASSES
from benchmark.formats import (
    FAMILIES,
    DatasetFormatError,
    encode_gray_ids,
    image_size,
    read_label_as_train_ids,
    write_bytes_atomic,
)
from benchmark.layouts import Frame, list_frames
from benchmark.manifests import Manifest, ManifestFrame, save_manifest

SIZE_MISMATCH_POLICIES = ("resize", "skip", "error")
#: Below this many frames, worker processes cost more than they save.
_PARALLEL_THRESHOLD = 256


@dataclass(frozen=True)
class _FrameResult:
    frame: ManifestFrame | None
    resized: bool = False
    skip_reason: str | None = None


@dataclass(frozen=True)
class _Job:
    root: Path
    family: str
    frame: Frame
    on_size_mismatch: str
    skip_bad: bool


def _prepare_frame(job: _Job) -> _FrameResult:
    root, frame = job.root, job.frame
    try:
        if not (root / frame.label).is_file():
            raise DatasetFormatError(f"{root / frame.image}: image without its label (expected {root / frame.label})")
        train_ids = read_label_as_train_ids(root / frame.label, job.family)
        image_shape = image_size(root / frame.image)
        resized = False
        if train_ids.shape != image_shape:
            message = (
                f"{root / frame.label}: label is {train_ids.shape[1]}x{train_ids.shape[0]} but its image "
                f"{root / frame.image} is {image_shape[1]}x{image_shape[0]} (width x height)"
            )
            if job.on_size_mismatch == "error":
                raise DatasetFormatError(message + "; pass --on-size-mismatch resize or skip")
            if job.on_size_mismatch == "skip":
                return _FrameResult(None, skip_reason=message)
            train_ids = cv2.resize(train_ids, image_shape[::-1], interpolation=cv2.INTER_NEAREST)
            resized = True
        encoded = encode_gray_ids(train_ids)
        write_bytes_atomic(root / frame.train_ids, encoded)
        class_pixels = np.bincount(train_ids.ravel(), minlength=256)[:NUM_CLASSES]
        image_sha = hashlib.sha256((root / frame.image).read_bytes()).hexdigest()
    except DatasetFormatError as error:
        if job.skip_bad:
            return _FrameResult(None, skip_reason=str(error))
        raise
    return _FrameResult(
        ManifestFrame(
            image=frame.image,
            label=frame.train_ids,
            class_pixels=tuple(int(n) for n in class_pixels),
            image_sha256=image_sha,
            label_sha256=hashlib.sha256(encoded).hexdigest(),
        ),
        resized=resized,
    )


def _prepare_frames(jobs: list[_Job], description: str, workers: int) -> list[_FrameResult]:
    progress = dict(total=len(jobs), desc=description, unit="frame", disable=None, leave=False)
    if workers <= 1 or len(jobs) < _PARALLEL_THRESHOLD:
        return [_prepare_frame(job) for job in tqdm(jobs, **progress)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(_prepare_frame, jobs, chunksize=32), **progress))


def _manifest(family: str, split: str, frames: list[Frame], results: list[_FrameResult]) -> Manifest:
    return Manifest(
        dataset=family,
        split=split,
        frames=[result.frame for result in results if result.frame is not None],
        skipped=[
            {"image": frame.image, "reason": result.skip_reason}
            for frame, result in zip(frames, results)
            if result.skip_reason is not None
        ],
        label_resized=[frame.image for frame, result in zip(frames, results) if result.resized],
    )


def select_holdout(num_frames: int, fraction: float, seed: int) -> np.ndarray:
    """Indices of the target-train frames held out as the labelled ``target_select`` split."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--select-fraction must be in (0, 1), got {fraction}")
    count = max(1, round(num_frames * fraction))
    if count >= num_frames:
        raise DatasetFormatError(
            f"cannot hold out {count} of {num_frames} Cityscapes train frames for target_select; "
            "the train split is too small"
        )
    return np.sort(np.random.default_rng(seed).permutation(num_frames)[:count])


def prepare(
    family: str,
    root: Path | str,
    *,
    on_size_mismatch: str = "resize",
    skip_bad: bool = False,
    select_fraction: float = 0.1,
    select_seed: int = 0,
    workers: int = 2,
) -> list[Manifest]:
    """Convert the labels of one dataset root and write its split manifests; return the manifests."""
    if family not in FAMILIES:
        raise ValueError(f"unknown dataset {family!r}; expected one of {', '.join(FAMILIES)}")
    if on_size_mismatch not in SIZE_MISMATCH_POLICIES:
        raise ValueError(f"--on-size-mismatch must be one of {SIZE_MISMATCH_POLICIES}, got {on_size_mismatch!r}")
    root = Path(root)
    splits = {"source_train": "all"} if family != "cityscapes" else {"target_train": "train", "target_test": "val"}
    manifests = []
    for split, folder in splits.items():
        frames = list_frames(family, root, None if family != "cityscapes" else folder)
        jobs = [_Job(root, family, frame, on_size_mismatch, skip_bad) for frame in frames]
        results = _prepare_frames(jobs, f"{family} {folder}", workers)
        if split == "target_train":
            held_out = select_holdout(len(frames), select_fraction, select_seed).tolist()
            kept = sorted(set(range(len(frames))) - set(held_out))
            manifests.append(
                _manifest(family, "target_select", [frames[i] for i in held_out], [results[i] for i in held_out])
            )
            manifests.append(_manifest(family, split, [frames[i] for i in kept], [results[i] for i in kept]))
        else:
            manifests.append(_manifest(family, split, frames, results))
    for manifest in manifests:
        save_manifest(root, manifest)
    return manifests


def _report(root: Path, manifests: list[Manifest]) -> None:
    for manifest in manifests:
        print(
            f"{root}/manifests/{manifest.split}.json: {len(manifest.frames)} frames, "
            f"content hash {manifest.content_hash[:12]}",
            file=sys.stderr,
        )
        if manifest.label_resized:
            shown = ", ".join(manifest.label_resized[:5]) + (" ..." if len(manifest.label_resized) > 5 else "")
            print(
                f"  {len(manifest.label_resized)} label(s) had another size than their image and were "
                f"resized with nearest neighbour: {shown}",
                file=sys.stderr,
            )
        for skipped in manifest.skipped:
            print(f"  skipped {skipped['image']}: {skipped['reason']}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=FAMILIES, help="dataset family of the root")
    parser.add_argument("--root", required=True, type=Path, help="dataset root folder")
    parser.add_argument(
        "--on-size-mismatch",
        choices=SIZE_MISMATCH_POLICIES,
        default="resize",
        help="what to do with a label whose size differs from its image (default: resize, nearest neighbour)",
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out unreadable or wrongly encoded frames (listed in the manifest) instead of stopping",
    )
    parser.add_argument(
        "--select-fraction",
        type=float,
        default=0.1,
        help="Cityscapes: fraction of train frames held out as the labelled target_select split (default 0.1)",
    )
    parser.add_argument("--select-seed", type=int, default=0, help="Cityscapes: seed of the target_select hold-out")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args(argv)
    try:
        manifests = prepare(
            args.dataset,
            args.root,
            on_size_mismatch=args.on_size_mismatch,
            skip_bad=args.skip_bad,
            select_fraction=args.select_fraction,
            select_seed=args.select_seed,
            workers=args.workers,
        )
    except (DatasetFormatError, ValueError) as error:
        print(f"prepare.py: error: {error}", file=sys.stderr)
        return 2
    _report(args.root, manifests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
