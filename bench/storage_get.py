"""S3 read benchmark: what one GET of a scan costs the process that asks, side by side in
one run: boto3's get_object (what diagnostics.storage did before) against a URL presigned by
the same boto3 client and fetched with urllib3 (what diagnostics.storage.get does now).

    .venv/bin/python bench/storage_get.py       # writes bench/results/storage_get.json + .md

The server is a real SeaweedFS S3 (started here, in a throwaway folder), the object a real
MRI slice from the dataset. Per variant and round, after a warm-up: CPU time of this process
per GET (time.process_time: the client's own cost, which a worker pays while it holds the
GIL) and wall time per GET, one GET at a time. Rounds alternate the variants, so a slower
moment of a shared machine hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def per_get_ms(get, n: int) -> tuple[float, float]:
    for _ in range(20):
        get()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        get()
    return (time.process_time() - cpu) / n * 1000, (time.perf_counter() - wall) / n * 1000


def measure(rounds: int, n: int) -> dict:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "diagnostics.settings")
    from django.conf import settings

    from bench.scans import scans
    from devstack import services
    from diagnostics import storage

    with tempfile.TemporaryDirectory(prefix="bench-storage-") as scratch:
        with services.start_s3(scratch, access_key="benchkey", secret_key="benchsecret") as s3:
            settings.S3_ENDPOINT_URL = s3.url
            settings.S3_ACCESS_KEY_ID, settings.S3_SECRET_ACCESS_KEY = "benchkey", "benchsecret"
            settings.S3_BUCKET = "bench-storage"
            storage.ensure_bucket()
            scan = scans(1, salt=0)[0]
            storage.put("scan.jpg", scan, content_type="image/jpeg", sha256="-")

            def boto3_get_object():
                return storage._call("get_object", Key="scan.jpg")["Body"].read()

            def presigned_urllib3():
                return storage.get("scan.jpg")

            variants = {
                "boto3 get_object": boto3_get_object,
                "presigned URL + urllib3 (storage.get)": presigned_urllib3,
            }
            for get in variants.values():
                if get() != scan:
                    raise AssertionError("a GET returned other bytes than were stored")
            samples = {name: {"cpu": [], "wall": []} for name in variants}
            for index in range(rounds):
                for name, get in variants.items():
                    cpu, wall = per_get_ms(get, n)
                    samples[name]["cpu"].append(cpu)
                    samples[name]["wall"].append(wall)
                    print(
                        f"round {index + 1}: {name}: {cpu:.2f} ms CPU, {wall:.2f} ms wall",
                        file=sys.stderr,
                        flush=True,
                    )
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "object_bytes": len(scan),
        "gets_per_round": n,
        "rounds": rounds,
        "variants": [
            {
                "variant": name,
                "cpu_ms_per_get_median": round(statistics.median(s["cpu"]), 3),
                "wall_ms_per_get_median": round(statistics.median(s["wall"]), 3),
                "cpu_ms_per_round": [round(v, 3) for v in s["cpu"]],
            }
            for name, s in samples.items()
        ],
    }


def markdown(report: dict) -> str:
    base = report["variants"][0]["cpu_ms_per_get_median"]
    lines = [
        f"S3 GET of one {report['object_bytes']:,}-byte scan from SeaweedFS on {report['machine']};"
        f" {report['rounds']} alternating rounds of {report['gets_per_round']} GETs, medians.",
        "",
        "| variant | client CPU ms per GET | vs boto3 get_object | wall ms per GET |",
        "|---|---|---|---|",
    ]
    for row in report["variants"]:
        lines.append(
            f"| {row['variant']} | {row['cpu_ms_per_get_median']:.2f} "
            f"| {row['cpu_ms_per_get_median'] / base:.2f}x | {row['wall_ms_per_get_median']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-n", type=int, default=300, help="GETs per variant and round")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "storage_get"))
    args = parser.parse_args()
    report = measure(args.rounds, args.n)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
