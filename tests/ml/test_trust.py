"""Trust signals: class activation maps, input checks and OOD scores, the review flag,
heatmap overlays, and the trust-artifact helpers (tiny models and synthetic images; the
shipped model where it is committed; a few dataset files when the dataset is present)."""

import io
import json

import keras
import numpy as np
import pytest
from keras import layers
from PIL import Image

from ml.config import CLASS_NAMES
from ml.export import export_artifact
from ml.heatmap import overlay_png
from ml.inference import (
    Classifier,
    MicroBatcher,
    Prediction,
    class_heatmaps,
    load_classifier,
)
from ml.model import OUTPUT_CAM, build_model, serving_model
from ml.ood import (
    REASON_PREFIX,
    MahalanobisScorer,
    OODDetector,
    feature_reason,
    fit_mahalanobis,
    input_check,
)
from ml.trust import choose_review_threshold, review_effect, unscaled

from .conftest import jpeg_bytes, synthetic_scan

BLANK = "not a brain MRI slice: the image is blank (almost a single grey level)"
COLOUR = "not a brain MRI slice: the image is in colour (MRI slices are grayscale)"
NOISE = "not a brain MRI slice: the image looks like random noise"


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def blank_png(level: int = 0) -> bytes:
    return _png(np.full((96, 96), level))


def noise_png(seed: int = 0) -> bytes:
    return _png(np.random.default_rng(seed).uniform(0, 256, (300, 300)))


def colour_photo_jpeg() -> bytes:
    """A colourful 'photo': scikit-learn's bundled china.jpg, else a painted scene."""
    try:
        from sklearn.datasets import load_sample_image

        return jpeg_bytes(Image.fromarray(load_sample_image("china.jpg")))
    except (ImportError, OSError):
        yy, xx = np.mgrid[:128, :128]
        rgb = np.stack([xx * 2, 255 - yy * 2, (xx + yy) % 256], axis=2)
        return jpeg_bytes(Image.fromarray(rgb.astype(np.uint8)))


# ---------------------------------------------------------------- CAM


def test_cam_spatial_mean_plus_bias_gives_the_probabilities():
    # CAM is exact for GAP -> Dense: mean over locations of the CAM + bias = the logits.
    model = build_model("tiny", input_size=32)
    dense = model.get_layer("predictions")
    rng = np.random.default_rng(0)
    dense.set_weights([rng.normal(0, 0.3, w.shape) for w in dense.get_weights()])
    serving = serving_model(model)
    batch = rng.uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    outputs = serving(batch, training=False)
    cam = np.asarray(outputs[OUTPUT_CAM])
    logits = cam.mean(axis=(1, 2)) + dense.get_weights()[1]
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(softmax, np.asarray(outputs["probabilities"]), atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(outputs["probabilities"]), np.asarray(model(batch, training=False)), atol=1e-6
    )
    assert cam.shape == (3, 8, 8, 4)


def test_class_heatmaps_are_the_predicted_class_relu_scaled_to_one():
    cam = np.zeros((2, 7, 7, 4), np.float32)
    cam[0, :, :, 1] = -1.0
    cam[0, 2, 3, 1] = 4.0
    cam[0, 5, 5, 1] = 2.0
    cam[1, :, :, 0] = -3.0  # nothing positive: an all-zero map, not a division by zero
    maps = class_heatmaps(cam, np.array([1, 0]))
    assert maps.shape == (2, 7, 7) and maps.dtype == np.float32
    assert maps[0, 2, 3] == 1.0 and maps[0, 5, 5] == 0.5
    assert maps[0].min() == 0.0
    assert not maps[1].any()


def _bright_feature_model(size: int = 32) -> keras.Model:
    """A model with the classifier's layer names whose 'backbone' features are the image's
    local brightness (4x4 average pooling, 1 channel): class 0's evidence is brightness,
    so its CAM must peak where the image is bright."""
    image = keras.Input((size, size, 3), name="image")
    inner = keras.Input((size, size, 3), name="backbone_input")
    x = layers.AveragePooling2D(4, name="pool")(inner)
    x = layers.Conv2D(2, 1, use_bias=False, name="mix")(x)
    backbone = keras.Model(inner, x, name="backbone")
    features = backbone(image)
    pooled = layers.GlobalAveragePooling2D(name="avg_pool")(features)
    dropped = layers.Dropout(0.5, name="top_dropout")(pooled)
    out = layers.Dense(4, activation="softmax", name="predictions")(dropped)
    model = keras.Model(image, out, name="bright")
    mix = np.zeros((1, 1, 3, 2), np.float32)
    mix[0, 0, :, 0] = 1 / 3 / 255  # channel 0: brightness 0..1
    mix[0, 0, :, 1] = -1 / 3 / 255  # channel 1: darkness (negative)
    backbone.get_layer("mix").set_weights([mix])
    kernel = np.zeros((2, 4), np.float32)
    kernel[0, 0] = 200.0  # brightness is strong evidence for class 0
    model.get_layer("predictions").set_weights([kernel, np.zeros(4, np.float32)])
    return model


