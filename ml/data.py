"""Data: decoding (shared by training and serving), folder discovery, near-duplicate
grouping, the leakage-free split, and cached decoded arrays.

Only Pillow and numpy are imported at module level, so the serving path
(ml.inference) can use `decode_image` without loading scikit-learn or TensorFlow.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ml.config import (
    CLASS_ALIASES,
    CLASS_NAMES,
    DEFAULT_DEDUP,
    DEFAULT_SPLIT,
    IMAGE_SUFFIXES,
    DedupConfig,
    SplitConfig,
)


class UnreadableImage(ValueError):
    """The bytes are not an image Pillow can decode."""


def _open_rgb(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        # Phone photos carry their rotation in EXIF; scanners' JPEGs have none (no-op).
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise UnreadableImage(f"image too large to decode safely: {error}") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UnreadableImage(f"cannot decode image ({len(data)} bytes): {error}") from error


def decode_image(data: bytes, size: int) -> np.ndarray:
    """THE preprocessing function of training and serving: bytes -> uint8 RGB (size, size, 3).

    Any Pillow-readable format and mode (grayscale, palette, RGBA) becomes RGB, and the
    image is resized (bilinear, aspect ratio not kept, as in the origin notebook) to a
    square. Scaling of the 0-255 values happens inside the model.
    """
    image = _open_rgb(data).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def decode_batch(images: Sequence[bytes], size: int) -> np.ndarray:
    """Decode several images into the float32 NHWC 0-255 batch every runtime takes."""
    batch = np.empty((len(images), size, size, 3), dtype=np.float32)
    for index, data in enumerate(images):
        batch[index] = decode_image(data, size)
    return batch


def progress(items: Iterable, total: int, label: str, every_seconds: float = 5.0) -> Iterator:
    """Yield items while printing 'label: done/total (rate)' to stderr now and then."""
    start = last = time.monotonic()
    count = 0
    for count, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if now - last >= every_seconds or count == total:
            rate = count / max(now - start, 1e-9)
            print(f"{label}: {count}/{total} ({rate:.1f}/s)", file=sys.stderr, flush=True)
            last = now
    if count and count != total:
        print(f"{label}: {count}/{total}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- folder discovery


def canonical_class(folder_name: str) -> str | None:
    """Map a folder name like 'glioma_tumor' or 'No Tumor' to a canonical class, else None."""
    key = folder_name.strip().lower().replace("-", "_").replace(" ", "_")
    for canonical, aliases in CLASS_ALIASES.items():
        if key in aliases:
            return canonical
    return None


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    relative_path: str  # relative to the data root given by the user, with "/" separators
    label: str  # canonical class name

    @property
    def label_index(self) -> int:
        return CLASS_NAMES.index(self.label)


def _class_folders(directory: Path) -> dict[Path, str]:
    return {
        child: label
        for child in sorted(directory.iterdir())
        if child.is_dir() and (label := canonical_class(child.name)) is not None
    }


def find_labelled_images(root: str | Path) -> list[LabelledImage]:
    """All images under `root/<class folder>/` or, failing that, `root/*/<class folder>/`.

    The second form lets a dataset root holding Training/ and Testing/ be read as one pool.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    class_folders = _class_folders(root)
    if not class_folders:
        for child in sorted(p for p in root.iterdir() if p.is_dir()):
            class_folders.update(_class_folders(child))
    if not class_folders:
        expected = ", ".join(aliases[0] for aliases in CLASS_ALIASES.values())
        raise ValueError(f"no class folders ({expected} or aliases) under {root}")
    images = [
        LabelledImage(path, path.relative_to(root).as_posix(), label)
        for folder, label in class_folders.items()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not images:
        raise ValueError(f"class folders under {root} hold no images")
    return images


def data_fingerprint(images: Sequence[LabelledImage], file_hashes: Sequence[str]) -> str:
    """sha256 over sorted (relative path, label, content sha256): names the exact training data."""
    lines = sorted(
        f"{image.relative_path}\t{image.label}\t{digest}"
        for image, digest in zip(images, file_hashes, strict=True)
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


# ---------------------------------------------------------------- near-duplicate grouping


@dataclass
class Signatures:
    """Per image: content sha256, dHash bits and a small grayscale thumbnail for the pixel check."""

    sha256: list[str]
    hash_bits: np.ndarray  # (n, hash_size**2) bool
    thumbnails: np.ndarray  # (n, pixel_size, pixel_size) uint8


def _signature_cache_path(cache_dir: Path, config: DedupConfig) -> Path:
    return cache_dir / f"signatures-h{config.hash_size}-p{config.pixel_size}.npz"


def compute_signatures(
    paths: Sequence[Path], config: DedupConfig = DEFAULT_DEDUP, cache_dir: Path | None = None
) -> Signatures:
    """Hash every file; reuse signatures cached (by content sha256) from earlier runs."""
    import imagehash  # deferred: only dataset tools need it, not serving

    cached: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    cache_path = _signature_cache_path(cache_dir, config) if cache_dir else None
    if cache_path and cache_path.exists():
        with np.load(cache_path) as stored:
            for digest, bits, thumb in zip(
                stored["sha256"], stored["hash_bits"], stored["thumbnails"], strict=True
            ):
                cached[str(digest)] = (bits, thumb)

    side = config.pixel_size
    digests: list[str] = []
    bits_out = np.zeros((len(paths), config.hash_size**2), dtype=bool)
    thumbs_out = np.zeros((len(paths), side, side), dtype=np.uint8)
    new = 0
    for index, path in enumerate(progress(paths, len(paths), "hashing images")):
        data = Path(path).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        digests.append(digest)
        if digest not in cached:
            gray = _open_rgb(data).convert("L")
            bits = imagehash.dhash(gray, hash_size=config.hash_size).hash.reshape(-1)
            thumb = np.asarray(gray.resize((side, side), Image.Resampling.BILINEAR))
            cached[digest] = (bits, thumb)
            new += 1
        bits_out[index], thumbs_out[index] = cached[digest]

    if cache_path and new:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(cached)
        np.savez(
            cache_path,
            sha256=np.array(keys),
            hash_bits=np.stack([cached[k][0] for k in keys]),
            thumbnails=np.stack([cached[k][1] for k in keys]),
        )
    return Signatures(digests, bits_out, thumbs_out)


def near_duplicate_pairs(
    signatures: Signatures,
    config: DedupConfig = DEFAULT_DEDUP,
    other: Signatures | None = None,
    chunk: int = 1024,
) -> list[tuple[int, int]]:
    """Index pairs (i, j) that are the same picture: identical bytes, or dHash distance
    <= max_hash_distance and mean absolute thumbnail difference < max_mean_pixel_difference.

    Within one set (other=None) pairs have i < j; against `other`, j indexes `other`.
    """
    right = other or signatures
    # Hamming distance via a dot product of +-1 vectors: d = (bits - a.b) / 2.
    left_signs = np.where(signatures.hash_bits, 1.0, -1.0).astype(np.float32)
    right_signs = np.where(right.hash_bits, 1.0, -1.0).astype(np.float32)
    n_bits = left_signs.shape[1]
    right_index = {}
    for j, digest in enumerate(right.sha256):
        right_index.setdefault(digest, []).append(j)

    pairs: set[tuple[int, int]] = set()
    for i, digest in enumerate(signatures.sha256):
        pairs.update((i, j) for j in right_index.get(digest, ()) if other is not None or i < j)
    for start in range(0, len(left_signs), chunk):
        distances = (n_bits - left_signs[start : start + chunk] @ right_signs.T) / 2
        for i, j in zip(*np.nonzero(distances <= config.max_hash_distance), strict=True):
            i = int(i) + start
            j = int(j)
            if (other is None and i >= j) or (i, j) in pairs:
                continue
            difference = np.abs(
                signatures.thumbnails[i].astype(np.int16) - right.thumbnails[j].astype(np.int16)
            ).mean()
            if difference < config.max_mean_pixel_difference:
                pairs.add((i, j))
    return sorted(pairs)


def group_near_duplicates(
    signatures: Signatures, config: DedupConfig = DEFAULT_DEDUP
) -> np.ndarray:
    """Group id per image: connected components of the near-duplicate graph."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    count = len(signatures.sha256)
    pairs = near_duplicate_pairs(signatures, config)
    rows = np.array([i for i, _ in pairs], dtype=np.int64)
    cols = np.array([j for _, j in pairs], dtype=np.int64)
    graph = coo_matrix((np.ones(len(pairs)), (rows, cols)), shape=(count, count))
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64)


# ---------------------------------------------------------------- the split


SPLIT_NAMES = ("train", "val", "test")


def split_by_group(
    labels: Sequence[int], groups: Sequence[int], config: SplitConfig = DEFAULT_SPLIT
) -> dict[str, np.ndarray]:
    """Stratified split that never puts one group on two sides.

    StratifiedGroupKFold cuts the data into 20 folds (5 % each; fewer for tiny data);
    test and validation take round(fraction * folds) folds each, training the rest.
    Fixed seed -> fixed split.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.asarray(labels)
    groups = np.asarray(groups)
    # Fewer folds than a class has groups would leave that class off some side.
    groups_per_class = [len(np.unique(groups[labels == label])) for label in np.unique(labels)]
    n_folds = min(20, min(groups_per_class))
    n_test = max(1, round(config.test_fraction * n_folds))
    n_val = max(1, round(config.val_fraction * n_folds)) if config.val_fraction > 0 else 0
    if n_test + n_val >= n_folds:
        raise ValueError(f"too few groups ({n_folds}) for a train/val/test split")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=config.seed)
    fold_of = np.empty(len(labels), dtype=np.int64)
    for fold, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        fold_of[held] = fold
    return {
        "test": np.flatnonzero(fold_of < n_test),
        "val": np.flatnonzero((fold_of >= n_test) & (fold_of < n_test + n_val)),
        "train": np.flatnonzero(fold_of >= n_test + n_val),
    }


@dataclass
class Dataset:
    """A labelled image folder with its duplicate groups and leakage-free split."""

    root: Path
    images: list[LabelledImage]
    signatures: Signatures
    groups: np.ndarray
    split: dict[str, np.ndarray]
    fingerprint: str

    @property
    def labels(self) -> np.ndarray:
        return np.array([image.label_index for image in self.images], dtype=np.int64)

    def split_record(self, dedup: DedupConfig, split: SplitConfig) -> dict:
        """The JSON saved next to the model: who is where, and why (auditable)."""
        side_of = {}
        for name, indices in self.split.items():
            for index in indices:
                side_of[int(index)] = name
        return {
            "data_root": str(self.root),
            "data_fingerprint": self.fingerprint,
            "dedup": vars(dedup),
            "split": vars(split),
            "counts": {name: int(len(idx)) for name, idx in self.split.items()},
            "groups": int(len(np.unique(self.groups))),
            "images": [
                {
                    "path": image.relative_path,
                    "label": image.label,
                    "sha256": self.signatures.sha256[index],
                    "group": int(self.groups[index]),
                    "split": side_of[index],
                }
                for index, image in enumerate(self.images)
            ],
        }


def load_dataset(
    root: str | Path,
    dedup: DedupConfig = DEFAULT_DEDUP,
    split: SplitConfig = DEFAULT_SPLIT,
    cache_dir: Path | None = None,
) -> Dataset:
    images = find_labelled_images(root)
    signatures = compute_signatures([image.path for image in images], dedup, cache_dir)
    groups = group_near_duplicates(signatures, dedup)
    labels = [image.label_index for image in images]
    parts = split_by_group(labels, groups, split)
    fingerprint = data_fingerprint(images, signatures.sha256)
    return Dataset(Path(root), images, signatures, groups, parts, fingerprint)


def assert_no_group_leak(groups: np.ndarray, split: dict[str, np.ndarray]) -> None:
    """Raise if any duplicate group has members on two sides of the split."""
    seen: dict[int, str] = {}
    for name, indices in split.items():
        for group in np.unique(groups[indices]):
            if seen.setdefault(int(group), name) != name:
                raise AssertionError(f"group {group} is in both {seen[int(group)]} and {name}")


def select_from_split_record(
    images: Sequence[LabelledImage], record: dict, side: str
) -> list[LabelledImage]:
    """The images of `side` in a saved split, matched by relative path and content hash."""
    wanted = {
        entry["path"]: entry["sha256"] for entry in record["images"] if entry["split"] == side
    }
    chosen = [image for image in images if image.relative_path in wanted]
    missing = set(wanted) - {image.relative_path for image in chosen}
    if missing:
        example = sorted(missing)[0]
        raise ValueError(
            f"{len(missing)} split images not found under the data root, e.g. {example}"
        )
    for image in chosen:
        if hashlib.sha256(image.path.read_bytes()).hexdigest() != wanted[image.relative_path]:
            raise ValueError(f"{image.relative_path} differs from the file the split recorded")
    return chosen


# ---------------------------------------------------------------- decoded-array cache


def decode_files(
    paths: Sequence[Path], size: int, cache_dir: Path | None = None, key: str = ""
) -> np.ndarray:
    """uint8 (n, size, size, 3) array of decoded images, cached on disk under `key`."""
    cache_path = None
    if cache_dir and key:
        cache_path = cache_dir / f"decoded-{key[:16]}-{size}.npy"
        if cache_path.exists():
            cached = np.load(cache_path)
            if len(cached) == len(paths):
                return cached
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for index, path in enumerate(progress(paths, len(paths), f"decoding at {size}px")):
        out[index] = decode_image(Path(path).read_bytes(), size)
    if cache_path:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache_path, out)
    return out


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
