"""Inference: load an exported artifact and classify image bytes.

    from ml.inference import load_classifier
    classifier = load_classifier()            # the shipped model (env MODEL_DIR overrides)
    [prediction] = classifier.predict([jpeg_bytes])
    prediction.label, prediction.probabilities

runtime "auto" uses LiteRT (ai_edge_litert) when the artifact has model.tflite and the
package imports, and never imports TensorFlow on that path; otherwise Keras.
Decoding and resizing are ml.data.decode_image, the function training used.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ml.config import CLASS_NAMES, DEFAULT_MODEL_NAME, MODELS_DIR
from ml.data import UnreadableImage, decode_batch

__all__ = [
    "CLASS_NAMES",
    "Classifier",
    "Prediction",
    "UnreadableImage",
    "default_model_dir",
    "load_classifier",
]

RUNTIMES = ("auto", "litert", "keras")
BATCH_SIZE = 32


@dataclass(frozen=True)
class Prediction:
    label: str  # one of the classifier's class_names
    probabilities: dict[str, float]  # every class, summing to 1


def default_model_dir() -> Path:
    """The artifact committed in the repo, unless env MODEL_DIR names another folder."""
    configured = os.environ.get("MODEL_DIR")
    return Path(configured) if configured else MODELS_DIR / DEFAULT_MODEL_NAME


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _LiteRTRunner:
    def __init__(self, path: Path, threads: int):
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._batch = None
        # One interpreter holds one set of tensors: serialise calls from threads.
        self._lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            if self._batch != len(batch):
                self._interpreter.resize_tensor_input(self._input, batch.shape)
                self._interpreter.allocate_tensors()
                self._batch = len(batch)
            self._interpreter.set_tensor(self._input, batch)
            self._interpreter.invoke()
            return np.array(self._interpreter.get_tensor(self._output))


class _KerasRunner:
    def __init__(self, path: Path):
        import keras

        self._model = keras.saving.load_model(path, compile=False)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        # Calling the model directly avoids model.predict's per-call overhead.
        return np.asarray(self._model(batch, training=False))


@dataclass
class Classifier:
    name: str
    version: str
    sha256: str  # of the model file this runtime loaded (model.tflite or model.keras)
    input_size: int
    runtime: str  # "litert" or "keras"
    class_names: tuple[str, ...]
    model_dir: Path
    metadata: dict = field(repr=False)
    _run: object = field(repr=False)

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """float32 (n, size, size, 3) RGB 0-255 -> (n, classes) probabilities."""
        outputs = [
            self._run(np.ascontiguousarray(batch[start : start + BATCH_SIZE], dtype=np.float32))
            for start in range(0, len(batch), BATCH_SIZE)
        ]
        probabilities = np.concatenate(outputs).astype(np.float64)
        return probabilities / probabilities.sum(axis=1, keepdims=True)

    def predict(self, images: Sequence[bytes]) -> list[Prediction]:
        """Classify encoded images (JPEG, PNG, ...). Raises UnreadableImage for bad bytes."""
        if not images:
            return []
        probabilities = self.predict_batch(decode_batch(images, self.input_size))
        return [
            Prediction(
                label=self.class_names[int(np.argmax(row))],
                probabilities={
                    name: float(p) for name, p in zip(self.class_names, row, strict=True)
                },
            )
            for row in probabilities
        ]


def _litert_available() -> bool:
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return False
    return True


def load_classifier(model_dir: str | Path | None = None, runtime: str = "auto") -> Classifier:
    """Load the artifact in `model_dir` (default: default_model_dir()) with the given runtime."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, not {runtime!r}")
    folder = Path(model_dir) if model_dir is not None else default_model_dir()
    metadata_path = folder / "model.json"
    if not metadata_path.is_file():
        raise FileNotFoundError(f"no model artifact in {folder} (model.json missing)")
    metadata = json.loads(metadata_path.read_text())
    files = metadata.get("files", {})
    if runtime == "auto":
        has_tflite = "model.tflite" in files and (folder / "model.tflite").is_file()
        runtime = "litert" if has_tflite and _litert_available() else "keras"
    filename = "model.tflite" if runtime == "litert" else "model.keras"
    path = folder / filename
    if not path.is_file() or filename not in files:
        raise FileNotFoundError(f"{filename} missing from the model artifact in {folder}")
    digest = _sha256(path)
    if digest != files[filename]["sha256"]:
        raise ValueError(
            f"{path} does not match model.json (sha256 {digest[:12]}..., expected "
            f"{files[filename]['sha256'][:12]}...): a corrupt copy or a Git LFS pointer?"
        )
    threads = int(os.environ.get("ML_NUM_THREADS", min(4, os.cpu_count() or 1)))
    run = _LiteRTRunner(path, threads) if runtime == "litert" else _KerasRunner(path)
    return Classifier(
        name=metadata["name"],
        version=str(metadata["version"]),
        sha256=digest,
        input_size=int(metadata["input_size"]),
        runtime=runtime,
        class_names=tuple(metadata["class_names"]),
        model_dir=folder,
        metadata=metadata,
        _run=run,
    )
