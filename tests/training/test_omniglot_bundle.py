"""The committed models/omniglot bundle: loads anywhere, ships no Omniglot image, re-measures from its ONNX
model where the data is present (../shared/data/omniglot; skipped on a fresh clone)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("tensorflow")

from bundle import load_bundle
from training.workflows.check_bundle import check_bundle

ROOT = Path(__file__).resolve().parents[2]
OMNIGLOT = ROOT / "models" / "omniglot"
DATA = ROOT.parent / "shared" / "data" / "omniglot"


def test_omniglot_bundle_loads_is_small_and_ships_no_image_of_the_data():
    bundle = load_bundle(OMNIGLOT)
    files = [p for p in OMNIGLOT.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 5_000_000
    # Omniglot's licence terms here: models trained on it are fine, its images are never committed.
    assert not [p for p in files if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"}]
    m = bundle.manifest
    assert m.training.options["heldout_groups"] == "Korean,Tagalog"
    assert all(not c.startswith(("Korean/", "Tagalog/")) for c in m.training.train_classes)
    assert m.thresholds.out_of_sample is not None and m.thresholds.calibration_identities >= 2


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} absent (Omniglot is not part of a fresh clone)")
def test_omniglot_manifest_numbers_are_reproduced_by_its_onnx_model(monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe names the data relative to the repository root
    check = check_bundle(OMNIGLOT)
    assert check.ok, [row for row in check.rows if abs(row[1] - row[2]) > check.tolerance]
    assert {"eer", "test_default.far", "test_default.tar"} <= {key for key, _, _ in check.rows}