@pytest.fixture(scope="module")
def bright_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("bright") / "bright-0"
    return export_artifact(_bright_feature_model(), out, name="bright", version="0", input_size=32)


@pytest.mark.parametrize("runtime", ["litert", "keras", "keras_predict", "tf_gpu"])
@pytest.mark.parametrize(("row", "column"), [(1, 1), (2, 6), (6, 3)])
def test_cam_highlights_where_the_evidence_is(bright_artifact, runtime, row, column):
    classifier = load_classifier(bright_artifact, runtime=runtime)
    pixels = np.full((32, 32), 20, np.uint8)
    pixels[row * 4 : row * 4 + 4, column * 4 : column * 4 + 4] = 250  # one feature cell
    [prediction] = classifier.predict([_png(pixels)])
    assert prediction.label == CLASS_NAMES[0]
    heatmap = prediction.heatmap
    assert heatmap.shape == (8, 8) and heatmap.dtype == np.float32
    assert np.unravel_index(np.argmax(heatmap), heatmap.shape) == (row, column)
    assert heatmap.max() == pytest.approx(1.0)
    assert heatmap.min() >= 0.0
    # Everywhere else the (dim) background holds less than a tenth of the peak's evidence.
    others = np.delete(heatmap.reshape(-1), row * 8 + column)
    assert others.max() < 0.1


# ---------------------------------------------------------------- input checks


def test_input_checks_reject_blank_noise_and_colour_with_reasons():
    from ml.data import decode_image

    for level in (0, 128, 255):
        assert input_check(decode_image(blank_png(level), 224)) == BLANK
    assert input_check(decode_image(noise_png(), 224)) == NOISE
    assert input_check(decode_image(colour_photo_jpeg(), 224)) == COLOUR
    for label in CLASS_NAMES:
        assert input_check(decode_image(jpeg_bytes(synthetic_scan(label, 1, 224)), 224)) == ""


def test_feature_reason_names_score_and_threshold():
    reason = feature_reason(123.44, 56.7)
    assert reason == (
        "not a brain MRI slice: the image is out of the model's training distribution "
        "(score 123.4 > threshold 56.7)"
    )


def test_mahalanobis_scores_far_points_higher_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 200)
    centres = rng.normal(0, 5, (3, 16))
    features = centres[labels] + rng.normal(0, 1, (600, 16))
    scorer = fit_mahalanobis(features, labels)
    near = scorer(centres + rng.normal(0, 1, (3, 16)))
    far = scorer(centres + 8.0)
    assert near.max() < 60 < far.min()  # chi-square(16) sits near 16
    scorer.save(tmp_path / "ood.npz")
    again = MahalanobisScorer.load(tmp_path / "ood.npz")
    np.testing.assert_allclose(again(features[:5]), scorer(features[:5]), rtol=1e-6)


def test_detector_applies_input_checks_first_then_the_threshold():
    detector = OODDetector(None, threshold=10.0, checks={})
    from ml.ood import DEFAULT_INPUT_CHECKS

    detector.checks = dict(DEFAULT_INPUT_CHECKS)
    scan = np.asarray(synthetic_scan("glioma", 0, 64).convert("RGB"), np.float32)
    blank = np.zeros_like(scan)
    reasons = detector.reasons(np.stack([scan, scan, blank]), np.array([5.0, 50.0, 50.0]))
    assert reasons[0] == ""
    assert reasons[1] == feature_reason(50.0, 10.0)
    assert reasons[2] == BLANK


# ---------------------------------------------------------------- review threshold, calibration


