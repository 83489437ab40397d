"""Export: write the versioned artifact folder the workers load.

<out_dir>/model.keras    Keras serving model (no optimizer state), input float32 RGB 0-255
                         NHWC, outputs {"probabilities", "cam", "features"}
                         (ml.model.serving_model: one forward pass gives all three)
<out_dir>/model.tflite   the same network for LiteRT (no TensorFlow needed to serve), with
                         the same three outputs named in its signature
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
from ml.model import OUTPUT_PROBABILITIES, serving_model

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


def _write_tflite(model: keras.Model, path: Path, input_size: int) -> dict[str, float]:
    """Convert to LiteRT; return the max |difference| to Keras per output on a random batch."""
    signature = [keras.InputSpec(shape=(None, input_size, input_size, 3), dtype="float32")]
    model.export(str(path), format="litert", input_signature=signature, verbose=False)
    from ml.inference import _LiteRTRunner

    probe = np.random.default_rng(0).uniform(0, 255, (2, input_size, input_size, 3))
    probe = probe.astype(np.float32)
    expected = model(probe, training=False)
    if not isinstance(expected, dict):
        expected = {OUTPUT_PROBABILITIES: expected}
    num_classes = int(model.output[OUTPUT_PROBABILITIES].shape[-1])
    lite = _LiteRTRunner(path, threads=1, num_classes=num_classes)(probe)
    if set(lite) != set(expected):
        raise ValueError(f"LiteRT outputs {sorted(lite)}, Keras {sorted(expected)}")
    return {name: float(np.abs(lite[name] - np.asarray(expected[name])).max()) for name in expected}


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
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write the artifact folder and return it. `split` (a split record) goes to split.json;
    `extra_files` (name -> path) are copied in and listed in "files" with their sha256."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = serving_model(model)
    probabilities = model.output[OUTPUT_PROBABILITIES]
    if tuple(probabilities.shape[1:]) != (len(class_names),):
        raise ValueError(
            f"model outputs {probabilities.shape}, expected {len(class_names)} classes"
        )
    clean = inference_copy(model)
    clean.save(out / "model.keras")
    files = ["model.keras"]
    checks = {}
    if tflite:
        differences = _write_tflite(clean, out / "model.tflite", input_size)
        checks["tflite_max_abs_difference"] = differences[OUTPUT_PROBABILITIES]
        checks["tflite_max_abs_difference_per_output"] = differences
        files.append("model.tflite")
    if split is not None:
        (out / "split.json").write_text(json.dumps(split) + "\n")
        files.append("split.json")
    for filename, source in (extra_files or {}).items():
        if Path(source).resolve() != (out / filename).resolve():
            (out / filename).write_bytes(Path(source).read_bytes())
        files.append(filename)
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
