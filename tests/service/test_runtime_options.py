"""Runtime wiring of settings that change search and inference behaviour but not results."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from service_testkit import TinyBundle

from bundle.files import load_bundle
from service.app import create_app
from service.core.config import Settings
from service.gallery.ann import AutoIndex, HnswIndex
from service.gallery.index import ExactIndex
from service.model import EmbeddingModel, RuntimeOptions


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
        # The retry line is each identify call's threshold (test_identify_sources.py), not one frozen here.
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
