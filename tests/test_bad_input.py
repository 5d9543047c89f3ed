"""Bad input gets a clear error naming the file and what was expected, never a silent wrong label."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from benchmark import prepare
from benchmark.data import SegmentationDataset
from benchmark.formats import DatasetFormatError, encode_image, read_train_ids, write_bytes_atomic
from benchmark.manifests import load_manifest

from conftest import write_cityscapes_root, write_gta_root, write_synthia_root

LABEL = np.array([[7, 8, 11, 26], [7, 7, 23, 24], [21, 21, 0, 33]], dtype=np.uint8)


def test_missing_root_is_named(tmp_path):
    missing = tmp_path / "no_such_gta"
    with pytest.raises(DatasetFormatError, match="does not exist") as error:
        prepare.prepare("gta", missing)
    assert str(missing) in str(error.value)
    assert "images/NNNNN.png" in str(error.value)


def test_missing_split_is_named(tmp_path):
    root = write_cityscapes_root(tmp_path / "cs", train=[LABEL] * 3, val=[LABEL])
    for folder in ("leftImg8bit/val", "gtFine/val"):
        for path in sorted((root / folder).rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        (root / folder).rmdir()
    with pytest.raises(DatasetFormatError, match="folder not found") as error:
        prepare.prepare("cityscapes", root)
    assert str(root / "leftImg8bit/val") in str(error.value)


def test_missing_manifest_names_the_command(tmp_path):
    write_gta_root(tmp_path / "gta", [LABEL])
    with pytest.raises(DatasetFormatError, match="prepare.py") as error:
        load_manifest(tmp_path / "gta", "source_train")
    assert "source_train.json" in str(error.value)


def test_image_without_label_is_named(tmp_path):
    root = write_gta_root(tmp_path / "gta", [LABEL, LABEL])
    (root / "labels/00002.png").unlink()
    with pytest.raises(DatasetFormatError, match="image without its label") as error:
        prepare.prepare("gta", root)
    assert str(root / "images/00002.png") in str(error.value)
    assert str(root / "labels/00002.png") in str(error.value)


def test_skip_bad_leaves_the_frame_out_and_says_why(tmp_path):
    root = write_gta_root(tmp_path / "gta", [LABEL, LABEL, LABEL])
    (root / "labels/00002.png").unlink()
    (manifest,) = prepare.prepare("gta", root, skip_bad=True)
    assert [frame.image for frame in manifest.frames] == ["images/00001.png", "images/00003.png"]
    assert manifest.skipped[0]["image"] == "images/00002.png"
    assert "image without its label" in manifest.skipped[0]["reason"]


def test_label_value_outside_gta_id_set_is_named(tmp_path):
    bad = LABEL.copy()
    bad[0, 0] = 40
    root = write_gta_root(tmp_path / "gta", [LABEL, bad])
    with pytest.raises(DatasetFormatError, match=r"label values \[40\] are not valid Cityscapes labelIds") as error:
        prepare.prepare("gta", root)
    assert str(root / "labels/00002.png") in str(error.value)


def test_label_value_outside_synthia_id_set_is_named(tmp_path):
    bad = np.array([[3, 4, 2, 23]], dtype=np.uint16)
    root = write_synthia_root(tmp_path / "synthia", [bad])
    with pytest.raises(DatasetFormatError, match=r"\[23\] are not valid SYNTHIA class ids \(expected 0\.\.22\)"):
        prepare.prepare("synthia", root)


def test_gta_label_saved_as_colours_is_refused(tmp_path):
    root = write_gta_root(tmp_path / "gta", [LABEL])
    colours = np.zeros((*LABEL.shape, 3), dtype=np.uint8)
    write_bytes_atomic(root / "labels/00001.png", encode_image(colours))
    with pytest.raises(DatasetFormatError, match="expected an 8-bit palette PNG.*got mode RGB") as error:
        prepare.prepare("gta", root)
    assert str(root / "labels/00001.png") in str(error.value)


@pytest.mark.parametrize(
    "array, found",
    [
        (np.zeros((3, 4, 3), dtype=np.uint8), "8-bit with 3 channel"),
        (np.zeros((3, 4), dtype=np.uint16), "16-bit with 1 channel"),
    ],
)
def test_synthia_label_not_16bit_3channel_is_refused(tmp_path, array, found):
    root = write_synthia_root(tmp_path / "synthia", [np.zeros((3, 4), dtype=np.uint16)])
    cv2.imwrite(str(root / "GT/LABELS/0000000.png"), array)
    with pytest.raises(DatasetFormatError, match="16 bits per channel and 3 channels") as error:
        prepare.prepare("synthia", root)
    assert found in str(error.value)
    assert str(root / "GT/LABELS/0000000.png") in str(error.value)


def _root_with_mismatched_label(tmp_path):
    root = write_gta_root(tmp_path / "gta", [LABEL, LABEL])
    big = cv2.resize(LABEL, (8, 6), interpolation=cv2.INTER_NEAREST)
    from benchmark.formats import encode_gta_label

    write_bytes_atomic(root / "labels/00002.png", encode_gta_label(big))
    return root


def test_size_mismatch_is_resized_with_nearest_and_reported(tmp_path, capsys):
    root = _root_with_mismatched_label(tmp_path)
    assert prepare.main(["--dataset", "gta", "--root", str(root)]) == 0
    manifest = load_manifest(root, "source_train")
    assert manifest.label_resized == ["images/00002.png"]
    assert read_train_ids(root / "labels/00002_labelTrainIds.png").shape == LABEL.shape
    assert read_train_ids(root / "labels/00002_labelTrainIds.png").tolist() == read_train_ids(
        root / "labels/00001_labelTrainIds.png"
    ).tolist()
    assert "resized with nearest neighbour: images/00002.png" in capsys.readouterr().err


def test_size_mismatch_skip_and_error(tmp_path, capsys):
    root = _root_with_mismatched_label(tmp_path)
    (manifest,) = prepare.prepare("gta", root, on_size_mismatch="skip")
    assert [f.image for f in manifest.frames] == ["images/00001.png"]
    assert "label is 8x6 but its image" in manifest.skipped[0]["reason"]
    assert prepare.main(["--dataset", "gta", "--root", str(root), "--on-size-mismatch", "error"]) == 2
    err = capsys.readouterr().err
    assert "prepare.py: error:" in err and str(root / "labels/00002.png") in err and "is 4x3" in err


def test_loader_refuses_label_of_other_size(tmp_path):
    root = write_gta_root(tmp_path / "gta", [LABEL])
    prepare.prepare("gta", root)
    write_bytes_atomic(root / "images/00001.png", encode_image(np.zeros((5, 5, 3), dtype=np.uint8)))
    dataset = SegmentationDataset(root, "source_train")
    with pytest.raises(DatasetFormatError, match="re-run benchmark/prepare.py") as error:
        dataset[0]
    assert "00001_labelTrainIds.png" in str(error.value)


def test_edited_manifest_is_refused(tmp_path):
    root = write_gta_root(tmp_path / "gta", [LABEL])
    prepare.prepare("gta", root)
    path = root / "manifests/source_train.json"
    path.write_text(path.read_text().replace("images/00001.png", "images/00009.png"))
    with pytest.raises(DatasetFormatError, match="content_hash does not match"):
        load_manifest(root, "source_train")


def test_cli_unknown_dataset_exits_with_usage(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--dataset", "kitti", "--root", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "invalid choice: 'kitti'" in capsys.readouterr().err
