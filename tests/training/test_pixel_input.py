"""uint8 pixels normalised inside the graph: one normalisation definition in numpy, the training graph and the
exported ONNX subgraph; bundles with the subgraph serve like bundles without; streamed images that do not
decode are named."""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
from pathlib import Path

import httpx
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from bench.face_bundle import build_face_bundle
from bundle import BundleError, BundleManifest, load_bundle
from bundle.manifest import InputSpec, Preprocessing
from bundle.preprocess import normalize_pixels, preprocess_pil
from service.model import EmbeddingModel
from service.preprocess import ImagePreprocessor
from training.config import RunConfig
from training.data import build_splits
from training.data.recordio import write_insightface_rec
from training.data.sources import DataError
from training.data.tfrecord import write_shards
from training.export import add_preprocessing, onnx_embed, strip_preprocessing
from training.model import PixelNormalization

SIZE = 16
PREPS = {
    "L": (Preprocessing(color_mode="L", mean=[0.5], std=[0.5]), 1, "NHWC"),
    "RGB": (Preprocessing(color_mode="RGB", mean=[0.5], std=[0.5]), 3, "NHWC"),
    # insightface's convention, and an OpenCV-style BGR model with per-channel statistics
    "RGB-arcface-NCHW": (Preprocessing(color_mode="RGB", scale=1.0, mean=[127.5], std=[127.5]), 3, "NCHW"),
    "BGR-NCHW": (
        Preprocessing(
            color_mode="RGB", channel_order="BGR", mean=[0.406, 0.456, 0.485], std=[0.225, 0.224, 0.229]
        ),
        3,
        "NCHW",
    ),
}


def _spec(channels: int, layout: str = "NHWC") -> InputSpec:
    return InputSpec(height=SIZE, width=SIZE, channels=channels, layout=layout)


def _pixels(n: int, channels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, SIZE, SIZE, channels), dtype=np.uint8)


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


# --- one definition of the normalisation ----------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(PREPS))
def test_numpy_training_graph_and_onnx_subgraph_normalise_identically(case):
    prep, channels, layout = PREPS[case]
    spec = _spec(channels, layout)
    pixels = _pixels(4, channels)
    # numpy, one image at a time through Pillow, as the service does without the subgraph
    per_image = np.stack(
        [preprocess_pil(Image.fromarray(p[:, :, 0] if channels == 1 else p), prep, spec) for p in pixels]
    )
    batch = normalize_pixels(pixels, prep, spec)
    np.testing.assert_array_equal(batch, per_image)
    # the training graph (streamed uint8 batches)
    in_graph = PixelNormalization(prep, spec)(tf.constant(pixels)).numpy()
    np.testing.assert_array_equal(in_graph, batch)
    # the ONNX subgraph, on an identity body: its output is the normalised input itself
    from onnx import TensorProto, helper

    shape = ["N", *spec.shape(None)[1:]]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["embedding"])],
        "identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with_subgraph = add_preprocessing(model.SerializeToString(), spec, prep)
    np.testing.assert_array_equal(onnx_embed(with_subgraph, pixels), batch)
    # the float body is recovered for already-normalised inputs (check-bundle feeds training's arrays)
    assert strip_preprocessing(with_subgraph) != with_subgraph
    np.testing.assert_array_equal(onnx_embed(with_subgraph, batch), batch)


def test_uint8_input_needs_schema_4_and_nhwc():
    spec = InputSpec(height=SIZE, width=SIZE, channels=3, dtype="uint8")
    assert spec.takes_pixels
    with pytest.raises(ValueError, match="layout NHWC"):
        InputSpec(height=SIZE, width=SIZE, channels=3, dtype="uint8", layout="NCHW")
    manifest = json.loads((Path(__file__).parents[2] / "models/default/manifest.json").read_text())
    assert manifest["schema_version"] == 3
    del manifest["input"]["dtype"]  # older writers may leave it out: it defaults to float32
    assert BundleManifest.model_validate(manifest).input.dtype == "float32"  # an old manifest still loads
    manifest["input"]["dtype"] = "uint8"
    with pytest.raises(ValueError, match="schema_version 4"):
        BundleManifest.model_validate(manifest)
    BundleManifest.model_validate({**manifest, "schema_version": 4})


