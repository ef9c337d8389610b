"""Sample images for a bundle's quick start: identities the model never saw, written beside the bundle.

`<bundle>/samples/` holds PNGs of a few TEST identities of the bundle's own split (held out of training and
of threshold calibration), so a demo that enrolls one of them, identifies it and rejects another shows what
the manifest's out-of-sample figures promise. `idembed-serve samples` copies them; it needs no training
dependency. Files are `<identity>_<k>.png` with `/` in identity names written as `__`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from training.data import load_dataset

SAMPLES_DIR = "samples"
SAMPLES_INDEX = "samples.json"


def write_samples(
    bundle_dir: Path,
    *,
    dataset: str,
    color_mode: str,
    test_identities: list[str],
    count: int = 3,
    per_identity: int = 3,
    seed: int = 0,
) -> Path:
    """Write `per_identity` images of `count` seeded test identities to `<bundle_dir>/samples/`."""
    if len(test_identities) < count:
        raise ValueError(f"{len(test_identities)} test identities, {count} asked for samples")
    image_set = load_dataset(dataset, color_mode)
    rng = np.random.default_rng([seed, 0x5A])
    chosen = sorted(rng.choice(sorted(test_identities), count, replace=False).tolist())
    out = Path(bundle_dir) / SAMPLES_DIR
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, list[str]] = {}
    for name in chosen:
        k = image_set.class_names.index(name)
        rows = rng.choice(np.flatnonzero(image_set.labels == k), per_identity, replace=False)
        files = []
        for j, row in enumerate(np.sort(rows)):
            file = f"{name.replace('/', '__')}_{j}.png"
            mode = "L" if color_mode == "L" else "RGB"
            Image.fromarray(np.asarray(image_set.images[row], dtype=np.uint8)).convert(mode).save(out / file)
            files.append(file)
        index[name] = files
    note = "test identities of this bundle's split: never trained on, not used to choose its thresholds"
    (out / SAMPLES_INDEX).write_text(json.dumps({"note": note, "identities": index}, indent=1) + "\n")
    return out
