"""End-to-end benchmark: uploads through gunicorn to results in PostgreSQL, at several
offered loads, with the API, one worker and the services sharing this machine.

    .venv/bin/python bench/end_to_end.py        # writes bench/results/end_to_end.json + .md

Starts what `./stack up` runs (gunicorn with 2 workers, one `celery -A workers worker`)
on DATABASE_URL (default postgres://postgres@127.0.0.1:5432/diagnostics_bench), REDIS_URL
(default redis://127.0.0.1:6379/12, flushed) and an embedded S3 unless S3_ENDPOINT_URL is
set. Each offered load is open loop: uploads are sent on a fixed schedule (rate per s for
--seconds) whatever the answers, each a distinct 512x512 JPEG in its own case.

- upload-to-done latency: client send time -> the image's finished_at (PostgreSQL), same
  machine clock; p50/p95/p99;
- a load is sustained when every upload is accepted and done, and the last result lands
  within --drain-s of the last upload (no backlog building up);
- the highest sustained load is then re-run at half its rate for the p95 target.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.worker import (  # noqa: E402  (needs the repo on sys.path first)
    _tree_memory_mb,
    run_driver_and_report,
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(command: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _percentile_ms(values: list[float], q: float) -> float:
    import numpy as np

    return round(float(np.percentile(values, q)) * 1000, 1) if values else float("nan")


def offered_load(url: str, token: str, rate: float, seconds: float, drain_s: float, seed: int):
    import urllib3

    from bench.scans import scans as real_scans
    from diagnostics.models import TERMINAL_STATUSES, Image

    count = max(int(rate * seconds), 1)
    # The request bodies are encoded before the clock starts, and sent with urllib3 rather
    # than requests: the load generator shares the 2 cores with what it measures, so it
    # should take as little of them as it can (a real client runs elsewhere).
    bodies = [
        urllib3.encode_multipart_formdata(
            [("images", (f"e2e-{seed}-{index}.jpg", scan, "image/jpeg"))]
        )
        for index, scan in enumerate(real_scans(count, salt=seed))
    ]
    # One retry when a connection fails before an answer: the server may close a kept-alive
    # connection just as the client reuses it (gunicorn's keep-alive is 2 s), which a real
    # client survives the same way. A retry of an upload the server did take makes no
    # second case: the same bytes at the same site answer 200 with the first one.
    retry = urllib3.Retry(
        total=1, allowed_methods=None, status_forcelist=(), redirect=False, raise_on_status=False
    )
    http = urllib3.PoolManager(maxsize=64, retries=retry, timeout=60)
    sent: dict[int, tuple[float, str | None, float]] = {}
    refused: collections.Counter = collections.Counter()  # what the uploads not accepted got
    retried: collections.Counter = collections.Counter()  # why an upload was sent twice

    def upload(index: int):
        body, content_type = bodies[index]
        started = time.time()
        case_id = None
        try:
            response = http.request(
                "POST",
                f"{url}/api/v1/cases/",
                body=body,
                # X-Forwarded-Proto as the TLS-terminating proxy in front of production sets
                # it (settings redirect plain HTTP to HTTPS when DEBUG is off).
                headers={
                    "Authorization": f"Token {token}",
                    "Content-Type": content_type,
                    "X-Forwarded-Proto": "https",
                },
            )
            for attempt in response.retries.history:
                retried[type(attempt.error).__name__] += 1
            if response.status in (200, 202):
                case_id = response.headers["Location"].rstrip("/").rsplit("/", 1)[1]
            else:
                refused[f"{response.status} {response.data[:200].decode(errors='replace')}"] += 1
        except urllib3.exceptions.HTTPError as exc:
            refused[type(exc).__name__] += 1
        sent[index] = (started, case_id, time.time() - started)

    schedule_start = time.monotonic() + 0.2
    with ThreadPoolExecutor(64) as pool:
        for index in range(count):
            delay = schedule_start + index / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(upload, index)
    last_sent = max(started for started, _, _ in sent.values())
    case_ids = [case_id for _, case_id, _ in sent.values() if case_id]
    deadline = time.monotonic() + max(60.0, drain_s)
    while time.monotonic() < deadline:
        pending = Image.objects.filter(case_id__in=case_ids).exclude(status__in=TERMINAL_STATUSES)
        if not pending.exists():
            break
        time.sleep(0.25)
    finished = dict(
        # A result: a label, or the model's refusal of what is not a brain MRI slice.
        Image.objects.filter(case_id__in=case_ids, status__in=["done", "rejected"]).values_list(
            "case_id", "finished_at"
        )
    )
    by_case = {str(key): value.timestamp() for key, value in finished.items()}
    latencies = [by_case[c] - started for started, c, _ in sent.values() if c in by_case]
    done = len(latencies)
    last_done = max(by_case.values()) if by_case else float("nan")
    drain = last_done - last_sent
    return {
        "offered_per_s": rate,
        "uploads": count,
        "accepted": len(case_ids),
        "refused": dict(refused),
        "retried": dict(retried),
        "done": done,
        "lost_or_failed": count - done,
        "completed_per_s": round(done / (last_done - min(s for s, _, _ in sent.values())), 2),
        "upload_to_done_ms": {
            "p50": _percentile_ms(latencies, 50),
            "p95": _percentile_ms(latencies, 95),
            "p99": _percentile_ms(latencies, 99),
        },
        "upload_request_ms_p95": _percentile_ms([u for _, _, u in sent.values()], 95),
        "last_result_after_last_upload_s": round(drain, 2),
        # Open loop: a client that could not keep the schedule (answers too slow for its
        # threads) offered less than `rate`, so that load was not sustained either.
        "sustained": done == count
        and drain <= drain_s
        and done / (last_done - min(s for s, _, _ in sent.values())) >= 0.95 * rate,
    }


def driver(args) -> dict:
    import django

    django.setup()
    import redis
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from diagnostics import services, storage
    from diagnostics.models import Role

    call_command("migrate", verbosity=0)
    storage.ensure_bucket()
    redis.Redis.from_url(os.environ["REDIS_URL"]).flushdb()
    token = services.demo_user_ensure(username="bench", site_name="bench")
    services.user_roles_set(
        user=get_user_model().objects.get(username="bench"), roles=[Role.UPLOADER]
    )
    port = _free_port()
    logs = Path(args.log_dir)
    web_options = [f"--workers={args.web_workers}", f"--threads={args.web_threads}"]
    nice = ["nice", "-n", str(args.web_nice)] if args.web_nice else []
    web = _start(
        [*nice, sys.executable, "-m", "gunicorn", "diagnostics.wsgi:application"]
        + [f"--bind=127.0.0.1:{port}", *web_options],
        logs / "web.log",
    )
    os.environ["CELERY_WORKER_POOL"] = args.worker_pool
    os.environ["CELERY_WORKER_CONCURRENCY"] = str(args.worker_concurrency)
    os.environ["ML_NUM_THREADS"] = str(args.ml_threads)
    os.environ["ML_INTERPRETERS"] = str(args.ml_interpreters)
    worker = _start(
        [sys.executable, "-m", "celery", "-A", "workers", "worker", "--loglevel=warning"]
        + ["--without-gossip", "--without-mingle"],
        logs / "worker.log",
    )
    url = f"http://127.0.0.1:{port}"
    report = {
        "loads": [],
        "worker": {
            "pool": args.worker_pool,
            "concurrency": args.worker_concurrency,
            "ml_num_threads": args.ml_threads,
            "ml_interpreters": args.ml_interpreters,
            "classify_batch_wait_ms": settings.CLASSIFY_BATCH_WAIT_MS,
        },
        "web": " ".join([*nice, "gunicorn", *web_options]),
    }
    seed = int(time.time()) * 1000
    try:
        import requests

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/healthz", timeout=2).ok:
                    break
            time.sleep(0.3)
        # Warm both: the first uploads and results pay for imports and connections.
        offered_load(url, token, 2, 3, args.drain_s, seed)
        best = None
        for rate in [float(r) for r in args.rates.split(",")]:
            seed += 100_000
            row = offered_load(url, token, rate, args.seconds, args.drain_s, seed)
            print(json.dumps(row), file=sys.stderr, flush=True)
            report["loads"].append(row)
            if not row["sustained"]:
                break
            best = rate
            time.sleep(2)
        report["max_sustained_per_s"] = best
        if best:
            seed += 100_000
            row = offered_load(url, token, best / 2, args.seconds, args.drain_s, seed)
            row["half_of_max"] = True
            print(json.dumps(row), file=sys.stderr, flush=True)
            report["loads"].append(row)
        report["worker_rss_mb"], report["worker_pss_mb"] = (
            round(value, 1) for value in _tree_memory_mb(worker.pid)
        )
        report["web_rss_mb"], report["web_pss_mb"] = (
            round(value, 1) for value in _tree_memory_mb(web.pid)
        )
    finally:
        _stop(worker)
        _stop(web)
    return report


def markdown(report: dict) -> str:
    worker = report.get("worker", {})
    lines = [
        f"Worker: {worker.get('pool')} pool, concurrency {worker.get('concurrency')}, "
        f"{worker.get('ml_interpreters', 1)} LiteRT interpreters of "
        f"{worker.get('ml_num_threads')} thread(s), batches waiting up to "
        f"{worker.get('classify_batch_wait_ms', 20)} ms; API: {report.get('web')}; "
        "DJANGO_DEBUG=false",
        "",
        f"Highest sustained load: {report['max_sustained_per_s']} scans/s; worker RSS "
        f"{report['worker_rss_mb']:.0f} MB (main + pool; PSS {report.get('worker_pss_mb', 0):.0f}"
        f" MB), gunicorn {report['web_rss_mb']:.0f} MB (PSS {report.get('web_pss_mb', 0):.0f} MB)",
        "",
        "| offered /s | uploads | done | completed /s | p50 ms | p95 ms | p99 ms "
        "| upload request p95 ms | last result after last upload s | sustained |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["loads"]:
        latency = row["upload_to_done_ms"]
        label = f"{row['offered_per_s']:g}" + (" (half of max)" if row.get("half_of_max") else "")
        lines.append(
            f"| {label} | {row['uploads']} | {row['done']} | {row['completed_per_s']:.1f} "
            f"| {latency['p50']:.0f} | {latency['p95']:.0f} | {latency['p99']:.0f} "
            f"| {row['upload_request_ms_p95']:.0f} | {row['last_result_after_last_upload_s']:.1f} "
            f"| {'yes' if row['sustained'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", default="8,16,24,28,32,36,40", help="offered scans/s, rising")
    parser.add_argument("--seconds", type=float, default=20.0, help="per offered load")
    parser.add_argument("--drain-s", type=float, default=3.0)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "end_to_end"))
    parser.add_argument("--worker-pool", default="prefork", choices=["prefork", "threads"])
    parser.add_argument("--worker-concurrency", type=int, default=1)
    parser.add_argument(
        "--ml-threads", type=int, default=1, help="threads per LiteRT interpreter (ML_NUM_THREADS)"
    )
    parser.add_argument(
        "--ml-interpreters", type=int, default=2, help="LiteRT interpreters (ML_INTERPRETERS)"
    )
    parser.add_argument(
        "--batch-wait-ms", type=int, help="CLASSIFY_BATCH_WAIT_MS (default: the setting's)"
    )
    parser.add_argument(
        "--web-nice",
        type=int,
        default=0,
        help="run gunicorn under `nice -n N`: the worker's share of the cores grows",
    )
    parser.add_argument("--web-workers", type=int, default=2, help="gunicorn --workers")
    parser.add_argument("--web-threads", type=int, default=4, help="gunicorn --threads")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--log-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        print(json.dumps(driver(args)))
        return
    if args.batch_wait_ms is not None:
        os.environ["CLASSIFY_BATCH_WAIT_MS"] = str(args.batch_wait_ms)  # driver and worker
    driver_args = ["--rates", args.rates, "--seconds", str(args.seconds)]
    driver_args += ["--drain-s", str(args.drain_s), "--worker-pool", args.worker_pool]
    driver_args += ["--worker-concurrency", str(args.worker_concurrency)]
    driver_args += ["--ml-threads", str(args.ml_threads)]
    driver_args += ["--ml-interpreters", str(args.ml_interpreters)]
    driver_args += ["--web-workers", str(args.web_workers), "--web-threads", str(args.web_threads)]
    driver_args += ["--web-nice", str(args.web_nice)]
    run_driver_and_report(
        __file__, driver_args, scratch_prefix="bench-e2e-", out=args.out, markdown=markdown
    )


if __name__ == "__main__":
    main()
