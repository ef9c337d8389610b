"""Many-identity benchmark from bundled data: identity "ab" = a digit-a sample beside a digit-b sample.

The bundled datasets have 10 classes, so held-out evaluation trains on 7 identities: far too few for the
open-set gains center loss is known for (the paper trains on ~17 000 people). Composites give hundreds of
identities from the same images, and like faces, a new identity is a new combination of familiar parts.

Design choices that keep the benchmark honest:

- **Private samples**: every (identity, position) slot owns its own base samples, never shared with any other
  identity. Whichever identities a split holds out, their images are built from base samples the model never
  saw in training (new "writers", not new arrangements of seen pixels).
- **Balanced held-out set** (`balanced_heldout`): identities whose class-index sum mod C falls in a seeded set
  of residues. With 2 parts and 3 of 10 residues that is 30 of 100 identities, and every base class appears
  exactly 3 times on the left and 3 times on the right of them, so no digit is unseen at any position.
- The dataset is written as an identity-folder tree (`load_folder_set` reads it), so it goes through exactly
  the path a real face-crop folder takes: `idembed-train build-bundle --dataset <folder> ...`.

    python -m training.data.composite --out runs/data/digit-pairs      # 100 identities x 64 images, 8x16
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.data.sources import DataError, ImageSet, is_idx_source, load_digits_set, load_idx_set

HELDOUT_FILE = "heldout.txt"
PROVENANCE_FILE = "composite.json"


@dataclass(frozen=True)
class CompositeSet:
    """A composite dataset and where each image came from.

    `parts[i, p]` is the index (into the base `ImageSet`) of the sample at position `p` of image `i`;
    `identity_parts[j]` are the base class indices that make identity `image_set.class_names[j]`.
    """

    image_set: ImageSet
    parts: np.ndarray  # int64 [N, P]
    identity_parts: list[tuple[int, ...]]
    samples_per_slot: int


def identity_name(part_names: Sequence[str]) -> str:
    """'3' + '7' -> '37'; multi-character class names are joined with '_' so the parts stay readable."""
    return "".join(part_names) if all(len(n) == 1 for n in part_names) else "_".join(part_names)


def compose(samples: Sequence[np.ndarray]) -> np.ndarray:
    """Base samples side by side, left to right (all the same height): `[H, W] * P -> [H, P * W]`."""
    return np.concatenate([np.asarray(s, dtype=np.uint8) for s in samples], axis=1)


def _private_slots(
    labels: np.ndarray, num_classes: int, identities: Sequence[tuple[int, ...]], rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """`slots[j, p]` = the base samples reserved for position p of identity j (`[I, P, k]`), and k.

    Class c fills `n_c = sum_p #{j : identities[j][p] == c}` slots; its samples are shuffled and cut into
    equal chunks of `k = min_c floor(count_c / n_c)`, so no sample serves two slots.
    """
    parts = len(identities[0])
    slot_count = np.zeros(num_classes, dtype=np.int64)
    for ident in identities:
        for c in ident:
            slot_count[c] += 1
    counts = np.bincount(labels, minlength=num_classes)
    k = int(min(counts[c] // slot_count[c] for c in range(num_classes) if slot_count[c] > 0))
    if k < 1:
        worst = int(np.argmin(counts / np.maximum(slot_count, 1)))
        raise DataError(
            f"class {worst} has {counts[worst]} samples for {slot_count[worst]} identity slots: too few for "
            "private samples per identity (use fewer parts or a larger base dataset)"
        )
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in range(num_classes)}
    slots = np.empty((len(identities), parts, k), dtype=np.int64)
    for j, ident in enumerate(identities):
        for p, c in enumerate(ident):
            slots[j, p] = pools[c][:k]
            del pools[c][:k]
    return slots, k


def build_composite_set(
    base: ImageSet, *, parts: int = 2, per_identity: int = 64, seed: int = 0
) -> CompositeSet:
    """Every ordered `parts`-tuple of base classes is an identity (C^parts of them) with `per_identity`
    images, each a distinct combination of that identity's private samples (seeded)."""
    if parts < 1:
        raise DataError(f"parts must be >= 1, got {parts}")
    if per_identity < 2:
        raise DataError(f"per_identity must be >= 2 (genuine pairs need two images), got {per_identity}")
    sizes = {np.asarray(im).shape for im in base.images}
    if len(sizes) != 1 or len(next(iter(sizes))) != 2:
        raise DataError(f"{base.source}: composites need gray images of one size, found {sorted(sizes)}")
    rng = np.random.default_rng(seed)
    num_classes = len(base.class_names)
    identities = list(itertools.product(range(num_classes), repeat=parts))
    slots, k = _private_slots(np.asarray(base.labels), num_classes, identities, rng)
    combos = k**parts
    if per_identity > combos:
        raise DataError(
            f"{per_identity} images per identity asked, but {k} private samples per position give only "
            f"{combos} distinct combinations"
        )
    picks = np.empty((len(identities) * per_identity, parts), dtype=np.int64)
    for j in range(len(identities)):
        chosen = np.sort(rng.choice(combos, size=per_identity, replace=False))
        positions = np.stack(np.unravel_index(chosen, (k,) * parts), axis=1)  # [per_identity, P] in 0..k-1
        picks[j * per_identity : (j + 1) * per_identity] = slots[j, np.arange(parts), positions]
    images = np.stack([compose([base.images[i] for i in row]) for row in picks])
    labels = np.repeat(np.arange(len(identities), dtype=np.int64), per_identity)
    names = [identity_name([base.class_names[c] for c in ident]) for ident in identities]
    source = f"{base.source}-x{parts}"
    return CompositeSet(ImageSet(images, labels, names, source), picks, identities, k)


