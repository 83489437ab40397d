"""The Lite0 converter: PyTorch checkpoint -> Keras, checked on the same inputs."""

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch (requirements-dev.txt) is needed for the converter")

from ml.convert_lite0 import (  # noqa: E402
    build_keras_imagenet_lite0,
    convert,
    keras_weights_from_state_dict,
    load_state_dict,
    parity,
)
from ml.model import build_model  # noqa: E402


@pytest.fixture(scope="module")
def state():
    return load_state_dict()


def test_every_tensor_is_mapped(state):
    mapped = keras_weights_from_state_dict(state)
    used = sum(w.size for weights in mapped.values() for w in weights)
    expected = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert used == expected
    # Lite0's published size counts learnable tensors only, not BN running statistics.
    learnable = sum(v.size for k, v in state.items() if k.rsplit(".", 1)[-1] in ("weight", "bias"))
    assert learnable == 4_652_008
    assert len(mapped) == 49 + 49 + 1  # convs, batch norms, fc


@pytest.mark.parametrize("size", [64, 97])  # even and odd: TF-'SAME' padding differs
def test_keras_matches_pytorch_logits(state, size):
    assert parity(size, state) < 1e-4


def test_converted_weights_load_into_build_model(state, tmp_path):
    path = convert(tmp_path / "lite0.weights.h5")
    model = build_model("efficientnet_lite0", input_size=64, weights=path)
    reference = build_keras_imagenet_lite0(64, state)
    images = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    ours = np.asarray(model.get_layer("backbone")(images, training=False))
    theirs = np.asarray(reference.get_layer("backbone")(images, training=False))
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
