"""Identity trees with a group level, read from folders or straight from zip archives (no manual unzip).

Layout: `[<prefix>/...]<group>/<identity>/<image>`, e.g. Omniglot's `images_background_small1/Greek/
character01/0394_01.png`. The depth is detected from where the image files are: every image of one source
(a folder, or one zip) must sit at the same depth; its folder is the identity, the folder above it the group,
and anything above that (a split folder such as `images_background_small1/`) is ignored. A source whose
images sit one level down (`<identity>/<image>`) has no groups. Identity names are `<group>/<identity>`, so
two scripts' `character01` stay two identities.

Several zips are pooled into one data set (a folder holding only `.zip` files, read in name order). An
identity present in more than one source is merged, and a file whose bytes are identical to a file already
read for the same identity is read once (sha256 of its bytes): Omniglot's Greek and Latin alphabets are in
both background-small zips, and count once. Images are decoded eagerly, so a broken one fails now, naming
its zip and member, not in the middle of training.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from training.data.sources import IMAGE_SUFFIXES, DataError, ImageSet

# Folders that archivers add beside the real content (macOS resource forks); never identities.
_IGNORED_DIRS = frozenset({"__MACOSX"})


@dataclass(frozen=True)
class _Member:
    """One image file of a source: its path parts inside the source and how to read its bytes."""

    parts: tuple[str, ...]
    where: str  # "<zip>:<member>" or the file path, for error messages
    read: Callable[[], bytes]


def _is_image(parts: tuple[str, ...]) -> bool:
    if any(p.startswith(".") or p in _IGNORED_DIRS for p in parts):
        return False
    return PurePosixPath(parts[-1]).suffix.lower() in IMAGE_SUFFIXES


def _zip_members(path: Path) -> tuple[zipfile.ZipFile, list[_Member]]:
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable zip archive ({exc})") from exc
    members = []
    for info in archive.infolist():
        if info.is_dir():
            continue
        parts = tuple(p for p in PurePosixPath(info.filename).parts if p)
        if parts and _is_image(parts):
            members.append(_Member(parts, f"{path}:{info.filename}", lambda a=archive, i=info: a.read(i)))
    return archive, members


def _folder_members(root: Path) -> list[_Member]:
    members = []
    for f in sorted(root.rglob("*")):
        parts = f.relative_to(root).parts
        if f.is_file() and _is_image(parts):
            members.append(_Member(parts, str(f), f.read_bytes))
    return members


def _depth(members: list[_Member], source: Path) -> int:
    """The single depth (path components, file included) of a source's images; >= 2."""
    depths: dict[int, str] = {}
    for m in members:
        depths.setdefault(len(m.parts), m.where)
    if not depths:
        raise DataError(f"{source}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if len(depths) > 1:
        examples = "; ".join(f"depth {d}: {w}" for d, w in sorted(depths.items()))
        raise DataError(
            f"{source}: images at different depths ({examples}); "
            "expected [<prefix>/]<group>/<identity>/<image>"
        )
    depth = next(iter(depths))
    if depth < 2:
        raise DataError(
            f"{source}: images directly in the root ({members[0].where}); need <identity>/<image>"
        )
    return depth


def _decode(data: bytes, where: str, color_mode: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert(color_mode), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{where}: unreadable image ({exc})") from exc


def zip_paths(path: Path | str) -> list[Path]:
    """The zips a dataset path names: the file itself if it is a `.zip`, else the `.zip` files of a folder."""
    path = Path(path)
    if path.is_file():
        return [path] if path.suffix.lower() == ".zip" else []
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".zip")
    return []


def is_grouped_folder(path: Path | str) -> bool:
    """A folder whose identity sub-folders hold no images but sub-folders that do (a group level)."""
    root = Path(path)
    if not root.is_dir():
        return False
    top = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    has_flat_images = any(
        f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
        for d in top
        for f in d.iterdir()
    )
    return bool(top) and not has_flat_images


def _sources(path: Path) -> Iterator[tuple[Path, list[_Member]]]:
    zips = zip_paths(path)
    if zips:
        if path.is_dir():
            subdirs = [d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
            if subdirs:
                raise DataError(
                    f"{path}: holds both .zip files and sub-folders ({', '.join(sorted(subdirs)[:5])}); "
                    "point --dataset at one zip, a folder of zips only, or an image-folder tree"
                )
        for z in zips:
            archive, members = _zip_members(z)
            with archive:
                yield z, members
    else:
        yield path, _folder_members(path)


def load_grouped_set(path: Path | str, color_mode: str = "L") -> ImageSet:
    """A grouped identity tree (folder), one zip, or a folder of zips -> one `ImageSet` with `groups`.

    Class names are `<group>/<identity>` (just `<identity>` when no source has a group level); classes are
    sorted by name and each class's images by file name, so the same files always give the same labels.
    """
    path = Path(path)
    # (group, identity) -> {file name: [(source order, bytes digest, image)]} merged across sources.
    found: dict[tuple[str | None, str], list[tuple[str, int, np.ndarray]]] = {}
    seen: dict[tuple[str | None, str], set[str]] = {}
    grouped: set[bool] = set()
    duplicates = 0
    names = []
    for order, (source, members) in enumerate(_sources(path)):
        names.append(str(source))
        depth = _depth(members, source)
        grouped.add(depth >= 3)
        for m in sorted(members, key=lambda m: m.parts):
            group = m.parts[-3] if depth >= 3 else None
            key = (group, m.parts[-2])
            data = m.read()
            digest = hashlib.sha256(data).hexdigest()
            hashes = seen.setdefault(key, set())
            if digest in hashes:
                duplicates += 1
                continue
            hashes.add(digest)
            found.setdefault(key, []).append((m.parts[-1], order, _decode(data, m.where, color_mode)))
    if len(grouped) > 1:
        raise DataError(
            f"{path}: some sources have a group level (<group>/<identity>/<image>) and some do not"
        )
    keys = sorted(found, key=lambda k: (k[0] or "", k[1]))
    class_names = [k[1] if k[0] is None else f"{k[0]}/{k[1]}" for k in keys]
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, key in enumerate(keys):
        for _name, _order, image in sorted(found[key], key=lambda e: (e[0], e[1])):
            images.append(image)
            labels.append(label)
    groups = [k[0] for k in keys] if grouped == {True} else None
    return ImageSet(
        images,
        np.asarray(labels, dtype=np.int64),
        class_names,
        ",".join(names) if len(names) > 1 else names[0],
        groups=groups,
        duplicates_skipped=duplicates,
    )
