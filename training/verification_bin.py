"""Verification on insightface pair files (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...).

A pair file is a pickle of `(bins, issame_list)`: `bins` are encoded images (JPEG/PNG bytes), pair i is
`(bins[2i], bins[2i+1])` and `issame_list[i]` says whether both show the same person. The accuracy is
computed as insightface's `verification.py` computes it (`calculate_roc`): embeddings L2-normalised, squared
Euclidean distance, thresholds `np.arange(0, 4, 0.01)`, `KFold(n_splits=10, shuffle=False)`; in each fold the
threshold with the best accuracy on the other nine folds (the first of equals, `np.argmax`) is applied to
the held-out fold (`dist < threshold` = same). Reported: mean and std of the 10 fold accuracies, for the
plain embeddings and, as arcface_torch logs it ("Accuracy-Flip"), for the sum of the embeddings of the image
and its horizontal mirror; and XNorm, the mean norm of the raw embeddings.

Images are preprocessed by `bundle.preprocess.preprocess_pil` with the run's manifest objects, as the
service would. Pair files are unpickled with a restricted unpickler: only the types such a file holds
(bytes, lists, bools, numpy arrays) are allowed, so a hostile file cannot run code.
"""

from __future__ import annotations

import importlib.util
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from bundle.files import l2_normalize
from bundle.manifest import InputSpec, Preprocessing
from training.data.sources import DataError

THRESHOLDS = np.arange(0, 4, 0.01)
FOLDS = 10
EMBED_BATCH = 256

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("builtins", "bytearray"),
    ("__builtin__", "bytearray"),
    ("_codecs", "encode"),
}


class _PairUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a pair file holds only images and flags"
        )


@dataclass(frozen=True)
class PairSet:
    """A pair file: `images[2i]`, `images[2i+1]` is pair i; `issame[i]` its truth."""

    name: str
    path: Path
    images: list[bytes]
    issame: np.ndarray  # bool [P]

    @property
    def num_pairs(self) -> int:
        return len(self.issame)


def load_bin(path: Path | str) -> PairSet:
    """Read an insightface `.bin` pair file (`pickle.load(f, encoding='bytes')`)."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            payload = _PairUnpickler(fh, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: no such pair file") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: not an insightface pair file ({exc})") from exc
    if not (isinstance(payload, tuple | list) and len(payload) == 2):
        raise DataError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(payload).__name__}")
    bins, issame = payload
    try:
        images = [
            bytes(np.asarray(b, dtype=np.uint8).tobytes()) if not isinstance(b, bytes) else b for b in bins
        ]
        flags = np.asarray([bool(x) for x in issame], dtype=bool)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: bins must be encoded images and issame_list booleans ({exc})") from exc
    if len(flags) == 0 or len(images) != 2 * len(flags):
        raise DataError(f"{path}: {len(images)} images for {len(flags)} pairs; need exactly two per pair")
    name = path.name.removesuffix(".bin")
    return PairSet(name, path, images, flags)


def write_bin(path: Path | str, images: Sequence[bytes], issame: Sequence[bool]) -> Path:
    """Write a pair file in insightface's layout (for tests and for making pair sets of your own data)."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs; need exactly two per pair")
    path = Path(path)
    with path.open("wb") as fh:
        pickle.dump(([bytes(b) for b in images], [bool(s) for s in issame]), fh, protocol=4)
    return path


