"""Build a face-sized model bundle for speed benchmarks: a backbone exported by training/export.

    python bench/face_bundle.py [--size 112] [--out bench/results/bundles/facecnn-112-l]
    python bench/face_bundle.py --size 112 --color-mode RGB              # facecnn, ~1 M parameters
    python bench/face_bundle.py --backbone mobilefacenet                 # MobileFaceNet, 2.06 M, 112x112 RGB
    python bench/face_bundle.py --backbone iresnet50                     # IResNet-50, 43.6 M, 112x112 RGB

`--backbone` is `facecnn` (the project's small CNN) or one of training/face_backbones.py's arcface_torch
architectures (mobilefacenet, iresnet18/34/50/100: 112x112 RGB and 512-d unless told otherwise).

The weights are untrained (Keras' seeded initialisation, BatchNorm at its initial statistics, every PReLU
slope 0.25): inference cost depends only on the graph (layer shapes and operators), not on the weight values
(but for a PReLU whose slopes are all 0, exported as a ReLU; none is here), so this bundle times
the service exactly as a trained face model of the same architecture would. Its thresholds, centers and
evaluation are placeholders and it must not be used to embed real faces. The export is the production path
(tf2onnx, dynamic batch, Keras/onnxruntime parity check, manifest with checksums), so the service loads it
like any other bundle. The default output folder is git-ignored.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "bundles"


def build_face_bundle(
    out: Path,
    *,
    backbone: str = "facecnn",
    size: int = 112,
    color_mode: str = "L",
    feature_dim: int = 128,
    width: int = 32,
    num_classes: int = 10,
    seed: int = 0,
    embed_preprocessing: bool = False,
) -> Path:
    """Export an untrained `backbone` (size x size, gray or RGB) as a bundle in `out`; returns `out`.

    `embed_preprocessing`: the ONNX model takes uint8 pixels and normalises them itself (manifest
    `input.dtype` uint8), as `idembed-train export --embed-preprocessing` writes it."""
    import keras

    from bundle.manifest import InputSpec, OperatingPoint, Preprocessing, Thresholds
    from training.backbones import build_backbone
    from training.export import export_bundle
    from training.face_backbones import calibrate_batchnorm

    channels = 1 if color_mode == "L" else 3
    keras.utils.set_random_seed(seed)
    model = build_backbone(backbone, (size, size, channels), feature_dim, width=width)
    rng = np.random.default_rng(seed)
    parity = rng.uniform(-1.0, 1.0, size=(8, size, size, channels)).astype(np.float32)
    trained_slopes(model)
    if backbone != "facecnn":
        calibrate_batchnorm(model, rng.uniform(-1.0, 1.0, size=(32, size, size, channels)).astype(np.float32))
    placeholder = OperatingPoint(threshold=0.5, far=0.5, tar=0.5)
    export_bundle(
        out,
        model=model,
        centers=rng.normal(size=(num_classes, feature_dim)).astype(np.float32),
        labels=[f"id{k}" for k in range(num_classes)],
        parity_batch=parity,
        input_spec=InputSpec(height=size, width=size, channels=channels),
        preprocessing=Preprocessing(color_mode=color_mode, scale=1.0 / 255.0, mean=[0.5], std=[0.5]),
        thresholds=Thresholds(
            default=0.5,
            target_far=0.001,
            at_target_far=placeholder,
            eer=placeholder,
            num_genuine_pairs=1,
            num_impostor_pairs=1,
        ),
        recipe={
            "backbone": backbone,
            "center_update": "none",
            "center_lambda": 0.0,
            "center_alpha": 0.5,
            "epochs": 1,
            "batch_size": 1,
            "seed": seed,
            "dataset": "none (untrained weights, for speed benchmarks only)",
            "train_classes": [],
            "heldout_classes": [],
            "val_fraction": 0.0,
            "options": {
                "image_size": size,
                "color_mode": color_mode,
                "feature_dim": feature_dim,
                "width": width,
            },
        },
        evaluation={"note": "untrained speed-benchmark bundle: thresholds and centers are placeholders"},
        name=f"bench-{backbone}-{size}",
        version="untrained",
        embed_preprocessing=embed_preprocessing,
    )
    return out


def trained_slopes(model, slope: float = 0.25) -> None:
    """Every PReLU slope = `slope`. The facecnn backbones start theirs at Keras' 0, and the export writes a
    PReLU whose slopes are all 0 as a plain ReLU (training/graph_rewrite.py), which a trained model's are
    not: with non-zero slopes the bundle has the graph, and so the cost, of a trained one."""
    import keras

    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.PReLU):
            layer.alpha.assign(np.full(layer.alpha.shape, slope, np.float32))


def default_path(size: int, color_mode: str, backbone: str = "facecnn") -> Path:
    return DEFAULT_OUT / f"{backbone}-{size}-{color_mode.lower()}"


# Backbones the bundle can hold: the small CNN, and the arcface_torch architectures face models ship with.
BACKBONES = ("facecnn", "mobilefacenet", "iresnet18", "iresnet34", "iresnet50", "iresnet100")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=BACKBONES, default="facecnn")
    p.add_argument("--size", type=int, default=112, help="input height and width (e.g. 112 or 96)")
    p.add_argument(
        "--color-mode", choices=["L", "RGB"], default=None, help="default: L for facecnn, else RGB"
    )
    p.add_argument("--feature-dim", type=int, default=None, help="default: 128 for facecnn, else 512")
    p.add_argument("--width", type=int, default=32, help="facecnn base width (32: ~1 M parameters)")
    p.add_argument("--out", type=Path, default=None, help="bundle folder (default under bench/results/)")
    p.add_argument(
        "--embed-preprocessing",
        action="store_true",
        help="the model takes uint8 pixels and normalises them in its graph (default folder gets -u8)",
    )
    args = p.parse_args()
    small = args.backbone == "facecnn"
    color_mode = args.color_mode or ("L" if small else "RGB")
    feature_dim = args.feature_dim if args.feature_dim is not None else (128 if small else 512)
    if feature_dim < 1:
        p.error(f"--feature-dim must be >= 1, got {feature_dim}")
    if not small and (args.size < 16 or args.size % 16):
        p.error(f"--size: {args.backbone} needs a multiple of 16 (112 as arcface_torch), got {args.size}")
    out = args.out or default_path(args.size, color_mode, args.backbone)
    if args.embed_preprocessing and args.out is None:
        out = out.with_name(out.name + "-u8")
    build_face_bundle(
        out,
        backbone=args.backbone,
        size=args.size,
        color_mode=color_mode,
        feature_dim=feature_dim,
        width=args.width,
        embed_preprocessing=args.embed_preprocessing,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
