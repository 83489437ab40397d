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
- worker memory: the peak of the worker's process tree (main + pool), sampled every 0.2 s,
  as the sum of RSS and as PSS (pages shared by the fork counted once);
- raw runtime: the same classifier in this process, predict([jpeg]) per scan (decode +
  resize + model + CAM + OOD score, batch 1), measured before and after the workers (mean
  of the two), two ways (RAW): one stream on one interpreter of 2 threads, and one stream
  per interpreter on 2 interpreters of 1 thread;
- efficiency = worker jobs/s / the faster raw figure, also shown against the one-stream
  figure; speed-up = worker jobs/s / naive jobs/s.

The naive worker is the same worker with MODEL_RUNTIME=keras_predict: TensorFlow,
Keras model.predict per job, as most Celery projects of this kind do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
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


def _tree_memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of the process tree in MB. The RSS sum counts the pages a prefork pool
    process shares with its parent (copy-on-write) twice; PSS counts each page once,
    split between the processes that share it."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
        rss = pss = 0
        for process in processes:
            memory = process.memory_full_info()
            rss, pss = rss + memory.rss, pss + memory.pss
        return rss / 2**20, pss / 2**20
    except psutil.NoSuchProcess:
        return 0.0, 0.0


def raw_runtime(jpegs: list[bytes], seconds: float, *, interpreters: int, threads: int) -> float:
    """Images/s of Classifier.predict([jpeg]) in this process (decode, resize, model, CAM
    and OOD score), from one calling thread per LiteRT interpreter."""
    import itertools

    from bench.runtime import throughput
    from ml.inference import load_classifier

    os.environ |= {"ML_INTERPRETERS": str(interpreters), "ML_NUM_THREADS": str(threads)}
    classifier = load_classifier(runtime="litert")
    classifier.warm_up()
    scans = itertools.cycle(jpegs)  # next() on a cycle is safe from several threads
    return throughput(classifier.predict, lambda: [next(scans)], 1, seconds, interpreters)


# The raw runtime two ways: one interpreter of 2 threads called from one thread (the
# fastest single stream), and the worker's default, 2 interpreters of 1 thread each called
# side by side. Efficiency is against the faster of the two.
RAW = {
    "one stream": {"interpreters": 1, "threads": 2},
    "two interpreters": {"interpreters": 2, "threads": 1},
}


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
    # Counting every finished image, less those finished before, is cheaper than matching
    # the ids: this poller shares the cores with the worker it measures.
    finished_before = Image.objects.filter(status__in=TERMINAL_STATUSES).count()
    started = time.time()
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    peak_rss = peak_pss = 0.0
    first_done_at = None
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            rss, pss = _tree_memory_mb(worker.pid)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            done = Image.objects.filter(status__in=TERMINAL_STATUSES).count() - finished_before
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
        "peak_worker_pss_mb": round(peak_pss, 1),
    }


def driver(args) -> dict:
    import django

    django.setup()
    from django.core.management import call_command

    from bench.scans import scans
    from diagnostics import services, storage
    from diagnostics.models import Site

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

    environment = dict(os.environ)
    raw_before = {name: raw_runtime(jpegs, args.raw_seconds, **how) for name, how in RAW.items()}
    os.environ.clear()
    os.environ.update(environment)
    print(f"raw runtime before: {raw_before} images/s", file=sys.stderr, flush=True)
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
    raw_after = {name: raw_runtime(jpegs, args.raw_seconds, **how) for name, how in RAW.items()}
    print(f"raw runtime after: {raw_after} images/s", file=sys.stderr, flush=True)
    results["raw_runtime_images_per_s"] = {
        name: {
            "before": round(raw_before[name], 2),
            "after": round(raw_after[name], 2),
            "mean": round((raw_before[name] + raw_after[name]) / 2, 2),
            "settings": RAW[name],
        }
        for name in RAW
    }
    results["raw_what"] = (
        "LiteRT Classifier.predict([jpeg]) per scan in one process: decode + resize + model + "
        "CAM + OOD score"
    )
    raw = max(entry["mean"] for entry in results["raw_runtime_images_per_s"].values())
    one_stream = results["raw_runtime_images_per_s"]["one stream"]["mean"]
    naive = results["configurations"][-1]["jobs_per_s"]
    for row in results["configurations"]:
        row["efficiency_vs_raw"] = round(row["jobs_per_s"] / raw, 3)
        row["efficiency_vs_raw_one_stream"] = round(row["jobs_per_s"] / one_stream, 3)
        row["speed_up_vs_naive"] = round(row["jobs_per_s"] / naive, 2)
    return results


