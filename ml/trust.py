"""Trust signals: build a serving artifact with CAM, OOD rejection and a review threshold
from an exported model (no retraining), and measure them.

    python -m ml.trust --source ml/models/brain-mri-lite0-1.0.0 \\
        --out ml/models/brain-mri-lite0-1.1.0 --version 1.1.0 \\
        --data ../shared/datasets/sartaj-brain-tumor-mri/Training

Steps (all choices are made on TRAIN/VALIDATION; the test split is only measured):
1. The source model.keras (same weights) becomes the serving model (ml.model.serving_model:
   probabilities + class activation maps + pooled features in one pass), exported as
   model.keras and model.tflite with the source's split.json.
2. Every train/val/test image of split.json goes through the new LiteRT model.
3. OOD: Mahalanobis (class means, Ledoit-Wolf shared covariance) fitted on the TRAIN
   features -> ood.npz; threshold = the OOD_PERCENTILE-th percentile of the VALIDATION
   scores. Input-check thresholds: ml.ood's defaults, checked against the train split
   (every train image must pass; its statistics are recorded).
4. Review threshold on the calibrated top probability, from VALIDATION: the lowest
   threshold t such that the validation images with top probability >= t are at least
   REVIEW_TARGET_ACCURACY accurate; images below t are flagged needs_review.
5. model.json gets "review_threshold", "review_rule", "ood" and ood.npz in "files".

`evaluate_trust` (python -m ml.evaluate --trust) measures ECE before/after temperature
scaling, the review flag's effect on the test split, and OOD AUROC / false rejections.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from ml.config import default_cache_dir
from ml.data import decode_image, find_labelled_images, progress
from ml.ood import (
    DEFAULT_INPUT_CHECKS,
    OOD_FILE,
    fit_mahalanobis,
    image_statistics,
)

OOD_PERCENTILE = 99.0
REVIEW_TARGET_ACCURACY = 0.99
REVIEW_RULE = (
    "lowest threshold t on the calibrated top probability such that the validation images "
    f"with top probability >= t are at least {REVIEW_TARGET_ACCURACY:.0%} accurate; "
    "predictions below t are flagged needs_review"
)
OOD_RULE = (
    f"squared Mahalanobis distance to the nearest class mean above the {OOD_PERCENTILE:g}th "
    "percentile of the in-distribution validation scores"
)


# ---------------------------------------------------------------- model outputs, cached


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def outputs_for(classifier, items, label: str, cache: bool = True, batch_size: int = 32) -> dict:
    """Probabilities, pooled features, OOD scores, input-check reasons and image statistics
    for `items` (file paths or bytes), decoded the way serving decodes them. Cached under
    cache/ml/ by model sha256 and the items' content."""

    def data_of(item) -> bytes:
        return item if isinstance(item, bytes) else Path(item).read_bytes()

    digest = hashlib.sha256()
    for item in items:
        digest.update(hashlib.sha256(data_of(item)).digest())
    path = default_cache_dir() / f"trust-{classifier.sha256[:12]}-{digest.hexdigest()[:16]}.npz"
    if cache and path.exists():
        with np.load(path) as stored:
            arrays = {name: stored[name] for name in stored.files}
    else:
        probabilities, features, stats = [], [], []
        starts = range(0, len(items), batch_size)
        for start in progress(starts, len(starts), f"{label} ({batch_size}/batch)"):
            chunk = items[start : start + batch_size]
            batch = np.stack([decode_image(data_of(item), classifier.input_size) for item in chunk])
            outputs = classifier.run_batch(batch.astype(np.float32))
            probabilities.append(outputs["probabilities"])
            features.append(outputs["features"])
            for image in batch:
                s = image_statistics(image)
                stats.append((s.std, s.mean_chroma, s.roughness))
        arrays = {
            "probabilities": np.concatenate(probabilities),
            "features": np.concatenate(features).astype(np.float32),
            "stats": np.array(stats, dtype=np.float64),
        }
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **arrays)
    arrays["scores"] = classifier.ood.scores(arrays["features"], len(arrays["features"]))
    checks = classifier.ood.checks
    arrays["check_reasons"] = [_check_from_stats(row, checks) for row in arrays["stats"]]
    arrays["reasons"] = [
        reason or (("out of distribution") if score > classifier.ood.threshold else "")
        for reason, score in zip(arrays["check_reasons"], arrays["scores"], strict=True)
    ]
    return arrays


