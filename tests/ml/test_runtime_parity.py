"""The CPU serving runtime (LiteRT) gives the Keras model's outputs on the shipped artifact.

Tolerance: 1e-4 absolute on every class probability, and the same label. The export
check recorded ~3e-7 on one input; float32 kernels that differ between runtimes (fused
ops, another summation order) stay well inside 1e-4, while any preprocessing or
weight mismatch moves probabilities by far more.
"""

import numpy as np
import pytest

from ml.config import CLASS_NAMES
from ml.inference import default_model_dir, load_classifier

from .conftest import jpeg_bytes, synthetic_scan

PROBABILITY_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def scans():
    # Different classes' blobs and variants, so the inputs span the model's output range.
    return [
        jpeg_bytes(synthetic_scan(label, variant)) for label in CLASS_NAMES for variant in (0, 4)
    ]


@pytest.fixture(scope="module")
def shipped():
    folder = default_model_dir()
    if not (folder / "model.json").is_file():
        pytest.skip(f"no shipped artifact at {folder}")
    return folder


def _probabilities(predictions):
    return np.array([[p.probabilities[name] for name in CLASS_NAMES] for p in predictions])


def test_litert_matches_keras_on_the_shipped_model(shipped, scans):
    litert = load_classifier(shipped, runtime="litert")
    keras = load_classifier(shipped, runtime="keras")
    from_litert, from_keras = litert.predict(scans), keras.predict(scans)
    difference = np.abs(_probabilities(from_litert) - _probabilities(from_keras))
    assert difference.max() < PROBABILITY_TOLERANCE, difference.max()
    assert [p.label for p in from_litert] == [p.label for p in from_keras]


def test_litert_gives_the_same_outputs_one_by_one_and_batched(shipped, scans):
    # Workers classify one image per call on CPU and batches on GPU: both must agree.
    litert = load_classifier(shipped, runtime="litert")
    one_by_one = np.vstack([_probabilities(litert.predict([scan])) for scan in scans])
    batched = _probabilities(litert.predict(scans))
    np.testing.assert_allclose(one_by_one, batched, atol=PROBABILITY_TOLERANCE)