def balanced_heldout(
    identity_parts: Sequence[tuple[int, ...]],
    names: Sequence[str],
    num_classes: int,
    *,
    residues: int,
    seed: int,
) -> list[str]:
    """Identities whose class-index sum mod C is one of `residues` seeded residues.

    For each position and class c, exactly `residues * C^(P-2)` of them have c there (P >= 2), so held-out
    identities are new combinations of parts every one of which is trained on at every position.
    """
    if not 1 <= residues < num_classes:
        raise DataError(f"residues must be in 1..{num_classes - 1}, got {residues}")
    chosen = set(np.random.default_rng(seed).choice(num_classes, size=residues, replace=False).tolist())
    return [n for n, ident in zip(names, identity_parts, strict=True) if sum(ident) % num_classes in chosen]


def digit_pairs(seed: int = 0) -> ImageSet:
    """The built-in `digit-pairs` data set: 100 identities "ab" x 64 images (8x16) from sklearn's digits, with
    the balanced 30 held-out identities as its suggested split (the same as `python -m training.data.composite
    --out D` writes, seed 0, in memory)."""
    base = load_digits_set()
    composite = build_composite_set(base, parts=2, per_identity=64, seed=seed)
    images = composite.image_set
    heldout = balanced_heldout(
        composite.identity_parts, images.class_names, len(base.class_names), residues=3, seed=seed
    )
    return ImageSet(
        images.images, images.labels, images.class_names, "digit-pairs", suggested_heldout=heldout
    )


def keep_identities(composite: CompositeSet, names: Sequence[str]) -> CompositeSet:
    """Only the images of `names` (kept in dataset order, relabelled); their images are unchanged, so a run
    with fewer training identities is scored on exactly the same held-out images."""
    ims = composite.image_set
    unknown = sorted(set(names) - set(ims.class_names))
    if unknown:
        raise DataError(f"unknown identities {', '.join(unknown)}")
    keep = [k for k, n in enumerate(ims.class_names) if n in set(names)]
    relabel = np.full(len(ims.class_names), -1, dtype=np.int64)
    relabel[keep] = np.arange(len(keep))
    rows = np.flatnonzero(np.isin(ims.labels, keep))
    subset = ImageSet(
        np.asarray(ims.images)[rows],
        relabel[ims.labels[rows]],
        [ims.class_names[k] for k in keep],
        ims.source,
    )
    identity_parts = [composite.identity_parts[k] for k in keep]
    return CompositeSet(subset, composite.parts[rows], identity_parts, composite.samples_per_slot)