def _check_from_stats(row, checks: dict) -> str:
    """input_check's decision from precomputed statistics (same order of checks)."""
    std, chroma, roughness = row
    if std < checks["blank_max_std"]:
        return "blank"
    if chroma > checks["colour_min_mean_chroma"]:
        return "colour"
    if roughness > checks["noise_min_roughness"]:
        return "noise"
    return ""


def split_images(data: Path, record: dict) -> dict[str, list]:
    """The LabelledImages of each side of a saved split."""
    from ml.data import select_from_split_record

    images = find_labelled_images(data)
    return {
        side: select_from_split_record(images, record, side) for side in ("train", "val", "test")
    }


# ---------------------------------------------------------------- choices on validation


def choose_review_threshold(
    labels: np.ndarray, probabilities: np.ndarray, target: float = REVIEW_TARGET_ACCURACY
) -> float:
    """The lowest t (a validation top probability, or 0) with accuracy >= target among the
    images whose top probability is >= t. 1.0 + tiny if no t reaches it (flag all)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    order = np.argsort(confidence)
    confidence, correct = confidence[order], correct[order]
    # Kept images for candidate index i: order[i:], whose accuracy is a suffix mean.
    suffix_correct = np.cumsum(correct[::-1])[::-1]
    suffix_count = np.arange(len(correct), 0, -1)
    accuracy = suffix_correct / suffix_count
    for index in range(len(confidence)):
        # Ties: a threshold at confidence[index] keeps every image with that confidence.
        if index > 0 and confidence[index] == confidence[index - 1]:
            continue
        if accuracy[index] >= target:
            return 0.0 if index == 0 else float(confidence[index])
    return float(np.nextafter(1.0, 2.0))


def review_effect(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict:
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    flagged = confidence < threshold

    def accuracy(mask):
        return float(correct[mask].mean()) if mask.any() else None

    return {
        "n": int(len(labels)),
        "threshold": float(threshold),
        "flagged": int(flagged.sum()),
        "share_flagged": float(flagged.mean()) if len(labels) else 0.0,
        "accuracy_all": accuracy(np.ones_like(flagged)),
        "accuracy_unflagged": accuracy(~flagged),
        "accuracy_flagged": accuracy(flagged),
        "errors_total": int((~correct).sum()),
        "errors_flagged": int((~correct & flagged).sum()),
    }


# ---------------------------------------------------------------- building the artifact


def build_trust_artifact(
    source: Path, out: Path, data: Path, version: str, name: str | None = None
) -> Path:
    import keras

    from ml.export import export_artifact
    from ml.inference import load_classifier

    source_metadata = json.loads((source / "model.json").read_text())
    record = json.loads((source / "split.json").read_text())
    model = keras.saving.load_model(source / "model.keras", compile=False)
    kept = {
        key: value
        for key, value in source_metadata.items()
        if key
        not in {
            "format",
            "name",
            "version",
            "created_at",
            "class_names",
            "input_size",
            "preprocessing",
            "files",
            "export_checks",
            "exported_with",
            "provenance",
        }
    }
    provenance = {
        "source": f"{source_metadata['name']} {source_metadata['version']}",
        "source_model_keras_sha256": source_metadata["files"]["model.keras"]["sha256"],
        "note": "same weights as the source (not retrained); exported as the serving model "
        "(probabilities + class activation maps + pooled features) with OOD rejection and a "
        "review threshold fitted by ml.trust",
        "source_provenance": source_metadata.get("provenance"),
    }
    print(f"exporting the serving model to {out}", file=sys.stderr, flush=True)
    export_artifact(
        model,
        out,
        name=name or source_metadata["name"],
        version=version,
        class_names=tuple(source_metadata["class_names"]),
        input_size=int(source_metadata["input_size"]),
        extra={**kept, "provenance": provenance},
        split=record,
    )
    classifier = load_classifier(out, runtime="litert")
    sides = split_images(data, record)
    labels = {
        side: np.array([classifier.class_names.index(i.label) for i in images])
        for side, images in sides.items()
    }
    outputs = {
        side: outputs_for(classifier, [i.path for i in images], f"model outputs, {side} split")
        for side, images in sides.items()
    }

    # OOD: fit on train, threshold on validation.
    scorer = fit_mahalanobis(outputs["train"]["features"], labels["train"])
    scorer.save(out / OOD_FILE)
    val_scores = scorer(outputs["val"]["features"])
    threshold = float(np.percentile(val_scores, OOD_PERCENTILE))
    train_stats = outputs["train"]["stats"]
    rejected_by_checks = {
        side: int(sum(bool(_check_from_stats(r, DEFAULT_INPUT_CHECKS)) for r in out_["stats"]))
        for side, out_ in outputs.items()
    }
    if rejected_by_checks["train"]:
        raise ValueError(f"input checks reject {rejected_by_checks['train']} training images")
    review_threshold = choose_review_threshold(labels["val"], outputs["val"]["probabilities"])

    metadata = json.loads((out / "model.json").read_text())
    metadata["files"][OOD_FILE] = {
        "sha256": _sha256(out / OOD_FILE),
        "bytes": (out / OOD_FILE).stat().st_size,
    }
    metadata["review_threshold"] = review_threshold
    metadata["review_rule"] = REVIEW_RULE
    metadata["ood"] = {
        "file": OOD_FILE,
        "method": "mahalanobis_tied_ledoit_wolf",
        "score": "min over classes of the squared Mahalanobis distance of the pooled features",
        "fitted_on": "train side of split.json",
        "features": int(scorer.means.shape[1]),
        "threshold": threshold,
        "threshold_rule": OOD_RULE,
        "validation_scores": _percentiles(val_scores),
        "train_scores": _percentiles(scorer(outputs["train"]["features"])),
        "input_checks": {
            "thresholds": dict(DEFAULT_INPUT_CHECKS),
            "rule": "fixed margins outside every training image's statistics (ml/ood.py)",
            "train_statistics": {
                "std_min": float(train_stats[:, 0].min()),
                "mean_chroma_max": float(train_stats[:, 1].max()),
                "roughness_max": float(train_stats[:, 2].max()),
            },
            "images_rejected": rejected_by_checks,
        },
    }
    (out / "model.json").write_text(json.dumps(metadata, indent=2) + "\n")
    print(
        f"review threshold {review_threshold:.4f}; OOD threshold {threshold:.1f}; "
        f"input checks reject {rejected_by_checks}",
        file=sys.stderr,
    )
    return out


def _sha256(path: Path) -> str:
    from ml.export import sha256_of

    return sha256_of(path)


def _percentiles(values: np.ndarray) -> dict:
    points = (0, 1, 5, 50, 95, 99, 100)
    return {f"p{p}": float(v) for p, v in zip(points, np.percentile(values, points), strict=True)}


# ---------------------------------------------------------------- measuring


def unscaled(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Undo a folded temperature: p = softmax(z / T) -> softmax(z) = softmax(T log p)."""
    logits = np.log(np.clip(probabilities, 1e-300, 1.0)) * temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """P(out score > in score) + 0.5 P(tie): the AUROC of 'score says OOD'."""
    from sklearn.metrics import roc_auc_score

    values = np.concatenate([in_scores, out_scores])
    return float(roc_auc_score(np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))], values))


