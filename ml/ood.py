"""Out-of-distribution rejection: is this image a brain MRI slice like the training data?

Two stages, both numpy only at serving time (no scikit-learn or TensorFlow import):

1. Cheap input checks on the decoded image the model sees (uint8 RGB, input_size^2):
   - blank: the grayscale standard deviation is below `blank_max_std` (a uniform or
     near-uniform image: black, white, grey, an empty scan);
   - colour: the mean chroma (max(R,G,B) - min(R,G,B) per pixel) is above
     `colour_min_mean_chroma` - MRI slices are grayscale, even when saved as RGB JPEGs;
   - noise: neighbouring pixels differ almost as much as random pixels do (the mean
     absolute difference of horizontal and vertical neighbours over the standard deviation
     is above `noise_min_roughness`; i.i.d. noise gives about 2/sqrt(pi) = 1.13, anatomy
     far less).
   The thresholds are stored in model.json ("ood" -> "input_checks") with the training-
   split statistics they were set against.
2. A feature-space score on the pooled backbone features (the serving model's "features"
   output): the Mahalanobis distance to the closest class mean under one shared covariance
   (Lee et al. 2018), fitted on the TRAIN side of split.json with Ledoit-Wolf shrinkage
   (1280 dimensions from about 2,000 images need it). Reported as the squared distance;
   the threshold is a percentile of the in-distribution VALIDATION scores. Stored as
   ood.npz: `means` (C, D) and `whitening` (D, D) with precision = whitening @ whitening.T,
   so the score is min_c ||x W - means_c W||^2: one (D x D) matrix-vector product.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

OOD_FILE = "ood.npz"
REASON_PREFIX = "not a brain MRI slice"

# Input-check defaults; the artifact's model.json overrides them.
DEFAULT_INPUT_CHECKS = {
    "blank_max_std": 4.0,
    "colour_min_mean_chroma": 20.0,
    "noise_min_roughness": 0.6,
}


@dataclass(frozen=True)
class ImageStatistics:
    std: float  # grayscale standard deviation, 0-255
    mean_chroma: float  # mean of max(R,G,B) - min(R,G,B), 0-255
    roughness: float  # mean |neighbour difference| / std (0 for a blank image)


def image_statistics(image: np.ndarray) -> ImageStatistics:
    """Statistics of one decoded image, (size, size, 3) RGB 0-255 (uint8 or float).
    Channel slices rather than reductions over the last axis: about 1 ms at 224 px."""
    pixels = np.asarray(image, dtype=np.float32)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    gray = (red + green + blue) / 3
    std = float(gray.std())
    chroma = np.maximum(np.maximum(red, green), blue) - np.minimum(np.minimum(red, green), blue)
    if std > 0:
        steps = np.abs(np.diff(gray, axis=0)).mean() + np.abs(np.diff(gray, axis=1)).mean()
        roughness = float(steps / 2 / std)
    else:
        roughness = 0.0
    return ImageStatistics(std, float(chroma.mean()), roughness)


def input_check(image: np.ndarray, checks: dict | None = None) -> str:
    """ "" when the image passes, else the rejection reason (a short sentence)."""
    limits = {**DEFAULT_INPUT_CHECKS, **(checks or {})}
    stats = image_statistics(image)
    if stats.std < limits["blank_max_std"]:
        return f"{REASON_PREFIX}: the image is blank (almost a single grey level)"
    if stats.mean_chroma > limits["colour_min_mean_chroma"]:
        return f"{REASON_PREFIX}: the image is in colour (MRI slices are grayscale)"
    if stats.roughness > limits["noise_min_roughness"]:
        return f"{REASON_PREFIX}: the image looks like random noise"
    return ""


def feature_reason(score: float, threshold: float) -> str:
    return (
        f"{REASON_PREFIX}: the image is out of the model's training distribution "
        f"(score {score:.1f} > threshold {threshold:.1f})"
    )


class MahalanobisScorer:
    """min over classes of the squared Mahalanobis distance, shared (tied) covariance."""

    def __init__(self, means: np.ndarray, whitening: np.ndarray):
        self.whitening = np.ascontiguousarray(whitening, dtype=np.float32)
        self.means = np.asarray(means, dtype=np.float32)
        self._whitened_means = self.means @ self.whitening  # (C, D)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """(n, D) pooled features -> (n,) scores (float64)."""
        # einsum, not `@`: a matrix-vector product through multithreaded BLAS leaves its
        # threads spinning on the cores LiteRT needs next (measured: LiteRT at 2 threads
        # went from ~4 to ~8 ms per image); einsum's own loop takes ~0.2 ms on one core.
        whitened = np.einsum("nd,de->ne", np.asarray(features, dtype=np.float32), self.whitening)
        # (n, C, D) differences: C is small, and no |a|^2 - 2ab + |b|^2 cancellation.
        differences = whitened[:, None, :] - self._whitened_means[None, :, :]
        return np.einsum("ncd,ncd->nc", differences, differences).min(axis=1).astype(np.float64)

    def save(self, path: str | Path) -> None:
        # Uncompressed: float32 noise does not compress, and np.load stays a plain read.
        np.savez(path, means=self.means, whitening=self.whitening)

    @classmethod
    def load(cls, path: str | Path) -> MahalanobisScorer:
        with np.load(path) as stored:
            return cls(stored["means"], stored["whitening"])


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray) -> MahalanobisScorer:
    """Class means and the Ledoit-Wolf shrunk covariance of the class-centred features."""
    from sklearn.covariance import LedoitWolf

    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(axis=0) for c in classes])
    centred = features - means[np.searchsorted(classes, labels)]
    covariance = LedoitWolf(assume_centered=True).fit(centred).covariance_
    # precision = V diag(1/w) V^T = W W^T with W = V diag(1/sqrt(w)).
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    whitening = eigenvectors / np.sqrt(np.maximum(eigenvalues, 1e-12))[None, :]
    return MahalanobisScorer(means.astype(np.float32), whitening.astype(np.float32))


@dataclass
class OODDetector:
    """What load_classifier reads from the artifact: input checks + the feature score."""

    scorer: MahalanobisScorer | None
    threshold: float  # scores above it are rejected (inf: never)
    checks: dict

    @classmethod
    def from_artifact(cls, folder: Path, metadata: dict) -> OODDetector:
        config = metadata.get("ood") or {}
        checks = {**DEFAULT_INPUT_CHECKS, **config.get("input_checks", {}).get("thresholds", {})}
        filename = config.get("file")
        if not filename:
            return cls(None, float("inf"), checks)
        return cls(
            MahalanobisScorer.load(Path(folder) / filename), float(config["threshold"]), checks
        )

    def scores(self, features: np.ndarray | None, count: int) -> np.ndarray:
        if self.scorer is None or features is None:
            return np.full(count, np.nan)
        return self.scorer(features)

    def reasons(self, images: np.ndarray, scores: np.ndarray) -> list[str]:
        """One rejection reason per image ("" = accepted): input checks first."""
        out = []
        for image, score in zip(images, scores, strict=True):
            reason = input_check(image, self.checks)
            if not reason and score > self.threshold:
                reason = feature_reason(float(score), self.threshold)
            out.append(reason)
        return out
