"""Export: write the versioned artifact folder the workers load.

<out_dir>/model.keras    Keras model (no optimizer state), input float32 RGB 0-255 NHWC
<out_dir>/model.tflite   the same network for LiteRT (no TensorFlow needed to serve)
<out_dir>/model.json     name, version, class names, input size, preprocessing,
                         sha256 + size of every file, plus `extra` (training config,
                         data fingerprint, metrics, ...)
<out_dir>/split.json     (optional) the leakage-free split, for audits
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import UTC, datetime
from pathlib import Path

import keras
import numpy as np

from ml.config import CLASS_NAMES

ARTIFACT_FORMAT = "brain-mri-classifier/1"
PREPROCESSING = {
    "function": "ml.data.decode_image",
    "decode": "Pillow; EXIF orientation applied; converted to RGB (grayscale/RGBA/palette too)",
    "resize": "bilinear to input_size x input_size, aspect ratio not kept",
    "input": "float32 RGB 0-255, NHWC; scaling happens inside the model",
}


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def inference_copy(model: keras.Model) -> keras.Model:
    """Same architecture and weights, no optimizer state (keeps model.keras small)."""
    # Rebuilt from its config: clone_model would carry a compiled model's optimizer along.
    clean = keras.Model.from_config(model.get_config())
    clean.set_weights(model.get_weights())
    return clean


def _write_tflite(model: keras.Model, path: Path, input_size: int) -> float:
    """Convert to LiteRT and return the max |difference| to Keras on a random batch."""
    signature = [keras.InputSpec(shape=(None, input_size, input_size, 3), dtype="float32")]
    model.export(str(path), format="litert", input_signature=signature, verbose=False)
    from ai_edge_litert.interpreter import Interpreter

    probe = np.random.default_rng(0).uniform(0, 255, (2, input_size, input_size, 3))
    probe = probe.astype(np.float32)
    interpreter = Interpreter(model_path=str(path))
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], probe.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], probe)
    interpreter.invoke()
    lite = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    return float(np.abs(lite - np.asarray(model(probe, training=False))).max())


def export_artifact(
    model: keras.Model,
    out_dir: str | Path,
    *,
    name: str,
    version: str,
    class_names: tuple[str, ...] = CLASS_NAMES,
    input_size: int,
    extra: dict | None = None,
    tflite: bool = True,
    split: dict | None = None,
) -> Path:
    """Write the artifact folder and return it. `split` (a split record) goes to split.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tuple(model.output.shape[1:]) != (len(class_names),):
        raise ValueError(f"model outputs {model.output.shape}, expected {len(class_names)} classes")
    clean = inference_copy(model)
    clean.save(out / "model.keras")
    files = ["model.keras"]
    checks = {}
    if tflite:
        checks["tflite_max_abs_difference"] = _write_tflite(clean, out / "model.tflite", input_size)
        files.append("model.tflite")
    if split is not None:
        (out / "split.json").write_text(json.dumps(split) + "\n")
        files.append("split.json")
    metadata = {
        "format": ARTIFACT_FORMAT,
        "name": name,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "class_names": list(class_names),
        "input_size": int(input_size),
        "preprocessing": PREPROCESSING,
        "files": {
            filename: {
                "sha256": sha256_of(out / filename),
                "bytes": (out / filename).stat().st_size,
            }
            for filename in files
        },
        "export_checks": checks,
        "exported_with": {
            "python": platform.python_version(),
            "keras": keras.__version__,
        },
        **(extra or {}),
    }
    (out / "model.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return out
