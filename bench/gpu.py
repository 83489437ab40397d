"""GPU benchmark: the shipped model on a GPU node, batched, side by side in one run.

    python bench/gpu.py --backend jax --out bench/results/gpu     # on a machine with a GPU

Measured, each in the same process and run:
1. model only: images/s of one batched call at batch 1/8/32/64/128/256 (host float32
   arrays in, probabilities back on the host: the transfers count);
2. from JPEG, batched: a thread pool decodes (ml.data.decode_image, the training
   preprocessing) the next batch while the GPU runs the current one;
3. the worker's way: client threads each decode one scan and call the model through
   ml.inference.MicroBatcher, which groups waiting calls into one GPU call (what a GPU
   worker does with the jobs it holds), at several client counts, with the batch sizes
   it formed.

Keras 3 runs the model on the backend named by --backend (TensorFlow where it is
installed; JAX or PyTorch elsewhere: the device machines lent to this project have no
TensorFlow, and the same model.keras loads on every Keras backend).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _gpu_name() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _rate(call, items_per_call: int, seconds: float, minimum_calls: int = 5) -> float:
    call()  # compile / warm up for this shape
    calls, started = 0, time.perf_counter()
    while calls < minimum_calls or time.perf_counter() - started < seconds:
        call()
        calls += 1
    return calls * items_per_call / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "jax"))
    parser.add_argument("--model-dir", default=None, help="default: the shipped artifact")
    parser.add_argument("--batches", default="1,8,32,64,128,256")
    parser.add_argument("--clients", default="1,8,32,64")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--scans", type=int, default=512, help="distinct JPEGs to decode")
    parser.add_argument("--decode-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu"))
    args = parser.parse_args()
    os.environ["KERAS_BACKEND"] = args.backend

    import keras
    import numpy as np

    from bench.scans import mri_like_jpeg
    from ml.data import decode_image
    from ml.inference import MicroBatcher, default_model_dir

    model_dir = Path(args.model_dir) if args.model_dir else default_model_dir()
    metadata = json.loads((model_dir / "model.json").read_text())
    size = int(metadata["input_size"])
    started = time.perf_counter()
    model = keras.saving.load_model(model_dir / "model.keras", compile=False)

    buckets = [2**power for power in range(9)]  # 1 .. 256

    def run(batch: np.ndarray) -> np.ndarray:
        # XLA (JAX, TensorFlow with jit) compiles once per input shape: pad a batch to the
        # next power of two, so the micro-batcher's every batch size reuses a few programs.
        count = len(batch)
        bucket = next(b for b in buckets if b >= count)
        if bucket != count:
            batch = np.concatenate(
                [batch, np.zeros((bucket - count, *batch.shape[1:]), batch.dtype)]
            )
        outputs = model.predict_on_batch(batch)
        # 1.1.0 and later give {"probabilities", "cam", "features"}; 1.0.0 an array.
        if isinstance(outputs, dict):
            outputs = outputs["probabilities"]
        return np.asarray(outputs)[:count]

    run(np.zeros((1, size, size, 3), np.float32))
    cold_start_s = time.perf_counter() - started
    for bucket in buckets:
        run(np.zeros((bucket, size, size, 3), np.float32))
    report_compile_s = time.perf_counter() - started - cold_start_s
    print(f"compiled every batch bucket in {report_compile_s:.1f} s", flush=True)
    print(f"loaded {model_dir.name} on {args.backend} in {cold_start_s:.1f} s", flush=True)

    report = {
        "model": metadata["name"] + " " + str(metadata["version"]),
        "backend": args.backend,
        "keras": keras.__version__,
        "gpu": _gpu_name(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "cold_start_to_first_result_s": round(cold_start_s, 2),
        "compile_all_batch_buckets_s": round(report_compile_s, 2),
        "model_only": [],
        "from_jpeg_batched": [],
        "micro_batcher": [],
    }
    rng = np.random.default_rng(0)
    for batch_size in [int(b) for b in args.batches.split(",")]:
        batch = rng.uniform(0, 255, (batch_size, size, size, 3)).astype(np.float32)
        rate = _rate(lambda batch=batch: run(batch), batch_size, args.seconds)
        report["model_only"].append({"batch": batch_size, "images_per_s": round(rate, 1)})
        print(f"model only, batch {batch_size}: {rate:.0f} images/s", flush=True)

    jpegs = [mri_like_jpeg(index) for index in range(args.scans)]
    decoder = ThreadPoolExecutor(args.decode_threads)
    decode_rate = _rate(
        lambda: list(decoder.map(lambda data: decode_image(data, size), jpegs)),
        len(jpegs), args.seconds, minimum_calls=2,
    )  # fmt: skip
    report["decode_only_images_per_s"] = round(decode_rate, 1)
    print(f"decode only, {args.decode_threads} threads: {decode_rate:.0f} images/s", flush=True)

    def decoded(start: int, batch_size: int):
        chunk = [jpegs[(start + i) % len(jpegs)] for i in range(batch_size)]
        return np.stack(list(decoder.map(lambda data: decode_image(data, size), chunk)))

    for batch_size in (8, 32, 64, 128):
        # Pipelined: the next batch decodes on the pool while this one runs on the GPU.
        done, started = 0, time.perf_counter()
        pending = decoder.submit(decoded, 0, batch_size)
        while done < 4 * batch_size or time.perf_counter() - started < args.seconds:
            batch = pending.result().astype(np.float32)
            pending = decoder.submit(decoded, done + batch_size, batch_size)
            run(batch)
            done += batch_size
        rate = done / (time.perf_counter() - started)
        report["from_jpeg_batched"].append({"batch": batch_size, "images_per_s": round(rate, 1)})
        print(f"from JPEG, batch {batch_size}, pipelined: {rate:.0f} images/s", flush=True)

    batcher = MicroBatcher(run, max_batch=64, max_wait_s=0.005)
    for clients in [int(c) for c in args.clients.split(",")]:
        batcher.batch_sizes.clear()
        stop = time.perf_counter() + args.seconds
        counts = [0] * clients

        def client(index: int, clients: int, stop: float, counts: list[int]) -> None:
            position = index
            while time.perf_counter() < stop:
                image = decode_image(jpegs[position % len(jpegs)], size).astype(np.float32)
                batcher(image[np.newaxis])
                counts[index] += 1
                position += clients

        threads = [
            threading.Thread(target=client, args=(i, clients, stop, counts)) for i in range(clients)
        ]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        rate = sum(counts) / (time.perf_counter() - started)
        sizes = batcher.batch_sizes or [0]
        report["micro_batcher"].append(
            {
                "clients": clients,
                "images_per_s": round(rate, 1),
                "mean_batch": round(statistics.mean(sizes), 1),
                "max_batch": max(sizes),
            }
        )
        print(f"MicroBatcher, {clients} clients: {rate:.0f} images/s", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [
        f"{report['model']} on {report['gpu']} ({report['cpu_cores']} CPU cores), "
        f"Keras {report['keras']} on {report['backend']}; cold start to first result "
        f"{report['cold_start_to_first_result_s']} s (then "
        f"{report['compile_all_batch_buckets_s']} s to compile batch sizes 1-256); JPEG decode "
        f"alone "
        f"{report['decode_only_images_per_s']:.0f} images/s on the CPU cores",
        "",
        "| path | batch / clients | images/s | mean batch formed |",
        "|---|---|---|---|",
    ]
    for row in report["model_only"]:
        lines.append(f"| model only | batch {row['batch']} | {row['images_per_s']:.0f} | |")
    for row in report["from_jpeg_batched"]:
        lines.append(
            f"| from JPEG, pipelined decode | batch {row['batch']} | {row['images_per_s']:.0f} | |"
        )
    for row in report["micro_batcher"]:
        lines.append(
            f"| MicroBatcher (worker threads) | {row['clients']} clients "
            f"| {row['images_per_s']:.0f} | {row['mean_batch']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