def _kfold_splits(n: int, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import KFold

    indices = np.arange(n)
    return list(KFold(n_splits=folds, shuffle=False).split(indices))


def kfold_accuracy(
    embeddings1: np.ndarray, embeddings2: np.ndarray, issame: np.ndarray, folds: int = FOLDS
) -> tuple[np.ndarray, np.ndarray]:
    """insightface's `calculate_roc` accuracy: per-fold accuracies and the threshold each fold used.

    Embeddings must already be L2-normalised (as insightface's `test()` does before calling it).
    """
    issame = np.asarray(issame, dtype=bool)
    if len(issame) < folds:
        raise ValueError(f"{len(issame)} pairs cannot be split into {folds} folds")
    dist = np.sum(np.square(np.subtract(embeddings1, embeddings2)), axis=1)
    predict = dist[None, :] < THRESHOLDS[:, None]  # [T, P]
    correct = predict == issame[None, :]
    accuracy = np.zeros(folds)
    chosen = np.zeros(folds)
    for k, (train, test) in enumerate(_kfold_splits(len(issame), folds)):
        best = int(np.argmax(correct[:, train].mean(axis=1)))
        chosen[k] = THRESHOLDS[best]
        accuracy[k] = correct[best, test].mean()
    return accuracy, chosen


@dataclass(frozen=True)
class PairResult:
    name: str
    pairs: int
    accuracy: float  # flip-augmented when `flip`, as arcface_torch's "Accuracy-Flip"
    std: float
    accuracy_noflip: float
    std_noflip: float
    xnorm: float
    flip: bool
    thresholds: list[float]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pairs": self.pairs,
            "accuracy": round(self.accuracy, 6),
            "std": round(self.std, 6),
            "accuracy_noflip": round(self.accuracy_noflip, 6),
            "std_noflip": round(self.std_noflip, 6),
            "xnorm": round(self.xnorm, 4),
            "flip": self.flip,
            "fold_thresholds": [round(t, 2) for t in self.thresholds],
            "seconds": round(self.seconds, 2),
            "protocol": "insightface calculate_roc: squared L2 of normalised embeddings, thresholds "
            "0:4:0.01, KFold(10, shuffle=False)",
        }


