"""Datasets, augmentation and samplers for source, target and evaluation splits.

A dataset reads one split manifest (``benchmark/manifests.py``). Training augmentation follows
DAFormer's pipeline (Hoyer et al., CVPR 2022, and its mmsegmentation configs): resize to the
dataset's training scale, random crop with the category-ratio re-crop (up to 10 tries until no
single class covers more than ``cat_max_ratio`` of the crop's labelled pixels), horizontal flip with
probability 0.5, ImageNet normalisation.

Randomness is explicit: a sampler yields ``SampleRequest`` objects that carry the seed of the
sample's augmentation, so a batch is a pure function of the sampler state, whatever the number of
loader workers, and a resumed run sees the same batches.
"""

from __future__ import annotations

import atexit
import functools
import os
import queue
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
import torch

from benchmark.classes import NUM_CLASSES
from benchmark.formats import DatasetFormatError, read_image, read_train_ids
from benchmark.manifests import Manifest, load_manifest

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: DAFormer / mmsegmentation RandomCrop: attempts to find a crop below ``cat_max_ratio``.
CROP_ATTEMPTS = 10
#: DAFormer rare-class sampling: attempts to find a crop holding enough pixels of the sampled class.
RARE_CLASS_CROP_ATTEMPTS = 10


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation of one dataset. Sizes are (height, width)."""

    scale: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    flip: bool = True
    cat_max_ratio: float = 0.75


@dataclass(frozen=True)
class SampleRequest:
    """Which frame to load and the seed of its augmentation; ``required_class`` is set by RCS."""

    index: int
    seed: int
    required_class: int = -1


def normalize(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> ImageNet-normalised."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of ``normalize``: ImageNet-normalised (B, 3, H, W) -> RGB in [0, 1]."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return images * std + mean


def resize(image: np.ndarray, label: np.ndarray | None, size: tuple[int, int]):
    """Bilinear for the image, nearest neighbour for the label (never invent class ids)."""
    height, width = size
    if image.shape[:2] != (height, width):
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        if label is not None:
            label = cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)
    return image, label


def random_crop(
    image: np.ndarray,
    label: np.ndarray | None,
    size: tuple[int, int],
    rng: np.random.Generator,
    cat_max_ratio: float = 1.0,
):
    """Crop ``size`` at a random position; re-draw while one class dominates the crop.

    With a label and ``cat_max_ratio < 1``, up to ``CROP_ATTEMPTS`` positions are drawn and the
    first whose most frequent class covers less than ``cat_max_ratio`` of its labelled pixels is
    kept (the last one otherwise), as mmsegmentation's ``RandomCrop`` does for DAFormer.
    """
    crop_h, crop_w = size
    height, width = image.shape[:2]
    if crop_h > height or crop_w > width:
        raise ValueError(f"crop {crop_h}x{crop_w} is larger than the image {height}x{width} (height x width)")
    attempts = CROP_ATTEMPTS if (label is not None and cat_max_ratio < 1.0) else 1
    for _ in range(attempts):
        top = int(rng.integers(0, height - crop_h + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        if attempts == 1:
            break
        window = label[top : top + crop_h, left : left + crop_w]
        counts = np.bincount(window.ravel(), minlength=256)[:NUM_CLASSES]
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    image = image[top : top + crop_h, left : left + crop_w]
    if label is not None:
        label = label[top : top + crop_h, left : left + crop_w]
    return image, label


@functools.lru_cache(maxsize=16)
def _row_constants(width: int) -> tuple[np.ndarray, np.ndarray]:
    """ImageNet mean and std repeated along an (H, W, 3) image's row of ``width`` pixels, (3 W,)."""
    return tuple(np.tile(np.array(values, dtype=np.float32), width) for values in (IMAGENET_MEAN, IMAGENET_STD))


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> normalised (3, H, W) float32, a channels-last view of the (H, W, 3) array.

    The float32 operations of ``normalize`` (divide by 255, subtract the mean, divide by the std),
    done in place in numpy on rows of 3 W values: the same values to the bit in about a tenth of the
    time (no tensor per constant and operation, no inner loop of 3 channels)."""
    height, width = image.shape[:2]
    mean, std = _row_constants(width)
    rows = image.astype(np.float32).reshape(height, 3 * width)
    rows /= np.float32(255.0)
    rows -= mean
    rows /= std
    return torch.from_numpy(rows.reshape(height, width, 3)).permute(2, 0, 1)


class SegmentationDataset(torch.utils.data.Dataset):
    """The frames of one split manifest.

    Items are dicts with ``image`` (3, H, W) float32 normalised, ``index`` and, when
    ``with_labels``, ``label`` (H, W) int64 trainIds with 255 = ignore. Indexing with an ``int``
    gives the frame without random augmentation (evaluation: only ``eval_scale`` applies, the label
    stays at its native resolution so the metric is computed where the annotation lives); indexing
    with a ``SampleRequest`` applies ``augment`` seeded by the request.

    With ``cache``, decoded frames are kept in memory (``FRAMES``, shared by every dataset of the
    process that reads the same files) and a background thread decodes the split's frames ahead of
    use (``warm_up``), so that the training step does not wait on PNG decoding the first time it
    meets a frame. A frame is the same whether it was decoded ahead or on demand. A cached frame is
    also resized to ``augment.scale`` only once (``_scaled``), not at every draw.
    """

    def __init__(
        self,
        root: Path | str,
        split: str,
        *,
        with_labels: bool = True,
        augment: Augment | None = None,
        eval_scale: tuple[int, int] | None = None,
        min_crop_class_pixels: int = 0,
        cache: bool = False,
    ):
        self.root = Path(root)
        self.manifest: Manifest = load_manifest(self.root, split)
        self.split = split
        self.with_labels = with_labels
        self.augment = augment or Augment()
        self.eval_scale = eval_scale
        self.min_crop_class_pixels = min_crop_class_pixels
        self.cache = cache
        #: index -> (the decoded image it was made from, size, resized image, resized label)
        self._resized: dict[int, tuple] = {}
        if not self.manifest.frames:
            raise DatasetFormatError(f"{self.root}/manifests/{split}.json lists no frames")
        if cache:
            warm_up(self)

    def __len__(self) -> int:
        return len(self.manifest.frames)

    def _paths(self, index: int) -> tuple[Path, Path | None]:
        frame = self.manifest.frames[index]
        return self.root / frame.image, (self.root / frame.label) if self.with_labels else None

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        image_path, label_path = self._paths(index)
        if self.cache:
            cached = FRAMES.get(image_path, label_path)
            if cached is not None:
                return cached
        image = read_image(image_path)
        label = read_train_ids(label_path) if label_path is not None else None
        if label is not None and label.shape != image.shape[:2]:
            raise DatasetFormatError(
                f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but the image "
                f"{image_path} is {image.shape[1]}x{image.shape[0]}; re-run benchmark/prepare.py"
            )
        if self.cache:
            FRAMES.put(image_path, label_path, image, label)
        return image, label

    def _scaled(self, index: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
        """The frame resized to ``size``. With ``cache`` the resized arrays are kept (read-only, as
        the decoded ones) while ``_load`` keeps returning the very decoded image they were made from,
        so a frame that changed on disk is resized again."""
        image, label = self._load(index)
        if not self.cache:
            return resize(image, label, size)
        kept = self._resized.get(index)
        if kept is not None and kept[0] is image and kept[1] == size:
            return kept[2], kept[3]
        resized_image, resized_label = resize(image, label, size)
        for array in (resized_image, resized_label):
            if array is not None:
                array.flags.writeable = False
        self._resized[index] = (image, size, resized_image, resized_label)
        return resized_image, resized_label

    def _augmented(self, request: SampleRequest) -> tuple[np.ndarray, np.ndarray | None]:
        rng = np.random.default_rng(request.seed)
        augment = self.augment
        if augment.scale is not None:
            image, label = self._scaled(request.index, augment.scale)
        else:
            image, label = self._load(request.index)
        attempts = RARE_CLASS_CROP_ATTEMPTS if (request.required_class >= 0 and label is not None) else 1
        for _ in range(attempts):
            cropped_image, cropped_label = image, label
            if augment.crop is not None:
                cropped_image, cropped_label = random_crop(image, label, augment.crop, rng, augment.cat_max_ratio)
            if attempts == 1 or (cropped_label == request.required_class).sum() > self.min_crop_class_pixels:
                break
        if augment.flip and rng.random() < 0.5:
            cropped_image = cropped_image[:, ::-1]
            cropped_label = cropped_label[:, ::-1] if cropped_label is not None else None
        return cropped_image, cropped_label

    def __getitem__(self, item: int | SampleRequest) -> dict:
        if isinstance(item, SampleRequest):
            image, label = self._augmented(item)
            index = item.index
        else:
            index = int(item)
            image, label = self._load(index)
            if self.eval_scale is not None:
                image, _ = resize(image, None, self.eval_scale)
        sample = {"image": to_tensor(image), "index": index}
        if label is not None:
            sample["label"] = torch.from_numpy(label.astype(np.int64))
        return sample


class FrameCache:
    """Decoded frames by file: ``(image, label)`` arrays of an image path and a label path (or
    None), each entry valid while both files keep the size and modification time they had when
    read. Thread-safe for one writer and many readers (dict operations are atomic)."""

    def __init__(self):
        self._frames: dict[tuple[Path, Path | None], tuple[tuple, np.ndarray, np.ndarray | None]] = {}

    @staticmethod
    def _stamp(image_path: Path, label_path: Path | None) -> tuple:
        stamps = []
        for path in (image_path, label_path):
            if path is not None:
                stat = os.stat(path)
                stamps.append((stat.st_mtime_ns, stat.st_size))
        return tuple(stamps)

    def get(self, image_path: Path, label_path: Path | None) -> tuple[np.ndarray, np.ndarray | None] | None:
        entry = self._frames.get((image_path, label_path))
        if entry is None:
            return None
        try:
            if entry[0] != self._stamp(image_path, label_path):
                return None
        except OSError:
            return None
        return entry[1], entry[2]

    def contains(self, image_path: Path, label_path: Path | None) -> bool:
        return (image_path, label_path) in self._frames

    def put(self, image_path: Path, label_path: Path | None, image: np.ndarray, label: np.ndarray | None) -> None:
        try:
            stamp = self._stamp(image_path, label_path)
        except OSError:
            return
        # read-only views: every reader shares these arrays, augmentation copies what it changes
        image.flags.writeable = False
        if label is not None:
            label.flags.writeable = False
        self._frames[(image_path, label_path)] = (stamp, image, label)

    def clear(self) -> None:
        self._frames.clear()


#: The process's decoded frames of every dataset built with ``cache``.
FRAMES = FrameCache()
_warm_up_queue: queue.SimpleQueue | None = None
_warm_up_pid: int | None = None

#: This module's background threads, each with the function that asks it to stop.
_BACKGROUND: list[tuple[threading.Thread, Callable[[], None]]] = []


def _start_background(target: Callable, args: tuple, name: str, stop: Callable[[], None]) -> threading.Thread:
    """Start a daemon thread that ``_stop_background_threads`` stops and joins at interpreter exit."""
    _BACKGROUND[:] = [(thread, ask) for thread, ask in _BACKGROUND if thread.is_alive()]
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    _BACKGROUND.append((thread, stop))
    thread.start()
    return thread


@atexit.register
def _stop_background_threads() -> None:
    """Stop every background thread and let it finish the frame or batch in hand. A daemon thread
    still inside C++ code (an image decoder, a torch operation) when the interpreter finalises is ended
    by a forced unwind that such code cannot take, and the process aborts with "terminate called
    without an active exception" after its work is done (a short script, or cost.py, whose last
    batches were still being drawn). atexit functions run before that point."""
    for _, stop in _BACKGROUND:
        stop()
    for thread, _ in _BACKGROUND:
        thread.join(timeout=10.0)


def warm_up(dataset: SegmentationDataset) -> None:
    """Decode ``dataset``'s frames into ``FRAMES`` in a background thread (one per process, datasets
    in the order they were built), skipping frames already there. The thread holds the dataset weakly
    and stops on a frame that fails to read: reading it on demand then raises the error."""
    global _warm_up_queue, _warm_up_pid
    if _warm_up_queue is None or _warm_up_pid != os.getpid():  # none yet, or a forked child
        pending, stop = queue.SimpleQueue(), threading.Event()
        _warm_up_queue, _warm_up_pid = pending, os.getpid()

        def ask_to_stop() -> None:
            stop.set()
            pending.put(None)  # wakes the thread if it waits for a dataset

        _start_background(_warm_up_loop, (pending, stop), "frame-warm-up", ask_to_stop)
    _warm_up_queue.put(weakref.ref(dataset))


def _warm_up_loop(pending: queue.SimpleQueue, stop: threading.Event) -> None:
    while True:
        reference = pending.get()
        if reference is None or stop.is_set():
            return
        dataset = reference()
        count = len(dataset) if dataset is not None else 0
        del dataset
        for index in range(count):
            dataset = reference()
            if dataset is None or stop.is_set():
                break
            try:
                if not FRAMES.contains(*dataset._paths(index)):
                    dataset._load(index)
            except Exception:  # noqa: BLE001  the step's own read of the frame reports it
                break
            finally:
                del dataset


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless shuffled epochs of ``SampleRequest``; its state (a numpy generator) can be saved."""

    def __init__(self, num_frames: int, seed: int):
        self.num_frames = num_frames
        self.rng = np.random.default_rng(seed)

    def __iter__(self) -> Iterator[SampleRequest]:
        while True:
            for index in self.rng.permutation(self.num_frames):
                yield SampleRequest(int(index), int(self.rng.integers(2**63)))

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


