"""The deployment smoke test (deploy/docker_smoke.sh) with a real docker engine; skipped without one.

Builds the service image, brings the compose stack up, waits for the container to be healthy, exercises
verify/identify/enroll through the typed client, restarts the container, checks the enrolled identities
survived, and tears down. Takes minutes on a cold build cache. Point it at an engine with DOCKER_HOST; where
no registry is reachable, set IDEMBED_BASE_IMAGE to a local base image (docs/deployment.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL_BASE = "local/python-base:bookworm"
LOCAL_PGVECTOR = "local/pgvector:pgserver"

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def _engine_problem() -> str | None:
    """Why docker cannot be used here, or None when an engine answers."""
    if shutil.which("docker") is None:
        return "docker CLI not installed"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "docker info timed out"
    if info.returncode != 0:
        first = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no docker engine reachable (DOCKER_HOST={os.environ.get('DOCKER_HOST', 'unset')}): {first}"
    has_compose = subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    if not has_compose and shutil.which("docker-compose") is None:
        return "neither 'docker compose' nor 'docker-compose' is installed"
    return None


def _image_present(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


def _smoke_env() -> dict[str, str]:
    """Environment for the smoke scripts, or skip the test with the reason it cannot run here."""
    problem = _engine_problem()
    if problem:
        pytest.skip(problem)
    if not (REPO / "models/default/manifest.json").is_file():
        pytest.skip("models/default has no bundle to bake into the image")
    env = {**os.environ, "PYTHON": sys.executable}
    # Without registry access python:3.11-slim cannot be pulled; use the locally built base if there is one.
    pullable_base = _image_present("python:3.11-slim")
    if "IDEMBED_BASE_IMAGE" not in env and not pullable_base and _image_present(LOCAL_BASE):
        env["IDEMBED_BASE_IMAGE"] = LOCAL_BASE
    return env


def test_compose_deployment_serves_and_keeps_identities_across_restart() -> None:
    env = _smoke_env()

    result = subprocess.run(
        ["bash", str(REPO / "deploy/docker_smoke.sh")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )

    transcript = result.stdout + result.stderr
    assert result.returncode == 0, transcript[-6000:]
    assert "SMOKE OK" in result.stdout
    assert "survived the restart" in result.stdout
    assert "torn down" in transcript


def test_pg_profile_replicas_share_one_gallery() -> None:
    env = _smoke_env()
    candidates = [env.get("IDEMBED_PG_IMAGE"), "pgvector/pgvector:pg16", LOCAL_PGVECTOR]
    image = next((c for c in candidates if c and _image_present(c)), None)
    if image is None:
        pytest.skip(
            "no PostgreSQL + pgvector image present (docker pull pgvector/pgvector:pg16, or build "
            f"{LOCAL_PGVECTOR} with deploy/build_local_pgvector.sh)"
        )
    env["IDEMBED_PG_IMAGE"] = image

    result = subprocess.run(
        ["bash", str(REPO / "deploy/docker_smoke_pg.sh")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )

    transcript = result.stdout + result.stderr
    assert result.returncode == 0, transcript[-6000:]
    assert "PG SMOKE OK" in result.stdout
