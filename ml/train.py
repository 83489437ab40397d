"""Training: two-phase transfer learning (or training from scratch) on a leakage-free split.

    python -m ml.train --data DATA/Training --backbone efficientnet_lite0 --weights imagenet \\
        --export runs/brain-mri-lite0/artifact
    # then OOD rejection + review threshold on the exported model: python -m ml.trust --help

1. Find the class folders, group exact and near duplicates, split by group (stratified,
   fixed seed); the split goes into the artifact (split.json).
2. Decode every image once (ml.data.decode_image, the serving function) and cache it.
3. Phase 1 trains the head (Dense after GlobalAveragePooling + Dropout) on the frozen
   backbone; phase 2 unfreezes the top `--fine-tune-blocks` blocks with batch norm frozen.
   With --cache-features (default for Lite backbones with pretrained weights) the frozen
   lower blocks run once, over `--cached-views` augmented views of each training image,
   and both phases train only the upper part on those cached tensors: minutes, not hours,
   on a 2-core CPU. Without it (e.g. from scratch) images are augmented on the fly.
4. A temperature fitted on the validation split is folded into the last layer (calibration).
5. Export (ml.export), then score val and test through the exported artifact (ml.evaluate).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ml.config import (
    CLASS_NAMES,
    REPO_ROOT,
    DedupConfig,
    SplitConfig,
    TrainConfig,
    default_cache_dir,
    default_dataset_dir,
)
from ml.data import Dataset, assert_no_group_leak, decode_files, load_dataset, progress, write_json

AUGMENTATION = {
    "horizontal_flip": True,
    "rotation_degrees": 15,
    "zoom": 0.1,
    "translation": 0.1,
    "fill": "constant 0 (black, like the scan background)",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_augmenter(seed: int):
    """Random rotations, flips, zooms and translations (the origin notebook's augmentation)."""
    import keras
    from keras import layers

    return keras.Sequential(
        [
            layers.RandomFlip("horizontal", seed=seed),
            layers.RandomRotation(
                AUGMENTATION["rotation_degrees"] / 360, fill_mode="constant", seed=seed + 1
            ),
            layers.RandomZoom(
                (-AUGMENTATION["zoom"], AUGMENTATION["zoom"]), fill_mode="constant", seed=seed + 2
            ),
            layers.RandomTranslation(
                AUGMENTATION["translation"],
                AUGMENTATION["translation"],
                fill_mode="constant",
                seed=seed + 3,
            ),
        ],
        name="augmentation",
    )


def one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(len(CLASS_NAMES), dtype=np.float32)[labels]


# ---------------------------------------------------------------- cached features


def _feature_cache_key(config: TrainConfig, fingerprint: str, weights_id: str) -> str:
    parts = [
        fingerprint,
        config.backbone,
        weights_id,
        config.input_size,
        config.fine_tune_blocks,
        config.cached_views,
        json.dumps(AUGMENTATION, sort_keys=True),
        json.dumps(vars(config.split), sort_keys=True),
    ]
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def run_front(front, images: np.ndarray, augmenter=None, label: str = "", batch: int = 32):
    """float16 outputs of the frozen front for uint8 images (optionally augmented first)."""
    outputs = []
    starts = range(0, len(images), batch)
    for start in progress(starts, len(starts), f"{label} ({batch}/batch)", every_seconds=20):
        chunk = images[start : start + batch].astype(np.float32)
        if augmenter is not None:
            chunk = augmenter(chunk, training=True)
        outputs.append(np.asarray(front(chunk, training=False)).astype(np.float16))
    return np.concatenate(outputs)


def cached_features(front, decoded, dataset, config, weights_id, cache_dir):
    """{train: (n, views, h, w, c), val: (n, h, w, c), test: ...} float16, cached on disk."""
    key = _feature_cache_key(config, dataset.fingerprint, weights_id)
    path = cache_dir / f"features-{key}.npz"
    if path.exists():
        log(f"loading cached features {path}")
        with np.load(path) as stored:
            return {name: stored[name] for name in stored.files}
    import keras

    keras.utils.set_random_seed(0)  # views depend on the cache key only, not the run's seed
    augmenter = make_augmenter(seed=0)
    train_images = decoded[dataset.split["train"]]
    # View 0 is the image itself; the others are augmented.
    views = [run_front(front, train_images, label="features, view 1 (plain)")]
    for view in range(1, config.cached_views):
        views.append(
            run_front(front, train_images, augmenter, f"features, view {view + 1} (augmented)")
        )
    features = {"train": np.stack(views, axis=1)}
    for side in ("val", "test"):
        features[side] = run_front(front, decoded[dataset.split[side]], label=f"features, {side}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(path, **features)
    log(f"cached features in {path} ({path.stat().st_size / 1e9:.2f} GB)")
    return features


def view_batches(features: np.ndarray, labels: np.ndarray, batch_size: int, seed: int):
    """keras PyDataset: each epoch shows every training image once, as a random cached view."""
    import keras

    class RandomViews(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self.targets = one_hot(labels)
            self.on_epoch_end()

        def __len__(self):
            return math.ceil(len(features) / batch_size)

        def __getitem__(self, index):
            rows = self.order[index * batch_size : (index + 1) * batch_size]
            chosen = features[rows, self.views[rows]].astype(np.float32)
            return chosen, self.targets[rows]

        def on_epoch_end(self):
            self.order = self.rng.permutation(len(features))
            self.views = self.rng.integers(0, features.shape[1], len(features))

    return RandomViews()


# ---------------------------------------------------------------- training loop pieces


class TimeBudget:
    """Stops fit() once a wall-clock budget shared by all phases is spent."""

    def __init__(self, minutes: float | None):
        self.deadline = time.monotonic() + minutes * 60 if minutes else None

    def callback(self):
        import keras

        deadline = self.deadline

        class StopAtDeadline(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if deadline and time.monotonic() > deadline:
                    log("time budget spent: stopping")
                    self.model.stop_training = True

        return StopAtDeadline()

    @property
    def spent(self) -> bool:
        return bool(self.deadline and time.monotonic() > self.deadline)


def compile_model(model, learning_rate: float, label_smoothing: float) -> None:
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=["accuracy"],
    )


def fit_phase(model, phase, train_data, val_data, epochs, config, run_dir, budget, history):
    import keras

    if epochs <= 0 or budget.spent:
        return
    callbacks = [
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=0.3, patience=config.reduce_lr_patience, min_lr=1e-6
        ),
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=config.early_stopping_patience, restore_best_weights=True
        ),
        keras.callbacks.CSVLogger(str(run_dir / f"history-{phase}.csv")),
        budget.callback(),
    ]
    if _tensorboard_installed():
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(run_dir / "tensorboard" / phase)))
    else:
        log("tensorboard not installed (requirements-dev.txt): no TensorBoard logs")
    log(f"phase {phase}: {epochs} epochs max, {count_trainable(model):,} trainable parameters")
    started = time.monotonic()
    result = model.fit(
        train_data, validation_data=val_data, epochs=epochs, callbacks=callbacks, verbose=2
    )
    minutes = (time.monotonic() - started) / 60
    log(f"phase {phase}: {len(result.epoch)} epochs in {minutes:.1f} min")
    for index in range(len(result.epoch)):
        row = {key: float(values[index]) for key, values in result.history.items()}
        history.append({"phase": phase, **row})


