"""Failure kinds of the bundle contract, each naming the file at fault so an operator can act on it."""

from __future__ import annotations

from pathlib import Path


class BundleError(Exception):
    """A bundle that must not be served: missing, corrupt, tampered or inconsistent."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
