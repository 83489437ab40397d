"""Evaluation: metrics, calibration and plots for an exported model on any class-folder set.

    python -m ml.evaluate --data DIR --model ARTIFACT [--json OUT] [--split test]
                          [--exclude-near-duplicates-of OTHER_DIR]
    python -m ml.evaluate --suite --data ROOT --model ARTIFACT --json OUT
    python -m ml.evaluate --trust --data ROOT --model ARTIFACT --json OUT

DIR holds class folders (glioma/glioma_tumor, meningioma/..., notumor/no_tumor,
pituitary/...), directly or one level down. --split picks that side of the split saved
with the model (DIR must then be the folder it was made from); --exclude-near-duplicates-of
drops images that have a near-duplicate in OTHER_DIR (e.g. Testing/ minus Training/).
Writes JSON (accuracy, macro-F1, per-class precision/recall/F1, confusion matrix, ECE)
and PNGs (confusion matrix; training curves when the model recorded them).
--suite scores the report's three sets on a root with Training/ and Testing/.
--trust (same root) measures the trust signals (ml.trust.evaluate_trust): ECE before and
after temperature scaling on the validation and test splits, the needs-review flag's
effect on the test split, and OOD rejection (far-OOD AUROC overall and per category,
in-distribution false rejections), with reliability and OOD-score PNGs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ml.config import CLASS_NAMES, DEFAULT_DEDUP, default_cache_dir
from ml.data import (
    compute_signatures,
    decode_image,
    find_labelled_images,
    near_duplicate_pairs,
    progress,
    select_from_split_record,
    write_json,
)

ECE_BINS = 15


def expected_calibration_error(
    labels: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS
) -> float:
    """Top-label ECE: sum over equal-width confidence bins of |accuracy - confidence| * share."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds confidences in (edges[i], edges[i+1]]; confidence is never below 1/classes.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    error = 0.0
    for index in range(bins):
        members = which == index
        if members.any():
            error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)