def _pipeline_scores(arrays: dict, cap: float) -> np.ndarray:
    """Feature score, with images the input checks reject ranked above every score."""
    scores = np.asarray(arrays["scores"], dtype=np.float64).copy()
    scores[[bool(r) for r in arrays["check_reasons"]]] = cap
    return scores


def _rejections(arrays: dict) -> dict:
    reasons = arrays["reasons"]
    counts: dict[str, int] = {}
    for reason in reasons:
        if reason:
            counts[reason] = counts.get(reason, 0) + 1
    rejected = sum(counts.values())
    return {
        "n": len(reasons),
        "rejected": rejected,
        "rejection_rate": rejected / max(len(reasons), 1),
        "by_reason": counts,
    }


def evaluate_trust(dataset_root: Path, model_dir: Path, runtime: str = "litert") -> dict:
    """ECE before/after scaling (val, test), review flag (test), OOD (far-OOD set vs test)."""
    from ml.evaluate import expected_calibration_error, select_images
    from ml.far_ood import CATEGORIES, build_far_ood
    from ml.inference import load_classifier

    classifier = load_classifier(model_dir, runtime=runtime)
    metadata = classifier.metadata
    temperature = float(metadata["training"]["temperature"])
    record = json.loads((model_dir / "split.json").read_text())
    sides = split_images(dataset_root / "Training", record)
    result: dict = {
        "model": {
            "name": classifier.name,
            "version": classifier.version,
            "sha256": classifier.sha256,
            "runtime": classifier.runtime,
        },
        "calibration": {"temperature": temperature, "ece_bins": 15},
    }
    outputs, labels = {}, {}
    for side in ("val", "test"):
        images = sides[side]
        labels[side] = np.array([classifier.class_names.index(i.label) for i in images])
        outputs[side] = outputs_for(classifier, [i.path for i in images], f"{side} split")
        after = outputs[side]["probabilities"]
        before = unscaled(after, temperature)
        result["calibration"][side] = {
            "n": len(images),
            "ece_before_scaling": expected_calibration_error(labels[side], before),
            "ece_after_scaling": expected_calibration_error(labels[side], after),
            "nll_before_scaling": _nll(labels[side], before),
            "nll_after_scaling": _nll(labels[side], after),
            "accuracy": float((after.argmax(1) == labels[side]).mean()),
        }
    threshold = classifier.review_threshold
    result["review"] = {
        "threshold": threshold,
        "rule": metadata.get("review_rule", ""),
        "val": review_effect(labels["val"], outputs["val"]["probabilities"], threshold),
        "test": review_effect(labels["test"], outputs["test"]["probabilities"], threshold),
    }

    # Near-OOD, for information: Testing/ images with no near-duplicate in Training/.
    unseen, _ = select_images(dataset_root / "Testing", model_dir, None, dataset_root / "Training")
    unseen_labels = np.array([classifier.class_names.index(i.label) for i in unseen])
    outputs["testing_unseen"] = outputs_for(
        classifier, [i.path for i in unseen], "Testing/ without near-duplicates"
    )

    far = build_far_ood(seed=0)
    far_outputs = outputs_for(classifier, [image.data for image in far], "far-OOD set")
    categories = np.array([image.category for image in far])
    test = outputs["test"]
    finite = np.concatenate([test["scores"], far_outputs["scores"]])
    cap = float(np.nanmax(finite)) * 10 + 1
    in_pipeline = _pipeline_scores(test, cap)
    far_pipeline = _pipeline_scores(far_outputs, cap)
    ood = {
        "threshold": classifier.ood.threshold,
        "rule": metadata.get("ood", {}).get("threshold_rule", ""),
        "input_checks": classifier.ood.checks,
        "in_distribution": {
            side: _rejections(outputs[side]) for side in ("val", "test", "testing_unseen")
        },
        "far_ood": {
            "n": len(far),
            "auroc_pipeline": auroc(in_pipeline, far_pipeline),
            "auroc_feature_score_only": auroc(test["scores"], far_outputs["scores"]),
            **_rejections(far_outputs),
        },
        "per_category": {},
    }
    ood["in_distribution"]["test"]["false_rejection_rate"] = ood["in_distribution"]["test"][
        "rejection_rate"
    ]
    for category in CATEGORIES:
        members = categories == category
        if not members.any():
            continue
        sub = {
            "scores": far_outputs["scores"][members],
            "check_reasons": list(np.array(far_outputs["check_reasons"], dtype=object)[members]),
            "reasons": list(np.array(far_outputs["reasons"], dtype=object)[members]),
        }
        ood["per_category"][category] = {
            "auroc_pipeline": auroc(in_pipeline, far_pipeline[members]),
            "auroc_feature_score_only": auroc(test["scores"], sub["scores"]),
            "median_score": float(np.median(sub["scores"])),
            **_rejections(sub),
        }
    result["ood"] = ood
    review_unseen = review_effect(
        unseen_labels, outputs["testing_unseen"]["probabilities"], threshold
    )
    result["review"]["testing_unseen"] = review_unseen
    result["_plots"] = {
        "labels": labels,
        "outputs": outputs,
        "far_scores": far_outputs["scores"],
        "far_categories": categories,
        "temperature": temperature,
    }
    return result


