"""Print the pip requirements of chosen pyproject extras, one per line, for the wheelhouse and image builds.

Both `deploy/build_wheelhouse.sh` (on the host) and the Dockerfile's dependency layer (inside the build) read
pyproject.toml through this script, so neither keeps a second, drifting requirements list.

Usage: python deploy/requirements_from_pyproject.py EXTRAS [--pyproject PATH] [--with-build-system]
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str], with_build_system: bool) -> list[str]:
    """The base dependencies, then each extra's, in order and without duplicates."""
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    project = data["project"]
    available = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(available))
    if unknown:
        raise SystemExit(f"{pyproject}: unknown extra(s) {unknown}; it defines {sorted(available)}")
    reqs = list(project.get("dependencies", []))
    if with_build_system:
        # pip builds the project wheel in an isolated env; offline, its backend must come from the wheelhouse.
        reqs += [*data.get("build-system", {}).get("requires", []), "wheel"]
    for extra in extras:
        reqs += available[extra]
    return list(dict.fromkeys(reqs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", help="comma-separated extras of pyproject.toml, e.g. serve,pg")
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--with-build-system", action="store_true", help="add build-system.requires")
    args = parser.parse_args(argv)
    if not args.pyproject.is_file():
        parser.error(f"--pyproject {args.pyproject}: no such file")
    extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    print("\n".join(requirements(args.pyproject, extras, args.with_build_system)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
