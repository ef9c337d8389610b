"""The served model: load, verify and warm a bundle (onnxruntime options), embed through its batching engine,
swap in another one, drain the old one.

Requests ask the slot for the model at the moment they need it, never hold one themselves, so a hot reload is
one reference swap: requests already running finish on the model they started with (its engine drains before
it stops), requests arriving after the swap use the new one, and nothing in flight is dropped.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bundle.host import Int8Support, int8_support
from bundle.manifest import MODEL_FILE
from service.core.config import Settings
from service.engine import BatchingEngine, BatchObserver, EngineClosedError
from service.errors import InvalidInputError, NotReadyError, ServiceError
from service.gallery.gallery import mean_embedding
from service.gallery.store import ServedModel
from service.model import EmbeddingModel, RuntimeOptions
from service.offload import INLINE_DECODE_BYTES, inline_unless
from service.preprocess import ImagePreprocessor

logger = logging.getLogger("idembed.model")


@dataclass
class LoadedModel:
    model: EmbeddingModel
    engine: BatchingEngine
    preprocess: ImagePreprocessor
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def model_id(self) -> str:
        return self.model.model_id

    @property
    def threshold(self) -> float:
        """The bundle's calibrated threshold (similarity at the target false-accept rate)."""
        return self.model.manifest.thresholds.default

    @property
    def served(self) -> ServedModel:
        return ServedModel(self.model_id, model_fingerprint(self.model))


def int8_warnings(model: EmbeddingModel, support: Int8Support | None = None) -> list[str]:
    """Log what an int8 bundle means on this CPU when it has no int8 dot-product instruction (bundle/host.py),
    and return the concerns logged: "saturation" for a bundle with 8-bit weights, whose products saturate in
    onnxruntime's int8 kernels here, so it computes another function than the one its gate measured
    (training/quantize.py), and "speed" for any int8 bundle, whose gain over fp32 is smaller here."""
    q = model.manifest.quantization
    if q is None:  # fp32: nothing to say, and no /proc/cpuinfo to read on its start-up
        return []
    support = int8_support() if support is None else support
    if support.dot_product is not False:
        return []
    concerns = []
    extra = {"model_id": model.model_id, "int8_instructions": support.instructions}
    if q.weight_bits != 7:
        logger.warning(
            "%s is an int8 model with 8-bit weights and this CPU's int8 is %s: onnxruntime's int8 products "
            "saturate here, so it computes other embeddings here than on a CPU with VNNI, and its accuracy "
            "gate (measured on: %s) holds here only if that CPU lacked VNNI too (the default bundle's graph "
            "lost EER 0.0095 -> 0.0128 this way); quantize it again with this version, which writes 7-bit "
            "weights (docs/performance.md#int8-models)",
            model.model_id,
            support,
            q.speed_measured_on or "not recorded",
            extra={**extra, "int8_concern": "saturation"},
        )
        concerns.append("saturation")
    measured = (
        f"; where it was quantized ({q.speed_measured_on}) it ran {q.int8_images_per_s:.0f} img/s against "
        f"fp32's {q.fp32_images_per_s:.0f}"
        if q.int8_images_per_s and q.fp32_images_per_s
        else ""
    )
    logger.warning(
        "%s is an int8 model (%s) and this CPU's int8 is %s: without a single-instruction int8 dot "
        "product (VNNI or AMX on x86, SDOT on Arm) int8 gains less over fp32 than on CPUs that have one%s "
        "(docs/performance.md#int8-models)",
        model.model_id,
        q.method,
        support,
        measured,
        extra={**extra, "int8_concern": "speed"},
    )
    concerns.append("speed")
    return concerns


def model_fingerprint(model: EmbeddingModel) -> str:
    """What decides the embedding space: the ONNX graph's digest, its input and the preprocessing."""
    manifest = model.manifest
    digest = hashlib.sha256(manifest.files[MODEL_FILE].sha256.encode())
    digest.update(manifest.input.model_dump_json().encode())
    digest.update(manifest.preprocessing.model_dump_json().encode())
    return digest.hexdigest()[:32]


def embed_templates(
    loaded: LoadedModel, groups: list[list[bytes]], batch_size: int
) -> list[np.ndarray | None]:
    """Templates (normalised mean embedding) of identities from their kept images with `loaded`'s model,
    called off the event loop (onnxruntime directly, not the batching engine); None for an identity whose
    images the model cannot read (decode or preprocessing errors)."""
    flat = [(gi, image) for gi, group in enumerate(groups) for image in group]
    vectors: list[list[np.ndarray]] = [[] for _ in groups]
    failed: set[int] = set()
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        try:
            batch = loaded.preprocess([image for _, image in chunk], field="kept image")
        except ServiceError:
            batch = None
        if batch is None:  # one unreadable image: find which, one at a time
            for gi, image in chunk:
                try:
                    vectors[gi].append(loaded.model.run(loaded.preprocess([image], field="kept image"))[0])
                except ServiceError:
                    failed.add(gi)
            continue
        for (gi, _), vector in zip(chunk, loaded.model.run(batch), strict=True):
            vectors[gi].append(vector)
    return [None if gi in failed or not v else mean_embedding(np.stack(v)) for gi, v in enumerate(vectors)]