# The naive worker: Keras model.predict, one job per task (no batches).
NAIVE = {"MODEL_RUNTIME": "keras_predict", "CELERY_WORKER_CONCURRENCY": 1, "CLASSIFY_BATCH_SIZE": 1}
# Each: (name, environment of the worker). Batch size, pipeline threads, interpreters,
# LiteRT threads and pool concurrency are the knobs that matter on a 2-core node; the first
# is the shipped default.
CONFIGURATIONS = [
    ("batches of 32, 3 threads, 2 interpreters of 1 thread (the defaults)", {}),
    ("batches of 16", {"CLASSIFY_BATCH_SIZE": 16}),
    ("batches of 64", {"CLASSIFY_BATCH_SIZE": 64}),
    ("2 threads", {"CLASSIFY_THREADS": 2}),
    ("4 threads", {"CLASSIFY_THREADS": 4}),
    ("6 threads", {"CLASSIFY_THREADS": 6}),
    ("8 threads", {"CLASSIFY_THREADS": 8}),
    ("1 interpreter of 2 threads", {"ML_INTERPRETERS": 1, "ML_NUM_THREADS": 2}),
    ("no batches", {"CLASSIFY_BATCH_SIZE": 1}),
    (
        "prefork -c 2, 1 interpreter of 1 thread each",
        {"CELERY_WORKER_CONCURRENCY": 2, "ML_INTERPRETERS": 1, "ML_NUM_THREADS": 1},
    ),
    # One process whose batches run side by side (a batch's claim and first fetches overlap
    # the previous one's last results), but Celery's threads pool enforces no time limits.
    (
        "threads pool, 2 batches at once",
        {"CELERY_WORKER_POOL": "threads", "CELERY_WORKER_CONCURRENCY": 2},
    ),
    (
        "threads pool, 3 batches at once",
        {"CELERY_WORKER_POOL": "threads", "CELERY_WORKER_CONCURRENCY": 3},
    ),
]


def markdown(report: dict) -> str:
    raw = report["raw_runtime_images_per_s"]
    lines = [
        f"Raw runtime (same run; {report['raw_what']}): "
        + "; ".join(
            f"{name} ({how['settings']['interpreters']} x {how['settings']['threads']} "
            f"threads): {how['mean']:.1f} images/s"
            for name, how in raw.items()
        ),
        "Efficiency is against the faster raw figure.",
        "",
        "| worker (LiteRT, prefork -c 1 unless said) | jobs | rejected | jobs/s "
        "| efficiency vs raw | vs raw one stream | speed-up vs naive "
        "| cold start to first result s | peak worker RSS MB | peak worker PSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["configurations"]:
        lines.append(
            f"| {row['worker']} | {row['jobs']} | {row['rejected_as_not_mri']} "
            f"| {row['jobs_per_s']:.1f} | {row['efficiency_vs_raw']:.2f} "
            f"| {row['efficiency_vs_raw_one_stream']:.2f} | {row['speed_up_vs_naive']:.1f}x "
            f"| {row['cold_start_to_first_result_s']:.1f} | {row['peak_worker_rss_mb']:.0f} "
            f"| {row['peak_worker_pss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=300, help="jobs per LiteRT worker run")
    parser.add_argument("--naive-n", type=int, default=60, help="jobs for the naive worker")
    parser.add_argument("--raw-seconds", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="per worker run")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "worker"))
    parser.add_argument(
        "--only", help="comma-separated indices of the configurations to run (default: all)"
    )
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--log-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.configurations = CONFIGURATIONS
    if args.only:
        args.configurations = [CONFIGURATIONS[int(i)] for i in args.only.split(",")]
    if args.driver:
        print(json.dumps(driver(args)))
        return
    driver_args = ["-n", str(args.n), "--naive-n", str(args.naive_n)]
    driver_args += ["--raw-seconds", str(args.raw_seconds), "--timeout", str(args.timeout)]
    if args.only:
        driver_args += ["--only", args.only]
    run_driver_and_report(
        __file__, driver_args, scratch_prefix="bench-worker-", out=args.out, markdown=markdown
    )


# What docker-compose.yml runs with: DEBUG off (Django's debug cursor times, formats and
# keeps every SQL statement, which cost the API and the worker CPU per job), and the
# secrets that production requires then (throwaway values: the bench's data is deleted).
PRODUCTION_SETTINGS = {
    "DJANGO_DEBUG": "false",
    "DJANGO_SECRET_KEY": secrets.token_urlsafe(32),
    "DICOM_PSEUDONYM_KEY": secrets.token_urlsafe(32),
}


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
            env |= PRODUCTION_SETTINGS
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
