"""bench/embed_matrix.py: several servers in interleaved rounds, paired ratios, JSON that says what ran."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.server import REPO, service_env

SCRIPT = REPO / "bench" / "embed_matrix.py"
BUNDLE = REPO / "models" / "default"

sys.path.insert(0, str(REPO / "bench"))
import embed_matrix  # noqa: E402


def test_server_groups_take_their_own_checkout_and_settings() -> None:
    servers, rest = embed_matrix.parse_servers(
        ["--rounds", "2", "--server", "a", str(BUNDLE), "--env", "IDEMBED_INFERENCE_WORKERS=1",
         "IDEMBED_MAX_BATCH_SIZE=8", "--server", "b", str(BUNDLE), "--repo", "/tmp", "--pair", "a/b"]
    )  # fmt: skip
    assert [s.name for s in servers] == ["a", "b"]
    assert servers[0].env == {"IDEMBED_INFERENCE_WORKERS": "1", "IDEMBED_MAX_BATCH_SIZE": "8"}
    assert servers[0].repo == REPO and servers[1].repo == Path("/tmp") and servers[1].env == {}
    assert rest == ["--rounds", "2", "--pair", "a/b"]


@pytest.mark.parametrize(
    "argv",
    [["--server", "a"], ["--server", "a", str(BUNDLE), "--server", "a", str(BUNDLE)]],
    ids=["no bundle", "same name twice"],
)
def test_bad_server_groups_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        embed_matrix.parse_servers(argv)


def test_a_setting_must_be_an_idembed_one() -> None:
    with pytest.raises(SystemExit):
        embed_matrix.parse_servers(["--server", "a", str(BUNDLE), "--env", "WORKERS=1"])


def test_two_servers_are_measured_in_rounds_and_paired(tmp_path: Path) -> None:
    out = tmp_path / "matrix.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--rounds", "2", "--seconds", "0.4", "--sizes", "1,4", "--conc", "4",
         "--server", "one", str(BUNDLE), "--env", "IDEMBED_INFERENCE_WORKERS=1",
         "--server", "two", str(BUNDLE), "--env", "IDEMBED_INFERENCE_WORKERS=2",
         "--pair", "two/one", "--out", str(out)],
        env=service_env({}), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert [s["env"] for s in report["servers"]] == [
        {"IDEMBED_INFERENCE_WORKERS": "1"},
        {"IDEMBED_INFERENCE_WORKERS": "2"},
    ]
    for name in ("one", "two"):
        for size in ("1", "4"):
            phases = report["results"][name][size]
            assert len(phases) == 2 and all(p["images_per_s"] > 0 and p["errors"] == 0 for p in phases)
    ratios = report["paired"]["two/one@4"]
    assert len(ratios) == 2 and all(r > 0 for r in ratios)
    assert "two / one, 4 img/request: paired median" in done.stdout


def test_a_pair_must_name_two_servers(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--server", "one", str(BUNDLE), "--pair", "one/nobody"],
        env=service_env({}), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "--pair one/nobody" in done.stderr
