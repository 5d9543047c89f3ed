"""Readers, writers and converters against the real-format samples and the id tables of DESIGN.md."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from benchmark import prepare
from benchmark.classes import (
    CITYSCAPES_ID_TO_TRAIN_ID,
    IGNORE_INDEX,
    NUM_CLASSES,
    SYNTHIA_ID_TO_TRAIN_ID,
)
from benchmark.formats import (
    DatasetFormatError,
    read_cityscapes_label_ids,
    read_gta_label_ids,
    read_synthia_label_ids,
    read_train_ids,
)
from benchmark.manifests import load_manifest

from conftest import write_cityscapes_root, write_gta_root, write_synthia_root

CITYSCAPES_FRAME = "cityscapes/{kind}/val/frankfurt/frankfurt_000000_000294_{suffix}"

#: The SYNTHIA encoding probes and the class ids their red channel documents (PROVENANCE.md 1b).
SYNTHIA_PROBES = {
    "Omni_B/000000.png": [1, 1, 10, 10, 10],
    "Omni_B/000001.png": [8, 11, 11, 3, 3],
    "Omni_F/000000.png": [1, 1, 2, 2, 3],
    "Omni_F/000001.png": [1, 2, 15, 15, 3],
}
PROBE_DIR = "synthetic_encoding_probes/datumaro_synthia/GT/{kind}/Stereo_Left"


def test_cityscapes_fixture_converted_by_prepare_agrees_with_shipped_train_ids(real_format, tmp_path):
    image = real_format / CITYSCAPES_FRAME.format(kind="leftImg8bit", suffix="leftImg8bit.png")
    label = real_format / CITYSCAPES_FRAME.format(kind="gtFine", suffix="gtFine_labelIds.png")
    shipped = real_format / CITYSCAPES_FRAME.format(kind="gtFine", suffix="gtFine_labelTrainIds.png")
    root = tmp_path / "cityscapes"
    # prepare.py needs a train split too: the same frame under three train names
    for split, names in (("val", ["frankfurt_000000_000294"]), ("train", [f"aachen_00000{i}_000019" for i in range(3)])):
        city = names[0].split("_")[0]
        for name in names:
            (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
            (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
            shutil.copy(image, root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
            shutil.copy(label, root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png")

    assert prepare.main(["--dataset", "cityscapes", "--root", str(root)]) == 0

    converted = read_train_ids(root / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png")
    expected = np.asarray(Image.open(shipped))
    agreement = (converted == expected).mean()
    assert converted.shape == expected.shape == (128, 256)
    assert agreement >= 0.995, f"only {agreement:.4%} of pixels agree with the shipped labelTrainIds"
    test = load_manifest(root, "target_test")
    assert [frame.image for frame in test.frames] == [
        "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png"
    ]
    assert sum(test.class_pixels) == int((converted != IGNORE_INDEX).sum())


def test_cityscapes_fixture_label_ids_read_as_documented(real_format):
    ids = read_cityscapes_label_ids(real_format / CITYSCAPES_FRAME.format(kind="gtFine", suffix="gtFine_labelIds.png"))
    values, counts = np.unique(ids, return_counts=True)
    documented = {1: 1890, 2: 987, 3: 764, 4: 233, 7: 9740, 8: 2628, 11: 12744, 13: 44, 17: 396, 20: 188,
                  21: 664, 23: 581, 24: 107, 26: 1802}  # fmt: skip
    assert dict(zip(values.tolist(), counts.tolist())) == documented


@pytest.mark.parametrize("probe, class_ids", sorted(SYNTHIA_PROBES.items()))
def test_synthia_probes_decode_to_documented_class_ids(real_format, probe, class_ids):
    path = real_format / PROBE_DIR.format(kind="LABELS") / probe
    decoded = read_synthia_label_ids(path)
    assert decoded.shape == (1, 5)
    assert decoded[0].tolist() == class_ids
    # the pitfall the reader exists for: Pillow silently returns zeros for these files
    assert not np.asarray(Image.open(path)).any()


def test_synthia_colour_rendering_is_refused(real_format):
    path = real_format / PROBE_DIR.format(kind="COLOR") / "Omni_B/000000.png"
    with pytest.raises(DatasetFormatError, match=r"16 bits per channel and 3 channels.*got 8-bit") as error:
        read_synthia_label_ids(path)
    assert str(path) in str(error.value)


def _every_id_label(ids: list[int], shape=(12, 16)) -> np.ndarray:
    """A label holding each id in ``ids`` at least once (tiled)."""
    values = np.resize(np.array(ids), shape[0] * shape[1])
    return values.reshape(shape)


def _expected(ids: np.ndarray, table: dict[int, int]) -> np.ndarray:
    return np.vectorize(lambda v: table.get(int(v), IGNORE_INDEX))(ids).astype(np.uint8)


def test_gta_round_trip_every_id(tmp_path):
    label_ids = _every_id_label(list(range(34))).astype(np.uint8)
    root = write_gta_root(tmp_path / "gta", [label_ids, label_ids[::-1].copy()])
    assert read_gta_label_ids(root / "labels/00001.png").tolist() == label_ids.tolist()

    (manifest,) = prepare.prepare("gta", root)

    expected = _expected(label_ids, CITYSCAPES_ID_TO_TRAIN_ID)
    assert read_train_ids(root / manifest.frames[0].label).tolist() == expected.tolist()
    assert set(np.unique(expected)) == set(range(NUM_CLASSES)) | {IGNORE_INDEX}
    assert manifest.class_pixels == [2 * int((expected == c).sum()) for c in range(NUM_CLASSES)]


def test_synthia_round_trip_every_id(tmp_path):
    class_ids = _every_id_label(list(range(23))).astype(np.uint16)
    root = write_synthia_root(tmp_path / "synthia", [class_ids])

    (manifest,) = prepare.prepare("synthia", root)

    expected = _expected(class_ids, SYNTHIA_ID_TO_TRAIN_ID)
    assert read_train_ids(root / manifest.frames[0].label).tolist() == expected.tolist()
    # void 0, parking-slot 13, road-work 14 and lanemarking 22 are ignored
    assert (expected[np.isin(class_ids, [0, 13, 14, 22])] == IGNORE_INDEX).all()
    assert set(np.unique(expected)) == set(range(NUM_CLASSES)) | {IGNORE_INDEX}


def test_cityscapes_round_trip_every_id(tmp_path):
    label_ids = _every_id_label(list(range(34))).astype(np.uint8)
    root = write_cityscapes_root(tmp_path / "cs", train=[label_ids] * 4, val=[label_ids])

    manifests = {m.split: m for m in prepare.prepare("cityscapes", root, select_fraction=0.25)}

    expected = _expected(label_ids, CITYSCAPES_ID_TO_TRAIN_ID)
    for manifest in manifests.values():
        for frame in manifest.frames:
            assert read_train_ids(root / frame.label).tolist() == expected.tolist()
    assert {split: len(m.frames) for split, m in manifests.items()} == {
        "target_train": 3,
        "target_select": 1,
        "target_test": 1,
    }
    train_images = {f.image for f in manifests["target_train"].frames}
    assert not train_images & {f.image for f in manifests["target_select"].frames}