def _tensorboard_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def count_trainable(model) -> int:
    return int(sum(math.prod(w.shape) for w in model.trainable_weights))


def fit_temperature(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The T minimising validation NLL of softmax(log p / T) (temperature scaling)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    log_p = np.log(np.clip(probabilities, 1e-12, 1.0))

    def nll(log_t):
        scaled = log_softmax(log_p / np.exp(log_t), axis=1)
        return -scaled[np.arange(len(labels)), labels].mean()

    return float(np.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded").x))


def predict_arrays(model, inputs: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate(
        [
            np.asarray(model(inputs[i : i + batch].astype(np.float32), training=False))
            for i in range(0, len(inputs), batch)
        ]
    )


# ---------------------------------------------------------------- the two modes


def train_cached(model, dataset, decoded, config, run_dir, budget, history, cache_dir):
    """Both phases on cached outputs of the frozen lower blocks; returns val probabilities."""
    from ml.model import copy_weights_by_name, split_for_caching

    front, tail = split_for_caching(model, config.fine_tune_blocks, config.backbone, config.dropout)
    weights_id = _weights_id(config.weights)
    features = cached_features(front, decoded, dataset, config, weights_id, cache_dir)
    log(f"cached training features {features['train'].shape} float16")
    labels = dataset.labels
    train_data = view_batches(
        features["train"], labels[dataset.split["train"]], config.batch_size, config.seed
    )
    val_data = (features["val"].astype(np.float32), one_hot(labels[dataset.split["val"]]))

    for layer in tail.layers:
        layer.trainable = layer.name == "predictions"
    compile_model(tail, config.head_learning_rate, config.label_smoothing)
    fit_phase(
        tail, "head", train_data, val_data, config.head_epochs, config, run_dir, budget, history
    )

    # Phase 2: every block of the tail, batch norm frozen (keeps ImageNet statistics).
    import keras

    for layer in tail.layers:
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    compile_model(tail, config.learning_rate, config.label_smoothing)
    fit_phase(
        tail, "fine_tune", train_data, val_data, config.epochs, config, run_dir, budget, history
    )
    copied = copy_weights_by_name(tail, model)
    val_probabilities = predict_arrays(tail, features["val"])
    # The full model on images must reproduce the tail on cached features (up to float16).
    sample = dataset.split["val"][:16]
    difference = np.abs(predict_arrays(model, decoded[sample]) - val_probabilities[:16]).max()
    log(f"copied {copied} trained layers into the full model; max |difference| {difference:.1e}")
    if difference > 0.05:
        raise RuntimeError(f"full model disagrees with the trained tail by {difference}")
    return val_probabilities


def train_end_to_end(model, dataset, decoded, config, run_dir, budget, history):
    """Augmentation on the fly; phase 1 (head) only with pretrained weights."""
    import tensorflow as tf

    from ml.model import set_fine_tunable

    labels = one_hot(dataset.labels)
    augmenter = make_augmenter(seed=config.seed)
    train_index = dataset.split["train"]
    train_data = (
        tf.data.Dataset.from_tensor_slices((decoded[train_index], labels[train_index]))
        .shuffle(len(train_index), seed=config.seed, reshuffle_each_iteration=True)
        .batch(config.batch_size)
        .map(
            lambda x, y: (augmenter(tf.cast(x, tf.float32), training=True), y),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        .prefetch(2)
    )
    val_index = dataset.split["val"]
    val_data = (
        tf.data.Dataset.from_tensor_slices((decoded[val_index], labels[val_index]))
        .batch(64)
        .map(lambda x, y: (tf.cast(x, tf.float32), y))
    )
    pretrained = config.weights is not None
    if pretrained:
        model.get_layer("backbone").trainable = False
        compile_model(model, config.head_learning_rate, config.label_smoothing)
        fit_phase(
            model,
            "head",
            train_data,
            val_data,
            config.head_epochs,
            config,
            run_dir,
            budget,
            history,
        )
    # From scratch every layer learns, batch norm included; pretrained keeps BN frozen.
    blocks = config.fine_tune_blocks if pretrained else -1
    set_fine_tunable(model, blocks, freeze_batch_norm=pretrained)
    compile_model(model, config.learning_rate, config.label_smoothing)
    fit_phase(
        model, "fine_tune", train_data, val_data, config.epochs, config, run_dir, budget, history
    )
    return predict_arrays(model, decoded[val_index])


def _weights_id(weights: str | None) -> str:
    if weights in (None, "imagenet"):
        return str(weights)
    from ml.export import sha256_of

    return sha256_of(weights)[:16]


# ---------------------------------------------------------------- main


def train(
    config: TrainConfig,
    data: Path,
    run_dir: Path,
    export_dir: Path,
    name: str,
    version: str,
    cache_dir: Path,
) -> dict:
    import keras

    from ml.evaluate import evaluate, plot_training_curves
    from ml.export import export_artifact
    from ml.model import build_model, count_parameters, fold_temperature

    started = time.monotonic()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", config.to_dict())
    keras.utils.set_random_seed(config.seed)
    budget = TimeBudget(config.max_minutes)

    log(f"reading {data}")
    dataset: Dataset = load_dataset(data, config.dedup, config.split, cache_dir)
    assert_no_group_leak(dataset.groups, dataset.split)
    counts = {
        side: np.bincount(dataset.labels[idx], minlength=4).tolist()
        for side, idx in dataset.split.items()
    }
    log(
        f"{len(dataset.images)} images, {len(np.unique(dataset.groups))} duplicate groups; "
        f"split per class {CLASS_NAMES}: {counts}"
    )
    decoded = decode_files(
        [image.path for image in dataset.images], config.input_size, cache_dir, dataset.fingerprint
    )

    model = build_model(config.backbone, config.input_size, config.dropout, config.weights)
    initial = config.weights or "random init"
    log(f"{config.backbone} ({initial}): {count_parameters(model):,} weights")
    history: list[dict] = []
    use_cache = (
        config.cache_features
        and config.weights is not None
        and config.backbone != "efficientnet_b0"
    )
    if use_cache:
        val_probabilities = train_cached(
            model, dataset, decoded, config, run_dir, budget, history, cache_dir
        )
    else:
        val_probabilities = train_end_to_end(
            model, dataset, decoded, config, run_dir, budget, history
        )
    train_minutes = (time.monotonic() - started) / 60

    val_labels = dataset.labels[dataset.split["val"]]
    temperature = fit_temperature(val_labels, val_probabilities)
    fold_temperature(model, temperature)
    log(f"temperature {temperature:.3f} (fitted on validation) folded into the last layer")
    write_json(run_dir / "history.json", {"history": history})
    if history:
        plot_training_curves(history, run_dir / "training-curves.png", f"{name} {version}")

    record = dataset.split_record(config.dedup, config.split)
    extra = {
        "backbone": config.backbone,
        "weights": str(config.weights),
        "data_fingerprint": dataset.fingerprint,
        "split_summary": {"counts_per_class": counts, "class_order": list(CLASS_NAMES)},
        "training": {
            "config": config.to_dict(),
            "mode": "cached frozen-front features" if use_cache else "end to end",
            "augmentation": AUGMENTATION,
            "temperature": temperature,
            "minutes": round(train_minutes, 1),
            "epochs_run": {
                phase: sum(1 for row in history if row["phase"] == phase)
                for phase in ("head", "fine_tune")
            },
        },
        "history": history,
    }
    artifact = export_artifact(
        model, export_dir, name=name, version=version, input_size=config.input_size,
        extra=extra, split=record,
    )  # fmt: skip
    log(f"exported {artifact}")
    if history:
        plot_training_curves(history, artifact / "training-curves.png", f"{name} {version}")

    metrics = {}
    for side in ("val", "test"):
        result = evaluate(data, artifact, split=side)
        metrics[side] = {k: v for k, v in result["metrics"].items() if k != "misclassified"}
        m = metrics[side]
        log(f"{side}: accuracy {m['accuracy']:.4f} macro-F1 {m['macro_f1']:.4f} ECE {m['ece']:.4f}")
    metadata = json.loads((artifact / "model.json").read_text())
    metadata["metrics"] = metrics
    (artifact / "model.json").write_text(json.dumps(metadata, indent=2) + "\n")
    write_json(run_dir / "metrics.json", metrics)
    log(f"done in {(time.monotonic() - started) / 60:.1f} min")
    return metrics


def parse_args(argv: list[str] | None = None):
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(default_dataset_dir() / "Training"))
    parser.add_argument("--backbone", default=defaults.backbone,
                        choices=("efficientnet_b0", "efficientnet_lite0", "tiny"))  # fmt: skip
    parser.add_argument("--weights", default="none",
                        help="none, imagenet, or a local weights file")  # fmt: skip
    parser.add_argument("--input-size", type=int, default=defaults.input_size)
    parser.add_argument("--dropout", type=float, default=defaults.dropout)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--head-epochs", type=int, default=defaults.head_epochs)
    parser.add_argument("--head-lr", type=float, default=defaults.head_learning_rate)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate)
    parser.add_argument("--fine-tune-blocks", type=int, default=defaults.fine_tune_blocks)
    parser.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing)
    parser.add_argument("--cached-views", type=int, default=defaults.cached_views)
    parser.add_argument("--no-cache", action="store_true", help="augment on the fly instead")
    parser.add_argument("--patience", type=int, default=defaults.early_stopping_patience)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--split-seed", type=int, default=SplitConfig().seed)
    parser.add_argument("--test-fraction", type=float, default=SplitConfig().test_fraction)
    parser.add_argument("--val-fraction", type=float, default=SplitConfig().val_fraction)
    parser.add_argument("--run-dir", help="logs, TensorBoard, history (default runs/<name>)")
    parser.add_argument("--export", help="artifact folder (default <run-dir>/artifact)")
    parser.add_argument("--name", help="artifact name (default brain-mri-<backbone>)")
    parser.add_argument("--version", default="0.0.0")
    parser.add_argument("--cache-dir", default=str(default_cache_dir()))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    weights = None if args.weights.lower() == "none" else args.weights
    config = TrainConfig(
        backbone=args.backbone,
        weights=weights,
        input_size=args.input_size,
        dropout=args.dropout,
        batch_size=args.batch_size,
        head_epochs=args.head_epochs,
        head_learning_rate=args.head_lr,
        epochs=args.epochs,
        learning_rate=args.lr,
        fine_tune_blocks=args.fine_tune_blocks,
        label_smoothing=args.label_smoothing,
        cached_views=args.cached_views,
        cache_features=not args.no_cache,
        early_stopping_patience=args.patience,
        max_minutes=args.max_minutes,
        seed=args.seed,
        dedup=DedupConfig(),
        split=replace(
            SplitConfig(),
            seed=args.split_seed,
            test_fraction=args.test_fraction,
            val_fraction=args.val_fraction,
        ),  # fmt: skip
    )
    name = args.name or f"brain-mri-{args.backbone.replace('efficientnet_', '')}"
    run_dir = Path(args.run_dir or REPO_ROOT / "runs" / f"{name}-seed{args.seed}")
    export_dir = Path(args.export) if args.export else run_dir / "artifact"
    train(config, Path(args.data), run_dir, export_dir, name, args.version, Path(args.cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