def rare_class_probabilities(class_pixels: np.ndarray | list[int], temperature: float) -> np.ndarray:
    """DAFormer rare-class sampling (Hoyer et al., CVPR 2022, sec. 3.3, eq. 6).

    ``P(c) = exp((1 - f_c) / T) / sum_c' exp((1 - f_c') / T)`` with ``f_c`` the fraction of source
    pixels of class ``c``. Classes with no source pixel get probability 0 (SYNTHIA has no terrain,
    truck or train). Input: (C,) pixel counts; output: (C,) probabilities.
    """
    counts = np.asarray(class_pixels, dtype=np.float64)
    if temperature <= 0:
        raise ValueError(f"rare-class temperature must be > 0, got {temperature}")
    present = counts > 0
    if not present.any():
        raise ValueError("no labelled source pixel: cannot build rare-class probabilities")
    frequency = counts / counts.sum()
    logits = np.where(present, (1.0 - frequency) / temperature, -np.inf)
    logits -= logits[present].max()
    weights = np.exp(logits)
    return weights / weights.sum()


class RareClassSampler(InfiniteSampler):
    """Rare-class sampling: draw a class by ``rare_class_probabilities``, then a frame that holds
    more than ``min_pixels`` of it; the dataset then re-crops until the crop holds the class.

    Classes without any frame above ``min_pixels`` are dropped and the rest renormalised.
    """

    def __init__(self, manifest: Manifest, temperature: float, min_pixels: int, seed: int):
        super().__init__(len(manifest.frames), seed)
        per_frame = np.array([frame.class_pixels for frame in manifest.frames], dtype=np.int64)
        self.frames_with_class = [np.flatnonzero(per_frame[:, c] > min_pixels) for c in range(NUM_CLASSES)]
        probabilities = rare_class_probabilities(per_frame.sum(axis=0), temperature)
        has_frames = np.array([len(frames) > 0 for frames in self.frames_with_class])
        probabilities = np.where(has_frames, probabilities, 0.0)
        if probabilities.sum() == 0:
            raise DatasetFormatError(
                f"rare-class sampling: no frame holds more than {min_pixels} pixels of any class; lower min_pixels"
            )
        self.class_probabilities = probabilities / probabilities.sum()

    def __iter__(self) -> Iterator[SampleRequest]:
        while True:
            train_id = int(self.rng.choice(NUM_CLASSES, p=self.class_probabilities))
            index = int(self.rng.choice(self.frames_with_class[train_id]))
            yield SampleRequest(index, int(self.rng.integers(2**63)), required_class=train_id)



