"""Constants and options shared by the ml package (no heavy imports here)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Canonical labels, in the order of the model's output units.
CLASS_NAMES: tuple[str, ...] = ("glioma", "meningioma", "no_tumor", "pituitary")

# Folder names accepted for each class (matched case-insensitively, "-" and " " read as "_").
CLASS_ALIASES: dict[str, tuple[str, ...]] = {
    "glioma": ("glioma", "glioma_tumor", "glioma_tumour"),
    "meningioma": ("meningioma", "meningioma_tumor", "meningioma_tumour"),
    "no_tumor": ("no_tumor", "notumor", "no_tumour", "notumour", "normal", "healthy"),
    "pituitary": ("pituitary", "pituitary_tumor", "pituitary_tumour"),
}

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(__file__).resolve().parent / "models"
# Folder (under MODELS_DIR) of the artifact the workers load unless MODEL_DIR says otherwise.
DEFAULT_MODEL_NAME = "brain-mri-lite0-1.1.0"


def default_dataset_dir() -> Path:
    """The shared Sartaj dataset: env SARTAJ_DATA, else ../shared/datasets/... from the repo."""
    configured = os.environ.get("SARTAJ_DATA")
    if configured:
        return Path(configured)
    return REPO_ROOT.parent / "shared" / "datasets" / "sartaj-brain-tumor-mri"


def default_cache_dir() -> Path:
    """Decoded images and cached features live here (git-ignored /cache/)."""
    return Path(os.environ.get("ML_CACHE_DIR", REPO_ROOT / "cache" / "ml"))


@dataclass(frozen=True)
class DedupConfig:
    """Near-duplicate rule: dHash within `max_hash_distance` bits AND a small pixel difference."""

    hash_size: int = 16  # 16x16 = 256-bit dHash
    max_hash_distance: int = 32
    pixel_size: int = 64  # grayscale thumbnail side for the pixel check
    max_mean_pixel_difference: float = 4.0  # mean absolute difference, 0-255 scale


@dataclass(frozen=True)
class SplitConfig:
    """Stratified group split: test and validation fractions, and the seed that fixes it."""

    test_fraction: float = 0.15
    val_fraction: float = 0.15
    seed: int = 0


# Immutable defaults, usable as argument defaults.
DEFAULT_DEDUP = DedupConfig()
DEFAULT_SPLIT = SplitConfig()


@dataclass
class TrainConfig:
    """Every knob of ml.train; saved into the artifact so a run can be repeated."""

    backbone: str = "efficientnet_b0"
    weights: str | None = None  # None (random), "imagenet", or a local weights file
    input_size: int = 224
    dropout: float = 0.5
    batch_size: int = 32
    # Phase 1 trains the head on a frozen backbone; phase 2 fine-tunes the top blocks.
    head_epochs: int = 5
    head_learning_rate: float = 1e-3
    epochs: int = 20
    learning_rate: float = 1e-4
    fine_tune_blocks: int = 11  # how many of the 16 MBConv blocks phase 2 unfreezes (plus top conv)
    label_smoothing: float = 0.1
    # Cache the frozen part of the network on this many augmented views per training image.
    cached_views: int = 6
    cache_features: bool = True
    early_stopping_patience: int = 5
    reduce_lr_patience: int = 2
    max_minutes: float | None = None  # wall-clock budget for the fit loop
    seed: int = 0
    dedup: DedupConfig = field(default_factory=DedupConfig)
    split: SplitConfig = field(default_factory=SplitConfig)

    def to_dict(self) -> dict:
        return asdict(self)
