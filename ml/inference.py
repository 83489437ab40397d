"""Inference: load an exported artifact and classify image bytes.

    from ml.inference import load_classifier
    classifier = load_classifier()            # the shipped model (env MODEL_DIR overrides)
    [prediction] = classifier.predict([jpeg_bytes])
    if prediction.rejected:             # not a brain MRI slice: do not show a label
        prediction.rejection_reason
    prediction.label, prediction.probabilities, prediction.needs_review
    prediction.heatmap                  # (7, 7) float32 0..1, see ml.heatmap.overlay_png

One forward pass gives the calibrated probabilities, the class activation maps and the
pooled features (the artifact's serving model, ml.model.serving_model); the OOD score and
the input checks (ml.ood) are numpy on top. runtime "auto" uses LiteRT (ai_edge_litert)
when the artifact has model.tflite and the package imports, and never imports TensorFlow
on that path; otherwise Keras.
Decoding and resizing are ml.data.decode_image, the function training used.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ml.config import CLASS_NAMES, DEFAULT_MODEL_NAME, MODELS_DIR
from ml.data import UnreadableImage, decode_batch
from ml.ood import OODDetector

# The serving model's outputs (ml.model.OUTPUT_*; repeated so this module needs no Keras).
PROBABILITIES, CAM, FEATURES = "probabilities", "cam", "features"

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
    """One image's result. Check `rejected` first: a rejected image is not a brain MRI
    slice (or not one like the training data), and its label must not be shown."""

    label: str  # one of the classifier's class_names (the argmax, also when rejected)
    probabilities: dict[str, float]  # every class, summing to 1 (temperature-calibrated)
    # Class activation map of `label` at feature resolution (7x7 for 224 px), float32,
    # ReLU'd and divided by its maximum (0..1; all zeros when no location has positive
    # evidence). None only when the artifact has no CAM output.
    heatmap: np.ndarray | None = field(default=None, repr=False, compare=False)
    # Squared Mahalanobis distance of the pooled features to the nearest class mean
    # (higher = less like the training data); NaN when the artifact has no OOD model.
    ood_score: float = float("nan")
    rejection_reason: str = ""  # "" when accepted, else a short sentence
    needs_review: bool = False  # top probability below the classifier's review_threshold

    @property
    def rejected(self) -> bool:
        return bool(self.rejection_reason)


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


def _as_outputs(result) -> dict[str, np.ndarray]:
    """A runner's raw result -> {"probabilities": ..., ["cam": ..., "features": ...]}.
    Artifacts from before the serving model have the probabilities only."""
    if isinstance(result, dict):
        return {name: np.asarray(value) for name, value in result.items()}
    return {PROBABILITIES: np.asarray(result)}


def _litert_output_indices(interpreter, num_classes: int | None) -> dict[str, int]:
    """Output tensor index per output name. LiteRT may order outputs differently from the
    Keras model, and its tensor names are generic ("StatefulPartitionedCall:1"), so take
    the names from the signature; without one, tell them apart by shape: rank 4 is the
    CAM, rank 2 with `num_classes` columns the probabilities, other rank 2 the features."""
    details = interpreter.get_output_details()
    try:
        signatures = interpreter.get_signature_list()
        if len(signatures) == 1:
            runner = interpreter.get_signature_runner(next(iter(signatures)))
            named = {name: detail["index"] for name, detail in runner.get_output_details().items()}
            if PROBABILITIES in named:
                return named
    except (ValueError, KeyError, AttributeError):
        pass
    if len(details) == 1:
        return {PROBABILITIES: details[0]["index"]}
    found: dict[str, int] = {}
    for detail in details:
        shape = detail.get("shape_signature", detail["shape"])
        if len(shape) == 4:
            found[CAM] = detail["index"]
        elif len(shape) == 2 and (num_classes is None or shape[-1] == num_classes):
            found.setdefault(PROBABILITIES, detail["index"])
        elif len(shape) == 2:
            found[FEATURES] = detail["index"]
    if PROBABILITIES not in found:
        raise ValueError("no probabilities output found in the LiteRT model")
    return found


class _LiteRTRunner:
    """LiteRT interpreters, each with `threads` threads, shared by the caller's threads.

    One interpreter holds one set of tensors, so a call takes a free one (waiting when all
    are busy) and gives it back. Several single-threaded interpreters beat one with as many
    threads: on 2 cores, two interpreters of 1 thread ran 156 images/s from JPEG against
    119-124 for one of 2 threads, because a batch-1 call parallelises poorly across threads
    while two calls side by side keep both cores busy (bench/runtime.py, "lanes").
    """

    def __init__(self, path: Path, threads: int, num_classes: int | None = None, lanes: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        self._lanes = []
        for _ in range(max(int(lanes), 1)):
            interpreter = Interpreter(model_path=str(path), num_threads=threads)
            self._lanes.append(_Lane(interpreter, _litert_output_indices(interpreter, num_classes)))
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for lane in self._lanes:
            self._free.put(lane)

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(sorted(self._lanes[0].outputs))

    def warm_up(self, size: int) -> None:
        """Allocate every interpreter's tensors for batch 1, all at once (not one by one:
        the worker's cold start)."""
        blank = np.zeros((1, size, size, 3), np.float32)
        threads = [threading.Thread(target=lane, args=(blank,)) for lane in self._lanes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        lane = self._free.get()
        try:
            return lane(batch)
        finally:
            self._free.put(lane)


class _Lane:
    def __init__(self, interpreter, outputs: dict[str, int]):
        self.interpreter, self.outputs = interpreter, outputs
        self.input = interpreter.get_input_details()[0]["index"]
        self.batch = None

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self.batch != len(batch):
            self.interpreter.resize_tensor_input(self.input, batch.shape)
            self.interpreter.allocate_tensors()
            self.batch = len(batch)
        self.interpreter.set_tensor(self.input, batch)
        self.interpreter.invoke()
        return {name: np.array(self.interpreter.get_tensor(i)) for name, i in self.outputs.items()}


class MicroBatcher:
    """Run single-image calls from many threads as batches: the first caller waits up to
    `max_wait_s` for others (or until `max_batch` are waiting), then one call runs them all.

    This is the GPU path (runtime "tf_gpu"): a GPU call costs far less than its batch
    size times a single image's, so the jobs a threads-pool worker holds at once share one
    call. CPU workers (LiteRT) do not go through it: LiteRT measured no faster per image
    at batch 8/32 than at batch 1 (bench/results/runtime.md). max_batch 1 calls the runner
    directly. The runner returns an array, or a dict of arrays (one row per input each).
    """

    def __init__(self, run, max_batch: int, max_wait_s: float):
        self._run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
        self._condition = threading.Condition()
        self._waiting: list[list] = []  # [input row, output row or None, error or None]
        self._running = threading.Lock()
        self.batch_sizes: list[int] = []  # every batch run, for tests and metrics

    def __call__(self, batch: np.ndarray):
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
        if isinstance(entry[1], dict):
            return {name: row[np.newaxis] for name, row in entry[1].items()}
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
        if isinstance(outputs, dict):
            for index, entry in enumerate(taken):
                entry[1] = {name: np.asarray(value)[index] for name, value in outputs.items()}
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

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        result = self._call(batch)
        if isinstance(result, dict):
            return {name: value.numpy() for name, value in result.items()}
        return _as_outputs(result.numpy())


class _KerasRunner:
    def __init__(self, path: Path, use_predict: bool = False):
        import keras

        self._model = keras.saving.load_model(path, compile=False)
        self._use_predict = use_predict

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self._use_predict:
            return _as_outputs(self._model.predict(batch, verbose=0, batch_size=len(batch)))
        # Calling the model directly avoids model.predict's per-call overhead.
        return _as_outputs(self._model(batch, training=False))


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
    # Predictions whose top probability is below this are flagged needs_review
    # (model.json "review_threshold"; 0 = never).
    review_threshold: float = 0.0
    ood: OODDetector = field(
        default_factory=lambda: OODDetector(None, float("inf"), {}), repr=False
    )

    @property
    def parallel_calls(self) -> int:
        """How many calls may usefully run at once, from as many threads (LiteRT lanes)."""
        return getattr(self._run, "lanes", 1)

    @property
    def batches_calls(self) -> bool:
        """Whether several images per call pay off: on a GPU (bench/results/gpu.md), not
        with LiteRT on a CPU, which measured fastest per image at batch 1."""
        return self.runtime == "tf_gpu"

    def run_batch(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """float32 (n, size, size, 3) RGB 0-255 -> the model's outputs: "probabilities"
        (n, classes), and when the artifact has them "cam" (n, h, w, classes) and
        "features" (n, D). One forward pass per chunk of BATCH_SIZE."""
        outputs = [
            _as_outputs(
                self._run(np.ascontiguousarray(batch[start : start + BATCH_SIZE], np.float32))
            )
            for start in range(0, len(batch), BATCH_SIZE)
        ]
        if not outputs:
            return {PROBABILITIES: np.zeros((0, len(self.class_names)))}
        joined = {name: np.concatenate([out[name] for out in outputs]) for name in outputs[0]}
        probabilities = joined[PROBABILITIES].astype(np.float64)
        joined[PROBABILITIES] = probabilities / probabilities.sum(axis=1, keepdims=True)
        return joined

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """float32 (n, size, size, 3) RGB 0-255 -> (n, classes) probabilities."""
        return self.run_batch(batch)[PROBABILITIES]

    def warm_up(self) -> None:
        """One call on a blank image: allocates the runtime's tensors (and traces the
        graph on TensorFlow), so the first real job does not pay for it."""
        if isinstance(self._run, _LiteRTRunner):
            self._run.warm_up(self.input_size)
            return
        self.run_batch(np.zeros((1, self.input_size, self.input_size, 3), np.float32))

    def analyse_batch(self, batch: np.ndarray) -> list[Prediction]:
        """Decoded images (n, size, size, 3) RGB 0-255 -> full Predictions."""
        outputs = self.run_batch(batch)
        probabilities = outputs[PROBABILITIES]
        labels = probabilities.argmax(axis=1)
        heatmaps = class_heatmaps(outputs.get(CAM), labels)
        scores = self.ood.scores(outputs.get(FEATURES), len(batch))
        reasons = self.ood.reasons(batch, scores)
        return [
            Prediction(
                label=self.class_names[int(labels[index])],
                probabilities={
                    name: float(p)
                    for name, p in zip(self.class_names, probabilities[index], strict=True)
                },
                heatmap=None if heatmaps is None else heatmaps[index],
                ood_score=float(scores[index]),
                rejection_reason=reasons[index],
                needs_review=bool(probabilities[index].max() < self.review_threshold),
            )
            for index in range(len(batch))
        ]

    def predict(self, images: Sequence[bytes]) -> list[Prediction]:
        """Classify encoded images (JPEG, PNG, ...). Raises UnreadableImage for bad bytes."""
        if not images:
            return []
        return self.analyse_batch(decode_batch(images, self.input_size))


def class_heatmaps(cam: np.ndarray | None, labels: np.ndarray) -> np.ndarray | None:
    """(n, h, w, C) class activation maps -> (n, h, w) float32 maps of each image's label,
    ReLU'd and scaled to 0..1 by their maximum (all zeros when nothing is positive)."""
    if cam is None:
        return None
    chosen = np.maximum(cam[np.arange(len(labels)), :, :, labels], 0.0).astype(np.float32)
    peaks = chosen.reshape(len(labels), -1).max(axis=1)
    scale = np.where(peaks > 0, peaks, 1.0).astype(np.float32)
    return chosen / scale[:, None, None]


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
    digest = _verify(path, files)
    lanes, threads = litert_lanes_and_threads()
    class_names = tuple(metadata["class_names"])
    ood_file = (metadata.get("ood") or {}).get("file")
    if ood_file:
        _verify(folder / ood_file, files)
    ood = OODDetector.from_artifact(folder, metadata)
    if runtime == "litert":
        run = _LiteRTRunner(path, threads, num_classes=len(class_names), lanes=lanes)
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
        class_names=class_names,
        model_dir=folder,
        metadata=metadata,
        _run=run,
        review_threshold=float(metadata.get("review_threshold", 0.0)),
        ood=ood,
    )


def litert_lanes_and_threads() -> tuple[int, int]:
    """LiteRT interpreters per process (ML_INTERPRETERS) and threads per interpreter
    (ML_NUM_THREADS). Defaults: 2 interpreters (1 on a single core), sharing at most 4
    cores between them; measured on 2 cores in bench/results/runtime.md ("lanes")."""
    cores = os.cpu_count() or 1
    lanes = int(os.environ.get("ML_INTERPRETERS", min(2, cores)))
    threads = int(os.environ.get("ML_NUM_THREADS", max(min(4, cores) // max(lanes, 1), 1)))
    return lanes, threads


def _verify(path: Path, files: dict) -> str:
    """The file's sha256, after checking it exists and matches what model.json lists."""
    if not path.is_file() or path.name not in files:
        raise FileNotFoundError(f"{path.name} missing from the model artifact in {path.parent}")
    digest = _sha256(path)
    if digest != files[path.name]["sha256"]:
        raise ValueError(
            f"{path} does not match model.json (sha256 {digest[:12]}..., expected "
            f"{files[path.name]['sha256'][:12]}...): a corrupt copy or a Git LFS pointer?"
        )
    return digest
