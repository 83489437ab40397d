"""Fixtures for ml tests: tiny synthetic class folders (no dataset needed)."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml.config import REPO_ROOT

# Folder names deliberately mix the aliases the loader must accept.
FOLDERS = {
    "glioma": "glioma_tumor",
    "meningioma": "Meningioma",
    "no_tumor": "notumor",
    "pituitary": "pituitary_tumor",
}


def synthetic_scan(label: str, variant: int, size: int = 48) -> Image.Image:
    """A grayscale 'scan' whose bright blob position encodes the class; variants differ
    in noise and blob offset, so they are not near-duplicates of each other."""
    yy, xx = np.mgrid[:size, :size]
    # Smooth background: JPEG re-encoding keeps it close (noise would not survive).
    pixels = 40 + 30 * np.sin(xx / 6 + variant) * np.cos(yy / 9 - variant)
    centres = {"glioma": (12, 12), "meningioma": (12, 36), "no_tumor": None, "pituitary": (36, 24)}
    if centres[label] is not None:
        cy, cx = centres[label]
        cy += variant % 3 - 1
        cx += (variant // 3) % 3 - 1
        pixels[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = 230
    # A variant-specific stripe makes each image distinct to the perceptual hash.
    pixels[:, (variant * 7) % size] = 255 - pixels[:, (variant * 7) % size]
    pixels[(variant * 5) % size, :] = 200
    return Image.fromarray(pixels.astype(np.uint8), mode="L")


def jpeg_bytes(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def write_synthetic_dataset(root: Path, per_class: int = 8, duplicates: int = 2) -> Path:
    """Class folders with `per_class` distinct images each, plus `duplicates` re-encoded
    (near-duplicate) and byte-identical copies per class."""
    for label, folder in FOLDERS.items():
        directory = root / folder
        directory.mkdir(parents=True)
        for variant in range(per_class):
            scan = synthetic_scan(label, variant)
            (directory / f"img{variant}.jpg").write_bytes(jpeg_bytes(scan))
        for copy in range(duplicates):
            scan = synthetic_scan(label, copy)
            (directory / f"copy{copy}-reencoded.jpg").write_bytes(jpeg_bytes(scan, quality=80))
            (directory / f"copy{copy}-identical.jpg").write_bytes(jpeg_bytes(scan))
    return root


@pytest.fixture
def synthetic_dataset(tmp_path) -> Path:
    return write_synthetic_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def sartaj_dir() -> Path:
    """The shared dataset (env SARTAJ_DATA), or skip the test with the reason."""
    from ml.config import default_dataset_dir

    path = default_dataset_dir()
    if not (path / "Training").is_dir():
        pytest.skip(f"Sartaj dataset not found at {path} (set SARTAJ_DATA)")
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shipped():
    """The committed artifact's folder (tests of it skip where it is missing)."""
    from ml.inference import default_model_dir

    folder = default_model_dir()
    if not (folder / "model.json").is_file():
        pytest.skip(f"no shipped artifact at {folder}")
    return folder