def _nll(labels: np.ndarray, probabilities: np.ndarray) -> float:
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, 1.0)).mean())


def plot_trust(result: dict, stem: Path) -> list[str]:
    """Reliability diagrams (before/after scaling) and OOD score distributions + ROC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    data = result["_plots"]
    written = []
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for axis, side in zip(axes, ("val", "test"), strict=True):
        labels, after = data["labels"][side], data["outputs"][side]["probabilities"]
        for probabilities, name in (
            (unscaled(after, data["temperature"]), "before"),
            (after, "after"),
        ):
            confidence = probabilities.max(1)
            correct = probabilities.argmax(1) == labels
            edges = np.linspace(0, 1, 16)
            which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, 14)
            xs, ys = [], []
            for index in range(15):
                members = which == index
                if members.any():
                    xs.append(confidence[members].mean())
                    ys.append(correct[members].mean())
            ece = result["calibration"][side][f"ece_{name}_scaling"]
            axis.plot(xs, ys, "o-", label=f"{name} temperature scaling (ECE {ece:.3f})")
        axis.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        axis.axvline(result["review"]["threshold"], color="grey", linewidth=0.8)
        axis.set_title(f"{side} split: reliability (15 bins; grey: review threshold)", fontsize=9)
        axis.set_xlabel("confidence (top probability)")
        axis.set_ylabel("accuracy")
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(f"{stem}-reliability.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    written.append(path.name)

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    test_scores = data["outputs"]["test"]["scores"]
    unseen_scores = data["outputs"]["testing_unseen"]["scores"]
    far_scores, categories = data["far_scores"], data["far_categories"]
    bins = np.logspace(np.log10(max(min(test_scores.min(), far_scores.min()), 1.0)),
                       np.log10(max(test_scores.max(), far_scores.max()) * 1.1), 60)  # fmt: skip
    colours = plt.get_cmap("tab20").colors
    left.hist(test_scores, bins=bins, histtype="stepfilled", alpha=0.35, color="black",
              label="test split (in-distribution)")  # fmt: skip
    left.hist(unseen_scores, bins=bins, histtype="step", linewidth=2, linestyle=":",
              color="black", label="Testing/ unseen (near-OOD)")  # fmt: skip
    for index, category in enumerate(dict.fromkeys(categories)):
        left.hist(far_scores[categories == category], bins=bins, histtype="step",
                  color=colours[2 * index % 20], label=category)  # fmt: skip
    left.axvline(result["ood"]["threshold"], color="k", linestyle="--", label="threshold")
    left.set_xscale("log")
    left.set_xlabel("OOD score (squared Mahalanobis distance)")
    left.set_ylabel("images")
    left.legend(fontsize=7)
    for index, category in enumerate(dict.fromkeys(categories)):
        scores = np.r_[test_scores, far_scores[categories == category]]
        truth = np.r_[np.zeros(len(test_scores)), np.ones((categories == category).sum())]
        fpr, tpr, _ = roc_curve(truth, scores)
        right.plot(fpr, tpr, color=colours[2 * index % 20], label=category)
    right.axvline(result["ood"]["in_distribution"]["test"]["rejection_rate"], color="k",
                  linestyle="--", label="shipped threshold")  # fmt: skip
    right.set_xscale("symlog", linthresh=0.01)
    right.set_xlim(0, 1)
    right.set_xlabel("false rejection rate of test-split MRIs")
    right.set_ylabel("share of far-OOD images rejected")
    right.set_title("feature score alone (input checks not applied)", fontsize=9)
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(f"{stem}-ood.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    written.append(path.name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a trust-signal serving artifact")
    parser.add_argument("--source", required=True, help="exported artifact (model.keras)")
    parser.add_argument("--out", required=True, help="new artifact folder")
    parser.add_argument("--version", required=True)
    parser.add_argument("--name", help="default: the source's name")
    parser.add_argument("--data", required=True, help="the folder split.json was made from")
    args = parser.parse_args(argv)
    build_trust_artifact(
        Path(args.source), Path(args.out), Path(args.data), args.version, args.name
    )
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
