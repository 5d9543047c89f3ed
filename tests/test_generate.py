"""The mini benchmarks: written in each real format, read back through the project's readers and
converters, the labels give exactly the trainIds the generator intended, for every class."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark import generate, prepare
from benchmark.classes import CLASSES_16, IGNORE_INDEX, NUM_CLASSES, TRAIN_ID
from benchmark.formats import read_image, read_train_ids
from benchmark.generate import intended_train_ids, render_frame
from benchmark.manifests import load_manifest

SIZE = dict(height=64, width=128)


def _check_round_trip(root, family, manifests, expected_frames):
    """Every manifest frame's trainIds equal the rendered scene's intended trainIds."""
    seen = np.zeros(NUM_CLASSES, dtype=bool)
    checked = 0
    for manifest in manifests:
        for frame in manifest.frames:
            split, index = expected_frames[frame.image]
            scene = render_frame(family, 0, split, index, **SIZE)
            intended = intended_train_ids(scene, family)
            decoded = read_train_ids(root / frame.label)
            assert decoded.tolist() == intended.tolist(), f"{frame.label} differs from the rendered scene"
            assert np.array_equal(read_image(root / frame.image), scene.image)
            present = np.unique(intended)
            seen[present[present != IGNORE_INDEX]] = True
            checked += 1
    return seen, checked


@pytest.mark.parametrize("family", ["gta", "synthia"])
def test_source_round_trip_gives_intended_train_ids_for_every_class(tmp_path, family):
    root = tmp_path / family
    count = 80
    generate.generate(family, root, count=count, seed=0, workers=1, **SIZE)
    manifests = prepare.prepare(family, root)
    jobs = generate.frame_jobs(family, root, count=count, seed=0, **SIZE)
    seen, checked = _check_round_trip(root, family, manifests, {job.image_path: ("all", job.index) for job in jobs})
    assert checked == count
    expected_classes = CLASSES_16 if family == "synthia" else None
    if expected_classes is None:
        assert seen.all(), f"classes never generated: {np.flatnonzero(~seen)}"
    else:
        assert {c for c in range(NUM_CLASSES) if seen[c]} == {TRAIN_ID[name] for name in expected_classes}


def test_cityscapes_round_trip_gives_intended_train_ids_for_every_class(tmp_path):
    root = tmp_path / "cityscapes"
    generate.generate("cityscapes", root, train=60, val=30, seed=0, workers=1, **SIZE)
    manifests = prepare.prepare("cityscapes", root)
    jobs = generate.frame_jobs("cityscapes", root, train=60, val=30, seed=0, **SIZE)
    seen, checked = _check_round_trip(
        root, "cityscapes", manifests, {job.image_path: (job.split, job.index) for job in jobs}
    )
    assert checked == 90
    assert seen.all(), f"classes never generated: {np.flatnonzero(~seen)}"
    assert len(load_manifest(root, "target_select").frames) == 6


def test_mismatched_gta_label_is_resized_by_prepare(tmp_path):
    root = tmp_path / "gta"
    generate.generate("gta", root, count=5, seed=0, workers=1, mismatched_labels=1, **SIZE)
    (manifest,) = prepare.prepare("gta", root)
    assert manifest.label_resized == ["images/00003.png"]
    assert read_train_ids(root / "labels/00003_labelTrainIds.png").shape == (SIZE["height"], SIZE["width"])


def test_generation_is_deterministic_and_independent_of_workers(tmp_path):
    one = tmp_path / "one"
    two = tmp_path / "two"
    generate.generate("synthia", one, count=6, seed=3, workers=1, **SIZE)
    generate.generate("synthia", two, count=6, seed=3, workers=2, **SIZE)
    files = sorted(p.relative_to(one) for p in one.rglob("*.png"))
    assert len(files) == 12
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)


def test_generate_refuses_to_overwrite_foreign_folders(tmp_path, capsys):
    foreign = tmp_path / "my_gta"
    (foreign / "images").mkdir(parents=True)
    (foreign / "images" / "00001.png").write_bytes(b"precious")
    code = generate.main(["--dataset", "gta", "--root", str(foreign), "--count", "2", "--height", "32", "--width", "64"])
    assert code == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (foreign / "images" / "00001.png").read_bytes() == b"precious"


def test_regenerating_replaces_stale_frames(tmp_path):
    root = tmp_path / "gta"
    generate.generate("gta", root, count=4, seed=0, workers=1, **SIZE)
    generate.generate("gta", root, count=2, seed=0, workers=1, **SIZE)
    assert sorted(p.name for p in (root / "images").iterdir()) == ["00001.png", "00002.png"]
