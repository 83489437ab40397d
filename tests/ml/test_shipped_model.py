"""The artifact committed in ml/models: loadable offline, small, and as good as its report says."""

import json

import pytest

from ml.config import MODELS_DIR
from ml.inference import default_model_dir, load_classifier

from .conftest import jpeg_bytes, synthetic_scan

MAX_FILE_BYTES = 30 * 1024 * 1024


def test_default_model_dir_is_inside_the_repo(monkeypatch):
    monkeypatch.delenv("MODEL_DIR", raising=False)
    assert default_model_dir().parent == MODELS_DIR


def test_shipped_files_are_small_and_listed(shipped):
    metadata = json.loads((shipped / "model.json").read_text())
    for name, entry in metadata["files"].items():
        size = (shipped / name).stat().st_size
        assert size == entry["bytes"]
        assert size < MAX_FILE_BYTES, f"{name} is {size} bytes"


@pytest.mark.parametrize("runtime", ["litert", "keras"])
def test_shipped_model_classifies_with_both_runtimes(shipped, runtime):
    classifier = load_classifier(shipped, runtime=runtime)
    [prediction] = classifier.predict([jpeg_bytes(synthetic_scan("glioma", 0))])
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0)


def test_shipped_model_reproduces_its_test_split_numbers(shipped, sartaj_dir):
    from ml.evaluate import evaluate

    recorded = json.loads((shipped / "model.json").read_text())["metrics"]["test"]
    result = evaluate(sartaj_dir / "Training", shipped, split="test")["metrics"]
    assert result["n"] == recorded["n"]
    assert result["accuracy"] == pytest.approx(recorded["accuracy"], abs=1e-9)
    assert result["macro_f1"] == pytest.approx(recorded["macro_f1"], abs=1e-9)
    assert result["ece"] == pytest.approx(recorded["ece"], abs=1e-6)
