"""Decoding, folder discovery, near-duplicate grouping and the leakage-free split."""

import io

import numpy as np
import pytest
from PIL import Image

from ml.config import CLASS_NAMES, DedupConfig, SplitConfig
from ml.data import (
    UnreadableImage,
    assert_no_group_leak,
    canonical_class,
    compute_signatures,
    decode_image,
    find_labelled_images,
    load_dataset,
    near_duplicate_pairs,
    select_from_split_record,
    split_by_group,
)

from .conftest import jpeg_bytes, synthetic_scan


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("glioma_tumor", "glioma"),
        ("Glioma", "glioma"),
        ("meningioma_tumor", "meningioma"),
        ("notumor", "no_tumor"),
        ("no_tumor", "no_tumor"),
        ("No Tumor", "no_tumor"),
        ("pituitary-tumor", "pituitary"),
        ("cats", None),
    ],
)
def test_class_folder_aliases(folder, expected):
    assert canonical_class(folder) == expected


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16"])
def test_decode_any_mode_gives_rgb_uint8_square(mode):
    image = Image.new("L", (40, 30), 100).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    decoded = decode_image(buffer.getvalue(), 16)
    assert decoded.shape == (16, 16, 3)
    assert decoded.dtype == np.uint8


def test_decode_grayscale_repeats_the_channel():
    decoded = decode_image(jpeg_bytes(synthetic_scan("glioma", 0)), 24)
    assert np.array_equal(decoded[..., 0], decoded[..., 1])
    assert np.array_equal(decoded[..., 1], decoded[..., 2])


@pytest.mark.parametrize(
    "data", [b"", b"not an image", jpeg_bytes(synthetic_scan("glioma", 0))[:60]]
)
def test_undecodable_bytes_raise_unreadable_image(data):
    with pytest.raises(UnreadableImage, match="image"):
        decode_image(data, 32)


def test_unreadable_image_is_a_value_error():
    assert issubclass(UnreadableImage, ValueError)


def test_find_images_matches_aliases_and_nested_roots(synthetic_dataset, tmp_path):
    images = find_labelled_images(synthetic_dataset)
    assert {image.label for image in images} == set(CLASS_NAMES)
    assert len(images) == 4 * (8 + 4)
    # A root holding Training/ and Testing/ style subfolders is read as one pool.
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "Training").symlink_to(synthetic_dataset)
    nested_images = find_labelled_images(nested)
    assert len(nested_images) == len(images)
    assert nested_images[0].relative_path.startswith("Training/")


def test_find_images_rejects_a_folder_without_classes(tmp_path):
    (tmp_path / "cats").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        find_labelled_images(tmp_path)


def test_near_duplicates_are_found_and_distinct_images_are_not(synthetic_dataset):
    images = find_labelled_images(synthetic_dataset)
    signatures = compute_signatures([image.path for image in images])
    pairs = near_duplicate_pairs(signatures)
    names = {tuple(sorted((images[i].relative_path, images[j].relative_path))) for i, j in pairs}
    # Each copy joins its original: re-encoded (near) and byte-identical (exact).
    for folder in ("glioma_tumor", "notumor"):
        assert (f"{folder}/copy0-identical.jpg", f"{folder}/img0.jpg") in names
        assert (f"{folder}/copy1-reencoded.jpg", f"{folder}/img1.jpg") in names
    # Originals of different variants are never joined.
    for a, b in names:
        assert not (a.split("/")[1].startswith("img") and b.split("/")[1].startswith("img"))


def test_split_keeps_every_group_on_one_side_and_is_stratified(synthetic_dataset):
    dataset = load_dataset(synthetic_dataset, split=SplitConfig(0.25, 0.25, seed=3))
    assert_no_group_leak(dataset.groups, dataset.split)
    sides = np.concatenate(list(dataset.split.values()))
    assert sorted(sides) == list(range(len(dataset.images)))  # every image exactly once
    for indices in dataset.split.values():
        assert set(dataset.labels[indices]) == set(range(4))  # every class on every side
    # 4 duplicate groups of 3 files per class: fewer groups than images.
    assert len(np.unique(dataset.groups)) == len(dataset.images) - 4 * 2 * 2


def test_split_is_reproducible_and_seed_dependent():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    groups = np.arange(400) // 2
    first = split_by_group(labels, groups, SplitConfig(seed=1))
    again = split_by_group(labels, groups, SplitConfig(seed=1))
    other = split_by_group(labels, groups, SplitConfig(seed=2))
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first["test"], other["test"])
    assert_no_group_leak(groups, first)


def test_assert_no_group_leak_detects_a_leak():
    groups = np.array([0, 0, 1, 2])
    with pytest.raises(AssertionError, match="group 0"):
        assert_no_group_leak(groups, {"train": np.array([0, 2]), "test": np.array([1, 3])})


def test_split_record_selects_the_same_files_and_detects_changes(synthetic_dataset):
    dataset = load_dataset(synthetic_dataset, split=SplitConfig(0.25, 0.25, seed=0))
    record = dataset.split_record(DedupConfig(), SplitConfig(0.25, 0.25, seed=0))
    chosen = select_from_split_record(find_labelled_images(synthetic_dataset), record, "test")
    expected = sorted(dataset.images[i].relative_path for i in dataset.split["test"])
    assert sorted(image.relative_path for image in chosen) == expected
    chosen[0].path.write_bytes(jpeg_bytes(synthetic_scan("glioma", 99)))
    with pytest.raises(ValueError, match="differs"):
        select_from_split_record(find_labelled_images(synthetic_dataset), record, "test")


def test_sartaj_split_has_no_group_on_two_sides(sartaj_dir, tmp_path):
    dataset = load_dataset(sartaj_dir / "Training", cache_dir=tmp_path)
    assert_no_group_leak(dataset.groups, dataset.split)
    assert len(np.unique(dataset.groups)) < len(dataset.images)
