"""Worker benchmark: one real `celery -A workers worker` on real PostgreSQL, Redis and S3,
against the raw runtime and a naive worker, side by side in one run.

    .venv/bin/python bench/worker.py            # writes bench/results/worker.json + .md

Services: DATABASE_URL's server (the database named there is created and migrated;
default postgres://postgres@127.0.0.1:5432/diagnostics_bench), REDIS_URL (default
redis://127.0.0.1:6379/12, flushed) and an embedded S3 (devstack) unless S3_ENDPOINT_URL
is set. For each configuration, N scans are stored and their jobs queued *before* the
worker starts, so the worker is never starved:

- jobs/s: (N - 1) / (last finished_at - first finished_at), from PostgreSQL;
- cold start: worker process start -> first image done;
- worker RSS: the peak of the worker's process tree (main + pool), sampled every 0.2 s;
- raw runtime: the same classifier in this process, predict([jpeg]) per scan (decode +
  resize + model, batch 1), measured before and after the workers (mean of the two);
- efficiency = worker jobs/s / raw images/s, also against the raw figure with the heatmap
  overlay each job renders; speed-up = worker jobs/s / naive jobs/s.

The naive worker is the same worker with MODEL_RUNTIME=keras_predict: TensorFlow,
Keras model.predict per job, as most Celery projects of this kind do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/diagnostics_bench"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"


def _create_database(url: str) -> None:
    import psycopg2

    parsed = urlparse(url)
    name = parsed.path.lstrip("/")
    admin = psycopg2.connect(url.replace(parsed.path, "/postgres"))
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
        if cursor.fetchone() is None:
            cursor.execute(f'CREATE DATABASE "{name}"')
    admin.close()


def _tree_rss_mb(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
        return sum(p.memory_info().rss for p in processes if p.is_running()) / 2**20
    except psutil.NoSuchProcess:
        return 0.0


def raw_runtime(classifier, jpegs: list[bytes], seconds: float, heatmaps: bool = False) -> float:
    """Images/s of classifier.predict([jpeg]) in this process (decode, resize, model, CAM
    and OOD score); with `heatmaps`, also the overlay PNG a worker renders for each."""
    import numpy as np

    from ml.data import decode_image
    from ml.heatmap import overlay_png

    def one(jpeg: bytes) -> None:
        if not heatmaps:
            classifier.predict([jpeg])
            return
        pixels = decode_image(jpeg, classifier.input_size)
        [result] = classifier.analyse_batch(pixels[np.newaxis].astype(np.float32))
        overlay_png(pixels, result.heatmap)

    one(jpegs[0])
    count, started = 0, time.perf_counter()
    while count < 10 or time.perf_counter() - started < seconds:
        one(jpegs[count % len(jpegs)])
        count += 1
    return count / (time.perf_counter() - started)


def seed(user, jpegs: list[bytes], tag: str) -> list:
    """Store each scan as its own case (through the upload service) and queue its job."""
    from diagnostics import services

    image_ids = []
    for index, data in enumerate(jpegs):
        case, _ = services.case_create(user=user, uploads=[(f"{tag}-{index}.jpg", data)])
        image_ids.extend(case.images.values_list("id", flat=True))
    return image_ids


def run_worker(image_ids: list, env: dict, log_path: Path, timeout_s: float) -> dict:
    from diagnostics.models import TERMINAL_STATUSES, Image

    command = [sys.executable, "-m", "celery", "-A", "workers", "worker", "--loglevel=warning"]
    command += ["--without-gossip", "--without-mingle", "--hostname=bench@%h"]
    started = time.time()
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    peak_rss, first_done_at = 0.0, None
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            peak_rss = max(peak_rss, _tree_rss_mb(worker.pid))
            done = Image.objects.filter(id__in=image_ids, status__in=TERMINAL_STATUSES).count()
            if done and first_done_at is None:
                first_done_at = time.time()
            if done == len(image_ids):
                break
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited; see {log_path}")
            time.sleep(0.2)
        else:
            raise RuntimeError(f"not finished in {timeout_s} s; see {log_path}")
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    finished = sorted(Image.objects.filter(id__in=image_ids).values_list("finished_at", flat=True))
    failed = Image.objects.filter(id__in=image_ids, status="failed").count()
    rejected = Image.objects.filter(id__in=image_ids, status="rejected").count()
    span_s = (finished[-1] - finished[0]).total_seconds()
    return {
        "jobs": len(image_ids),
        "failed": failed,
        "rejected_as_not_mri": rejected,
        "jobs_per_s": round((len(image_ids) - 1) / span_s, 2),
        # The DB clock stamps finished_at; this process's clock the start: same machine.
        "cold_start_to_first_result_s": round(finished[0].timestamp() - started, 2),
        "peak_worker_rss_mb": round(peak_rss, 1),
    }


def driver(args) -> dict:
    import django

    django.setup()
    from django.core.management import call_command

    from bench.scans import scans
    from diagnostics import services, storage
    from diagnostics.models import Site
    from ml.inference import load_classifier

    call_command("migrate", verbosity=0)
    storage.ensure_bucket()
    import redis

    redis.Redis.from_url(os.environ["REDIS_URL"]).flushdb()
    services.demo_user_ensure(username="bench", site_name="bench")
    from django.contrib.auth import get_user_model

    from diagnostics.models import Role

    user = get_user_model().objects.get(username="bench")
    services.user_roles_set(user=user, roles=[Role.UPLOADER])
    user = get_user_model().objects.get(username="bench")  # fresh permission cache
    assert Site.objects.filter(name="bench").exists()
    run_tag = str(int(time.time()))
    jpegs = scans(args.n, salt=0)

    litert = load_classifier(runtime="litert")
    raw_before = raw_runtime(litert, jpegs, args.raw_seconds)
    with_heatmaps_before = raw_runtime(litert, jpegs, args.raw_seconds, heatmaps=True)
    print(f"raw runtime before: {raw_before:.1f} images/s", file=sys.stderr, flush=True)
    results = {"configurations": []}
    configurations = [(name, args.n, dict(cfg)) for name, cfg in args.configurations]
    configurations.append(("naive: keras model.predict per job", args.naive_n, NAIVE))
    for name, count, overrides in configurations:
        # Fresh bytes per configuration and run: equal bytes would be deduplicated.
        first = int(run_tag) * 10 + len(results["configurations"]) * 100_000_000
        fresh = scans(count, salt=first)
        image_ids = seed(user, fresh, f"{run_tag}-{len(results['configurations'])}")
        env = os.environ | {key: str(value) for key, value in overrides.items()}
        print(f"{name}: {count} jobs queued, starting the worker", file=sys.stderr, flush=True)
        log_path = Path(args.log_dir) / f"worker-{len(results['configurations'])}.log"
        row = {"worker": name, "settings": overrides}
        row |= run_worker(image_ids, env, log_path, args.timeout)
        print(json.dumps(row), file=sys.stderr, flush=True)
        results["configurations"].append(row)
    raw_after = raw_runtime(litert, jpegs, args.raw_seconds)
    with_heatmaps_after = raw_runtime(litert, jpegs, args.raw_seconds, heatmaps=True)
    print(f"raw runtime after: {raw_after:.1f} images/s", file=sys.stderr, flush=True)
    raw = (raw_before + raw_after) / 2
    with_heatmaps = (with_heatmaps_before + with_heatmaps_after) / 2
    naive = results["configurations"][-1]["jobs_per_s"]
    results["raw_runtime_images_per_s"] = {
        "before": round(raw_before, 2),
        "after": round(raw_after, 2),
        "mean": round(raw, 2),
        "what": "LiteRT predict([jpeg]) per scan in one process: decode + resize + model + "
        "CAM + OOD score",
    }
    results["raw_with_heatmaps_images_per_s"] = {
        "before": round(with_heatmaps_before, 2),
        "after": round(with_heatmaps_after, 2),
        "mean": round(with_heatmaps, 2),
        "what": "the same plus the heatmap overlay PNG each job stores",
    }
    for row in results["configurations"]:
        row["efficiency_vs_raw"] = round(row["jobs_per_s"] / raw, 3)
        row["efficiency_vs_raw_with_heatmaps"] = round(row["jobs_per_s"] / with_heatmaps, 3)
        row["speed_up_vs_naive"] = round(row["jobs_per_s"] / naive, 2)
    return results


# The naive worker: Keras model.predict, one job per task (no batches).
NAIVE = {"MODEL_RUNTIME": "keras_predict", "CELERY_WORKER_CONCURRENCY": 1, "CLASSIFY_BATCH_SIZE": 1}
# Each: (name, environment of the worker). Batch size, I/O threads, concurrency and LiteRT
# threads are the knobs that matter on a 2-core node; the first is the shipped default.
CONFIGURATIONS = [
    ("litert, batches of 32, prefork -c 1, 2 threads (the defaults)", {}),
    ("litert, batches of 16", {"CLASSIFY_BATCH_SIZE": 16}),
    ("litert, batches of 64", {"CLASSIFY_BATCH_SIZE": 64}),
    ("litert, batches of 32, 4 I/O threads", {"CLASSIFY_IO_THREADS": 4}),
    ("litert, no batches", {"CLASSIFY_BATCH_SIZE": 1}),
    (
        "litert, batches of 32, prefork -c 2, 1 thread each",
        {"CELERY_WORKER_CONCURRENCY": 2, "ML_NUM_THREADS": 1},
    ),
]


def markdown(report: dict) -> str:
    raw, with_heatmaps = (
        report["raw_runtime_images_per_s"],
        report["raw_with_heatmaps_images_per_s"],
    )
    lines = [
        f"Raw runtime (same run): {raw['mean']:.1f} images/s ({raw['what']}); "
        f"{with_heatmaps['mean']:.1f} images/s with heatmaps ({with_heatmaps['what']})",
        "",
        "| worker | jobs | rejected | jobs/s | efficiency vs raw | vs raw with heatmaps "
        "| speed-up vs naive | cold start to first result s | peak worker RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["configurations"]:
        lines.append(
            f"| {row['worker']} | {row['jobs']} | {row['rejected_as_not_mri']} "
            f"| {row['jobs_per_s']:.1f} | {row['efficiency_vs_raw']:.2f} "
            f"| {row['efficiency_vs_raw_with_heatmaps']:.2f} | {row['speed_up_vs_naive']:.1f}x "
            f"| {row['cold_start_to_first_result_s']:.1f} | {row['peak_worker_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=300, help="jobs per LiteRT worker run")
    parser.add_argument("--naive-n", type=int, default=60, help="jobs for the naive worker")
    parser.add_argument("--raw-seconds", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="per worker run")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "worker"))
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--log-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.configurations = CONFIGURATIONS
    if args.driver:
        print(json.dumps(driver(args)))
        return
    driver_args = ["-n", str(args.n), "--naive-n", str(args.naive_n)]
    driver_args += ["--raw-seconds", str(args.raw_seconds), "--timeout", str(args.timeout)]
    run_driver_and_report(
        __file__, driver_args, scratch_prefix="bench-worker-", out=args.out, markdown=markdown
    )


def run_driver_and_report(script, driver_args, *, scratch_prefix, out, markdown) -> None:
    """Run `script --driver ...` with any service not configured started for it (a
    throwaway folder), then write its report as JSON and a markdown table and print it."""
    from devstack.up import start_missing_services

    os.environ.setdefault("DATABASE_URL", DEFAULT_DATABASE_URL)
    os.environ.setdefault("REDIS_URL", DEFAULT_REDIS_URL)
    _create_database(os.environ["DATABASE_URL"])
    with tempfile.TemporaryDirectory(prefix=scratch_prefix) as scratch:
        with contextlib.ExitStack() as running:
            env = start_missing_services(Path(scratch), running)
            env |= {"DJANGO_SETTINGS_MODULE": "diagnostics.settings", "S3_BUCKET": "bench"}
            command = [sys.executable, script, "--driver", *driver_args, "--log-dir", scratch]
            done = subprocess.run(command, env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
            if done.returncode != 0:
                for log in sorted(Path(scratch).glob("*.log")):
                    print(f"--- {log.name}\n{log.read_text()[-3000:]}", file=sys.stderr)
                sys.exit(done.returncode)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["machine"] = {"cores": os.cpu_count(), "load_average_at_end": os.getloadavg()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
