"""Model: the origin notebook's architecture on a choice of backbones.

    image (RGB 0-255) -> backbone without top -> GlobalAveragePooling -> Dropout -> Dense softmax

Backbones:
- "efficientnet_b0": keras.applications.EfficientNetB0 (weights None, "imagenet" - needs
  a network - or a local weights file). Its input normalisation is built in.
- "efficientnet_lite0": EfficientNet-Lite0 (same block table as B0, no squeeze-excite,
  ReLU6), built here with Keras layer names so ImageNet weights converted from the
  PyTorch checkpoint (ml.convert_lite0) load by name. Scales (x - 127) / 128 inside.
- "tiny": the same block builder with two small blocks, for tests at 32 px.

The scaling is inside every model, so all runtimes take raw 0-255 RGB floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import keras
from keras import layers

from ml.config import CLASS_NAMES, default_cache_dir

BACKBONES = ("efficientnet_b0", "efficientnet_lite0", "tiny")
LITE0_IMAGENET_WEIGHTS_FILE = "efficientnet_lite0_imagenet_notop.weights.h5"

# Keras's EfficientNet conv initialiser, so random-init runs are comparable. Its dense
# initialiser (fan_out-scaled, made for 1000 classes) gives logits with a std of ~20 over
# 1280 pooled ReLU6 features and 4 classes; Glorot keeps the head's start sane.
_CONV_INIT = keras.initializers.VarianceScaling(2.0, "fan_out", "truncated_normal")
_DENSE_INIT = "glorot_uniform"


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block of an EfficientNet block table, after expanding repeats."""

    name: str  # Keras naming: block{stage}{letter}_
    kernel_size: int
    strides: int
    expand_ratio: int
    filters_in: int
    filters_out: int


def _expand_block_table(table: list[tuple[int, int, int, int, int, int]]) -> list[BlockSpec]:
    """(kernel, repeats, filters_in, filters_out, expand, stride) per stage -> blocks."""
    blocks = []
    for stage, (kernel, repeats, filters_in, filters_out, expand, stride) in enumerate(table, 1):
        for repeat in range(repeats):
            blocks.append(
                BlockSpec(
                    name=f"block{stage}{chr(ord('a') + repeat)}_",
                    kernel_size=kernel,
                    strides=stride if repeat == 0 else 1,
                    expand_ratio=expand,
                    filters_in=filters_in if repeat == 0 else filters_out,
                    filters_out=filters_out,
                )
            )
    return blocks


@dataclass(frozen=True)
class LiteArchitecture:
    stem_filters: int
    top_filters: int
    blocks: tuple[BlockSpec, ...]
    drop_connect_rate: float = 0.2


# EfficientNet-B0's table (Tan & Le 2019), which Lite0 shares.
LITE0 = LiteArchitecture(
    stem_filters=32,
    top_filters=1280,
    blocks=tuple(
        _expand_block_table(
            [
                (3, 1, 32, 16, 1, 1),
                (3, 2, 16, 24, 6, 2),
                (5, 2, 24, 40, 6, 2),
                (3, 3, 40, 80, 6, 2),
                (5, 3, 80, 112, 6, 1),
                (5, 4, 112, 192, 6, 2),
                (3, 1, 192, 320, 6, 1),
            ]
        )
    ),
)
TINY = LiteArchitecture(
    stem_filters=8,
    top_filters=32,
    blocks=tuple(_expand_block_table([(3, 1, 8, 8, 1, 1), (3, 1, 8, 16, 2, 2)])),
    drop_connect_rate=0.0,
)
_LITE_ARCHITECTURES = {"efficientnet_lite0": LITE0, "tiny": TINY}


def _same_padding(size: int, kernel_size: int) -> tuple[int, int]:
    """TF 'SAME' padding for a stride-2 conv: asymmetric (extra on the end) for even sizes."""
    half = kernel_size // 2
    adjust = 1 - size % 2
    return (half - adjust, half)


def _relu6(name: str) -> layers.Layer:
    return layers.ReLU(max_value=6.0, name=name)


def _mbconv(x, spec: BlockSpec, drop_rate: float):
    inputs = x
    name = spec.name
    filters = spec.filters_in * spec.expand_ratio
    if spec.expand_ratio != 1:
        x = layers.Conv2D(
            filters, 1, padding="same", use_bias=False, kernel_initializer=_CONV_INIT,
            name=f"{name}expand_conv",
        )(x)  # fmt: skip
        x = layers.BatchNormalization(epsilon=1e-3, name=f"{name}expand_bn")(x)
        x = _relu6(f"{name}expand_activation")(x)
    if spec.strides == 2:
        height, width = x.shape[1], x.shape[2]
        pad = (
            _same_padding(height, spec.kernel_size),
            _same_padding(width, spec.kernel_size),
        )
        x = layers.ZeroPadding2D(pad, name=f"{name}dwconv_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    x = layers.DepthwiseConv2D(
        spec.kernel_size, strides=spec.strides, padding=padding, use_bias=False,
        depthwise_initializer=_CONV_INIT, name=f"{name}dwconv",
    )(x)  # fmt: skip
    x = layers.BatchNormalization(epsilon=1e-3, name=f"{name}bn")(x)
    x = _relu6(f"{name}activation")(x)
    x = layers.Conv2D(
        spec.filters_out, 1, padding="same", use_bias=False, kernel_initializer=_CONV_INIT,
        name=f"{name}project_conv",
    )(x)  # fmt: skip
    x = layers.BatchNormalization(epsilon=1e-3, name=f"{name}project_bn")(x)
    if spec.strides == 1 and spec.filters_in == spec.filters_out:
        if drop_rate > 0:
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}drop")(x)
        x = layers.add([x, inputs], name=f"{name}add")
    return x


