"""The in-memory data path: from a RunConfig to its input spec, preprocessed identity-disjoint splits held as
arrays, and their tf.data input (`train_dataset`, `eval_dataset`). `build_splits` hands streamed sources to
`training.data.streaming`, whose training images are never held in memory.

Every image becomes a model input through `bundle.preprocess.preprocess_image` with the same `InputSpec` and
`Preprocessing` objects the exported bundle's manifest carries, so the service computes identical tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from bundle.manifest import InputSpec, Preprocessing
from bundle.preprocess import preprocess_image
from training.config import RunConfig
from training.data.augment import Augmentation, augment_batch, batch_key
from training.data.datasets import load_dataset
from training.data.sources import ImageSet, idx_image_size, is_idx_source
from training.data.splits import SplitIndices, choose_heldout, choose_heldout_groups, split_identities

# Input size when the dataset has no single native size (an image folder) and --image-size is not given.
DEFAULT_IMAGE_SIZE = {"lenetpp": 28, "facecnn": 96, "conv4": 28}
# issue 13: arcface_torch's 112x112 face crops.
DEFAULT_IMAGE_SIZE.update(
    dict.fromkeys(("iresnet18", "iresnet34", "iresnet50", "iresnet100", "mobilefacenet"), 112)
)
DIGITS_IMAGE_SIZE = 8
# 8x16 composites, resized (upsampled: nothing lost) to a square 16x16 input by the shared preprocessing.
DIGIT_PAIRS_IMAGE_SIZE = 16


@dataclass(frozen=True)
class Splits:
    """Preprocessed float32 inputs `[N, H, W, C]` and int32 labels for each side of the split.

    `y_train`/`y_val` index `class_names` (the K training identities, the rows of the centers);
    `y_heldout` indexes `heldout_class_names` (identities the model never saw).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_heldout: np.ndarray
    y_heldout: np.ndarray
    class_names: list[str]
    heldout_class_names: list[str]
    input_spec: InputSpec
    preprocessing: Preprocessing
    # group of each held-out identity (heldout_groups[k] for heldout_class_names[k]), when the data has groups
    heldout_groups: list[str] | None = None


def resolve_image_size(config: RunConfig) -> int:
    """The square input size a run uses: --image-size, else the dataset's own, else the backbone default."""
    if config.image_size is not None:
        return config.image_size
    if config.dataset == "digits":
        return DIGITS_IMAGE_SIZE
    if config.dataset == "digit-pairs":
        return DIGIT_PAIRS_IMAGE_SIZE
    if is_idx_source(Path(config.dataset)):
        return idx_image_size(config.dataset)
    return DEFAULT_IMAGE_SIZE[config.backbone]


def model_input(config: RunConfig) -> tuple[InputSpec, Preprocessing]:
    """The `InputSpec` and `Preprocessing` of a run — the exact objects its bundle manifest must carry.

    Pixels are scaled to [0, 1] then normalised with mean 0.5 / std 0.5 to [-1, 1] (zero-centred inputs
    train faster with PReLU/BatchNorm and need no dataset statistics that would also have to be shipped).
    """
    size = resolve_image_size(config)
    channels = 1 if config.color_mode == "L" else 3
    spec = InputSpec(height=size, width=size, channels=channels, layout="NHWC")
    prep = Preprocessing(color_mode=config.color_mode, mean=[0.5], std=[0.5])
    return spec, prep


def preprocess_images(
    images: np.ndarray | list[np.ndarray], preprocessing: Preprocessing, input_spec: InputSpec
) -> np.ndarray:
    """uint8 images -> float32 batch `[N, H, W, C]` through the shared bundle preprocessing."""
    if len(images) == 0:
        return np.zeros((0, *input_spec.shape(0)[1:]), dtype=np.float32)
    return np.stack([preprocess_image(np.asarray(im), preprocessing, input_spec) for im in images])