def embed_pairs(
    embed: Callable[[np.ndarray], np.ndarray],
    pairs: PairSet,
    preprocessing: Preprocessing,
    input_spec: InputSpec,
    *,
    flip: bool = True,
    batch_size: int = EMBED_BATCH,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw embeddings of every image (and of its mirror), preprocessed in bounded chunks."""
    from training.data.streaming import preprocess_encoded

    plain, mirrored = [], []
    width_axis = 2 if input_spec.layout == "NHWC" else 3
    for start in range(0, len(pairs.images), batch_size):
        chunk = pairs.images[start : start + batch_size]
        names = [f"{pairs.path}: image {start + i}" for i in range(len(chunk))]
        x = preprocess_encoded(chunk, preprocessing, input_spec, names=names)
        plain.append(np.asarray(embed(x), dtype=np.float64))
        if flip:
            mirrored.append(np.asarray(embed(np.ascontiguousarray(np.flip(x, axis=width_axis))), np.float64))
    return np.concatenate(plain), (np.concatenate(mirrored) if flip else None)


def verify_pairs(
    embed: Callable[[np.ndarray], np.ndarray],
    pairs: PairSet,
    preprocessing: Preprocessing,
    input_spec: InputSpec,
    *,
    flip: bool = True,
    folds: int = FOLDS,
) -> PairResult:
    """10-fold accuracy of an embedder on a pair file, as insightface reports it."""
    started = time.perf_counter()
    emb, emb_flip = embed_pairs(embed, pairs, preprocessing, input_spec, flip=flip)
    xnorm = float(np.mean(np.linalg.norm(np.concatenate([emb, emb_flip]) if flip else emb, axis=1)))
    plain = l2_normalize(emb, dtype=np.float64)
    acc1, thr1 = kfold_accuracy(plain[0::2], plain[1::2], pairs.issame, folds)
    if flip:
        assert emb_flip is not None
        both = l2_normalize(emb + emb_flip, dtype=np.float64)
        acc2, thr2 = kfold_accuracy(both[0::2], both[1::2], pairs.issame, folds)
    else:
        acc2, thr2 = acc1, thr1
    return PairResult(
        name=pairs.name,
        pairs=pairs.num_pairs,
        accuracy=float(np.mean(acc2)),
        std=float(np.std(acc2)),
        accuracy_noflip=float(np.mean(acc1)),
        std_noflip=float(np.std(acc1)),
        xnorm=xnorm,
        flip=flip,
        thresholds=thr2.tolist(),
        seconds=time.perf_counter() - started,
    )


def keras_embedder(model: keras.Model) -> Callable[[np.ndarray], np.ndarray]:
    def embed(x: np.ndarray) -> np.ndarray:
        return np.asarray(model(x, training=False))

    return embed


class PairVerification(keras.callbacks.Callback):
    """Verifies the backbone on pair files every `every` steps (0: at each epoch end); writes TensorBoard
    scalars `verification/<name>/accuracy` (+ `xnorm`) under `<run>/logs/verification` and keeps the history
    for the run summary."""

    def __init__(
        self,
        pair_sets: list[PairSet],
        backbone: keras.Model,
        preprocessing: Preprocessing,
        input_spec: InputSpec,
        *,
        every: int,
        log_dir: Path | None,
        flip: bool = True,
    ) -> None:
        super().__init__()
        self.pair_sets, self.backbone = pair_sets, backbone
        self.preprocessing, self.input_spec = preprocessing, input_spec
        self.every, self.flip = every, flip
        self.history: list[dict[str, Any]] = []
        self._writer = None
        if log_dir is not None and importlib.util.find_spec("tensorboard") is not None:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(str(log_dir))
        self._epoch = 0
        self._last_step = -1

    def _step(self) -> int:
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def _run(self, step: int) -> None:
        if step == self._last_step:
            return
        self._last_step = step
        embed = keras_embedder(self.backbone)
        for pairs in self.pair_sets:
            result = verify_pairs(embed, pairs, self.preprocessing, self.input_spec, flip=self.flip)
            self.history.append({"step": step, "epoch": self._epoch + 1, **result.as_dict()})
            print(
                f"\n[verification] step {step} {result.name}: accuracy {result.accuracy:.4f} "
                f"± {result.std:.4f} (no flip {result.accuracy_noflip:.4f}), XNorm {result.xnorm:.3f}"
            )
            if self._writer is not None:
                import tensorflow as tf

                with self._writer.as_default(step=step):
                    tf.summary.scalar(f"verification/{result.name}/accuracy", result.accuracy)
                    tf.summary.scalar(f"verification/{result.name}/accuracy_noflip", result.accuracy_noflip)
                    tf.summary.scalar(f"verification/{result.name}/xnorm", result.xnorm)
                self._writer.flush()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self.every > 0:
            step = self._step()
            if step % self.every == 0:
                self._run(step)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.every == 0:
            self._run(self._step())

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._writer is not None:
            self._writer.close()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for pairs in self.pair_sets:
            rows = [r for r in self.history if r["name"] == pairs.name]
            if not rows:
                continue
            best = max(rows, key=lambda r: r["accuracy"])
            out[pairs.name] = {
                "pairs": pairs.num_pairs,
                "last": {
                    k: rows[-1][k] for k in ("step", "epoch", "accuracy", "std", "accuracy_noflip", "xnorm")
                },
                "best": {k: best[k] for k in ("step", "epoch", "accuracy", "std")},
                "history": [{k: r[k] for k in ("step", "accuracy", "std", "xnorm")} for r in rows],
            }
        return out


def load_pair_sets(config: Any) -> list[PairSet]:
    """The pair files of `config.verify_pairs`, read (and checked) before training starts."""
    return [load_bin(f) for f in getattr(config, "verify_pairs", []) or []]


def verification_callbacks(
    config: Any, paths: Any, backbone: keras.Model, splits: Any, pair_sets: list[PairSet]
) -> list[keras.callbacks.Callback]:
    """The trainer's pair-verification callback for `config.verify_pairs` ([] when none)."""
    if not pair_sets:
        return []
    return [
        PairVerification(
            pair_sets,
            backbone,
            splits.preprocessing,
            splits.input_spec,
            every=int(getattr(config, "verify_every", 0)),
            log_dir=paths.logs / "verification",
        )
    ]


def verification_summary(callbacks: list[Any], stream: Any = None) -> dict[str, Any]:
    """Entries of the run's summary.json: pair verification history and the streamed input's counts."""
    out: dict[str, Any] = {}
    for cb in callbacks:
        if isinstance(cb, PairVerification):
            out["verification"] = cb.summary()
    if stream is not None:
        out["streaming"] = dict(stream.info)
    return out


def verify_run(run: Any, files: Sequence[Path | str], *, flip: bool = True) -> list[PairResult]:
    """`evaluate --pairs`: a finished run's embedding model on each pair file."""
    embed = keras_embedder(run.embedding)
    return [verify_pairs(embed, load_bin(f), run.preprocessing, run.input_spec, flip=flip) for f in files]


def pairs_table(results: Sequence[PairResult]) -> str:
    lines = [
        "| pair file | pairs | accuracy (flip) | accuracy (no flip) | XNorm |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        acc = f"{r.accuracy:.4f} ± {r.std:.4f}" if r.flip else "n/a"
        lines.append(
            f"| {r.name} | {r.pairs} | {acc} | {r.accuracy_noflip:.4f} ± {r.std_noflip:.4f} | {r.xnorm:.3f} |"
        )
    return "\n".join(lines)
