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
import time
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

# "keras_predict" is the naive way (Keras model.predict per call), kept as the baseline
# that bench/worker.py measures our worker against.
# "tf_gpu" is TensorFlow with batched calls (MicroBatcher), what "auto" picks on a GPU node.
RUNTIMES = ("auto", "litert", "keras", "keras_predict", "tf_gpu")
# GPU micro-batching: how many waiting jobs share a call, and how long the first waits.
GPU_MAX_BATCH = int(os.environ.get("ML_GPU_MAX_BATCH", "32"))
GPU_MAX_WAIT_S = float(os.environ.get("ML_GPU_MAX_WAIT_MS", "5")) / 1000
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


class MicroBatcher:
    """Run single-image calls from many threads as batches: the first caller waits up to
    `max_wait_s` for others (or until `max_batch` are waiting), then one call runs them all.

    This is the GPU path (runtime "tf_gpu"): a GPU call costs far less than its batch
    size times a single image's, so the jobs a threads-pool worker holds at once share one
    call. CPU workers (LiteRT) do not go through it: LiteRT measured no faster per image
    at batch 8/32 than at batch 1 (bench/results/runtime.md). max_batch 1 calls the runner
    directly.
    """

    def __init__(self, run, max_batch: int, max_wait_s: float):
        self._run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
        self._condition = threading.Condition()
        self._waiting: list[list] = []  # [input row, output row or None, error or None]
        self._running = threading.Lock()
        self.batch_sizes: list[int] = []  # every batch run, for tests and metrics

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.max_batch <= 1 or len(batch) != 1:
            return self._run(batch)
        entry = [batch[0], None, None]
        with self._condition:
            self._waiting.append(entry)
            self._condition.notify_all()
        # Whoever holds the runner takes every waiting row; the others wait for theirs.
        with self._running:
            if entry[1] is None and entry[2] is None:
                self._gather_and_run()
        if entry[2] is not None:
            raise entry[2]
        return entry[1][np.newaxis]

    def _gather_and_run(self) -> None:
        deadline = time.monotonic() + self.max_wait_s
        with self._condition:
            while len(self._waiting) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0 or not self._condition.wait(left):
                    break
            taken, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
        self.batch_sizes.append(len(taken))
        try:
            outputs = self._run(np.stack([entry[0] for entry in taken]))
        except Exception as error:  # every caller in the batch gets the model's error
            for entry in taken:
                entry[2] = error
            return
        for entry, row in zip(taken, outputs, strict=True):
            entry[1] = row


def gpu_devices() -> list[str]:
    """NVIDIA devices this process may use, found without importing TensorFlow (a CPU
    worker must not pay its import): /dev/nvidiaN, narrowed by CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return []
    return sorted(str(path) for path in Path("/dev").glob("nvidia[0-9]*"))


def choose_runtime(has_tflite: bool, litert_available: bool, devices: list[str]) -> str:
    """auto: TensorFlow batched on a GPU node; LiteRT on CPU (fastest measured on CPU,
    bench/results/runtime.md); Keras when the artifact has no TFLite file."""
    if devices:
        return "tf_gpu"
    return "litert" if has_tflite and litert_available else "keras"


class _TFFunctionRunner:
    """The GPU path: one compiled graph with a free batch dimension (no retracing per
    batch size), placed on the GPU by TensorFlow."""

    def __init__(self, path: Path):
        import keras
        import tensorflow as tf

        model = keras.saving.load_model(path, compile=False)
        size = model.input_shape[1]
        signature = [tf.TensorSpec([None, size, size, 3], tf.float32)]
        self._call = tf.function(lambda x: model(x, training=False), input_signature=signature)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._call(batch).numpy()


class _KerasRunner:
    def __init__(self, path: Path, use_predict: bool = False):
        import keras

        self._model = keras.saving.load_model(path, compile=False)
        self._use_predict = use_predict

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self._use_predict:
            return np.asarray(self._model.predict(batch, verbose=0, batch_size=len(batch)))
        # Calling the model directly avoids model.predict's per-call overhead.
        return np.asarray(self._model(batch, training=False))


@dataclass
class Classifier:
    name: str
    version: str
    sha256: str  # of the model file this runtime loaded (model.tflite or model.keras)
    input_size: int
    runtime: str  # "litert", "keras", "keras_predict" or "tf_gpu"
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

    def warm_up(self) -> None:
        """One call on a blank image: allocates the runtime's tensors (and traces the
        graph on TensorFlow), so the first real job does not pay for it."""
        self.predict_batch(np.zeros((1, self.input_size, self.input_size, 3), np.float32))

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
        runtime = choose_runtime(has_tflite, _litert_available(), gpu_devices())
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
    if runtime == "litert":
        run = _LiteRTRunner(path, threads)
    elif runtime == "tf_gpu":
        run = MicroBatcher(_TFFunctionRunner(path), GPU_MAX_BATCH, GPU_MAX_WAIT_S)
    else:
        run = _KerasRunner(path, use_predict=runtime == "keras_predict")
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
