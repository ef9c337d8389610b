"""Settings: IDEMBED_ environment variables, comma-separated keys, and errors that name the bad setting."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.core.config import Settings


def test_defaults_serve_models_default_on_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in __import__("os").environ if k.startswith("IDEMBED_")]:
        monkeypatch.delenv(key)
    s = Settings(_env_file=None)
    assert s.bundle_path == Path("models/default") and s.host == "127.0.0.1" and s.api_keys == []


def test_environment_overrides_with_prefix_and_comma_separated_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDEMBED_PORT", "9123")
    monkeypatch.setenv("IDEMBED_API_KEYS", "first-key-1, second-key-2")
    monkeypatch.setenv("IDEMBED_LOG_LEVEL", "debug")
    s = Settings(_env_file=None)
    assert s.port == 9123 and s.log_level == "DEBUG"
    assert s.api_key_values() == [b"first-key-1", b"second-key-2"]


def test_dotenv_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IDEMBED_MAX_BATCH_SIZE", raising=False)
    env = tmp_path / ".env"
    env.write_text("IDEMBED_MAX_BATCH_SIZE=7\n")
    assert Settings(_env_file=env).max_batch_size == 7


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", 0),
        ("max_batch_size", 0),
        ("batch_wait_ms", -1.0),
        ("api_keys", ["short"]),
        ("log_level", "LOUD"),
        ("inference_workers", -1),
        ("lone_inline_max_ms", -1.0),
    ],
)
def test_invalid_values_are_rejected_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(_env_file=None, **{field: value})


def test_queue_smaller_than_one_request_is_rejected() -> None:
    with pytest.raises(ValidationError, match="max_queue_depth"):
        Settings(_env_file=None, max_queue_depth=4, max_images_per_request=8)


def test_api_keys_are_hidden_in_repr() -> None:
    s = Settings(_env_file=None, api_keys=["super-secret-key"])
    assert "super-secret-key" not in repr(s)


def test_several_workers_share_the_cores_unless_threads_are_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert Settings(_env_file=None, inference_workers=1).intra_op_threads() == 0  # onnxruntime's own default
    assert Settings(_env_file=None, inference_workers=2).intra_op_threads() == 4
    assert Settings(_env_file=None, inference_workers=16).intra_op_threads() == 1
    assert Settings(_env_file=None, inference_workers=2, ort_intra_op_threads=3).intra_op_threads() == 3


def test_lone_batch_session_only_when_each_call_gets_fewer_than_all_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert Settings(_env_file=None, inference_workers=1).lone_batch_threads() is None  # it has every core
    assert Settings(_env_file=None, inference_workers=2).lone_batch_threads() == 0  # 4 each: all 8 alone
    off = Settings(_env_file=None, inference_workers=2, lone_batch_session=False)
    assert off.lone_batch_threads() is None
    assert Settings(_env_file=None, inference_workers=2, ort_intra_op_threads=8).lone_batch_threads() is None


@pytest.mark.parametrize(("cores", "workers"), [(1, 1), (2, 2), (3, 3), (8, 4), (64, 4)])
def test_default_workers_are_one_per_core_up_to_four(
    monkeypatch: pytest.MonkeyPatch, cores: int, workers: int
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    s = Settings(_env_file=None)
    assert s.inference_workers == workers
    assert s.intra_op_threads() == (0 if workers == 1 else cores // workers)
    # Several workers with a share of the cores each: a lone batch gets the all-cores session.
    assert s.lone_batch_threads() == (None if workers == 1 else 0)
    assert Settings(_env_file=None, inference_workers=1).inference_workers == 1
