"""Service settings: one typed, validated object read from `IDEMBED_*` environment variables and `.env`."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# `IDEMBED_INFERENCE_WORKERS=0` (the default): one worker per usable core, at most this many. On a small host
# one single-threaded batch per core beats one call split across the cores, under load and (with the
# lone-batch session) alone; beyond a few workers, each more copies a batch's activations at once for
# little gain, and the cores are better split inside each call.
AUTO_WORKERS_MAX = 4


class Settings(BaseSettings):
    """Every knob of the service, with a default that works for `idembed-serve` on `models/default`.

    Set any field with `IDEMBED_<FIELD>` (e.g. `IDEMBED_PORT=9000`) or a `.env` file in the working folder.
    Invalid values stop start-up with a message naming the variable.
    """

    model_config = SettingsConfigDict(
        env_prefix="IDEMBED_", env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    bundle_path: Path = Field(Path("models/default"), description="bundle folder served at start-up")
    models_dir: Path | None = Field(
        None, description="folder hot reload may load bundles from (default: the bundle's parent folder)"
    )
    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="comma-separated keys with every scope (read, write and admin), accepted in X-API-Key; "
        "narrower keys go in IDEMBED_READ_KEYS / IDEMBED_WRITE_KEYS / IDEMBED_ADMIN_KEYS",
    )
    read_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="comma-separated keys with the read scope: embed, identify, verify, list/get identities, "
        "model, /v2 inference",
    )
    write_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="comma-separated keys with the write scope: enroll and delete"
    )
    admin_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="comma-separated keys with the admin scope: reload and snapshot"
    )
    require_key_for_reads: bool = Field(
        True,
        description="reads need a key with the read scope (the default); false opens embed/identify/verify, "
        "listing identities and the model card to anyone who can reach the port",
    )
    audit_log_path: Path | None = Field(
        None,
        description="append-only JSON-lines log of every write and admin call (key id, action, identity, "
        "time, outcome; never a key or a vector); default: audit.jsonl beside the SQLite store, "
        "or data/audit.jsonl with PostgreSQL",
    )

    max_payload_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest request body (413 above)")
    max_images_per_request: int = Field(64, ge=1, description="most images (or embeddings) in one request")
    max_image_pixels: int = Field(
        16_000_000, ge=1, description="largest decoded image width*height (decompression-bomb guard, 413)"
    )
    max_top_k: int = Field(100, ge=1, le=10_000, description="largest top_k accepted by /v1/identify")

    max_batch_size: int = Field(32, ge=1, le=4096, description="most images in one onnxruntime call")
    batch_wait_ms: float = Field(
        0.0,
        ge=0.0,
        le=1000.0,
        description="extra time the batcher waits for more requests once one arrived; 0 batches whatever "
        "queued while the previous batch ran, which adds no latency to a lone request",
    )
    max_queue_depth: int = Field(
        1024, ge=1, description="most images waiting for inference; beyond it requests get 503 + Retry-After"
    )
    inline_inference_max_ms: float = Field(
        0.5,
        ge=0.0,
        le=100.0,
        description="batches predicted to run faster than this run on the event loop instead of a thread "
        "(saves the thread hand-off, measured at ~0.1-0.7 ms on a busy 2-core host, for small models; "
        "0 = always use the inference thread)",
    )
    inference_workers: int = Field(
        0,
        ge=0,
        le=64,
        validate_default=True,
        description="batches run at the same time, each in its own thread (0: one per usable core, at most "
        f"{AUTO_WORKERS_MAX}); with several, each onnxruntime call gets a share of the cores, so cores run "
        "separate batches instead of splitting one call, and a batch that starts alone uses every core (the "
        "lone-batch session; docs/service.md, Speed)",
    )
    lone_inline_max_ms: float = Field(
        20.0,
        ge=0.0,
        le=1000.0,
        description="a batch that starts while no other batch runs or waits, predicted to run faster than "
        "this, runs on the event loop instead of a thread (saves the two thread wake-ups of a lone request: "
        "MobileFaceNet 112x112, a 5 ms call, 1.21 -> 0.95 ms of overhead; requests arriving meanwhile wait "
        "for it, as they would for the cores it uses; 0 = always use the inference thread)",
    )
    lone_batch_session: bool = Field(
        True,
        description="with several inference workers, run a batch that starts while no other batch runs or "
        "waits on a second onnxruntime session that uses every core (a lone request is then as fast as with "
        "one worker; costs one more copy of the model in memory; docs/service.md, Speed)",
    )
    ort_intra_op_threads: int = Field(
        0,
        ge=0,
        description="onnxruntime intra-op threads per call (0: onnxruntime's default, one per core, with one "
        "inference worker; with several, the usable cores divided among the workers, at least one each)",
    )
    ort_inter_op_threads: int = Field(0, ge=0, description="onnxruntime inter-op threads (0: default)")
    ort_allow_spinning: bool = Field(
        False,
        description="let onnxruntime's intra-op threads busy-wait after each parallel section (its own "
        "default); off, they sleep and leave the CPU to the event loop, which the request work between "
        "batches needs (less CPU per image for the digits and the face models; docs/service.md, Speed)",
    )

    store_url: str = Field(
        "sqlite:///data/identities.sqlite3",
        description="enrolled identities: sqlite:///path (WAL file) or postgresql://... (needs .[pg])",
    )

    identify_sources: Literal["enrolled", "centers", "both"] = Field(
        "enrolled",
        description="what /v1/identify searches unless a request says otherwise: enrolled identities "
        "(open-set deployments, where the bundle's training identities are not your users), centers "
        "(the bundle's training identities only) or both (closed demos)",
    )
    on_model_change: Literal["refuse", "orphan"] = Field(
        "refuse",
        description="start-up with another model than the one that enrolled the store's identities: refuse "
        "(exit naming how many would be orphaned) or orphan (start; those identities are never matched, "
        "and are listed as stale, until re-enrolled). POST /v1/admin/reload refuses with 409 unless forced",
    )

    keep_enrollment_images: bool = Field(
        False,
        description="store enrollment images with each identity, so that another model can re-embed the "
        "gallery (in the background on a reload, before serving at start-up) instead of orphaning it; "
        "the images are biometric data kept in the store until the identity is deleted (docs/service.md)",
    )

    gallery_index: Literal["exact", "hnsw", "auto"] = Field(
        "exact",
        description="search index for enrolled identities: exact (numpy), hnsw (usearch graph) or auto "
        "(exact while small, then hnsw)",
    )
    gallery_snapshot_path: Path | None = Field(
        None,
        description="folder for a snapshot of the hnsw/auto gallery index, written on graceful shutdown and "
        "by POST /v1/admin/snapshot, loaded at start-up instead of re-inserting every identity (seconds "
        "instead of minutes at 1M); one that does not fit the store is ignored with a warning (default: off)",
    )
    change_feed_keep: int = Field(
        100_000,
        ge=0,
        description="change-feed rows kept after each gallery snapshot (older ones are pruned): a replica or "
        "snapshot further behind than this rebuilds from the store instead of catching up",
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    log_format: Literal["json", "text"] = Field("json", description="json: one JSON object per line")
    shutdown_timeout_s: float = Field(
        30.0, gt=0, description="how long shutdown waits for in-flight requests and batches"
    )

    @field_validator("api_keys", "read_keys", "write_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("api_keys", "read_keys", "write_keys", "admin_keys")
    @classmethod
    def _keys_long_enough(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for key in keys:
            if len(key.get_secret_value()) < 8:
                raise ValueError("every API key must have at least 8 characters")
        return keys

    @field_validator("inference_workers")
    @classmethod
    def _auto_workers(cls, workers: int) -> int:
        # Resolved here, so every reader (the runtime, the start-up log of the settings) sees the real count.
        return workers or min(len(os.sched_getaffinity(0)), AUTO_WORKERS_MAX)

    @field_validator("gallery_snapshot_path")
    @classmethod
    def _snapshot_path_is_a_folder(cls, path: Path | None) -> Path | None:
        if path is not None and path.exists() and not path.is_dir():
            raise ValueError(f"{path} is a file; the gallery snapshot needs a folder (made if missing)")
        return path

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_queue_depth < self.max_images_per_request:
            raise ValueError(
                f"max_queue_depth ({self.max_queue_depth}) must be >= max_images_per_request "
                f"({self.max_images_per_request}), or a full-size request could never be queued"
            )
        return self

    @property
    def reload_root(self) -> Path:
        return (self.models_dir or self.bundle_path.parent).resolve()

    def intra_op_threads(self) -> int:
        """Threads per onnxruntime call: the setting, or with several workers the cores shared among them."""
        if self.ort_intra_op_threads or self.inference_workers == 1:
            return self.ort_intra_op_threads
        return max(1, len(os.sched_getaffinity(0)) // self.inference_workers)

    def lone_batch_threads(self) -> int | None:
        """Intra-op threads of the lone-batch session (0: every core), or None when there is none."""
        if not self.lone_batch_session or self.inference_workers == 1:
            return None
        threads = self.intra_op_threads()
        if threads == 0 or threads >= len(os.sched_getaffinity(0)):
            return None  # each call already gets every core
        return 0

    def api_key_values(self) -> list[bytes]:
        return [k.get_secret_value().encode() for k in self.api_keys]

    def key_scopes(self) -> dict[bytes, frozenset[str]]:
        """Every configured key with the union of its scopes (a key may be listed in several variables)."""
        lists = {
            ("read", "write", "admin"): self.api_keys,
            ("read",): self.read_keys,
            ("write",): self.write_keys,
            ("admin",): self.admin_keys,
        }
        out: dict[bytes, frozenset[str]] = {}
        for scopes, keys in lists.items():
            for key in keys:
                secret = key.get_secret_value().encode()
                out[secret] = out.get(secret, frozenset()) | frozenset(scopes)
        return out

    def audit_path(self) -> Path:
        """Where the audit log is written: the setting, else beside the SQLite store file."""
        if self.audit_log_path is not None:
            return self.audit_log_path
        url = self.store_url
        if url.startswith(("postgresql://", "postgres://")):
            return Path("data/audit.jsonl")
        return Path(url.removeprefix("sqlite:///")).parent / "audit.jsonl"


# Variables with the IDEMBED_ prefix that are not settings of the service but are read by other tools of the
# project (docker-compose.yml, the deploy scripts): no warning for them.
DEPLOYMENT_VARIABLES = {
    "IDEMBED_IMAGE",
    "IDEMBED_BASE_IMAGE",
    "IDEMBED_TRAIN_IMAGE",
    "IDEMBED_PG_IMAGE",
    "IDEMBED_PG_LISTEN",
    "IDEMBED_PG_PORT",
    "IDEMBED_PG_PASSWORD",
}


def unknown_variables(
    environ: Mapping[str, str] | None = None, env_file: Path | None = Path(".env")
) -> list[tuple[str, str | None]]:
    """IDEMBED_* variables (in the environment or the `.env` file Settings reads) that no setting reads (a
    typo is otherwise silently ignored), each with the closest setting's variable name, if any is close:
    [("IDEMBED_BUNDLE", "IDEMBED_BUNDLE_PATH"), ...]."""
    names = set(os.environ if environ is None else environ)
    if env_file is not None and env_file.is_file():
        from dotenv import dotenv_values  # pydantic-settings' own .env reader

        names |= set(dotenv_values(env_file))
    known = {f"IDEMBED_{name.upper()}" for name in Settings.model_fields}
    out = []
    for name in sorted(names):
        upper = name.upper()
        if not upper.startswith("IDEMBED_") or upper in known or upper in DEPLOYMENT_VARIABLES:
            continue
        close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.6)
        prefixed = [k for k in sorted(known) if k.startswith(upper + "_") or upper.startswith(k)]
        out.append((name, (close or prefixed or [None])[0]))
    return out
