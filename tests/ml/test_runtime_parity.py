"""Every serving runtime gives the same outputs on the shipped artifact: probabilities,
the predicted class's heatmap (CAM) and the OOD score, from the same preprocessing.

Tolerances (absolute unless said):
- probabilities 1e-4, and the same label. The export check recorded ~2e-7 on one input;
  float32 kernels that differ between runtimes (fused ops, another summation order) stay
  well inside 1e-4, while any preprocessing or weight mismatch moves them by far more.
- heatmap 1e-3 (it is scaled to 0..1; the raw CAMs differed by ~1e-5 at export).
- ood_score 1e-3 relative: the score is a squared distance in 1280 whitened dimensions
  (values ~300-15,000) and amplifies the ~1e-5 feature differences between runtimes.
"""

import numpy as np
import pytest

from ml.config import CLASS_NAMES
from ml.inference import load_classifier

from .conftest import jpeg_bytes, synthetic_scan

PROBABILITY_TOLERANCE = 1e-4
HEATMAP_TOLERANCE = 1e-3
OOD_SCORE_RELATIVE_TOLERANCE = 1e-3
RUNTIMES = ("keras", "keras_predict", "tf_gpu")


@pytest.fixture(scope="module")
def scans():
    # Different classes' blobs and variants, so the inputs span the model's output range.
    return [
        jpeg_bytes(synthetic_scan(label, variant)) for label in CLASS_NAMES for variant in (0, 4)
    ]


@pytest.fixture(scope="module")
def real_scans(sartaj_dir):
    folders = sorted(p for p in (sartaj_dir / "Testing").iterdir() if p.is_dir())
    return [sorted(folder.glob("*.jpg"))[0].read_bytes() for folder in folders]


@pytest.fixture(scope="module")
def litert(shipped):
    return load_classifier(shipped, runtime="litert")


def _probabilities(predictions):
    return np.array([[p.probabilities[name] for name in CLASS_NAMES] for p in predictions])


def _assert_same(reference, other):
    difference = np.abs(_probabilities(reference) - _probabilities(other))
    assert difference.max() < PROBABILITY_TOLERANCE, difference.max()
    assert [p.label for p in reference] == [p.label for p in other]
    for a, b in zip(reference, other, strict=True):
        assert a.heatmap.shape == b.heatmap.shape == (7, 7)
        np.testing.assert_allclose(a.heatmap, b.heatmap, atol=HEATMAP_TOLERANCE)
        assert b.ood_score == pytest.approx(a.ood_score, rel=OOD_SCORE_RELATIVE_TOLERANCE)
        assert a.rejection_reason.split(" (score")[0] == b.rejection_reason.split(" (score")[0]
        assert a.needs_review == b.needs_review


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_runtimes_match_litert_on_the_shipped_model(shipped, litert, scans, runtime):
    other = load_classifier(shipped, runtime=runtime)
    _assert_same(litert.predict(scans), other.predict(scans))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_runtimes_match_litert_on_real_scans(shipped, litert, real_scans, runtime):
    other = load_classifier(shipped, runtime=runtime)
    _assert_same(litert.predict(real_scans), other.predict(real_scans))


def test_litert_gives_the_same_outputs_one_by_one_and_batched(litert, scans):
    # Workers classify one image per call on CPU and batches on GPU: both must agree.
    one_by_one = [litert.predict([scan])[0] for scan in scans]
    _assert_same(one_by_one, litert.predict(scans))
