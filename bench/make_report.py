"""Aggregate `python -m ml.evaluate --suite` results of several trained models into tables.

    python bench/make_report.py --label "Lite0 ImageNet" runs/s0/suite.json runs/s1/suite.json \
        --label "B0 from scratch" runs/b0/suite.json --out report.md

Each --label starts a group of suite JSON files (one per training seed); the table shows
each seed and mean +- sample standard deviation per evaluation set.
"""

import json
import statistics
import sys
from pathlib import Path

SETS = ("test_split", "testing_raw", "testing_unseen")
CLASSES = ("glioma", "meningioma", "no_tumor", "pituitary")


def row(metrics: dict) -> list[float]:
    per_class = [metrics["per_class"][name]["f1"] for name in CLASSES]
    return [metrics["accuracy"], metrics["macro_f1"], *per_class, metrics["ece"]]


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def parse(tokens: list[str]) -> tuple[list[tuple[str, list[Path]]], str | None]:
    """[--label NAME FILE...]... [--out PATH] -> groups of (label, files), output path."""
    groups: list[tuple[str, list[Path]]] = []
    out = None
    tokens = list(tokens)
    while tokens:
        token = tokens.pop(0)
        if token == "--label":
            groups.append((tokens.pop(0), []))
        elif token == "--out":
            out = tokens.pop(0)
        elif groups:
            groups[-1][1].append(Path(token))
        else:
            raise SystemExit(f"usage: {__doc__.strip().splitlines()[2].strip()}")
    return groups, out


HEADER = (
    "| model | run | n | accuracy | macro-F1 | F1 glioma | F1 meningioma | F1 no_tumor "
    "| F1 pituitary | ECE |"
)


def main(argv=None) -> int:
    groups, out = parse(sys.argv[1:] if argv is None else argv)
    lines = []
    for key in SETS:
        lines += [f"\n### {key}\n", HEADER, "|" + "---|" * 10]
        for label, paths in groups:
            rows = []
            for path in paths:
                result = json.loads(path.read_text())[key]
                values = row(result["metrics"])
                rows.append(values)
                run = f"{result['model']['name']} {result['model']['version']}"
                cells = " | ".join(f"{v:.3f}" for v in values)
                lines.append(f"| {label} | {run} | {result['metrics']['n']} | {cells} |")
            if len(rows) > 1:
                columns = [fmt([r[i] for r in rows]) for i in range(len(rows[0]))]
                lines.append(
                    f"| **{label}** | mean ± sd ({len(rows)} seeds) | | "
                    + " | ".join(columns)
                    + " |"
                )
    text = "\n".join(lines) + "\n"
    if out:
        Path(out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
