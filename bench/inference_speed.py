"""Time the shipped artifact: cold load and images/s at batch 1 and 32, per runtime.

python bench/inference_speed.py [--model DIR] [--runtime litert keras]
"""

import argparse
import io
import time

import numpy as np
from PIL import Image

from ml.inference import load_classifier


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (512, 512), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, "JPEG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--runtime", nargs="+", default=["litert", "keras"])
    args = parser.parse_args()
    images = [jpeg(seed) for seed in range(32)]
    for runtime in args.runtime:
        started = time.perf_counter()
        classifier = load_classifier(args.model, runtime=runtime)
        load_seconds = time.perf_counter() - started
        classifier.predict(images[:1])  # warm-up
        started = time.perf_counter()
        for image in images[:16]:
            classifier.predict([image])
        single = 16 / (time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(2):
            classifier.predict(images)
        batched = 64 / (time.perf_counter() - started)
        print(
            f"{runtime}: load {load_seconds:.2f} s, batch 1 {single:.1f} img/s, "
            f"batch 32 {batched:.1f} img/s (decode + resize included)",
            flush=True,
        )


if __name__ == "__main__":
    main()
