"""bench/face_bundle.py --backbone: untrained face backbones exported as bundles the service loads.

The benchmark bundles go through the production export (tf2onnx, parity check, manifest), so a bundle that
this script writes must load in the service and embed like any other.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from testkit.server import REPO, service_env

pytest.importorskip("tensorflow", reason="building a bundle needs the train extra")
SCRIPT = REPO / "bench" / "face_bundle.py"


def build(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--out", str(out)],
        env=service_env({}),
        capture_output=True,
        text=True,
        timeout=600,
    )


def check_served(bundle: Path, backbone: str, side: int) -> None:
    from service.model import EmbeddingModel

    model = EmbeddingModel.load(bundle)
    recipe = json.loads((bundle / "manifest.json").read_text())["training"]
    assert recipe["backbone"] == backbone
    assert (model.manifest.input.height, model.manifest.input.channels, model.dim) == (side, 3, 512)
    x = np.random.default_rng(0).uniform(-1, 1, (4, side, side, 3)).astype(np.float32)
    out = model.run(x)
    assert out.shape == (4, 512) and np.all(np.isfinite(out))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-4)


@pytest.mark.slow
def test_mobilefacenet_bundle_is_rgb_512d_and_served(tmp_path: Path) -> None:
    done = build(tmp_path / "mbf", "--backbone", "mobilefacenet", "--size", "32")
    assert done.returncode == 0, done.stderr[-2000:]
    check_served(tmp_path / "mbf", "mobilefacenet", 32)


@pytest.mark.heavy
def test_deep_iresnet50_passes_the_export_parity_check_once_batchnorm_is_calibrated(tmp_path: Path) -> None:
    # At Keras' initial BatchNorm statistics an untrained IResNet-50 outputs ~1e22 and fails the parity check.
    done = build(tmp_path / "r50", "--backbone", "iresnet50", "--size", "32")
    assert done.returncode == 0, done.stderr[-2000:]
    check_served(tmp_path / "r50", "iresnet50", 32)


@pytest.mark.parametrize(
    ("args", "option"), [(["--feature-dim", "0"], "--feature-dim"), (["--size", "100"], "--size")]
)
def test_bad_options_are_refused_naming_the_option(tmp_path: Path, args: list[str], option: str) -> None:
    done = build(tmp_path / "x", "--backbone", "mobilefacenet", *args)
    assert done.returncode == 2 and option in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "x").exists()
