"""Which data set a `--dataset` value names, and loading it: the built-in sets, an IDX folder, an
identity-folder tree (flat or grouped), one zip of such a tree or a folder of zips.

It sits above the loaders (`sources`, `grouped`, `composite`), which never import it.
"""

from __future__ import annotations

from pathlib import Path

from training.data.composite import digit_pairs
from training.data.grouped import is_grouped_folder, load_grouped_set, zip_paths
from training.data.sources import (
    DataError,
    ImageSet,
    is_idx_source,
    load_digits_set,
    load_folder_set,
    load_idx_set,
)

# Data sets a fresh install has (built from scikit-learn's bundled digits), by name.
BUILTIN_DATASETS = ("digits", "digit-pairs")


def load_dataset(dataset: str, color_mode: str = "L") -> ImageSet:
    """`digits`, `digit-pairs`, an IDX folder/prefix, an identity-folder tree (flat or with a group level),
    one zip of such a tree or a folder of zips (see `RunConfig.dataset` and `training.data.grouped`)."""
    if dataset == "digits":
        return load_digits_set()
    if dataset == "digit-pairs":
        return digit_pairs()
    path = Path(dataset)
    if is_idx_source(path):
        return load_idx_set(path)
    if zip_paths(path) or is_grouped_folder(path):
        return load_grouped_set(path, color_mode)
    if path.is_dir():
        return load_folder_set(path, color_mode)
    raise DataError(f"{dataset}: not 'digits', an IDX folder/prefix, a .zip, or an image folder")
