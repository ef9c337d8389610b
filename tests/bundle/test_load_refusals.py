"""`bundle.load_bundle` refuses any corrupt, tampered or inconsistent bundle, naming the file and the problem.

The bundle here is real (an ONNX graph built with onnx.helper, written by `write_bundle`) but needs no
TensorFlow, so these checks run in the serve-only environment too.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bundle import BundleError, BundleManifest, load_bundle, write_bundle  # noqa: E402

DIM, K = 4, 3


def _onnx_bytes() -> bytes:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["embedding"]),
        ],
        "refusals",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 8, 8, 1])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", DIM])],
        [numpy_helper.from_array(rng.normal(size=(64, DIM)).astype(np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


MANIFEST = {
    "name": "refusals",
    "version": "1",
    "created_at": "2026-01-01T00:00:00+00:00",
    "input": {"height": 8, "width": 8, "channels": 1},
    "preprocessing": {"color_mode": "L"},
    "embedding": {"dim": DIM},
    "num_classes": K,
    "thresholds": {
        "default": 0.6,
        "target_far": 1e-3,
        "at_target_far": {"threshold": 0.6, "far": 1e-3, "tar": 0.8},
        "eer": {"threshold": 0.4, "far": 0.05, "tar": 0.95},
        "num_genuine_pairs": 100,
        "num_impostor_pairs": 1000,
    },
    "training": {
        "backbone": "lenetpp",
        "center_update": "paper",
        "center_lambda": 0.1,
        "center_alpha": 0.5,
        "epochs": 1,
        "batch_size": 32,
        "seed": 0,
        "dataset": "digits",
        "train_classes": ["0", "1", "2"],
        "heldout_classes": ["7", "8", "9"],
        "val_fraction": 0.1,
    },
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bundle") / "b"
    write_bundle(
        path,
        manifest=MANIFEST,
        model_bytes=_onnx_bytes(),
        centers=np.arange(1, K * DIM + 1, dtype=np.float32).reshape(K, DIM),
        labels=["0", "1", "2"],
    )
    return path


@pytest.fixture
def bundle_dir(pristine, tmp_path) -> Path:
    """A fresh copy per test, so each one tampers with its own files."""
    return Path(shutil.copytree(pristine, tmp_path / "b"))


def _rewrite_manifest(directory: Path, edit) -> None:
    path = directory / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def _replace_and_rehash(directory: Path, name: str, data: bytes) -> None:
    """Swap a file AND fix its digest, so only the content problem (not the checksum) remains."""
    (directory / name).write_bytes(data)

    def edit(raw):
        raw["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    _rewrite_manifest(directory, edit)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _refusal(directory: Path) -> BundleError:
    with pytest.raises(BundleError) as info:
        load_bundle(directory)
    return info.value


def test_untouched_bundle_loads_and_its_manifest_validates(bundle_dir):
    bundle = load_bundle(bundle_dir)
    assert isinstance(bundle.manifest, BundleManifest)
    assert bundle.centers.shape == (K, DIM)
    np.testing.assert_allclose(np.linalg.norm(bundle.centers, axis=1), 1.0, atol=1e-6)
    BundleManifest.model_validate_json((bundle_dir / "manifest.json").read_text())


@pytest.mark.parametrize("name", ["model.onnx", "centers.npy", "labels.json"])
def test_one_changed_byte_is_refused_as_a_checksum_mismatch(bundle_dir, name):
    path = bundle_dir / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    err = _refusal(bundle_dir)
    assert err.path == path
    assert "sha256 mismatch" in str(err) and name in str(err)


def test_truncated_file_is_refused_naming_its_size(bundle_dir):
    path = bundle_dir / "model.onnx"
    path.write_bytes(path.read_bytes()[:-10])
    err = _refusal(bundle_dir)
    assert err.path == path and "truncated" in err.problem


def test_missing_file_is_refused(bundle_dir):
    (bundle_dir / "labels.json").unlink()
    err = _refusal(bundle_dir)
    assert err.path == bundle_dir / "labels.json" and err.problem == "missing"


def test_centers_of_wrong_shape_are_refused_even_with_a_matching_checksum(bundle_dir):
    wrong = np.eye(K, DIM + 1, dtype=np.float32)  # unit rows, right dtype: only the shape is wrong
    _replace_and_rehash(bundle_dir, "centers.npy", _npy(wrong))
    err = _refusal(bundle_dir)
    assert err.path == bundle_dir / "centers.npy"
    assert f"shape ({K}, {DIM + 1}), expected ({K}, {DIM})" in err.problem


def test_unnormalised_centers_are_refused(bundle_dir):
    _replace_and_rehash(bundle_dir, "centers.npy", _npy(np.full((K, DIM), 2.0, np.float32)))
    err = _refusal(bundle_dir)
    assert err.path.name == "centers.npy" and "L2-normalised" in err.problem


def test_centers_of_wrong_dtype_are_refused(bundle_dir):
    _replace_and_rehash(bundle_dir, "centers.npy", _npy(np.eye(K, DIM, dtype=np.float64)))
    err = _refusal(bundle_dir)
    assert err.path.name == "centers.npy" and "float64" in err.problem


def test_label_count_disagreeing_with_manifest_is_refused(bundle_dir):
    _replace_and_rehash(bundle_dir, "labels.json", json.dumps(["0", "1"]).encode())
    err = _refusal(bundle_dir)
    assert err.path.name == "labels.json" and "2 labels" in err.problem


def test_duplicate_labels_are_refused(bundle_dir):
    _replace_and_rehash(bundle_dir, "labels.json", json.dumps(["0", "1", "1"]).encode())
    err = _refusal(bundle_dir)
    assert err.path.name == "labels.json" and "unique" in err.problem


@pytest.mark.parametrize("field", ["thresholds", "training", "embedding", "input", "files"])
def test_manifest_missing_a_field_is_refused_naming_the_field(bundle_dir, field):
    _rewrite_manifest(bundle_dir, lambda raw: raw.pop(field))
    err = _refusal(bundle_dir)
    assert err.path == bundle_dir / "manifest.json"
    assert field in err.problem and "Field required" in err.problem


def test_manifest_missing_a_nested_field_names_its_path(bundle_dir):
    _rewrite_manifest(bundle_dir, lambda raw: raw["thresholds"]["eer"].pop("tar"))
    err = _refusal(bundle_dir)
    assert "thresholds.eer.tar" in err.problem


def test_manifest_without_a_file_digest_is_refused(bundle_dir):
    _rewrite_manifest(bundle_dir, lambda raw: raw["files"].pop("centers.npy"))
    err = _refusal(bundle_dir)
    assert err.path.name == "manifest.json" and "centers.npy" in err.problem


def test_manifest_with_an_unknown_field_is_refused(bundle_dir):
    _rewrite_manifest(bundle_dir, lambda raw: raw.update(treshold=0.5))
    err = _refusal(bundle_dir)
    assert "treshold" in err.problem


def test_manifest_that_is_not_json_is_refused(bundle_dir):
    (bundle_dir / "manifest.json").write_text("{not json")
    err = _refusal(bundle_dir)
    assert err.path.name == "manifest.json" and "not valid JSON" in err.problem


def test_missing_folder_is_refused(tmp_path):
    err = _refusal(tmp_path / "nowhere")
    assert "does not exist" in err.problem


def test_written_bundle_folder_is_readable_by_other_users(pristine):
    # write_bundle stages in a mkdtemp folder (0700); the served bundle must be readable by a service user.
    assert pristine.stat().st_mode & 0o755 == 0o755