# --- bundles with and without the subgraph --------------------------------------------------------------


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixel-bundles")
    for name, embed in (("float", False), ("pixels", True)):
        build_face_bundle(
            root / name, size=32, color_mode="RGB", feature_dim=16, width=8, embed_preprocessing=embed
        )
    return root


def _images(n: int = 6) -> list[bytes]:
    rng = np.random.default_rng(1)
    out = []
    for k in range(n):
        # other sizes than the model's 32x32: the resize runs on the service side in both variants
        a = rng.integers(0, 256, size=(40 + k, 36, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG" if k % 2 else "JPEG")
        out.append(buf.getvalue())
    return out


def test_bundle_with_the_subgraph_embeds_as_the_one_without(bundles):
    float_model = EmbeddingModel.load(bundles / "float")
    pixel_model = EmbeddingModel.load(bundles / "pixels")
    m = pixel_model.manifest
    assert m.schema_version == 4 and m.input.dtype == "uint8" and m.input.layout == "NHWC"
    assert float_model.manifest.input.dtype == "float32"
    assert m.evaluation["export_pixel_parity_max_abs_diff"] <= 1e-5
    images = _images()
    x_float = ImagePreprocessor(
        float_model.manifest.preprocessing, float_model.manifest.input, max_pixels=10**6
    )(images)
    x_pixels = ImagePreprocessor(m.preprocessing, m.input, max_pixels=10**6)(images)
    assert x_float.dtype == np.float32 and x_pixels.dtype == np.uint8 and x_pixels.shape == (6, 32, 32, 3)
    np.testing.assert_allclose(pixel_model.run(x_pixels), float_model.run(x_float), atol=1e-5)


def test_manifest_declaring_pixels_over_a_float_graph_is_refused_naming_the_file(bundles, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(bundles / "float", bad)
    raw = json.loads((bad / "manifest.json").read_text())
    raw["input"]["dtype"] = "uint8"
    (bad / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=r"model\.onnx.*tensor\(float\).*uint8 pixels") as info:
        EmbeddingModel(load_bundle(bad))
    assert str(bad / "model.onnx") in str(info.value)


@pytest.mark.asyncio
async def test_service_serves_both_kinds_of_bundle(bundles, tmp_path):
    from service.app import create_app
    from service.core.config import Settings

    images = [base64.b64encode(b).decode() for b in _images()]
    got = {}
    for name in ("float", "pixels"):
        settings = Settings(
            _env_file=None,
            bundle_path=bundles / name,
            store_url=f"sqlite:///{tmp_path / f'{name}.sqlite3'}",
            api_keys=["test-key-0123456789"],
            log_level="WARNING",
            require_key_for_reads=False,
        )
        app = create_app(settings)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
        ):
            r = await client.post("/v1/embed", json={"images": images})
            assert r.status_code == 200, r.text
            got[name] = np.array(r.json()["embeddings"])
            model = "bench-facecnn-32"
            meta = (await client.get(f"/v2/models/{model}")).json()
            tensor = {"name": "input", "shape": [1, 32, 32, 3], "datatype": "FP32", "data": [0.0] * 3072}
            r = await client.post(f"/v2/models/{model}/infer", json={"inputs": [tensor]})
            if name == "pixels":
                # no float input tensor exists to feed: v2 offers (and takes) encoded images only
                assert [i["name"] for i in meta["inputs"]] == ["images"]
                assert r.status_code == 400 and "uint8 pixels" in r.text, r.text
            else:
                assert [i["name"] for i in meta["inputs"]] == ["images", "input"]
                assert r.status_code == 200, r.text
    np.testing.assert_allclose(got["pixels"], got["float"], atol=1e-5)


# --- a streamed image that does not decode is named ------------------------------------------------------

IDS, PER = 4, 6


def _identity_images() -> list[list[bytes]]:
    rng = np.random.default_rng(0)
    return [
        [_jpeg(_pixels(1, 3, seed=int(rng.integers(1 << 30)))[0]) for _ in range(PER)] for _ in range(IDS)
    ]


def _config(dataset: str, streaming: bool = False) -> RunConfig:
    return RunConfig(
        dataset=dataset,
        streaming=streaming,
        image_size=SIZE,
        color_mode="RGB",
        backbone="lenetpp",
        heldout_count=1,
        val_fraction=0.0,
        batch_size=4,
        epochs=1,
        seed=0,
        feature_dim=2,
    )


def _corrupt_training_image(kind: str, root: Path, splits) -> str:
    """Break one streamed training image (none is in memory) in place; returns what must be named."""
    stream = splits.train_stream
    idx = int(stream.indices[len(stream.indices) // 2])
    garbage = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2  # a JPEG start, then nothing a decoder accepts
    if kind == "folder":
        path = root / stream.listing.locators[idx].decode()
        path.write_bytes(garbage)
        return str(path)
    if kind == "rec":
        rec = stream.listing.source
        offset = int(stream.listing.locators[idx])
        data = bytearray(rec.read_bytes())
        # magic, length word, IRHeader (24 bytes), then the image: overwrite it with same-length garbage,
        # so the framing and label stay valid and only the decoder can tell
        (length,) = struct.unpack_from("<I", data, offset + 4)
        start, end = offset + 8 + 24, offset + 8 + (length & ((1 << 29) - 1))
        data[start:end] = (garbage * (1 + (end - start) // len(garbage)))[: end - start]
        rec.write_bytes(bytes(data))
        return f"{rec}: offset {offset}"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["folder", "rec", "tfrecord"])
def test_undecodable_streamed_image_stops_training_naming_it(kind, tmp_path, monkeypatch):
    from training import trainer
    from training.data import streaming

    # No training image is decoded into memory ahead of the stream (the PCA sample), so only the stream
    # meets the broken one.
    monkeypatch.setattr(streaming, "TRAIN_SAMPLE_IMAGES", 0)
    images = _identity_images()
    if kind == "folder":
        root = tmp_path / "faces"
        for k, ident in enumerate(images):
            (root / f"id{k}").mkdir(parents=True)
            for j, data in enumerate(ident):
                (root / f"id{k}" / f"{j}.jpg").write_bytes(data)
        dataset = str(root)
    elif kind == "rec":
        write_insightface_rec(tmp_path / "train.rec", images)
        dataset = str(tmp_path / "train.rec")
    else:
        # the broken image is written into the shard (TFRecord's CRC forbids editing one afterwards)
        broken = (1, 3)  # identity 1, image 3
        items = [
            (b"\xff\xd8\xff\xe0" + bytes(range(200)) if (k, j) == broken else data, k)
            for k, ident in enumerate(images)
            for j, data in enumerate(ident)
        ]
        write_shards(
            tmp_path / "shards",
            iter(items),
            num_images=len(items),
            class_names=[f"id{k}" for k in range(IDS)],
            shard_size=10,
        )
        dataset = str(tmp_path / "shards")
    config = _config(dataset, streaming=kind == "folder")
    if kind == "tfrecord":
        config = config.model_copy(update={"heldout_classes": ["id0"], "heldout_count": None})
    splits = build_splits(config)
    if kind == "tfrecord":
        # image/index 9 = identity 1, image 3: the last record of the first 10-record shard
        where = "shard-00000-of-00003.tfrecord"
        expected = "record 9 (image/index 9)"
    else:
        expected = _corrupt_training_image(kind, Path(dataset), splits)
        where = expected
    with pytest.raises(DataError) as info:
        trainer.train(config, tmp_path / "run", splits=splits, verbose=0)
    message = str(info.value)
    assert where in message and expected in message and "cannot be decoded" in message


def test_undecodable_streamed_image_fails_the_cli_with_exit_2_naming_it(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from training.cli import app
    from training.data import streaming

    monkeypatch.setattr(streaming, "TRAIN_SAMPLE_IMAGES", 0)
    root = tmp_path / "faces"
    for k, ident in enumerate(_identity_images()):
        (root / f"id{k}").mkdir(parents=True)
        for j, data in enumerate(ident):
            (root / f"id{k}" / f"{j}.jpg").write_bytes(data)
    config = _config(str(root), streaming=True)
    bad = _corrupt_training_image("folder", root, build_splits(config))
    args = ["train", "--dataset", str(root), "--streaming", "--out", str(tmp_path / "run")]
    args += ["--image-size", str(SIZE), "--color-mode", "RGB", "--backbone", "lenetpp", "--feature-dim", "2"]
    args += ["--heldout-count", "1", "--val-fraction", "0", "--batch-size", "4", "--epochs", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert bad in result.output.replace("\n", "") and "cannot be decoded" in result.output


@pytest.mark.slow
def test_export_embed_preprocessing_through_the_cli(tmp_path):
    """A trained run exported both ways: the pixel bundle re-measures as its manifest says (check-bundle)
    and embeds as the float bundle does."""
    from typer.testing import CliRunner

    from training.cli import app
    from training.trainer import train

    config = RunConfig(
        dataset="digits",
        heldout_classes=["6", "7", "8", "9"],
        feature_dim=4,
        width=2,
        epochs=1,
        center_lambda=0.1,
    )
    run = train(config, tmp_path / "run", verbose=0)
    runner = CliRunner()
    quick = ["--trials", "2", "--max-genuine", "2000", "--max-impostor", "5000"]
    for name, extra in (("float", []), ("pixels", ["--embed-preprocessing"])):
        result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / name), *quick, *extra])
        assert result.exit_code == 0, result.output
    assert load_bundle(tmp_path / "pixels").manifest.input.dtype == "uint8"
    result = runner.invoke(app, ["check-bundle", str(tmp_path / "pixels")])
    assert result.exit_code == 0, result.output
    rng = np.random.default_rng(0)
    images = []
    for _ in range(5):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(8, 8), dtype=np.uint8)).save(buf, format="PNG")
        images.append(buf.getvalue())
    out = {}
    for name in ("float", "pixels"):
        model = EmbeddingModel.load(tmp_path / name)
        m = model.manifest
        out[name] = model.run(ImagePreprocessor(m.preprocessing, m.input, max_pixels=10**6)(images))
    np.testing.assert_allclose(out["pixels"], out["float"], atol=1e-5)


def test_image_off_the_input_size_on_the_jpeg_fast_path_is_named(tmp_path):
    from training import trainer

    root = tmp_path / "faces"
    for k, ident in enumerate(_identity_images()):
        (root / f"id{k}").mkdir(parents=True)
        for j, data in enumerate(ident):
            (root / f"id{k}" / f"{j}.jpg").write_bytes(data)
    config = _config(str(root), streaming=True)
    splits = build_splits(config)
    stream = splits.train_stream
    assert stream.jpeg_at_size  # every probed image is a 16x16 JPEG: one decode, no resize branch
    # A file replaced after the listing by a JPEG of another size: the fast path cannot take it.
    victim = root / stream.listing.locators[int(stream.indices[-1])].decode()
    victim.write_bytes(_jpeg(np.zeros((SIZE + 4, SIZE, 3), np.uint8)))
    with pytest.raises(DataError, match=rf"{victim}: cannot be decoded as a {SIZE}x{SIZE} image"):
        trainer.train(config, tmp_path / "run", splits=splits, verbose=0)


def test_subgraph_refuses_graphs_it_cannot_rewire():
    from onnx import TensorProto, helper

    from training.export import ExportError

    spec, prep = _spec(1), PREPS["L"][0]
    shape = ["N", SIZE, SIZE, 1]

    def model(nodes, inputs, outputs):
        graph = helper.make_graph(nodes, "g", inputs, outputs)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m.SerializeToString()

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, shape)
    pixels = helper.make_tensor_value_info("input", TensorProto.UINT8, shape)
    identity = helper.make_node("Identity", ["input"], ["embedding"])
    with pytest.raises(ExportError, match="one float32 input"):
        add_preprocessing(model([identity], [pixels], [y]), spec, prep)
    once = add_preprocessing(model([identity], [x], [y]), spec, prep)
    with pytest.raises(ExportError, match="one float32 input"):  # already a pixel graph
        add_preprocessing(once, spec, prep)
    # a body that reads the input by name from inside an If: not rewired, refused
    branch = helper.make_graph([helper.make_node("Identity", ["input"], ["embedding"])], "b", [], [y])
    true = helper.make_tensor("cv", TensorProto.BOOL, [], [True])
    cond = helper.make_node("Constant", [], ["c"], value=true)
    flow = helper.make_node("If", ["c"], ["embedding"], then_branch=branch, else_branch=branch)
    with pytest.raises(ExportError, match="control-flow"):
        add_preprocessing(model([cond, flow], [x], [y]), spec, prep)


@pytest.mark.slow
def test_imported_nchw_bgr_model_with_the_subgraph_serves_as_without(tmp_path):
    """insightface's convention (NCHW, BGR, (x - 127.5) / 127.5) imported both ways: the pixel bundle's graph
    does the transpose, the channel swap and the normalisation; embeddings and check-bundle agree."""
    from typer.testing import CliRunner

    from testkit.onnx_graphs import conv_nchw
    from training.cli import app

    root = tmp_path / "faces"
    rng = np.random.default_rng(0)
    for k in range(8):
        (root / f"id{k}").mkdir(parents=True)
        base = rng.integers(0, 256, size=(16, 16, 3))
        for j in range(6):
            noisy = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(root / f"id{k}" / f"{j}.png")
    model = tmp_path / "conv.onnx"
    model.write_bytes(conv_nchw(size=16, channels=3))
    runner = CliRunner()
    args = ["--dataset", str(root), "--size", "16", "--layout", "NCHW", "--channel-order", "BGR"]
    args += ["--scale", "1", "--mean", "127.5", "--std", "127.5", "--heldout-fraction", "0.5"]
    for name, extra in (("float", []), ("pixels", ["--embed-preprocessing"])):
        result = runner.invoke(app, ["import", str(model), "--out", str(tmp_path / name), *args, *extra])
        assert result.exit_code == 0, result.output
    m = load_bundle(tmp_path / "pixels").manifest
    assert (m.input.dtype, m.input.layout, m.input.name) == ("uint8", "NHWC", "data")
    assert m.provenance is not None and any("preprocessing subgraph" in c for c in m.provenance.changes)
    assert m.evaluation["export_pixel_parity_max_abs_diff"] == 0.0
    assert m.thresholds == load_bundle(tmp_path / "float").manifest.thresholds
    result = runner.invoke(app, ["check-bundle", str(tmp_path / "pixels")])
    assert result.exit_code == 0, result.output
    files = [f.read_bytes() for f in sorted((root / "id0").glob("*.png"))]
    out = {}
    for name in ("float", "pixels"):
        served = EmbeddingModel.load(tmp_path / name)
        mm = served.manifest
        out[name] = served.run(ImagePreprocessor(mm.preprocessing, mm.input, max_pixels=10**6)(files))
    np.testing.assert_allclose(out["pixels"], out["float"], atol=1e-5)
