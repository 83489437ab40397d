"""Architecture pieces: backbones, the front/tail split for cached training, calibration."""

import keras
import numpy as np
import pytest

from ml.model import (
    block_names,
    build_model,
    fold_temperature,
    set_fine_tunable,
    split_for_caching,
)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)


@pytest.mark.parametrize("backbone", ["tiny", "efficientnet_lite0", "efficientnet_b0"])
def test_models_map_raw_rgb_to_four_probabilities(backbone, images):
    model = build_model(backbone, input_size=32, dropout=0.5)
    probabilities = np.asarray(model(images, training=False))
    assert probabilities.shape == (3, 4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert [layer.name for layer in model.layers[-3:]] == ["avg_pool", "top_dropout", "predictions"]
    assert model.get_layer("top_dropout").rate == 0.5


def test_unknown_backbone_is_rejected():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model("resnet", input_size=32)


def test_lite0_has_sixteen_blocks_like_b0():
    assert len(block_names(build_model("efficientnet_lite0", 32))) == 16
    assert len(block_names(build_model("efficientnet_b0", 32))) == 16


def test_tail_on_front_output_equals_the_full_model(images):
    model = build_model("efficientnet_lite0", input_size=32)
    front, tail = split_for_caching(model, 11, "efficientnet_lite0", dropout=0.5)
    assert front.output.shape[1:] == (4, 4, 40)  # block3b output at 32 px
    expected = np.asarray(model(images, training=False))
    np.testing.assert_allclose(np.asarray(tail(front(images))), expected, atol=1e-5)


def test_set_fine_tunable_unfreezes_top_blocks_but_not_batch_norm():
    model = build_model("efficientnet_lite0", input_size=32)
    set_fine_tunable(model, 2)
    backbone = model.get_layer("backbone")
    trainable = {layer.name for layer in backbone.layers if layer.trainable and layer.weights}
    assert "block7a_project_conv" in trainable
    assert "block6d_dwconv" in trainable
    assert "top_conv" in trainable
    assert "block6c_dwconv" not in trainable
    assert not any(
        isinstance(backbone.get_layer(n), keras.layers.BatchNormalization) for n in trainable
    )


def test_fold_temperature_equals_softmax_of_scaled_logits(images):
    model = build_model("tiny", input_size=32)
    before = np.asarray(model(images, training=False))
    fold_temperature(model, 2.0)
    after = np.asarray(model(images, training=False))
    logits = np.log(before) / 2.0
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(after, expected, atol=1e-5)
