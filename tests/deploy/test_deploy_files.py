"""Static checks of the deployment files: what the issue requires of the images and compose stack holds.

These run without a docker engine, so a clean clone (or CI with no docker) still catches a Dockerfile that
runs as root, ships TensorFlow, loses its health check, or a compose file that leaves host networking.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / dockerfile).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage(dockerfile: str) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.train"])
def test_images_default_to_python_slim_base_and_run_as_non_root(dockerfile: str) -> None:
    steps = instructions(dockerfile)
    assert steps[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    stages: list[str] = []
    for word, args in steps:
        if word == "FROM":
            base, _, name = args.partition(" AS ")
            assert base == "${BASE_IMAGE}" or base in stages, f"stage {name} is not built on BASE_IMAGE"
            stages.append(name.strip())
    users = [args for word, args in final_stage(dockerfile) if word == "USER"]
    assert users and users[-1] not in ("root", "0"), "the final stage must switch to a non-root user"


def test_service_image_has_readyz_healthcheck_and_installs_no_tensorflow() -> None:
    steps = final_stage("Dockerfile")
    assert any(word == "HEALTHCHECK" and "idembed-healthcheck" in args for word, args in steps)
    assert "/readyz" in (REPO / "deploy/healthcheck.py").read_text()
    extras = re.search(r"ARG EXTRAS=(\S+)", (REPO / "Dockerfile").read_text()).group(1).split(",")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]
    assert not [r for r in reqs if r.lower().startswith(("tensorflow", "tf2onnx", "keras"))]


def test_compose_service_uses_host_network_volumes_healthcheck_and_restart(compose: dict) -> None:
    service = compose["services"]["idembed"]
    assert service["network_mode"] == "host"
    assert service["restart"] in ("always", "unless-stopped", "on-failure")
    assert service["healthcheck"]["test"] == ["CMD", "idembed-healthcheck"]
    mounts = {v.split(":")[1] for v in service["volumes"]}
    assert {"/app/models", "/app/data"} <= mounts
    assert service["build"]["network"] == "host"
    # Configuration by environment, with the service listening on loopback unless told otherwise.
    assert service["environment"]["IDEMBED_HOST"].startswith("${IDEMBED_HOST:-127.0.0.1}")


def test_compose_profiles_add_training_and_postgres(compose: dict) -> None:
    train, postgres = compose["services"]["train"], compose["services"]["postgres"]
    assert train["profiles"] == ["train"]
    assert train["build"]["dockerfile"] == "Dockerfile.train"
    assert "models:/app/models" in train["volumes"], "training must export into the volume the service reads"
    assert postgres["profiles"] == ["pg"]
    assert "pgvector" in postgres["image"]
    assert postgres["network_mode"] == "host"


def test_dockerignore_keeps_secrets_and_scratch_out_of_the_build_context() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", "allow-list: everything is excluded unless named"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert not allowed & {".env", ".git", ".venv", "data", "runs"}


def test_requirements_come_from_pyproject_extras() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "deploy/requirements_from_pyproject.py"), "serve"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert out == list(dict.fromkeys(project["dependencies"] + project["optional-dependencies"]["serve"]))


def test_requirements_script_names_an_unknown_extra() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "deploy/requirements_from_pyproject.py"), "serve,gpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "gpu" in result.stderr
