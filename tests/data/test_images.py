"""Image sources and batching: class folders give labels, static batches are filled with copies
of the last image (dropped again by the caller), calibration samples are seeded."""

import numpy as np
import pytest
from PIL import Image

from turbo.core.errors import UsageError
from turbo.data.images import batches, calibration_set, coco_captions, image_folder


def test_batches_fill_a_static_batch_and_count_the_real_images():
    pixels = np.arange(5, dtype=np.float32).reshape(5, 1, 1, 1)
    static = list(batches(pixels, 2, static=True))
    assert [count for _, count in static] == [2, 2, 1]
    assert static[-1][0][:, 0, 0, 0].tolist() == [4.0, 4.0]  # the last image, repeated
    dynamic = list(batches(pixels, 2, static=False))
    assert [chunk.shape[0] for chunk, _ in dynamic] == [2, 2, 1]
    assert np.concatenate([chunk[:count] for chunk, count in static]).tolist() == pixels.tolist()


def test_class_folders_are_labels_in_sorted_order(tmp_path):
    for label in ("dog", "cat"):
        (tmp_path / label).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / label / "a.png")
    samples, classes = image_folder(tmp_path)
    assert classes == ["cat", "dog"]
    assert sorted((s.path.parent.name, s.label) for s in samples) == [("cat", 0), ("dog", 1)]


def test_synthetic_calibration_is_seeded_and_recorded():
    first = calibration_set("synthetic", 3, seed=5, processor=None, pixel_shape=(1, 8, 8))
    again = calibration_set("synthetic", 3, seed=5, processor=None, pixel_shape=(1, 8, 8))
    assert np.array_equal(first.pixels, again.pixels) and first.pixels.shape == (3, 1, 8, 8)
    assert first.info.synthetic and (first.info.count, first.info.seed) == (3, 5)


def test_an_empty_calibration_folder_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="holds no images"):
        calibration_set(str(tmp_path), 3, seed=0, processor=None, pixel_shape=(3, 8, 8))


@pytest.fixture
def two_images(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    return tmp_path


def test_captions_in_every_layout_they_ship_in(two_images):
    import json

    layouts = {
        "coco": {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
                 "annotations": [{"image_id": 1, "caption": "one"}, {"image_id": 1, "caption": "two"},
                                 {"image_id": 2, "caption": "three"}]},
        "karpathy": {"images": [{"filename": "a.png", "split": "test", "sentences": [{"raw": "one"}, {"raw": "two"}]},
                                {"filename": "b.png", "split": "test", "sentences": [{"raw": "three"}]}]},
        "blip": [{"image": "a.png", "caption": ["one", "two"]}, {"image": "b.png", "caption": "three"}],
    }
    for name, layout in layouts.items():
        (two_images / f"{name}.json").write_text(json.dumps(layout))
        samples = coco_captions(two_images / f"{name}.json", two_images)
        assert [(s.path.name, s.references) for s in samples] == [("a.png", ("one", "two")), ("b.png", ("three",))]


def test_a_karpathy_file_of_several_splits_uses_test_and_says_so(two_images):
    import json

    images = [{"filename": "a.png", "split": "train", "sentences": [{"raw": "x"}]},
              {"filename": "b.png", "split": "test", "sentences": [{"raw": "y"}]}]
    (two_images / "k.json").write_text(json.dumps({"images": images}))
    with pytest.warns(UserWarning, match="using its test split .1 of 2 images."):
        assert [s.path.name for s in coco_captions(two_images / "k.json", two_images)] == ["b.png"]


@pytest.mark.parametrize("document", [{"images": [{"file": "a.png"}]}, [{"image": "a.png"}], {"images": 3}, 7])
def test_a_captions_file_in_no_known_layout_is_one_line(two_images, document):
    import json

    (two_images / "bad.json").write_text(json.dumps(document))
    with pytest.raises(UsageError, match="is not a COCO, Karpathy or BLIP captions file"):
        coco_captions(two_images / "bad.json", two_images)