def test_review_threshold_is_the_lowest_reaching_the_target_accuracy():
    confidence = np.array([0.50, 0.55, 0.60, 0.65, 0.70, 0.80, 0.85, 0.90, 0.95, 0.99])
    correct = np.array([0, 1, 0, 1, 1, 1, 1, 1, 1, 1], bool)
    labels = np.where(correct, 0, 1)
    probabilities = np.stack([confidence, 1 - confidence], axis=1)  # always predicts 0
    # Keeping >= 0.65 leaves 7/7 right, >= 0.60 leaves 7/8; >= 0.55 leaves 8/9 (0.89).
    assert choose_review_threshold(labels, probabilities, target=0.99) == pytest.approx(0.65)
    assert choose_review_threshold(labels, probabilities, target=0.85) == pytest.approx(0.55)
    assert choose_review_threshold(labels, probabilities, target=0.8) == 0.0  # flag none
    effect = review_effect(labels, probabilities, 0.65)
    assert effect["flagged"] == 3
    assert effect["accuracy_unflagged"] == 1.0
    assert effect["accuracy_flagged"] == pytest.approx(1 / 3)


def test_unscaled_undoes_a_folded_temperature():
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    temperature = 0.66

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    np.testing.assert_allclose(
        unscaled(softmax(logits / temperature), temperature), softmax(logits)
    )


# ---------------------------------------------------------------- overlay PNG