class Prefetcher:
    """The items of ``iterator``, drawn ``depth`` ahead in a background thread.

    A loader without worker processes draws its batches in the training loop's own thread, between
    steps; drawn here they are ready when the step asks (the decoding, resizing and cropping are numpy
    and OpenCV work that runs beside the step's kernels). Items come in the iterator's order, so
    batches are unchanged: their randomness is in the sampler's requests (``SampleRequest``), not in
    which thread draws them. An exception raised while drawing an item is raised by the ``next`` that
    would have returned it. The thread stops when the iterator ends or fails, or when the prefetcher
    is closed or collected.
    """

    def __init__(self, iterator: Iterator, depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        # the thread holds the queue and the event, not the prefetcher, so that dropping the last
        # reference to the prefetcher collects it and its finaliser stops the thread
        self._thread = _start_background(
            _prefetch_loop, (iterator, self._queue, self._stop), "batch-prefetch", self._stop.set
        )

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == "item":
            return value
        self._done = True
        self._stop.set()
        if kind == "error":
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the thread (within a tenth of a second); items not yet taken are dropped."""
        self._done = True
        self._stop.set()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)  # absent when the constructor refused its arguments
        if stop is not None:
            stop.set()


def _prefetch_loop(iterator: Iterator, pending: queue.Queue, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            entry = ("item", next(iterator))
        except StopIteration:
            entry = ("end", None)
        except BaseException as error:  # noqa: BLE001  handed to the consumer, which raises it
            entry = ("error", error)
        while not stop.is_set():
            try:
                pending.put(entry, timeout=0.1)
                break
            except queue.Full:
                continue
        if entry[0] != "item":
            return
