"""Training data: dataset sources, identity-disjoint splits and the tf.data input of the trainer.

Layers, bottom up: `sources` (image sets, folder/IDX/digits loaders), `grouped` and `composite` (grouped
folders and zips; composite identities), `datasets` (which set a `--dataset` value names), `splits`
(identity-disjoint held-out choice), `in_memory` and `streaming` (the two inputs of the trainer), and
`build_splits` here, which picks between the two.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from training.data.datasets import BUILTIN_DATASETS, load_dataset
from training.data.in_memory import (
    Splits,
    build_in_memory_splits,
    eval_dataset,
    model_input,
    preprocess_images,
    resolve_image_size,
    split_indices,
    steps_per_epoch,
    train_dataset,
)
from training.data.sources import DataError, ImageSet
from training.data.splits import SplitIndices, choose_heldout, choose_heldout_groups, split_identities
from training.data.streaming import build_streaming_splits, is_streaming

if TYPE_CHECKING:
    from training.config import RunConfig


def build_splits(config: RunConfig, image_set: ImageSet | None = None) -> Splits:
    """Load (unless given), split and preprocess the dataset of `config`; rebuilds a finished run's splits.
    A streamed input (.rec, TFRecord shards, folder + --streaming) does not load the training images."""
    if image_set is None and is_streaming(config):
        return build_streaming_splits(config)
    return build_in_memory_splits(config, image_set)


__all__ = [
    "BUILTIN_DATASETS",
    "DataError",
    "ImageSet",
    "SplitIndices",
    "Splits",
    "build_splits",
    "choose_heldout",
    "choose_heldout_groups",
    "eval_dataset",
    "load_dataset",
    "model_input",
    "preprocess_images",
    "resolve_image_size",
    "split_identities",
    "split_indices",
    "steps_per_epoch",
    "train_dataset",
]
