"""The README quick start on the committed default bundle: every decision made by the bundle's own threshold.

Enroll a test identity of the bundle's split from two of its sample images, identify its third image and
every image of the two other sample identities (strangers), verify a genuine and an impostor pair; no request
passes a threshold. A bundle whose calibrated threshold rejects genuine pairs (as the previous default did:
TAR 0.014) fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.core.config import Settings

DEFAULT = Path(__file__).resolve().parents[2] / "models" / "default"
KEY = {"X-API-Key": "change-me-please"}
pytestmark = pytest.mark.asyncio


@pytest.fixture
def samples() -> dict[str, list[bytes]]:
    index = json.loads((DEFAULT / "samples" / "samples.json").read_text())["identities"]
    return {name: [(DEFAULT / "samples" / f).read_bytes() for f in files] for name, files in index.items()}


async def test_quick_start_enrolls_identifies_rejects_and_verifies_at_the_bundles_threshold(
    tmp_path: Path, samples: dict[str, list[bytes]]
) -> None:
    settings = Settings(
        _env_file=None,
        bundle_path=DEFAULT,
        store_url=f"sqlite:///{tmp_path / 'ids.sqlite3'}",
        api_keys=["change-me-please"],
        log_level="WARNING",
    )
    manifest = json.loads((DEFAULT / "manifest.json").read_text())
    threshold = manifest["thresholds"]["default"]
    (enrolled, images), *strangers = samples.items()
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", headers=KEY) as c,
    ):
        files = [("images", ("a.png", images[0])), ("images", ("b.png", images[1]))]
        r = await c.post("/v1/identities", data={"name": enrolled}, files=files)
        assert r.status_code == 201, r.text

        async def identify(image: bytes) -> dict:
            r = await c.post("/v1/identify", files=[("images", ("q.png", image))])
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["threshold"] == threshold and body["sources"] == "enrolled"
            return body["results"][0]

        assert (await identify(images[2]))["identity"] == enrolled
        for _, stranger_images in strangers:
            for image in stranger_images:
                result = await identify(image)
                assert result["unknown"] and result["identity"] is None

        async def verify(a: bytes, b: bytes) -> dict:
            r = await c.post("/v1/verify", files=[("image_a", ("a.png", a)), ("image_b", ("b.png", b))])
            assert r.status_code == 200, r.text
            assert r.json()["threshold"] == threshold
            return r.json()

        _, genuine = strangers[-1]
        assert (await verify(genuine[0], genuine[1]))["same"] is True
        assert (await verify(genuine[0], strangers[0][1][0]))["same"] is False