class ModelSlot:
    """Holds the served `LoadedModel`. `serving_model_id` tells which model the gallery serves: while a
    background re-embedding commits, the gallery may already serve the staged model, and `current` follows."""

    def __init__(
        self,
        settings: Settings,
        observer: BatchObserver | None = None,
        on_model_change: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self._observer = observer
        self._on_model_change = on_model_change
        self._current: LoadedModel | None = None
        self._staged: LoadedModel | None = None
        self.serving_model_id: Callable[[], str | None] = lambda: None

    @property
    def ready(self) -> bool:
        return self._current is not None and not self._current.engine.closing

    @property
    def loaded(self) -> bool:
        return self._current is not None

    @property
    def current(self) -> LoadedModel:
        """The model serving requests: the one whose identities the gallery searches."""
        staged = self._staged
        if staged is not None and self.serving_model_id() == staged.model_id:
            return staged  # a background re-embedding just swapped the gallery in its worker thread
        if self._current is None:
            raise NotReadyError("the model is not loaded yet; retry when /readyz returns 200")
        return self._current

    def load(self, path: Path) -> LoadedModel:
        """Load, verify and warm a bundle (blocking: call it in a thread); its engine is not started yet."""
        s = self.settings
        options = RuntimeOptions(
            s.intra_op_threads(),
            s.ort_inter_op_threads,
            s.ort_allow_spinning,
            warmup_batch_size=s.max_batch_size,
            warmup_concurrency=s.inference_workers,
        )
        model = EmbeddingModel.load(path, options)
        int8_warnings(model)
        lone_threads = s.lone_batch_threads()
        lone_model = None
        if lone_threads is not None:
            # The same verified bundle, a second session: every core, for batches that run alone (engine doc).
            # Its threads spin between the parallel sections of a call (waking sleeping threads costs 0.3 ms
            # per 112x112 image) and stop when it ends, burning no core between requests (docs/service.md).
            lone_options = replace(
                options,
                intra_op_threads=lone_threads,
                allow_spinning=True,
                stop_spinning_after_run=True,
                warmup_concurrency=1,
            )
            lone_model = EmbeddingModel(model.bundle, lone_options)
        engine = BatchingEngine(
            model.run,
            max_batch_size=s.max_batch_size,
            batch_wait_ms=s.batch_wait_ms,
            max_queue_depth=s.max_queue_depth,
            observer=self._observer,
            inline_max_ms=s.inline_inference_max_ms,
            workers=s.inference_workers,
            lone_run=None if lone_model is None else lone_model.run,
            lone_inline_max_ms=s.lone_inline_max_ms,
        )
        manifest = model.manifest
        pre = ImagePreprocessor(manifest.preprocessing, manifest.input, max_pixels=s.max_image_pixels)
        return LoadedModel(model=model, engine=engine, preprocess=pre)

    def stage(self, new: LoadedModel) -> None:
        """Start `new`'s engine ahead of a swap that another thread makes (`current` follows the gallery)."""
        new.engine.start()
        self._staged = new

    def unstage(self) -> None:
        self._staged = None

    def swap(self, new: LoadedModel) -> LoadedModel | None:
        """Serve `new` from now on (its engine started here unless staged); returns the model it replaced,
        whose engine still drains the requests queued on it (`drain`)."""
        if self._staged is not new:
            new.engine.start()
        old, self._current, self._staged = self._current, new, None
        if self._on_model_change is not None:
            self._on_model_change(new.model_id)
        return old

    async def drain(self, loaded: LoadedModel) -> None:
        """Let the requests queued on `loaded`'s engine finish, then stop it."""
        await loaded.engine.stop(self.settings.shutdown_timeout_s)

    async def stop(self) -> None:
        if self._current is not None:
            await self.drain(self._current)

    def check_embeddings(
        self, embeddings: list[list[float]], field_name: str, loaded: LoadedModel | None = None
    ) -> np.ndarray:
        """Client-supplied embeddings -> float32 [n, dim]; wrong dimension or all-zero vectors are refused.
        They are taken to be the served model's (`loaded`, default the current one)."""
        dim = (loaded or self.current).model.dim
        got = sorted({len(e) for e in embeddings})
        if got != [dim]:
            raise InvalidInputError(
                f"{field_name} must have {dim} values each (the model's embedding dim), got {got}",
                detail={"expected_dim": dim},
            )
        # Values beyond float32's range become inf here, so this also catches 1e300.
        with np.errstate(over="ignore"):
            array = np.asarray(embeddings, dtype=np.float32)
        if not np.all(np.isfinite(array)):
            raise InvalidInputError(f"{field_name} contains NaN or infinite values (as float32)")
        if np.any(np.linalg.norm(array, axis=1) == 0):
            raise InvalidInputError(f"{field_name} contains an all-zero vector, which has no direction")
        return array

    async def embed(self, images: list[bytes], field_name: str = "images") -> tuple[np.ndarray, LoadedModel]:
        """Decode, preprocess and embed images in one engine call; with the model that embedded them."""
        while True:
            loaded = self.current
            heavy = sum(len(i) for i in images) > INLINE_DECODE_BYTES
            inputs = await inline_unless(heavy, loaded.preprocess, images, field=field_name)
            try:
                return await loaded.engine.embed(inputs), loaded
            except EngineClosedError:
                if not self._swapped(loaded):
                    raise

    async def embed_tensor(
        self, tensor: np.ndarray, check: Callable[[LoadedModel], None]
    ) -> tuple[np.ndarray, LoadedModel]:
        """Embed ready model inputs through the engine; `check` refuses a tensor the model does not take."""
        while True:
            loaded = self.current
            check(loaded)
            try:
                return await loaded.engine.embed(np.ascontiguousarray(tensor)), loaded
            except EngineClosedError:
                if not self._swapped(loaded):
                    raise

    def _swapped(self, loaded: LoadedModel) -> bool:
        """Whether a hot reload replaced `loaded` while a request prepared or queued its inputs (then it is
        redone on the new model, whose preprocessing may differ). Shutting down is the only other reason an
        engine refuses work: then the request fails with 503."""
        return self._current is not loaded and self._current is not None
