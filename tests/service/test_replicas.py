"""Two service replicas sharing a PostgreSQL store: an identity enrolled or deleted through one is searched
(or no longer found) through the other, via the store's change feed. Skipped without a local PostgreSQL."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import httpx
import pytest

from testkit.service_helpers import API_KEY, TinyBundle

pytest.importorskip("psycopg", reason="replica tests need the pg extra: pip install '.[pg]'")

from service.app import create_app

pytestmark = pytest.mark.slow
AUTH = {"X-API-Key": API_KEY}


async def _names_seen(client: httpx.AsyncClient, embedding: list[float]) -> set[str]:
    r = await client.post("/v1/identify", json={"embeddings": [embedding], "top_k": 20})
    return {m["identity"] for m in r.json()["results"][0]["matches"] if m["source"] == "enrolled"}


async def _eventually(check, timeout_s: float = 10.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.05)
    return False


def test_enrollment_on_one_replica_is_searchable_on_the_other(
    make_settings, pg_url: str, tiny: TinyBundle
) -> None:
    settings = make_settings(store_url=pg_url)
    embedding = tiny.reference([5])[0].tolist()

    async def run() -> None:
        async with AsyncExitStack() as stack:
            clients = []
            for _ in range(2):
                app = create_app(settings)
                await stack.enter_async_context(app.router.lifespan_context(app))
                transport = httpx.ASGITransport(app=app)
                clients.append(
                    await stack.enter_async_context(
                        httpx.AsyncClient(transport=transport, base_url="http://t")
                    )
                )
            a, b = clients
            r = await a.post(
                "/v1/identities", json={"name": "shared", "embeddings": [embedding]}, headers=AUTH
            )
            assert r.status_code == 201, r.text

            async def b_sees() -> bool:
                return "shared" in await _names_seen(b, embedding)

            assert await _eventually(b_sees), "replica B never saw the identity enrolled on A"
            assert (await a.delete("/v1/identities/shared", headers=AUTH)).status_code == 204

            async def b_forgot() -> bool:
                return "shared" not in await _names_seen(b, embedding)

            assert await _eventually(b_forgot), "replica B still finds an identity deleted on A"

    asyncio.run(run())