def write_identity_folders(composite: CompositeSet, out: Path, heldout: Sequence[str], meta: dict) -> None:
    """`out/<identity>/<NNNN>.png` (lossless 8-bit gray) plus `heldout.txt` (comma-separated) and
    `composite.json` (recipe, held-out list, base sample indices of every image)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: not empty; choose another --out or delete it")
    image_set = composite.image_set
    counters = dict.fromkeys(range(len(image_set.class_names)), 0)
    files: list[str] = []
    for image, label in zip(image_set.images, image_set.labels, strict=True):
        name = image_set.class_names[int(label)]
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        rel = f"{name}/{counters[int(label)]:04d}.png"
        counters[int(label)] += 1
        Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L").save(out / rel)
        files.append(rel)
    (out / HELDOUT_FILE).write_text(",".join(heldout) + "\n", encoding="utf-8")
    provenance = {
        **meta,
        "identities": len(image_set.class_names),
        "images": len(image_set.labels),
        "image_shape": list(np.asarray(image_set.images[0]).shape),
        "samples_per_slot": composite.samples_per_slot,
        "heldout": list(heldout),
        "files": {f: composite.parts[i].tolist() for i, f in enumerate(files)},
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.data.composite",
        description="Write a composite many-identity dataset (identity 'ab' = digit a beside digit b) as an "
        "identity-folder tree, with a balanced held-out list in heldout.txt.",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to create (must be absent or empty)")
    parser.add_argument("--base", default="digits", help="'digits' (bundled sklearn 8x8) or an IDX folder")
    parser.add_argument("--parts", type=int, default=2, help="base samples per image (identities: C^parts)")
    parser.add_argument("--per-identity", type=int, default=64, help="images per identity")
    parser.add_argument(
        "--heldout-residues", type=int, default=3, help="held out: class sum mod C in N residues"
    )
    parser.add_argument(
        "--train-identities",
        type=int,
        default=None,
        help="keep this many (seeded) non-held-out identities [all]; held-out images stay the same",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of samples, images and held-out set")
    args = parser.parse_args(argv)
    try:
        if args.base == "digits":
            base = load_digits_set()
        elif is_idx_source(Path(args.base)):
            base = load_idx_set(Path(args.base))
        else:
            raise DataError(f"--base {args.base}: not 'digits' or an IDX folder/prefix")
        composite = build_composite_set(
            base, parts=args.parts, per_identity=args.per_identity, seed=args.seed
        )
        heldout = balanced_heldout(
            composite.identity_parts,
            composite.image_set.class_names,
            len(base.class_names),
            residues=args.heldout_residues,
            seed=args.seed,
        )
        if args.train_identities is not None:
            others = [n for n in composite.image_set.class_names if n not in set(heldout)]
            if not 2 <= args.train_identities <= len(others):
                raise DataError(
                    f"--train-identities must be in 2..{len(others)}, got {args.train_identities}"
                )
            rng = np.random.default_rng(args.seed)
            kept = rng.choice(len(others), size=args.train_identities, replace=False)
            composite = keep_identities(composite, [*heldout, *(others[i] for i in kept)])
        meta = {
            "base": args.base,
            "parts": args.parts,
            "per_identity": args.per_identity,
            "heldout_residues": args.heldout_residues,
            "train_identities": args.train_identities,
            "seed": args.seed,
        }
        write_identity_folders(composite, args.out, heldout, meta)
    except DataError as exc:
        parser.exit(2, f"error: {exc}\n")
    ident = composite.image_set
    print(
        f"wrote {args.out}: {len(ident.class_names)} identities x {args.per_identity} images "
        f"{np.asarray(ident.images[0]).shape}, {composite.samples_per_slot} private samples per slot; "
        f"held out ({len(heldout)}): {','.join(heldout)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
