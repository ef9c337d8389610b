"""Runtime wiring of settings that change search and inference behaviour but not results."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bundle.files import load_bundle
from service.app import create_app
from service.core.config import Settings
from service.gallery.ann import AutoIndex, HnswIndex
from service.gallery.index import ExactIndex
from service.model import EmbeddingModel, RuntimeOptions
from testkit.service_helpers import TinyBundle


@pytest.mark.asyncio
@pytest.mark.parametrize(("kind", "cls"), [("exact", ExactIndex), ("hnsw", HnswIndex), ("auto", AutoIndex)])
async def test_gallery_index_kind_is_built_with_no_frozen_retry_line(
    make_settings: Callable[..., Settings], kind: str, cls: type
) -> None:
    app = create_app(make_settings(gallery_index=kind))
    async with app.router.lifespan_context(app):
        index = app.state.runtime.gallery.enrolled_index
        assert isinstance(index, cls)
        if kind == "exact":
            return
        # The retry line is each identify call's threshold (routes/test_identify_sources.py), not frozen here.
        hnsw = index if isinstance(index, HnswIndex) else index._hnsw
        assert hnsw.retry_below is None


def test_onnxruntime_threads_sleep_instead_of_spinning_by_default(tiny: TinyBundle) -> None:
    assert Settings(_env_file=None).ort_allow_spinning is False
    model = EmbeddingModel(load_bundle(tiny.path), RuntimeOptions(allow_spinning=False))
    options = model.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_onnxruntime_spinning_can_be_allowed(tiny: TinyBundle) -> None:
    model = EmbeddingModel(load_bundle(tiny.path), RuntimeOptions(allow_spinning=True))
    # Allowed = onnxruntime's own default: the entry is simply not set.
    with pytest.raises(RuntimeError, match="allow_spinning"):
        model.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")


@pytest.mark.asyncio
async def test_several_workers_get_a_lone_batch_session_on_every_core_with_the_same_embeddings(
    make_settings: Callable[..., Settings], tiny: TinyBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    import base64

    import httpx
    import numpy as np

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    app = create_app(make_settings(inference_workers=2))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        loaded = app.state.runtime.current
        lone = loaded.engine._lone_run.__self__
        assert lone is not loaded.model and lone.bundle is loaded.model.bundle  # verified once, two sessions
        assert lone.session.get_session_options().intra_op_num_threads == 0  # onnxruntime's all cores
        assert loaded.model.session.get_session_options().intra_op_num_threads == 1  # 2 cores / 2 workers
        # The lone session spins within a call and stops when it ends: no core burnt between requests.
        lone_options = lone.session.get_session_options()
        assert lone_options.get_session_config_entry("session.force_spinning_stop") == "1"
        main_options = loaded.model.session.get_session_options()
        assert main_options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        with pytest.raises(RuntimeError):  # not set: onnxruntime's default, spinning on
            lone_options.get_session_config_entry("session.intra_op.allow_spinning")
        r = await client.post("/v1/embed", json={"images": [base64.b64encode(tiny.png(3)).decode()]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()["embeddings"]), tiny.reference([3]), atol=1e-5)
    app = create_app(make_settings(inference_workers=2, lone_batch_session=False))
    async with app.router.lifespan_context(app):
        assert app.state.runtime.current.engine._lone_run is None
