"""`idembed-train pack`: an identity folder -> TFRecord shards or an insightface .rec/.idx, with progress.

Image files are stored byte for byte (no re-encoding), so training on the packed set sees exactly the
pixels of the folder. Nothing is decoded and at most one image is in memory at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from training.data.recordio import write_insightface_rec
from training.data.sources import DataError
from training.data.tfrecord import TF_IMAGE_SUFFIXES, FolderListing, list_folder, write_shards

FORMATS = ("tfrecord", "rec")


def _progress_bar(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=desc, disable=not enabled, mininterval=0.5)


def _read(listing: FolderListing, i: int) -> bytes:
    path = listing.root / listing.paths[i].decode()
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc


def pack_folder(
    folder: Path | str,
    out: Path | str,
    *,
    fmt: str = "tfrecord",
    shard_size: int = 10_000,
    seed: int = 0,
    progress: bool = True,
) -> str:
    """Pack `folder` into `out`; returns a one-line description of what was written."""
    if fmt not in FORMATS:
        raise DataError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"--out {out}: exists and is not an empty folder")
    listing = list_folder(folder, suffixes=TF_IMAGE_SUFFIXES)
    n = len(listing.labels)
    if fmt == "tfrecord":
        order = np.random.default_rng(seed).permutation(n)

        def items() -> Iterator[tuple[bytes, int]]:
            for i in order:
                yield _read(listing, int(i)), int(listing.labels[i])

        with _progress_bar(n, progress, "pack tfrecord") as bar:
            shards = write_shards(
                out,
                items(),
                num_images=n,
                class_names=listing.class_names,
                shard_size=shard_size,
                progress=bar.update,
            )
        return (
            f"wrote {out}: {n} images of {len(listing.class_names)} identities in {len(shards.files)} "
            f"TFRecord shard(s)"
        )
    out.mkdir(parents=True, exist_ok=True)
    starts = np.concatenate([[0], np.cumsum(np.bincount(listing.labels))])
    with _progress_bar(n, progress, "pack rec") as bar:

        def identity(k: int) -> Iterator[bytes]:
            for i in range(int(starts[k]), int(starts[k + 1])):
                yield _read(listing, i)
                bar.update(1)

        images, identities = write_insightface_rec(
            out / "train.rec", (identity(k) for k in range(len(listing.class_names)))
        )
    (out / "identities.txt").write_text("\n".join(listing.class_names) + "\n", encoding="utf-8")
    return (
        f"wrote {out / 'train.rec'} + train.idx: {images} images of {identities} identities "
        "(insightface layout; identities.txt maps class k to its folder name)"
    )
