"""An image FILE gives the same embedding through training's path and through the service's path.

Training: identity folder -> `load_folder_set` -> `preprocess_images` -> Keras model.
Service:  file bytes -> `ImagePreprocessor` (decode + bundle preprocessing) -> onnxruntime (`EmbeddingModel`).
Both are compared L2-normalised (the space the service answers in) on images that need no resize, need a
resize, and need a colour conversion, so every preprocessing step is exercised on both sides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

keras = pytest.importorskip("keras")

from bundle.manifest import InputSpec, OperatingPoint, Preprocessing, Thresholds  # noqa: E402
from service.model import EmbeddingModel  # noqa: E402
from service.preprocess import ImagePreprocessor  # noqa: E402
from training.data.in_memory import preprocess_images  # noqa: E402
from training.data.sources import load_folder_set  # noqa: E402
from training.export import export_bundle  # noqa: E402

SPEC = InputSpec(height=8, width=8, channels=1)
# The same normalisation training uses (mean 0.5, std 0.5), so the test covers the non-trivial path.
PRE = Preprocessing(color_mode="L", mean=[0.5], std=[0.5])
TOLERANCE = 1e-4


def _model() -> keras.Model:
    keras.utils.set_random_seed(7)
    inputs = keras.Input((8, 8, 1), name="input")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(6, name="embedding")(x)
    return keras.Model(inputs, outputs)


def _write_identity_folders(root: Path) -> list[Path]:
    """Digit samples as files: native 8x8 gray PNG, 24x24 gray PNG (resized), 8x8 RGB PNG, and a BMP."""
    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    files = []
    for k, idx in enumerate((0, 1, 2, 3)):
        folder = root / f"id{k % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(pixels[idx])
        if k == 1:
            img = img.resize((24, 24), Image.Resampling.NEAREST)
        if k == 2:
            img = Image.merge("RGB", (img, img.point(lambda v: v // 2), img.point(lambda v: 255 - v)))
        path = folder / (f"{k}.bmp" if k == 3 else f"{k}.png")
        img.save(path)
        files.append(path)
    return files


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_image_file_embeds_identically_in_training_and_service(tmp_path):
    files = _write_identity_folders(tmp_path / "faces")
    model = _model()

    image_set = load_folder_set(tmp_path / "faces", color_mode="L")
    batch = preprocess_images(image_set.images, PRE, SPEC)
    training_embeddings = _unit(model.predict(batch, verbose=0))

    point = OperatingPoint(threshold=0.5, far=0.01, tar=0.5)
    export_bundle(
        tmp_path / "bundle",
        model=model,
        centers=np.eye(2, 6, dtype=np.float32),
        labels=["id0", "id1"],
        parity_batch=batch,
        input_spec=SPEC,
        preprocessing=PRE,
        thresholds=Thresholds(
            default=0.5,
            target_far=0.01,
            at_target_far=point,
            eer=point,
            num_genuine_pairs=1,
            num_impostor_pairs=1,
        ),
        recipe={
            "backbone": "tiny",
            "center_update": "paper",
            "center_lambda": 0.1,
            "center_alpha": 0.5,
            "epochs": 1,
            "batch_size": 4,
            "seed": 7,
            "dataset": str(tmp_path / "faces"),
            "train_classes": ["id0", "id1"],
            "heldout_classes": [],
            "val_fraction": 0.0,
        },
    )
    served = EmbeddingModel.load(tmp_path / "bundle")
    preprocess = ImagePreprocessor(served.manifest.preprocessing, served.manifest.input, max_pixels=10_000)
    # load_folder_set orders files by identity folder, then name: id0/0, id0/2, id1/1, id1/3.
    ordered = sorted(files, key=lambda p: (p.parent.name, p.name))
    service_embeddings = served.run(preprocess([p.read_bytes() for p in ordered]))

    assert service_embeddings.shape == training_embeddings.shape == (4, 6)
    np.testing.assert_allclose(service_embeddings, training_embeddings, atol=TOLERANCE, rtol=0)