def compute_metrics(
    labels: np.ndarray, probabilities: np.ndarray, class_names: tuple[str, ...] = CLASS_NAMES
) -> dict:
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        log_loss,
        precision_recall_fscore_support,
    )

    labels = np.asarray(labels)
    predicted = probabilities.argmax(axis=1)
    indices = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=indices, zero_division=0
    )
    accuracy = float(accuracy_score(labels, predicted))
    count = len(labels)
    return {
        "n": int(count),
        "accuracy": accuracy,
        # Normal-approximation 95% margin of the accuracy, to read differences against.
        "accuracy_95_margin": float(1.96 * np.sqrt(accuracy * (1 - accuracy) / max(count, 1))),
        "macro_f1": float(f1_score(labels, predicted, labels=indices, average="macro")),
        "ece": expected_calibration_error(labels, probabilities),
        "log_loss": float(log_loss(labels, probabilities, labels=indices)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(labels, predicted, labels=indices).tolist(),
        "confusion_matrix_axes": "rows: true class, columns: predicted class",
    }


def plot_confusion_matrix(matrix, class_names, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import textwrap

    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    figure, axes = plt.subplots(figsize=(5.5, 5.0))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=class_names).plot(
        ax=axes, cmap="Blues", colorbar=False, values_format="d"
    )
    axes.set_title(textwrap.fill(title, 70), fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_training_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """history: one dict per epoch with 'phase', 'loss', 'accuracy', 'val_loss', 'val_accuracy'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(history) + 1)
    for key, style in (("loss", "-"), ("val_loss", "--")):
        loss_axes.plot(epochs, [row.get(key, np.nan) for row in history], style, label=key)
    for key, style in (("accuracy", "-"), ("val_accuracy", "--")):
        accuracy_axes.plot(epochs, [row.get(key, np.nan) for row in history], style, label=key)
    phases = [row.get("phase") for row in history]
    for index in range(1, len(phases)):
        if phases[index] != phases[index - 1]:
            for axes in (loss_axes, accuracy_axes):
                axes.axvline(index + 0.5, color="grey", linewidth=0.8)
    for axes, name in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        axes.set_xlabel("epoch")
        axes.set_ylabel(name)
        axes.legend()
        axes.grid(alpha=0.3)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def predict_files(classifier, paths, batch_size: int = 64, label: str = "predicting") -> np.ndarray:
    """Probabilities (n, classes) for image files, decoded the way serving decodes them."""
    outputs = []
    starts = range(0, len(paths), batch_size)
    for start in progress(starts, len(starts), f"{label} ({batch_size}/batch)"):
        chunk = paths[start : start + batch_size]
        batch = np.stack(
            [decode_image(Path(p).read_bytes(), classifier.input_size) for p in chunk]
        ).astype(np.float32)
        outputs.append(classifier.predict_batch(batch))
    return np.concatenate(outputs) if outputs else np.zeros((0, len(classifier.class_names)))


def select_images(
    data: Path, model_dir: Path, split: str | None, exclude_near_duplicates_of: Path | None
):
    """The images to score and a description of how they were chosen."""
    images = find_labelled_images(data)
    selection = {"data": str(data), "found": len(images)}
    if split:
        record = json.loads((model_dir / "split.json").read_text())
        images = select_from_split_record(images, record, split)
        selection["split"] = split
        selection["split_data_fingerprint"] = record["data_fingerprint"]
    if exclude_near_duplicates_of:
        reference = find_labelled_images(exclude_near_duplicates_of)
        cache = default_cache_dir()
        ours = compute_signatures([i.path for i in images], DEFAULT_DEDUP, cache)
        theirs = compute_signatures([i.path for i in reference], DEFAULT_DEDUP, cache)
        duplicated = {i for i, _ in near_duplicate_pairs(ours, DEFAULT_DEDUP, other=theirs)}
        images = [image for index, image in enumerate(images) if index not in duplicated]
        selection["excluded_near_duplicates_of"] = str(exclude_near_duplicates_of)
        selection["excluded"] = len(duplicated)
    selection["scored"] = len(images)
    return images, selection


def evaluate(
    data: str | Path,
    model: str | Path,
    split: str | None = None,
    exclude_near_duplicates_of: str | Path | None = None,
    runtime: str = "auto",
) -> dict:
    from ml.inference import load_classifier

    classifier = load_classifier(model, runtime=runtime)
    images, selection = select_images(
        Path(data),
        Path(model),
        split,
        Path(exclude_near_duplicates_of) if exclude_near_duplicates_of else None,
    )
    if not images:
        raise ValueError(f"no images left to evaluate under {data}")
    labels = np.array([classifier.class_names.index(image.label) for image in images])
    probabilities = predict_files(classifier, [image.path for image in images])
    metrics = compute_metrics(labels, probabilities, classifier.class_names)
    predicted = probabilities.argmax(axis=1)
    metrics["misclassified"] = [
        {
            "path": image.relative_path,
            "true": image.label,
            "predicted": classifier.class_names[predicted[index]],
            "confidence": float(probabilities[index].max()),
        }
        for index, image in enumerate(images)
        if predicted[index] != labels[index]
    ]
    return {
        "model": {
            "name": classifier.name,
            "version": classifier.version,
            "sha256": classifier.sha256,
            "runtime": classifier.runtime,
            "dir": str(classifier.model_dir),
        },
        "selection": selection,
        "metrics": metrics,
    }


SUITE = {
    "test_split": "the leakage-free test split saved with the model (held-out Training/ groups)",
    "testing_raw": "the raw Testing/ folder (many images are re-encoded copies of Training/ ones)",
    "testing_unseen": "Testing/ images with no near-duplicate in Training/",
}


def evaluate_suite(dataset_root: str | Path, model: str | Path, runtime: str = "auto") -> dict:
    """The report's three evaluations on a Sartaj-style root with Training/ and Testing/."""
    root = Path(dataset_root)
    return {
        "test_split": evaluate(root / "Training", model, split="test", runtime=runtime),
        "testing_raw": evaluate(root / "Testing", model, runtime=runtime),
        "testing_unseen": evaluate(
            root / "Testing", model, exclude_near_duplicates_of=root / "Training", runtime=runtime
        ),
    }


def format_summary(result: dict) -> str:
    metrics = result["metrics"]
    lines = [
        f"{result['model']['name']} {result['model']['version']} ({result['model']['runtime']})"
        f" on {result['selection']['scored']} images",
        f"accuracy {metrics['accuracy']:.4f} (+-{metrics['accuracy_95_margin']:.3f})"
        f"  macro-F1 {metrics['macro_f1']:.4f}  ECE {metrics['ece']:.4f}",
        f"{'class':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}",
    ]
    for name, row in metrics["per_class"].items():
        lines.append(
            f"{name:<12}{row['precision']:>10.4f}{row['recall']:>10.4f}{row['f1']:>10.4f}"
            f"{row['support']:>9d}"
        )
    lines.append("confusion matrix (rows true, columns predicted):")
    lines += ["  " + " ".join(f"{v:>5d}" for v in row) for row in metrics["confusion_matrix"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="folder of class subfolders")
    parser.add_argument(
        "--suite",
        action="store_true",
        help="DATA is a root with Training/ and Testing/: score the report's three sets "
        "(test split, raw Testing/, Testing/ without near-duplicates in Training/)",
    )
    parser.add_argument(
        "--trust",
        action="store_true",
        help="DATA is a root with Training/ and Testing/: calibration, review flag and OOD "
        "rejection report (ml.trust)",
    )
    parser.add_argument("--model", required=True, help="artifact folder (with model.json)")
    parser.add_argument("--json", help="write the full result here")
    parser.add_argument("--png", help="confusion-matrix PNG (default: next to --json)")
    parser.add_argument("--split", choices=("train", "val", "test"), help="score one split side")
    parser.add_argument("--exclude-near-duplicates-of", metavar="DIR")
    parser.add_argument("--runtime", default="auto", choices=("auto", "litert", "keras"))
    args = parser.parse_args(argv)
    if args.suite:
        return run_suite(args)
    if args.trust:
        return run_trust(args)

    result = evaluate(
        args.data, args.model, args.split, args.exclude_near_duplicates_of, args.runtime
    )
    print(format_summary(result), flush=True)
    stem = Path(args.json).with_suffix("") if args.json else None
    png = Path(args.png) if args.png else (Path(f"{stem}-confusion.png") if stem else None)
    selection = result["selection"]
    title = (
        f"{result['model']['name']} {result['model']['version']}: {selection['scored']} images "
        f"from {selection['data']}" + (f" ({selection['split']} split)" if args.split else "")
    )
    if png:
        plot_confusion_matrix(result["metrics"]["confusion_matrix"], CLASS_NAMES, png, title)
        result["confusion_png"] = str(png)
    history = json.loads((Path(args.model) / "model.json").read_text()).get("history")
    if history and stem:
        curves = plot_training_curves(
            history, f"{stem}-training-curves.png", result["model"]["name"]
        )
        result["training_curves_png"] = str(curves)
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def run_suite(args) -> int:
    results = evaluate_suite(args.data, args.model, args.runtime)
    stem = Path(args.json).with_suffix("") if args.json else None
    for key, result in results.items():
        print(f"\n== {key}: {SUITE[key]}\n{format_summary(result)}", flush=True)
        if stem:
            png = Path(f"{stem}-{key}-confusion.png")
            title = f"{result['model']['name']} {result['model']['version']}: {SUITE[key]}"
            plot_confusion_matrix(result["metrics"]["confusion_matrix"], CLASS_NAMES, png, title)
            result["confusion_png"] = png.name
    if stem:
        history = json.loads((Path(args.model) / "model.json").read_text()).get("history")
        if history:
            plot_training_curves(
                history, f"{stem}-training-curves.png", results["test_split"]["model"]["name"]
            )
        write_json(args.json, {"descriptions": SUITE, **results})
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def format_trust(result: dict) -> str:
    lines = [
        f"{result['model']['name']} {result['model']['version']} ({result['model']['runtime']})"
    ]
    calibration = result["calibration"]
    lines.append(f"temperature {calibration['temperature']:.3f} (folded into the model)")
    for side in ("val", "test"):
        row = calibration[side]
        lines.append(
            f"{side:<5} n={row['n']}  ECE before scaling {row['ece_before_scaling']:.4f}  "
            f"after {row['ece_after_scaling']:.4f}  NLL {row['nll_before_scaling']:.4f} -> "
            f"{row['nll_after_scaling']:.4f}"
        )
    review = result["review"]
    lines.append(f"review threshold {review['threshold']:.4f}: {review['rule']}")
    for side in ("val", "test", "testing_unseen"):
        row = review[side]

        def show(value):
            return "-" if value is None else f"{value:.4f}"

        lines.append(
            f"  {side:<15} flagged {row['flagged']}/{row['n']} ({row['share_flagged']:.1%})  "
            f"accuracy all {show(row['accuracy_all'])}  unflagged "
            f"{show(row['accuracy_unflagged'])}  flagged {show(row['accuracy_flagged'])}"
        )
    ood = result["ood"]
    far = ood["far_ood"]
    lines.append(
        f"OOD threshold {ood['threshold']:.1f}; far-OOD n={far['n']}: "
        f"AUROC {far['auroc_pipeline']:.4f}"
        f" (feature score alone {far['auroc_feature_score_only']:.4f}), rejected "
        f"{far['rejected']}/{far['n']} ({far['rejection_rate']:.1%})"
    )
    for side, row in ood["in_distribution"].items():
        lines.append(
            f"  in-dist {side:<15} rejected {row['rejected']}/{row['n']} "
            f"({row['rejection_rate']:.2%}) {row['by_reason']}"
        )
    lines.append(f"  {'category':<14}{'n':>5}{'AUROC':>9}{'score only':>11}{'rejected':>10}")
    for category, row in ood["per_category"].items():
        lines.append(
            f"  {category:<14}{row['n']:>5}{row['auroc_pipeline']:>9.4f}"
            f"{row['auroc_feature_score_only']:>11.4f}{row['rejection_rate']:>10.1%}  "
            f"{row['by_reason']}"
        )
    return "\n".join(lines)


def run_trust(args) -> int:
    from ml.trust import evaluate_trust, plot_trust

    runtime = "litert" if args.runtime == "auto" else args.runtime
    result = evaluate_trust(Path(args.data), Path(args.model), runtime=runtime)
    print(format_trust(result), flush=True)
    if args.json:
        stem = Path(args.json).with_suffix("")
        stem.parent.mkdir(parents=True, exist_ok=True)
        result["pngs"] = plot_trust(result, stem)
        result.pop("_plots")
        write_json(args.json, result)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
