"""Runtime benchmark: the shipped model in every runtime, side by side in one run.

    .venv/bin/python bench/runtime.py                      # writes bench/results/runtime.json + .md
    PYTHONPATH=/tmp/onnx-site .venv/bin/python bench/runtime.py   # with ONNX Runtime (see below)

Each runtime runs in its own subprocess, so its imports, load time and peak RSS are its
own: Keras model.predict, a Keras direct call, a tf.function (input signature with a free
batch dimension: the GPU path), LiteRT and ONNX Runtime at 1 and 2 threads, and
"classifier" - the worker's whole call on LiteRT: ml.inference's Classifier.analyse_batch
(model outputs, heatmap, OOD score and input checks; predict_batch on a Classifier from
before the trust signals), which is what a worker pays per image. Per runtime:
cold start (process start -> first output, imports included), images/s at batch 1/8/32
on decoded inputs (model only), images/s at batch 1 from JPEG bytes (decode + resize +
model: what a worker does), and peak RSS.

ONNX Runtime is optional: the ONNX file is converted from model.tflite with tf2onnx into
cache/bench/ on first use. Neither package is in requirements (TensorFlow 2.21's protobuf
pins clash with tf2onnx's); install them beside the venv:
    .venv/bin/pip install --no-deps --target /tmp/onnx-site onnxruntime tf2onnx onnx
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

PROCESS_STARTED = time.perf_counter()
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RUNTIMES = [
    "keras_predict",
    "keras_call",
    "tf_function",
    "litert:1",
    "litert:2",
    "litert:1x2",
    "onnxruntime:1",
    "onnxruntime:2",
    "litert:1@150",
    "classifier:1",
    "classifier:2",
    "classifier:1x2",
]
ONNX_PATH = REPO / "cache" / "bench" / "model.onnx"


def _model_dir() -> Path:
    from ml.inference import default_model_dir

    return default_model_dir()


def onnx_model(tflite: Path) -> Path:
    if not ONNX_PATH.is_file():
        ONNX_PATH.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "tf2onnx.convert", "--tflite", str(tflite)]
            + ["--output", str(ONNX_PATH), "--opset", "17"],
            check=True,
            capture_output=True,
        )
    return ONNX_PATH


def make_runner(spec: str, model_dir: Path):
    """-> callable float32 NHWC batch -> probabilities; imports only what it needs.
    "litert:1x2": two interpreters ("lanes") of 1 thread each, called from two threads."""
    name, _, threads = spec.partition(":")
    threads, _, lanes = threads.partition("x")
    lanes = lanes or "1"
    if name in ("keras_predict", "keras_call", "tf_function"):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras

        model = keras.saving.load_model(model_dir / "model.keras", compile=False)
        if name == "keras_predict":
            return lambda batch: model.predict(batch, verbose=0, batch_size=len(batch))

        def numpy(output):  # the serving model returns a dict of outputs
            if isinstance(output, dict):
                return {key: value.numpy() for key, value in output.items()}
            return output.numpy()

        if name == "keras_call":
            return lambda batch: numpy(model(batch, training=False))
        import tensorflow as tf

        size = model.input_shape[1]
        signature = [tf.TensorSpec([None, size, size, 3], tf.float32)]
        compiled = tf.function(
            lambda batch: model(batch, training=False), input_signature=signature
        )
        return lambda batch: numpy(compiled(batch))
    if name == "classifier":
        os.environ["ML_NUM_THREADS"] = threads
        os.environ["ML_INTERPRETERS"] = lanes
        from ml.inference import load_classifier

        classifier = load_classifier(model_dir, runtime="litert")
        return getattr(classifier, "analyse_batch", None) or classifier.predict_batch
    if name == "litert":
        from ml.inference import _LiteRTRunner

        return _LiteRTRunner(model_dir / "model.tflite", int(threads), lanes=int(lanes))
    if name == "onnxruntime":
        path = onnx_model(model_dir / "model.tflite")
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        input_name = session.get_inputs()[0].name
        return lambda batch: session.run(None, {input_name: batch})[0]
    raise ValueError(spec)


def _shape(output):
    """Output shape(s) for the report: an array, a dict of arrays or a list of results."""
    import numpy as np

    if isinstance(output, dict):
        return {name: list(np.asarray(value).shape) for name, value in output.items()}
    if isinstance(output, list):
        return f"{len(output)} {type(output[0]).__name__}"
    return list(np.asarray(output).shape)


def throughput(call, make_input, images_per_call: int, seconds: float, streams: int = 1) -> float:
    """Images/s of `call`, from `streams` threads calling it side by side."""
    import threading

    for _ in range(streams):
        call(make_input())  # a warm-up call per shape (allocation, tracing)
    calls = [0] * streams
    started = time.perf_counter()

    def stream(index: int) -> None:
        while calls[index] < 2 or time.perf_counter() - started < seconds:
            call(make_input())
            calls[index] += 1

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(calls) * images_per_call / (time.perf_counter() - started)


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def child(spec: str, batches: list[int], seconds: float, baseline: str | None = None) -> dict:

    from bench.scans import mri_like_jpeg
    from ml.data import decode_batch

    model_dir = _model_dir()
    size = json.loads((model_dir / "model.json").read_text())["input_size"]
    # "litert:1@150": the same graph with its input resized (LiteRT and ONNX Runtime take
    # any spatial size; the network is convolutional up to a global pooling), to time the
    # input-size trade-off. Accuracy at another size needs a model trained at that size.
    spec, _, other_size = spec.partition("@")
    size = int(other_size) if other_size else size
    # "litert:1x2": one calling thread per interpreter.
    streams = int(spec.partition(":")[2].partition("x")[2] or 1)
    jpegs = [mri_like_jpeg(index) for index in range(max(batches))]
    run = make_runner(spec, model_dir)
    loaded_s = time.perf_counter() - PROCESS_STARTED
    first = run(decode_batch(jpegs[:1], size))
    first_result_s = time.perf_counter() - PROCESS_STARTED
    decoded = decode_batch(jpegs, size)
    result = {
        "runtime": spec,
        "input_size": size,
        "load_s": round(loaded_s, 3),
        "cold_start_to_first_result_s": round(first_result_s, 3),
        "model": json.loads((model_dir / "model.json").read_text())["version"],
        "output_shape": _shape(first),
        "images_per_s": {},
    }
    counter = iter(range(10**9))
    # Batch 1 from JPEG first, so the peak RSS so far is that of a batch-1 worker.
    result["images_per_s_from_jpeg_batch_1"] = round(
        throughput(
            run,
            lambda: decode_batch([jpegs[next(counter) % len(jpegs)]], size),
            1,
            seconds,
            streams,
        ),
        2,
    )
    for batch in batches:
        result["images_per_s"][str(batch)] = round(
            throughput(run, lambda b=batch: decoded[:b], batch, seconds, streams), 2
        )
        if batch == 1:
            result["peak_rss_mb_batch_1"] = _peak_rss_mb()
    result["peak_rss_mb"] = _peak_rss_mb()
    result["tensorflow_imported"] = "tensorflow" in sys.modules
    if spec.startswith("classifier"):
        result["trust_overhead_ms_per_image"] = trust_overhead(model_dir, decoded, batches)
    if baseline and spec.startswith("litert") and not other_size and streams == 1:
        result["vs_baseline_ms_per_image"] = versus_baseline(
            Path(baseline), model_dir, int(spec.partition(":")[2]), decoded, batches
        )
    return result


def _alternate(calls: dict, decoded, batches: list[int], rounds: int = 15) -> dict:
    """Median ms per image of each call, in alternating short runs."""
    import statistics

    out = {}
    for batch in batches:
        images = decoded[:batch]
        times = {name: [] for name in calls}
        repeats = max(1, 16 // batch)
        for _ in range(rounds):
            for name, call in calls.items():
                call(images)
                started = time.perf_counter()
                for _ in range(repeats):
                    call(images)
                times[name].append((time.perf_counter() - started) * 1000 / (repeats * batch))
        out[str(batch)] = {name: round(statistics.median(t), 3) for name, t in times.items()}
    return out


def versus_baseline(baseline: Path, model_dir: Path, threads: int, decoded, batches) -> dict:
    """The baseline artifact's model.tflite against this one's, model call only."""
    from ml.inference import _LiteRTRunner

    calls = {
        f"baseline {baseline.name}": _LiteRTRunner(baseline / "model.tflite", threads),
        f"current {model_dir.name}": _LiteRTRunner(model_dir / "model.tflite", threads),
    }
    return _alternate(calls, decoded, batches)


def trust_overhead(model_dir: Path, decoded, batches: list[int]) -> dict:
    """What the trust signals add per image on top of the model call: run_batch (model
    outputs only) against analyse_batch (plus heatmap, OOD score and input checks),
    alternating in one process so that load from other processes hits both alike.
    Empty for a Classifier without analyse_batch."""
    from ml.inference import load_classifier

    classifier = load_classifier(model_dir, runtime="litert")
    if not hasattr(classifier, "analyse_batch"):
        return {}
    calls = {"model_outputs": classifier.run_batch, "with_trust_signals": classifier.analyse_batch}
    out = _alternate(calls, decoded, batches)
    for row in out.values():
        row["extra"] = round(row["with_trust_signals"] - row["model_outputs"], 3)
    return out


def markdown(report: dict) -> str:
    batches = report["batches"]
    head = ["runtime", "model", "cold start s"] + [f"img/s b{b}" for b in batches]
    head += ["img/s from JPEG b1", "peak RSS MB b1", "peak RSS MB all", "imports TF"]
    machine = report.get("machine", {})
    lines = [
        f"{machine.get('cores', '?')} cores ({machine.get('cpu', '?')}), load average "
        f"{machine.get('load_average_at_start', ['?'])[0]} at start, "
        f"{machine.get('load_average_at_end', ['?'])[0]} at end (other processes share the "
        f"cores: compare rows of one run, and the alternating tables below)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in report["results"]:
        if "skipped" in row:
            lines.append(f"| {row['runtime']} | skipped: {row['skipped']} |")
            continue
        name = f"{row['runtime'].split('@')[0]} @{row.get('input_size', '')}"
        cells = [name, str(row.get("model", "")), f"{row['cold_start_to_first_result_s']:.2f}"]
        cells += [f"{row['images_per_s'][str(b)]:.1f}" for b in batches]
        cells += [
            f"{row['images_per_s_from_jpeg_batch_1']:.1f}",
            f"{row.get('peak_rss_mb_batch_1', 0):.0f}",
            f"{row['peak_rss_mb']:.0f}",
            "yes" if row["tensorflow_imported"] else "no",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    extra = []
    for row in report["results"]:
        for key, title in (
            ("vs_baseline_ms_per_image", "model call, ms per image, alternating in one process"),
            ("trust_overhead_ms_per_image", "ms per image: model outputs vs + trust signals"),
        ):
            if not row.get(key):
                continue
            names = list(next(iter(row[key].values())))
            extra += ["", f"{row['runtime']}: {title}", ""]
            extra += ["| batch | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            for batch, values in row[key].items():
                extra.append(f"| {batch} | " + " | ".join(f"{values[n]:.2f}" for n in names) + " |")
    return "\n".join(lines + extra) + "\n"


def machine() -> dict:
    load = os.getloadavg()
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_at_start": [round(value, 2) for value in load],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "runtime"))
    parser.add_argument(
        "--baseline",
        help="another artifact folder: the LiteRT rows also time its model.tflite, alternating "
        "with the current one in the same process (robust to load from other processes)",
    )
    parser.add_argument("--markdown-only", action="store_true", help="rewrite OUT.md from OUT.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        print(json.dumps(child(args.child, batches, args.seconds, args.baseline)))
        return
    if args.markdown_only:
        out = Path(args.out)
        out.with_suffix(".md").write_text(
            markdown(json.loads(out.with_suffix(".json").read_text()))
        )
        return
    report = {"machine": machine(), "batches": batches, "seconds_per_point": args.seconds}
    report["results"] = []
    for spec in args.runtimes.split(","):
        print(f"runtime {spec} ...", file=sys.stderr, flush=True)
        command = [sys.executable, __file__, "--child", spec]
        command += ["--batches", args.batches, "--seconds", str(args.seconds)]
        if args.baseline:
            command += ["--baseline", args.baseline]
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["failed"])[-1][:160]
            row = {"runtime": spec, "skipped": reason}
        else:
            row = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(row), file=sys.stderr, flush=True)
        report["results"].append(row)
    report["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
