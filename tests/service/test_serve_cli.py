"""`idembed-serve`: sample images for the curl examples, and clear refusals before any server starts."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from service.cli import app

runner = CliRunner()


DEFAULT = Path(__file__).resolve().parents[2] / "models" / "default"


def test_samples_copies_the_default_bundles_images_of_identities_it_never_saw(tmp_path: Path) -> None:
    # No scikit-learn needed: the images ship with the bundle (test identities of its split).
    result = runner.invoke(app, ["samples", "--out", str(tmp_path), "--bundle", str(DEFAULT)])
    assert result.exit_code == 0, result.output
    index = json.loads((DEFAULT / "samples" / "samples.json").read_text())
    manifest = json.loads((DEFAULT / "manifest.json").read_text())
    files = sorted(p.name for p in tmp_path.glob("*.png"))
    assert files == sorted(f for names in index["identities"].values() for f in names) and len(files) >= 6
    for identity in index["identities"]:
        assert identity in manifest["training"]["heldout_classes"]
        assert identity not in manifest["training"]["train_classes"]
    with Image.open(tmp_path / files[0]) as img:
        assert img.mode == "L" and img.size == (16, 8)


def test_samples_of_a_bundle_without_samples_is_refused_naming_the_folder(tmp_path: Path) -> None:
    result = runner.invoke(app, ["samples", "--out", str(tmp_path / "s"), "--bundle", str(tmp_path)])
    assert result.exit_code == 2 and "no samples.json" in result.output and str(tmp_path) in result.output
    assert not (tmp_path / "s").exists()


def test_serve_refuses_a_folder_without_a_bundle(tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve", "--bundle", str(tmp_path)])
    assert result.exit_code == 2 and "manifest.json missing" in result.output


def test_serve_names_an_invalid_setting(tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve", "--bundle", str(tmp_path), "--port", "70000"])
    assert result.exit_code == 2 and "IDEMBED_PORT" in result.output


def test_options_work_without_the_serve_command_and_errors_show_absolute_path_and_cwd(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["--bundle", "rel/models"])
    assert result.exit_code == 2, result.output
    assert f"no bundle at {tmp_path / 'rel' / 'models'}" in result.output
    assert f"working folder {tmp_path}" in result.output
    # Options before the command count too; the command's own win.
    result = runner.invoke(app, ["--bundle", "first", "serve", "--bundle", "second"])
    assert result.exit_code == 2 and str(tmp_path / "second") in result.output
    result = runner.invoke(app, ["--bundle", "first", "serve"])
    assert result.exit_code == 2 and str(tmp_path / "first") in result.output


def test_misnamed_idembed_variables_are_named_with_a_suggestion(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("IDEMBED_BUNDLE", "models/mine")
    monkeypatch.setenv("IDEMBED_API_KEY", "change-me-please")
    monkeypatch.setenv("IDEMBED_PG_PORT", "5432")  # read by docker-compose.yml: no warning
    result = runner.invoke(app, ["serve", "--bundle", str(tmp_path)])
    assert "IDEMBED_BUNDLE is not an idembed-serve setting" in result.output
    assert "did you mean IDEMBED_BUNDLE_PATH?" in result.output
    assert (
        "IDEMBED_API_KEY is not an idembed-serve setting and is ignored (did you mean IDEMBED_API_KEYS?)"
        in (result.output)
    )
    assert "IDEMBED_PG_PORT" not in result.output


def test_help_defaults_are_the_settings_defaults() -> None:
    from service.core.config import Settings

    text = " ".join(runner.invoke(app, ["serve", "--help"], terminal_width=200).output.split())
    for field in ("max_batch_size", "port", "host", "log_format"):
        default = Settings.model_fields[field].default
        assert f"(default: {default})" in text, field


def test_docker_compose_defaults_are_the_settings_defaults() -> None:
    import re

    from service.core.config import Settings

    compose = (Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text()
    pairs = re.findall(r"^\s+IDEMBED_(\w+): \$\{IDEMBED_\1:-([^}]*)\}\s*$", compose, flags=re.M)
    checked = 0
    for name, value in pairs:
        field = name.lower()
        if field not in Settings.model_fields or field in {"store_url"} or value == "":
            continue  # compose-only variables; the store lives in the container's volume
        default = Settings.model_fields[field].default
        expected = str(default).lower() if isinstance(default, bool) else str(default)
        assert value == expected, (
            f"docker-compose.yml IDEMBED_{name} defaults to {value}, Settings to {default}"
        )
        checked += 1
    assert checked >= 6


def test_audit_command_prints_filtered_entries(tmp_path: Path) -> None:
    from service.core.audit import AuditLog

    log = AuditLog(tmp_path / "audit.jsonl")
    log.record("enroll", key_id="key-1", identity="ada", outcome="ok", status=201)
    log.record("enroll", key_id="key-1", identity="bob", outcome="ok", status=201)
    log.record("delete", key_id="key-1", identity="ada", outcome="ok", status=204)
    log.close()
    result = runner.invoke(app, ["audit", "--path", str(log.path), "--identity", "ada"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [(e["action"], e["identity"]) for e in lines] == [("enroll", "ada"), ("delete", "ada")]
    result = runner.invoke(app, ["audit", "--path", str(tmp_path / "none.jsonl")])
    assert result.exit_code == 2 and "no audit log at" in result.output


def test_misnamed_variables_in_the_dotenv_file_are_named_too(tmp_path: Path, monkeypatch) -> None:
    from service.core.config import unknown_variables

    (tmp_path / ".env").write_text("IDEMBED_PORT=9000\nIDEMBED_MAX_BATCH=16\n")
    assert unknown_variables({}, tmp_path / ".env") == [("IDEMBED_MAX_BATCH", "IDEMBED_MAX_BATCH_SIZE")]
    assert unknown_variables({"IDEMBED_PORT": "1", "PATH": "/bin"}, None) == []
