"""Thread off-loading, in one place: what runs on the event loop and what goes to a worker thread.

Work that takes microseconds (decoding a few small images, an exact search over a few thousand vectors)
runs inline: a hop to a worker thread costs more than it. Work that can take milliseconds or block (a 12 MP
JPEG takes ~100 ms to decode, a store commit waits for fsync, loading a bundle, building an index) goes to a
thread, so it never stalls every other request on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from anyio import to_thread

T = TypeVar("T")

INLINE_DECODE_BYTES = 256 * 1024  # images up to this many bytes in all are decoded on the event loop
INLINE_SEARCH_ROWS = 20_000  # galleries up to this many enrolled identities are searched on the event loop


async def in_thread(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`call(*args, **kwargs)` in a worker thread."""
    return await to_thread.run_sync(partial(call, *args, **kwargs))


async def inline_unless(heavy: bool, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`call` on the event loop, or in a worker thread when `heavy`."""
    if heavy:
        return await in_thread(call, *args, **kwargs)
    return call(*args, **kwargs)