def lite_layers(x, architecture: LiteArchitecture, first_block: int = 0, with_stem: bool = True):
    """Apply stem (optional), blocks[first_block:] and the top conv to tensor x."""
    if with_stem:
        x = layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="input_scaling")(x)
        pad = (_same_padding(x.shape[1], 3), _same_padding(x.shape[2], 3))
        x = layers.ZeroPadding2D(pad, name="stem_conv_pad")(x)
        x = layers.Conv2D(
            architecture.stem_filters, 3, strides=2, padding="valid", use_bias=False,
            kernel_initializer=_CONV_INIT, name="stem_conv",
        )(x)  # fmt: skip
        x = layers.BatchNormalization(epsilon=1e-3, name="stem_bn")(x)
        x = _relu6("stem_activation")(x)
    count = len(architecture.blocks)
    for index in range(first_block, count):
        rate = architecture.drop_connect_rate * index / count
        x = _mbconv(x, architecture.blocks[index], rate)
    x = layers.Conv2D(
        architecture.top_filters, 1, padding="same", use_bias=False,
        kernel_initializer=_CONV_INIT, name="top_conv",
    )(x)  # fmt: skip
    x = layers.BatchNormalization(epsilon=1e-3, name="top_bn")(x)
    return _relu6("top_activation")(x)


def lite0_weights_path() -> Path:
    """Where ml.convert_lite0 writes the converted ImageNet weights by default."""
    return default_cache_dir() / LITE0_IMAGENET_WEIGHTS_FILE


def _build_backbone(backbone: str, input_size: int, weights) -> keras.Model:
    shape = (input_size, input_size, 3)
    if backbone == "efficientnet_b0":
        base = keras.applications.EfficientNetB0(
            include_top=False, weights=weights, input_shape=shape
        )
        return keras.Model(base.input, base.output, name="backbone")
    if backbone not in _LITE_ARCHITECTURES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {BACKBONES}")
    inputs = keras.Input(shape, name="backbone_input")
    model = keras.Model(inputs, lite_layers(inputs, _LITE_ARCHITECTURES[backbone]), name="backbone")
    if weights == "imagenet":
        if backbone != "efficientnet_lite0":
            raise ValueError("ImageNet weights exist for efficientnet_b0/efficientnet_lite0 only")
        weights = lite0_weights_path()
        if not weights.exists():
            raise FileNotFoundError(
                f"{weights} not found: run `python -m ml.convert_lite0` once (needs torch)"
            )
    if weights is not None:
        model.load_weights(str(weights))
    return model


def build_model(
    backbone: str = "efficientnet_b0",
    input_size: int = 224,
    dropout: float = 0.5,
    weights=None,
    num_classes: int = len(CLASS_NAMES),
    name: str | None = None,
) -> keras.Model:
    """image (float32 RGB 0-255, NHWC) -> class probabilities (softmax)."""
    inputs = keras.Input((input_size, input_size, 3), name="image")
    features = _build_backbone(backbone, input_size, weights)(inputs)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(features)
    x = layers.Dropout(dropout, name="top_dropout")(x)
    outputs = layers.Dense(
        num_classes, activation="softmax", kernel_initializer=_DENSE_INIT, name="predictions"
    )(x)
    return keras.Model(inputs, outputs, name=name or f"{backbone}_classifier")


# ---------------------------------------------------------------- pieces for cached training


def block_names(model: keras.Model) -> list[str]:
    """MBConv block prefixes ("block1a_", ...) of the model's backbone, in network order."""
    names: list[str] = []
    for layer in model.get_layer("backbone").layers:
        if layer.name.startswith("block"):
            prefix = layer.name.split("_")[0] + "_"
            if prefix not in names:
                names.append(prefix)
    return names


def set_fine_tunable(model: keras.Model, fine_tune_blocks: int, freeze_batch_norm: bool = True):
    """Phase 2: unfreeze the last `fine_tune_blocks` blocks and the top conv; keep the rest
    (and, for pretrained weights, every BatchNormalization) frozen. -1 = unfreeze all."""
    backbone = model.get_layer("backbone")
    names = block_names(model)
    unfrozen = set(names if fine_tune_blocks < 0 else names[len(names) - fine_tune_blocks :])
    backbone.trainable = True
    for layer in backbone.layers:
        prefix = layer.name.split("_")[0] + "_"
        trainable = fine_tune_blocks < 0 or prefix in unfrozen or layer.name.startswith("top_")
        if freeze_batch_norm and isinstance(layer, layers.BatchNormalization):
            trainable = False
        layer.trainable = trainable


