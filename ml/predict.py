"""Classify image files with an exported model.

    python -m ml.predict scan1.jpg scan2.png [--model ARTIFACT] [--runtime auto] [--json OUT]
                         [--heatmaps DIR]

Prints one line per file: the label and probabilities, "REVIEW" when the top probability
is below the model's review threshold, the OOD score, or "REJECTED" and the reason when
the image is not a brain MRI slice like the training data. Unreadable files are reported
and make the exit status 1. --json writes every result; --heatmaps writes each image's
class activation map over the image as DIR/<name>-heatmap.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ml.data import progress, write_json
from ml.inference import UnreadableImage, load_classifier


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--model", help="artifact folder (default: the shipped model)")
    parser.add_argument("--runtime", default="auto", choices=("auto", "litert", "keras"))
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--heatmaps", metavar="DIR", help="write heatmap overlay PNGs here")
    args = parser.parse_args(argv)

    classifier = load_classifier(args.model, runtime=args.runtime)
    print(
        f"model {classifier.name} {classifier.version} ({classifier.runtime}, "
        f"sha256 {classifier.sha256[:12]})",
        file=sys.stderr,
    )
    results = []
    failed = 0
    for path in progress(args.images, len(args.images), "classifying"):
        try:
            [prediction] = classifier.predict([Path(path).read_bytes()])
        except (UnreadableImage, OSError) as error:
            failed += 1
            print(f"{path}\tERROR\t{error}", flush=True)
            results.append({"path": path, "error": str(error)})
            continue
        scores = " ".join(f"{name}={p:.4f}" for name, p in prediction.probabilities.items())
        if prediction.rejected:
            print(f"{path}\tREJECTED\t{prediction.rejection_reason}", flush=True)
        else:
            review = "REVIEW\t" if prediction.needs_review else ""
            print(
                f"{path}\t{prediction.label}\t{review}{scores}\tood={prediction.ood_score:.1f}",
                flush=True,
            )
        result = {
            "path": path,
            "label": prediction.label,
            "probabilities": prediction.probabilities,
            "needs_review": prediction.needs_review,
            "ood_score": prediction.ood_score,
            "rejection_reason": prediction.rejection_reason,
        }
        if args.heatmaps and prediction.heatmap is not None:
            from ml.heatmap import overlay_png

            out = Path(args.heatmaps) / f"{Path(path).stem}-heatmap.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(overlay_png(Path(path).read_bytes(), prediction.heatmap))
            result["heatmap_png"] = str(out)
        results.append(result)
    if args.json:
        model = {
            "name": classifier.name,
            "version": classifier.version,
            "sha256": classifier.sha256,
            "review_threshold": classifier.review_threshold,
        }
        write_json(args.json, {"model": model, "results": results})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
