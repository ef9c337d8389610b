"""HTTP requests this process is serving right now, counted by the request middleware.

The batching engine reads it to tell a lone request (nothing else anywhere in the server) from the first of a
burst whose other requests are still being received or decoded: only the former should have every core, or
the event loop, to itself (service/engine.py). One counter per process: several apps in one process (tests)
share it, which can only make the engine treat a batch as not alone.
"""

from __future__ import annotations


class RequestsInFlight:
    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


IN_FLIGHT = RequestsInFlight()