def split_indices(config: RunConfig, image_set: ImageSet) -> SplitIndices:
    """The identity-disjoint split a config defines on a dataset (seeded: the same config, the same split)."""
    if config.heldout_groups is not None or config.heldout_group_count is not None:
        heldout = choose_heldout_groups(
            image_set.class_names,
            image_set.groups,
            names=config.heldout_groups,
            count=config.heldout_group_count,
            seed=config.seed,
            source=image_set.source,
        )
    else:
        names = config.heldout_classes
        if names is None and config.heldout_count is None and image_set.suggested_heldout is not None:
            names = image_set.suggested_heldout  # a built-in benchmark's own split (digit-pairs: balanced 30)
        heldout = choose_heldout(
            image_set.class_names,
            names=names,
            count=config.heldout_count,
            fraction=config.heldout_fraction,
            seed=config.seed,
        )
    return split_identities(
        image_set.labels, image_set.class_names, heldout, val_fraction=config.val_fraction, seed=config.seed
    )


def build_in_memory_splits(config: RunConfig, image_set: ImageSet | None = None) -> Splits:
    """Load (unless given), split and preprocess the dataset of `config` in memory
    (`training.data.build_splits` chooses between this and the streamed input)."""
    if image_set is None:
        image_set = load_dataset(config.dataset, config.color_mode)
    idx = split_indices(config, image_set)
    spec, prep = model_input(config)
    pos = {name: k for k, name in enumerate(image_set.class_names)}
    # Dataset label -> training label (or held-out label); -1 marks "not on this side".
    to_train = np.full(len(image_set.class_names), -1, dtype=np.int32)
    to_train[[pos[n] for n in idx.train_classes]] = np.arange(len(idx.train_classes), dtype=np.int32)
    to_held = np.full(len(image_set.class_names), -1, dtype=np.int32)
    to_held[[pos[n] for n in idx.heldout_classes]] = np.arange(len(idx.heldout_classes), dtype=np.int32)

    def take(indices: np.ndarray) -> np.ndarray:
        if isinstance(image_set.images, np.ndarray):
            subset = image_set.images[indices]
        else:
            subset = [image_set.images[i] for i in indices]
        return preprocess_images(subset, prep, spec)

    return Splits(
        x_train=take(idx.train),
        y_train=to_train[image_set.labels[idx.train]],
        x_val=take(idx.val),
        y_val=to_train[image_set.labels[idx.val]],
        x_heldout=take(idx.heldout),
        y_heldout=to_held[image_set.labels[idx.heldout]],
        class_names=idx.train_classes,
        heldout_class_names=idx.heldout_classes,
        input_spec=spec,
        preprocessing=prep,
        heldout_groups=(
            None if image_set.groups is None else [image_set.groups[pos[n]] for n in idx.heldout_classes]
        ),
    )


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return max(1, math.ceil(num_examples / batch_size))


def train_dataset(
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    epochs: int,
    initial_epoch: int = 0,
    augment: Augmentation | None = None,
) -> tf.data.Dataset:
    """Shuffled batches for epochs `initial_epoch .. epochs-1`, in one stream for `fit(steps_per_epoch=...)`.

    Epoch e's order is a stateless function of (seed, e), not of an iterator's history, so a run resumed
    at epoch e sees exactly the batches the uninterrupted run saw (tf.data's own reshuffling restarts
    from its first permutation whenever the dataset is rebuilt, which would break resume). `augment` warps
    each training image at random (training/data/augment.py) with draws keyed by (seed, epoch, batch index),
    so augmented batches keep that property.
    """
    n = len(x)
    features = tf.constant(x)
    labels = tf.constant(y, dtype=tf.int32)

    def epoch_batches(epoch: tf.Tensor) -> tf.data.Dataset:
        key = tf.stack([tf.constant(seed, tf.int64), epoch])
        order = tf.argsort(tf.random.stateless_uniform([n], seed=key))
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size)
        if augment is None or augment.is_identity:
            return batches
        return batches.enumerate().map(lambda b, i: (i, batch_key(seed, epoch, b)))

    ds = tf.data.Dataset.range(initial_epoch, epochs).flat_map(epoch_batches)
    if augment is None or augment.is_identity:
        ds = ds.map(lambda i: (tf.gather(features, i), tf.gather(labels, i)), num_parallel_calls=1)
    else:
        ds = ds.map(
            lambda i, key: (augment_batch(tf.gather(features, i), key, augment), tf.gather(labels, i)),
            num_parallel_calls=1,
        )
    return ds.prefetch(2)


def eval_dataset(x: np.ndarray, y: np.ndarray, *, batch_size: int) -> tf.data.Dataset:
    """Batches in order, for evaluation and embedding extraction."""
    return tf.data.Dataset.from_tensor_slices((x, y.astype(np.int32))).batch(batch_size).prefetch(2)
