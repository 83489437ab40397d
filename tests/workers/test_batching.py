"""The GPU path's batching and the runtime choice, tested on CPU with fake runners and
fake device lists (no GPU needed)."""

import threading

import numpy as np
import pytest

from ml import inference
from ml.inference import MicroBatcher, choose_runtime, gpu_devices


class RecordingRunner:
    """Doubles its input rows and remembers every batch size it was called with."""

    def __init__(self, delay_s: float = 0.0):
        self.calls: list[int] = []
        self.delay_s = delay_s

    def __call__(self, batch):
        self.calls.append(len(batch))
        threading.Event().wait(self.delay_s)
        return batch * 2


def _call_from_threads(batcher, count: int) -> dict[int, np.ndarray]:
    results, start = {}, threading.Barrier(count)

    def one(index):
        start.wait()
        results[index] = batcher(np.full((1, 3), index, dtype=np.float32))

    threads = [threading.Thread(target=one, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    return results


def test_concurrent_single_image_calls_share_batches_and_get_their_own_rows():
    runner = RecordingRunner(delay_s=0.02)
    batcher = MicroBatcher(runner, max_batch=8, max_wait_s=0.05)

    results = _call_from_threads(batcher, 20)

    assert sorted(results) == list(range(20))
    for index, output in results.items():
        np.testing.assert_array_equal(output, np.full((1, 3), index * 2))
    assert sum(runner.calls) == 20
    assert max(runner.calls) <= 8
    assert len(runner.calls) < 20, runner.calls  # some calls were shared
    assert batcher.batch_sizes == runner.calls


def test_a_lone_call_waits_at_most_max_wait_then_runs_alone():
    runner = RecordingRunner()
    batcher = MicroBatcher(runner, max_batch=32, max_wait_s=0.01)

    output = batcher(np.ones((1, 3), dtype=np.float32))

    np.testing.assert_array_equal(output, np.full((1, 3), 2))
    assert runner.calls == [1]


def test_max_batch_1_calls_the_runner_directly_as_cpu_workers_do():
    runner = RecordingRunner()
    batcher = MicroBatcher(runner, max_batch=1, max_wait_s=1.0)

    results = _call_from_threads(batcher, 4)

    assert len(results) == 4
    assert runner.calls == [1, 1, 1, 1]
    assert batcher.batch_sizes == []  # no gathering happened


def test_a_model_error_reaches_every_caller_of_the_batch():
    def failing(batch):
        raise RuntimeError("out of GPU memory")

    batcher = MicroBatcher(failing, max_batch=4, max_wait_s=0.05)
    errors = []

    def one():
        try:
            batcher(np.zeros((1, 3), dtype=np.float32))
        except RuntimeError as error:
            errors.append(str(error))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert errors == ["out of GPU memory"] * 4


@pytest.mark.parametrize(
    ("has_tflite", "litert", "devices", "expected"),
    [
        (True, True, [], "litert"),
        (True, True, ["/dev/nvidia0"], "tf_gpu"),
        (False, True, ["/dev/nvidia0"], "tf_gpu"),
        (False, True, [], "keras"),
        (True, False, [], "keras"),
    ],
)
def test_auto_picks_tensorflow_batched_on_gpu_nodes_and_litert_on_cpu(
    has_tflite, litert, devices, expected
):
    assert choose_runtime(has_tflite, litert, devices) == expected


def test_gpu_devices_honours_cuda_visible_devices(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert gpu_devices() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_devices() == []


def test_auto_on_a_gpu_node_loads_the_batched_tensorflow_runner(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(inference, "gpu_devices", lambda: ["/dev/nvidia0"])

    classifier = inference.load_classifier(tiny_model_dir, runtime="auto")

    assert classifier.runtime == "tf_gpu"
    assert isinstance(classifier._run, MicroBatcher)
    classifier.warm_up()
    keras = inference.load_classifier(tiny_model_dir, runtime="keras")
    batch = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(
        classifier.predict_batch(batch), keras.predict_batch(batch), atol=1e-5
    )


def test_auto_on_a_cpu_node_uses_litert_without_tensorflow(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(inference, "gpu_devices", lambda: [])

    classifier = inference.load_classifier(tiny_model_dir, runtime="auto")

    assert classifier.runtime == "litert"
    classifier.warm_up()


def test_threads_of_a_worker_load_and_warm_up_one_model(monkeypatch):
    from workers import tasks

    loads, warm_ups = [], []

    class FakeModel:
        name, version, runtime = "fake", "0", "litert"

        def warm_up(self):
            warm_ups.append(1)

    def slow_load(*args, **kwargs):
        loads.append(1)
        threading.Event().wait(0.1)  # two first jobs overlap while the model loads
        return FakeModel()

    monkeypatch.setattr(inference, "load_classifier", slow_load)
    tasks._loaded_classifier.cache_clear()
    try:
        models = []
        threads = [
            threading.Thread(target=lambda: models.append(tasks.classifier())) for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
    finally:
        tasks._loaded_classifier.cache_clear()
    assert (len(loads), len(warm_ups)) == (1, 1)
    assert len(models) == 4 and all(model is models[0] for model in models)
