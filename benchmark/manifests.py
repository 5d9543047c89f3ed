"""Split manifests: the file lists every run trains and evaluates on, with a content hash.

``prepare.py`` writes one JSON file per split into ``<root>/manifests/``:

* GTA5 / SYNTHIA roots: ``source_train.json``.
* Cityscapes roots: ``target_train.json`` (adaptation images; labels only for the oracle),
  ``target_select.json`` (labelled, held out of ``target_train``; for model selection and tuning
  only) and ``target_test.json`` (the ``val`` split; for the leaderboard only).

Each manifest holds the frames (image and trainId label, relative to the root), their per-class
pixel counts (what rare-class sampling needs) and ``content_hash``: the SHA-256 over every listed
file's path and bytes. A run records the hashes of the manifests it used and aggregation refuses to
average runs whose hashes differ.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmark.classes import NUM_CLASSES
from benchmark.formats import DatasetFormatError, write_bytes_atomic

FORMAT_VERSION = 1
SOURCE_SPLITS = ("source_train",)
TARGET_SPLITS = ("target_train", "target_select", "target_test")
SPLITS = SOURCE_SPLITS + TARGET_SPLITS


@dataclass(frozen=True)
class ManifestFrame:
    image: str
    label: str
    #: Pixels of each trainId 0..18 in the converted label.
    class_pixels: tuple[int, ...]
    image_sha256: str
    label_sha256: str


@dataclass
class Manifest:
    dataset: str
    split: str
    frames: list[ManifestFrame]
    #: Frames left out, each with the reason (only with ``prepare.py --skip-bad``).
    skipped: list[dict] = field(default_factory=list)
    #: Frames whose label had another size than the image and was resized (nearest neighbour).
    label_resized: list[str] = field(default_factory=list)

    @property
    def content_hash(self) -> str:
        digest = hashlib.sha256()
        for frame in self.frames:
            line = f"{frame.image}\t{frame.image_sha256}\t{frame.label}\t{frame.label_sha256}\n"
            digest.update(line.encode())
        return digest.hexdigest()

    @property
    def class_pixels(self) -> list[int]:
        totals = [0] * NUM_CLASSES
        for frame in self.frames:
            for train_id, count in enumerate(frame.class_pixels):
                totals[train_id] += count
        return totals

    def to_json(self) -> str:
        document = {
            "format_version": FORMAT_VERSION,
            "dataset": self.dataset,
            "split": self.split,
            "content_hash": self.content_hash,
            "num_frames": len(self.frames),
            "class_pixels": self.class_pixels,
            "skipped": self.skipped,
            "label_resized": self.label_resized,
            "frames": [asdict(frame) | {"class_pixels": list(frame.class_pixels)} for frame in self.frames],
        }
        return json.dumps(document, indent=1) + "\n"


def manifest_path(root: Path | str, split: str) -> Path:
    return Path(root) / "manifests" / f"{split}.json"


def save_manifest(root: Path | str, manifest: Manifest) -> Path:
    path = manifest_path(root, manifest.split)
    write_bytes_atomic(path, manifest.to_json().encode())
    return path


def load_manifest(root: Path | str, split: str) -> Manifest:
    """Read ``<root>/manifests/<split>.json``; a missing or stale file names the command that makes it."""
    if split not in SPLITS:
        raise DatasetFormatError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    path = manifest_path(root, split)
    if not path.is_file():
        raise DatasetFormatError(
            f"{path}: split manifest not found; run `python benchmark/prepare.py --dataset ... --root {root}` first"
        )
    try:
        document = json.loads(path.read_text())
        if document.get("format_version") != FORMAT_VERSION:
            raise DatasetFormatError(
                f"{path}: manifest format {document.get('format_version')} is not {FORMAT_VERSION}; "
                "re-run benchmark/prepare.py"
            )
        manifest = Manifest(
            dataset=document["dataset"],
            split=document["split"],
            frames=[
                ManifestFrame(**(frame | {"class_pixels": tuple(frame["class_pixels"])}))
                for frame in document["frames"]
            ],
            skipped=document["skipped"],
            label_resized=document["label_resized"],
        )
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise DatasetFormatError(f"{path}: not a valid split manifest ({error!r})") from error
    if manifest.content_hash != document["content_hash"]:
        raise DatasetFormatError(f"{path}: content_hash does not match its frame list; the file was edited")
    return manifest
