"""Export -> load round trip, both runtimes, and the serving contract."""

import json
import subprocess
import sys

import numpy as np
import pytest

from ml.config import CLASS_NAMES
from ml.data import decode_batch
from ml.export import export_artifact
from ml.inference import (
    Classifier,
    Prediction,
    UnreadableImage,
    default_model_dir,
    load_classifier,
)
from ml.model import build_model

from .conftest import jpeg_bytes, synthetic_scan


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("tiny", input_size=32)


@pytest.fixture(scope="module")
def artifact(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifact") / "tiny-test-0"
    return export_artifact(
        tiny_model, out, name="tiny-test", version="0", input_size=32, extra={"note": "test"}
    )


@pytest.fixture(scope="module")
def scans():
    return [jpeg_bytes(synthetic_scan(label, 1)) for label in CLASS_NAMES]


def test_artifact_files_and_metadata(artifact):
    metadata = json.loads((artifact / "model.json").read_text())
    assert metadata["name"] == "tiny-test"
    assert metadata["version"] == "0"
    assert metadata["class_names"] == list(CLASS_NAMES)
    assert metadata["input_size"] == 32
    assert metadata["note"] == "test"
    assert set(metadata["files"]) == {"model.keras", "model.tflite"}
    assert metadata["export_checks"]["tflite_max_abs_difference"] < 1e-5


@pytest.mark.parametrize("runtime", ["litert", "keras"])
def test_round_trip_gives_the_exported_models_outputs(artifact, tiny_model, scans, runtime):
    classifier = load_classifier(artifact, runtime=runtime)
    assert isinstance(classifier, Classifier)
    assert classifier.runtime == runtime
    assert (classifier.name, classifier.version, classifier.input_size) == ("tiny-test", "0", 32)
    assert classifier.class_names == CLASS_NAMES
    expected = np.asarray(tiny_model(decode_batch(scans, 32), training=False))
    predictions = classifier.predict(scans)
    assert len(predictions) == len(scans)
    for prediction, row in zip(predictions, expected, strict=True):
        assert isinstance(prediction, Prediction)
        assert set(prediction.probabilities) == set(CLASS_NAMES)
        assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-9)
        got = [prediction.probabilities[name] for name in CLASS_NAMES]
        np.testing.assert_allclose(got, row, atol=1e-6)
        assert prediction.label == CLASS_NAMES[int(np.argmax(row))]


def test_sha256_names_the_loaded_file(artifact):
    metadata = json.loads((artifact / "model.json").read_text())
    assert load_classifier(artifact, "litert").sha256 == metadata["files"]["model.tflite"]["sha256"]
    assert load_classifier(artifact, "keras").sha256 == metadata["files"]["model.keras"]["sha256"]


def test_auto_prefers_litert(artifact):
    assert load_classifier(artifact).runtime == "litert"


def test_batches_larger_than_one_chunk(artifact, scans):
    classifier = load_classifier(artifact)
    many = scans * 20  # 80 images: three interpreter batches
    labels = [p.label for p in classifier.predict(many)]
    assert labels[:4] * 20 == labels
    assert classifier.predict([]) == []


def test_unreadable_bytes_raise_with_reason(artifact):
    classifier = load_classifier(artifact)
    with pytest.raises(UnreadableImage, match="cannot decode"):
        classifier.predict([b"\x00garbage"])


def test_missing_artifact_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_classifier(tmp_path)


def test_unknown_runtime_is_rejected(artifact):
    with pytest.raises(ValueError, match="runtime"):
        load_classifier(artifact, runtime="onnx")


def test_tampered_model_file_is_rejected(artifact, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in artifact.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / "model.tflite").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ValueError, match="does not match"):
        load_classifier(copy, runtime="litert")


def test_model_dir_env_overrides_default(monkeypatch, tmp_path):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    assert default_model_dir() == tmp_path


def test_litert_path_does_not_import_tensorflow(artifact, tmp_path, repo_root):
    image = tmp_path / "scan.jpg"
    image.write_bytes(jpeg_bytes(synthetic_scan("glioma", 2)))
    script = (
        "import sys, pathlib\n"
        "from ml.inference import load_classifier\n"
        f"classifier = load_classifier({str(artifact)!r})\n"
        f"data = pathlib.Path({str(image)!r}).read_bytes()\n"
        "print(classifier.runtime, classifier.predict([data])[0].label)\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
        "assert 'keras' not in sys.modules, 'keras was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=repo_root
    )
    assert result.returncode == 0, result.stderr[-2000:]
    runtime, label = result.stdout.split()
    assert runtime == "litert"
    assert label in CLASS_NAMES


def test_export_drops_the_optimizer_state(tmp_path):
    import zipfile

    import h5py

    model = build_model("tiny", input_size=32)
    model.compile("adam", "categorical_crossentropy")
    model.fit(np.zeros((4, 32, 32, 3)), np.eye(4), verbose=0)
    artifact = export_artifact(model, tmp_path / "a", name="t", version="0", input_size=32)
    with zipfile.ZipFile(artifact / "model.keras") as archive:
        archive.extract("model.weights.h5", tmp_path)
    with h5py.File(tmp_path / "model.weights.h5") as weights:
        assert "optimizer" not in weights


def test_litert_interpreters_run_side_by_side_with_the_same_outputs(artifact, scans, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("ML_INTERPRETERS", "2")
    monkeypatch.setenv("ML_NUM_THREADS", "1")
    parallel = load_classifier(artifact, "litert")
    monkeypatch.setenv("ML_INTERPRETERS", "1")
    single = load_classifier(artifact, "litert")
    parallel.warm_up()
    decoded = decode_batch(scans, parallel.input_size)

    with ThreadPoolExecutor(4) as pool:
        side_by_side = list(pool.map(lambda row: parallel.run_batch(row[np.newaxis]), decoded))

    assert (parallel.parallel_calls, single.parallel_calls) == (2, 1)
    for row, outputs in zip(decoded, side_by_side, strict=True):
        expected = single.run_batch(row[np.newaxis])
        assert outputs.keys() == expected.keys()
        for name in expected:
            np.testing.assert_allclose(outputs[name], expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("cores", "env", "expected"),
    [
        (2, {}, (2, 1)),
        (1, {}, (1, 1)),
        (16, {}, (2, 2)),
        (2, {"ML_INTERPRETERS": "1"}, (1, 2)),
        (16, {"ML_INTERPRETERS": "4", "ML_NUM_THREADS": "3"}, (4, 3)),
    ],
)
def test_litert_interpreters_and_threads_default_to_the_cores(monkeypatch, cores, env, expected):
    from ml import inference

    monkeypatch.delenv("ML_INTERPRETERS", raising=False)
    monkeypatch.delenv("ML_NUM_THREADS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(inference.os, "cpu_count", lambda: cores)
    assert inference.litert_lanes_and_threads() == expected
