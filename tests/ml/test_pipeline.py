"""The whole pipeline on tiny synthetic images: train -> export -> evaluate -> predict CLIs."""

import json

import numpy as np
import pytest

from ml import evaluate as evaluate_cli
from ml import predict as predict_cli
from ml import train as train_cli
from ml.config import CLASS_NAMES
from ml.data import assert_no_group_leak
from ml.evaluate import compute_metrics, expected_calibration_error
from ml.inference import load_classifier
from ml.model import build_model

TINY_ARGS = ["--backbone", "tiny", "--input-size", "32", "--head-epochs", "1", "--epochs", "2"]


@pytest.fixture
def tiny_weights(tmp_path):
    """A local weights file, the way a user without network passes pretrained weights."""
    path = tmp_path / "tiny.weights.h5"
    build_model("tiny", input_size=32).get_layer("backbone").save_weights(path)
    return path


def check_run(data, run_dir, artifact):
    metadata = json.loads((artifact / "model.json").read_text())
    assert metadata["class_names"] == list(CLASS_NAMES)
    assert metadata["input_size"] == 32
    assert len(metadata["data_fingerprint"]) == 64
    assert metadata["training"]["temperature"] > 0
    assert [row["phase"] for row in metadata["history"]].count("fine_tune") >= 1
    assert set(metadata["metrics"]) == {"val", "test"}
    assert (run_dir / "training-curves.png").stat().st_size > 0
    # The saved split: every image once, no duplicate group on two sides.
    split = json.loads((artifact / "split.json").read_text())
    assert len(split["images"]) == len(list(data.rglob("*.jpg")))
    groups = np.array([entry["group"] for entry in split["images"]])
    sides = {
        side: np.array([i for i, e in enumerate(split["images"]) if e["split"] == side])
        for side in ("train", "val", "test")
    }
    assert_no_group_leak(groups, sides)
    return metadata


def test_train_cached_export_evaluate_predict(synthetic_dataset, tiny_weights, tmp_path, capsys):
    run_dir = tmp_path / "run"
    artifact = tmp_path / "artifact"
    args = [*TINY_ARGS, "--weights", str(tiny_weights), "--fine-tune-blocks", "1"]
    args += ["--cached-views", "2", "--data", str(synthetic_dataset), "--run-dir", str(run_dir)]
    args += ["--export", str(artifact), "--cache-dir", str(tmp_path / "cache"), "--version", "9"]
    assert train_cli.main(args) == 0
    metadata = check_run(synthetic_dataset, run_dir, artifact)
    assert metadata["training"]["mode"] == "cached frozen-front features"
    assert metadata["version"] == "9"

    # ml.evaluate on the saved test split reproduces the numbers recorded at training time.
    out = tmp_path / "eval" / "test.json"
    args = ["--data", str(synthetic_dataset), "--model", str(artifact), "--split", "test"]
    assert evaluate_cli.main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["metrics"]["accuracy"] == pytest.approx(metadata["metrics"]["test"]["accuracy"])
    assert result["metrics"]["ece"] == pytest.approx(metadata["metrics"]["test"]["ece"])
    assert (tmp_path / "eval" / "test-confusion.png").stat().st_size > 0
    assert (tmp_path / "eval" / "test-training-curves.png").stat().st_size > 0
    assert "macro-F1" in capsys.readouterr().out

    # ml.predict prints one line per image and flags unreadable files.
    image = next(synthetic_dataset.rglob("*.jpg"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    status = predict_cli.main([str(image), str(broken), "--model", str(artifact)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert status == 1
    assert lines[0].split("\t")[1] in CLASS_NAMES
    assert lines[1].split("\t")[1] == "ERROR"


def test_train_end_to_end_from_scratch(synthetic_dataset, tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY_ARGS, "--data", str(synthetic_dataset), "--run-dir", str(run_dir)]
    args += ["--cache-dir", str(tmp_path / "cache")]
    assert train_cli.main(args) == 0
    metadata = check_run(synthetic_dataset, run_dir, run_dir / "artifact")
    assert metadata["training"]["mode"] == "end to end"
    assert metadata["weights"] == "None"
    classifier = load_classifier(run_dir / "artifact")
    assert classifier.name == "brain-mri-tiny"


def test_evaluate_any_folder_and_exclude_near_duplicates(synthetic_dataset, tmp_path):
    artifact = tmp_path / "artifact"
    from ml.export import export_artifact

    export_artifact(build_model("tiny", 32), artifact, name="t", version="0", input_size=32)
    everything = evaluate_cli.evaluate(synthetic_dataset, artifact)
    assert everything["selection"]["scored"] == 48
    # Against itself every image has a near-duplicate (itself): nothing left.
    with pytest.raises(ValueError, match="no images left"):
        evaluate_cli.evaluate(
            synthetic_dataset, artifact, exclude_near_duplicates_of=synthetic_dataset
        )


def test_metrics_on_known_predictions():
    labels = np.array([0, 0, 1, 2, 3, 3])
    probabilities = np.eye(4)[[0, 1, 1, 2, 3, 3]] * 0.7 + 0.075
    metrics = compute_metrics(labels, probabilities)
    assert metrics["accuracy"] == pytest.approx(5 / 6)
    assert metrics["confusion_matrix"][0] == [1, 1, 0, 0]
    assert metrics["per_class"]["glioma"]["recall"] == pytest.approx(0.5)
    assert metrics["per_class"]["meningioma"]["precision"] == pytest.approx(0.5)
    # Confidence 0.775 everywhere, accuracy 5/6: ECE = |5/6 - 0.775|.
    assert metrics["ece"] == pytest.approx(abs(5 / 6 - 0.775))


def test_ece_is_zero_when_confidence_matches_accuracy():
    labels = np.array([0, 1, 0, 0])
    probabilities = np.tile([0.75, 0.25 / 3, 0.25 / 3, 0.25 / 3], (4, 1))
    assert expected_calibration_error(labels, probabilities) == pytest.approx(0.0)
