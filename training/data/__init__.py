"""Training data: dataset sources, identity-disjoint splits and the tf.data input of the trainer."""

from training.data.in_memory import (
    Splits,
    build_splits,
    eval_dataset,
    model_input,
    preprocess_images,
    resolve_image_size,
    split_indices,
    steps_per_epoch,
    train_dataset,
)
from training.data.sources import DataError, ImageSet, load_dataset
from training.data.splits import SplitIndices, choose_heldout, choose_heldout_groups, split_identities

__all__ = [
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