@pytest.mark.parametrize("size", [None, 64, 300])
def test_overlay_png_is_a_png_of_the_requested_size(size):
    heatmap = np.zeros((7, 7), np.float32)
    heatmap[1, 5] = 1.0
    png = overlay_png(jpeg_bytes(synthetic_scan("glioma", 0, 100)), heatmap, size=size)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(png))
    side = size or 224
    assert image.size == (side, side) and image.mode == "RGB"
    pixels = np.asarray(image, np.int16)
    chroma = pixels.max(axis=2) - pixels.min(axis=2)
    # Colour where the map is hot (top right), the grayscale image where it is zero.
    assert chroma[side * 3 // 14, side * 11 // 14] > 50
    assert chroma[side - 2, 1] == 0


def test_overlay_png_rejects_bad_input():
    from ml.data import UnreadableImage

    with pytest.raises(UnreadableImage):
        overlay_png(b"not an image", np.zeros((7, 7)))
    with pytest.raises(ValueError):
        overlay_png(jpeg_bytes(synthetic_scan("glioma", 0)), np.zeros(7))


# ---------------------------------------------------------------- interface


def test_prediction_defaults_and_rejected():
    plain = Prediction(label="glioma", probabilities={"glioma": 1.0})
    assert plain.heatmap is None and plain.rejection_reason == "" and not plain.rejected
    assert not plain.needs_review
    rejected = Prediction("glioma", {"glioma": 1.0}, rejection_reason=BLANK)
    assert rejected.rejected


def test_micro_batcher_splits_dict_outputs_by_row():
    import threading

    def runner(batch):
        return {"probabilities": batch * 2, "features": batch[:, :1]}

    batcher = MicroBatcher(runner, max_batch=4, max_wait_s=0.05)
    results = {}

    def one(index):
        results[index] = batcher(np.full((1, 3), index, np.float32))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    for index, output in results.items():
        np.testing.assert_array_equal(output["probabilities"], np.full((1, 3), index * 2))
        assert output["features"].shape == (1, 1)


def test_artifact_without_cam_or_ood_still_serves(tmp_path):
    # A runner that gives probabilities only (an artifact from before the serving model).
    classifier = Classifier(
        name="old", version="0", sha256="", input_size=32, runtime="keras",
        class_names=CLASS_NAMES, model_dir=tmp_path, metadata={},
        _run=lambda batch: np.full((len(batch), 4), 0.25, np.float32),
    )  # fmt: skip
    [prediction] = classifier.predict([jpeg_bytes(synthetic_scan("glioma", 0))])
    assert prediction.heatmap is None
    assert np.isnan(prediction.ood_score)
    assert not prediction.rejected
    assert not prediction.needs_review  # review_threshold 0 by default
    [blank] = classifier.predict([blank_png()])
    assert blank.rejection_reason == BLANK


def test_tiny_artifact_gives_every_field(tmp_path):
    out = export_artifact(build_model("tiny", input_size=32), tmp_path / "t", name="t",
                          version="0", input_size=32)  # fmt: skip
    classifier = load_classifier(out, runtime="litert")
    assert classifier.review_threshold == 0.0
    [prediction] = classifier.predict([jpeg_bytes(synthetic_scan("pituitary", 2))])
    assert prediction.heatmap.shape == (8, 8)
    assert np.isnan(prediction.ood_score)  # no ood.npz in this artifact


# ---------------------------------------------------------------- the shipped artifact


@pytest.fixture(scope="module")
def shipped_litert(shipped):
    return load_classifier(shipped, runtime="litert")


def test_review_and_ood_settings_come_from_model_json(shipped, shipped_litert):
    metadata = json.loads((shipped / "model.json").read_text())
    assert 0.5 < metadata["review_threshold"] < 1.0
    assert shipped_litert.review_threshold == metadata["review_threshold"]
    assert shipped_litert.ood.threshold == metadata["ood"]["threshold"]
    assert "ood.npz" in metadata["files"]
    assert shipped_litert.ood.checks == metadata["ood"]["input_checks"]["thresholds"]


def test_shipped_model_flags_low_confidence_for_review(shipped_litert):
    [prediction] = shipped_litert.predict([jpeg_bytes(synthetic_scan("glioma", 0, 224))])
    top = max(prediction.probabilities.values())
    assert prediction.needs_review == (top < shipped_litert.review_threshold)


def test_shipped_model_rejects_non_mri_images_with_reasons(shipped_litert):
    blank, noise, photo = shipped_litert.predict([blank_png(), noise_png(), colour_photo_jpeg()])
    assert (blank.rejection_reason, noise.rejection_reason) == (BLANK, NOISE)
    assert photo.rejection_reason == COLOUR
    assert blank.rejected and noise.rejected and photo.rejected


def test_shipped_model_rejects_a_grayscale_document_by_its_features(shipped_litert):
    from ml.far_ood import _document

    page = _document(np.random.default_rng(3), 0)
    [prediction] = shipped_litert.predict([jpeg_bytes(page)])
    assert prediction.rejection_reason.startswith(
        f"{REASON_PREFIX}: the image is out of the model's training distribution (score "
    )
    assert prediction.ood_score > shipped_litert.ood.threshold


# Test-split files (held-out groups of Training/) that must be accepted: the first three
# of each class in split.json order. Checked once: none of them is among the test split's
# false rejections (1.6% of 432 in the model card).
def _test_split_files(shipped, sartaj_dir, per_class: int = 3):
    record = json.loads((shipped / "split.json").read_text())
    chosen, counts = [], {}
    for entry in record["images"]:
        if entry["split"] == "test" and counts.get(entry["label"], 0) < per_class:
            counts[entry["label"]] = counts.get(entry["label"], 0) + 1
            chosen.append(entry)
    return [(sartaj_dir / "Training" / entry["path"], entry["label"]) for entry in chosen]


def test_real_test_split_mris_are_accepted(shipped, shipped_litert, sartaj_dir):
    files = _test_split_files(shipped, sartaj_dir)
    predictions = shipped_litert.predict([path.read_bytes() for path, _ in files])
    for (path, _), prediction in zip(files, predictions, strict=True):
        assert not prediction.rejected, (path.name, prediction.rejection_reason)
        assert prediction.ood_score < shipped_litert.ood.threshold
        assert prediction.heatmap.shape == (7, 7)
        assert prediction.heatmap.max() == pytest.approx(1.0)
    accuracy = np.mean([p.label == label for (_, label), p in zip(files, predictions, strict=True)])
    assert accuracy >= 0.75


def test_predict_cli_prints_rejections_and_writes_heatmaps(shipped, tmp_path, capsys):
    from ml import predict as predict_cli

    scan, blank = tmp_path / "scan.jpg", tmp_path / "blank.png"
    scan.write_bytes(jpeg_bytes(synthetic_scan("glioma", 0, 224)))
    blank.write_bytes(blank_png())
    out = tmp_path / "out.json"
    args = [str(scan), str(blank), "--model", str(shipped), "--heatmaps", str(tmp_path / "maps")]
    assert predict_cli.main([*args, "--json", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].split("\t")[1:] == ["REJECTED", BLANK]
    results = json.loads(out.read_text())["results"]
    assert results[1]["rejection_reason"] == BLANK
    png = (tmp_path / "maps" / "scan-heatmap.png").read_bytes()
    assert Image.open(io.BytesIO(png)).size == (224, 224)


def test_far_ood_set_is_deterministic_and_covers_every_category():
    from ml.far_ood import CATEGORIES, build_far_ood

    first = build_far_ood(seed=0, per_category=2)
    again = build_far_ood(seed=0, per_category=2)
    assert [(i.category, i.name, i.data) for i in first] == [
        (i.category, i.name, i.data) for i in again
    ]
    found = {image.category for image in first}
    assert found >= set(CATEGORIES) - {"photo_colour", "photo_gray", "dicom_ct", "dicom_other"}
    for image in first:
        Image.open(io.BytesIO(image.data)).verify()  # every item decodes