def split_for_caching(model: keras.Model, fine_tune_blocks: int, backbone: str, dropout: float):
    """(front, tail): front maps images to the input of the first fine-tuned block (frozen,
    run once to cache), tail is the rest with the same layer names. Lite backbones only."""
    if backbone not in _LITE_ARCHITECTURES:
        raise ValueError(f"cached fine-tuning needs a Lite backbone, not {backbone!r}")
    architecture = _LITE_ARCHITECTURES[backbone]
    first = len(architecture.blocks) - fine_tune_blocks
    if not 1 <= first < len(architecture.blocks):
        raise ValueError(f"fine_tune_blocks must be 1..{len(architecture.blocks) - 1}")
    source = model.get_layer("backbone")
    last_frozen = architecture.blocks[first - 1]
    boundary = next(
        source.get_layer(f"{last_frozen.name}{suffix}")
        for suffix in ("add", "project_bn")
        if any(layer.name == f"{last_frozen.name}{suffix}" for layer in source.layers)
    )
    backbone_front = keras.Model(source.input, boundary.output, name="front_backbone")
    image = keras.Input(model.input.shape[1:], name="image")
    front = keras.Model(image, backbone_front(image), name="front")

    cached = keras.Input(boundary.output.shape[1:], name="cached_features")
    x = lite_layers(cached, architecture, first_block=first, with_stem=False)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = layers.Dropout(dropout, name="top_dropout")(x)
    x = layers.Dense(
        model.get_layer("predictions").units, activation="softmax",
        kernel_initializer=_DENSE_INIT, name="predictions",
    )(x)  # fmt: skip
    tail = keras.Model(cached, x, name="tail")
    copy_weights_by_name(model, tail)
    return front, tail


def _weighted_layers(model: keras.Model) -> dict[str, layers.Layer]:
    found = {}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.update(_weighted_layers(layer))
        elif layer.weights:
            found[layer.name] = layer
    return found


def copy_weights_by_name(source: keras.Model, target: keras.Model) -> int:
    """Copy weights of same-named layers (nested models flattened); returns layers copied."""
    source_layers = _weighted_layers(source)
    copied = 0
    for name, layer in _weighted_layers(target).items():
        if name in source_layers:
            layer.set_weights(source_layers[name].get_weights())
            copied += 1
    return copied


def fold_temperature(model: keras.Model, temperature: float) -> None:
    """softmax(z / T) with z = Wx + b equals softmax((W/T)x + b/T): calibrate in place."""
    dense = model.get_layer("predictions")
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel / temperature, bias / temperature])


def count_parameters(model: keras.Model) -> int:
    return int(sum(math.prod(w.shape) for w in model.weights))


# ---------------------------------------------------------------- the serving model

# Output names of the serving model (model.keras and the model.tflite signature).
OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_CAM = "cam"
OUTPUT_FEATURES = "features"
CAM_LAYER = "class_activation"


def is_serving_model(model: keras.Model) -> bool:
    return isinstance(model.output, dict) and OUTPUT_PROBABILITIES in model.output


def serving_model(model: keras.Model) -> keras.Model:
    """The classifier with two more outputs, all from one forward pass (same weights):

    probabilities (n, C)        the classifier's softmax, unchanged
    cam           (n, h, w, C)  class activation maps: the backbone's last feature maps
                                (h x w x D) times the Dense kernel (D x C), no bias. Its
                                spatial mean plus the bias is the (temperature-folded) logit,
                                so it says where each class's evidence is (Zhou et al. 2016)
    features      (n, D)        the pooled features the head sees (for the OOD score)

    The head must be GlobalAveragePooling -> Dropout -> Dense "predictions": then CAM needs
    no gradients. The CAM layer holds a copy of the Dense kernel (D x C floats).
    """
    if is_serving_model(model):
        return model
    backbone = model.get_layer("backbone")
    dense = model.get_layer("predictions")
    image = keras.Input(model.input.shape[1:], name="image")
    feature_maps = backbone(image)
    pooled = model.get_layer("avg_pool")(feature_maps)
    probabilities = dense(model.get_layer("top_dropout")(pooled))
    cam_layer = layers.Dense(dense.units, use_bias=False, name=CAM_LAYER)
    cam = cam_layer(feature_maps)
    cam_layer.set_weights([dense.get_weights()[0]])
    return keras.Model(
        image,
        {OUTPUT_PROBABILITIES: probabilities, OUTPUT_CAM: cam, OUTPUT_FEATURES: pooled},
        name=f"{model.name}_serving",
    )


def classifier_of(model: keras.Model) -> keras.Model:
    """The plain image -> probabilities model inside a serving model (same layers)."""
    if not is_serving_model(model):
        return model
    return keras.Model(model.input, model.output[OUTPUT_PROBABILITIES], name=model.name)
