"""Upload N scans concurrently to a running stack, then check that every accepted upload
reached a final state with exactly one prediction per image.

    ./stack up                      # in another terminal; note the token it prints
    python bench/load.py --url http://127.0.0.1:8000 --token TOKEN -n 2000 \
        --database-url postgres://postgres@127.0.0.1:PORT/diagnostics

Each scan is a distinct synthetic 128x128 JPEG (distinct bytes, so none is deduplicated).
Prints progress, then a JSON summary: accepted / refused / done / failed / lost, the time it
took, and (with --database-url) predictions per image counted in PostgreSQL.
"""

import argparse
import io
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests
from PIL import Image

FINAL = {"done", "failed"}


def synthetic_scan(index: int, size: int = 128) -> bytes:
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class Progress:
    def __init__(self, label: str, total: int):
        self.label, self.total, self.count = label, total, 0
        self.lock = threading.Lock()
        self.started = self.last = time.monotonic()

    def step(self):
        with self.lock:
            self.count += 1
            now = time.monotonic()
            if now - self.last > 2 or self.count == self.total:
                self.last = now
                rate = self.count / max(now - self.started, 1e-9)
                print(f"{self.label}: {self.count}/{self.total} ({rate:.1f}/s)", file=sys.stderr)


def upload_all(args, token_header) -> tuple[list[str], dict[int, int], list[float]]:
    local = threading.local()
    progress = Progress("uploads", args.n)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    poll_urls: list[str] = []
    lock = threading.Lock()

    def upload(index: int):
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        started = time.monotonic()
        try:
            response = session.post(
                f"{args.url}/api/v1/cases/",
                files=[("images", (f"load-{index}.jpg", synthetic_scan(index), "image/jpeg"))],
                data={"reference": f"load-{index}"},
                headers=token_header,
                timeout=60,
            )
            status = response.status_code
        except requests.RequestException:
            status = 0  # no answer at all
        elapsed = time.monotonic() - started
        with lock:
            statuses[status] = statuses.get(status, 0) + 1
            latencies.append(elapsed)
            if status == 202:
                poll_urls.append(response.headers["Location"])
        progress.step()

    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(upload, range(args.n)))
    return poll_urls, statuses, latencies


def wait_until_final(args, token_header, poll_urls) -> dict[str, dict]:
    """Poll every accepted case until it is final or the deadline passes."""
    results: dict[str, dict] = {}
    pending = list(poll_urls)
    deadline = time.monotonic() + args.timeout
    session = requests.Session()
    while pending and time.monotonic() < deadline:
        still_pending = []
        for url in pending:
            try:
                case = session.get(url, headers=token_header, timeout=30).json()
            except (requests.RequestException, ValueError):
                still_pending.append(url)
                continue
            results[url] = case
            if case.get("status") not in FINAL:
                still_pending.append(url)
        done = len(poll_urls) - len(still_pending)
        print(f"final: {done}/{len(poll_urls)}", file=sys.stderr)
        pending = still_pending
        if pending:
            time.sleep(2)
    return results


def predictions_per_image(database_url: str, case_ids: list[str]) -> dict[int, int]:
    """{number of predictions: images with that many} for the given cases, from PostgreSQL."""
    import psycopg2

    with psycopg2.connect(database_url) as connection, connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT n, count(*) FROM (
                SELECT image.id, count(prediction.id) AS n
                FROM diagnostics_image image
                LEFT JOIN diagnostics_prediction prediction ON prediction.image_id = image.id
                WHERE image.case_id = ANY(%s::uuid[])
                GROUP BY image.id
            ) per_image GROUP BY n
            """,
            (case_ids,),
        )
        return {n: images for n, images in cursor.fetchall()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="API base URL")
    parser.add_argument("--token", required=True, help="API token (./stack up prints one)")
    parser.add_argument("-n", type=int, default=2000, help="scans to upload")
    parser.add_argument("--concurrency", type=int, default=16, help="uploads in flight")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for results")
    parser.add_argument("--database-url", help="also count predictions per image in PostgreSQL")
    parser.add_argument("--json", help="write the summary here too")
    args = parser.parse_args()
    token_header = {"Authorization": f"Token {args.token}"}

    started = time.monotonic()
    poll_urls, statuses, latencies = upload_all(args, token_header)
    uploaded = time.monotonic()
    results = wait_until_final(args, token_header, poll_urls)
    finished = time.monotonic()

    final_status = [results.get(url, {}).get("status") for url in poll_urls]
    summary = {
        "uploads": args.n,
        "concurrency": args.concurrency,
        "accepted": statuses.get(202, 0),
        "refused_by_status": {str(code): n for code, n in statuses.items() if code != 202},
        "done": final_status.count("done"),
        "failed": final_status.count("failed"),
        "lost": sum(status not in FINAL for status in final_status),
        "upload_seconds": round(uploaded - started, 1),
        "upload_rate_per_s": round(args.n / (uploaded - started), 1),
        "upload_latency_p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 1),
        "upload_latency_p95_ms": round(float(np.percentile(latencies, 95)) * 1000, 1),
        "total_seconds": round(finished - started, 1),
        "completion_rate_per_s": round(len(poll_urls) / (finished - started), 1),
    }
    if args.database_url:
        case_ids = [url.rstrip("/").rsplit("/", 1)[1] for url in poll_urls]
        counts = predictions_per_image(args.database_url, case_ids)
        summary["images_by_prediction_count"] = {str(n): images for n, images in counts.items()}
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(summary, out, indent=2)
    ok = summary["lost"] == 0 and summary["failed"] == 0
    if args.database_url:
        ok = ok and set(summary["images_by_prediction_count"]) == {"1"}
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
