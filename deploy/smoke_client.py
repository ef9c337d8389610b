"""The client half of deploy/docker_smoke.sh: exercise a deployed service through the typed client.

    python deploy/smoke_client.py exercise --url http://127.0.0.1:8000 --api-key KEY --state smoke.json
    (restart the container)
    python deploy/smoke_client.py check    --url http://127.0.0.1:8000 --api-key KEY --state smoke.json
    python deploy/smoke_client.py reload   --url http://127.0.0.1:8000 --api-key KEY --bundle retrained

`exercise` calls verify and identify, enrolls identities and records what it enrolled in the state file;
`check` (after a restart) asserts every one of them is still enrolled and still identified as itself;
`reload` hot-swaps to a bundle a training container exported into the models volume. Probe
images are sklearn's bundled digits, so nothing is downloaded. Exit status 0 means every check passed.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from service.client import IdembedClient, IdembedError

ENROLLED = {"smoke-alice": (8, 0), "smoke-bob": (9, 0), "smoke-zoë": (3, 5)}  # name -> (digit, which sample)


def digit_png(digit: int, which: int) -> bytes:
    """A PNG of the `which`-th sample of `digit` in sklearn's digits, scaled to 0..255."""
    from sklearn.datasets import load_digits

    data = load_digits()
    index = np.flatnonzero(data.target == digit)[which]
    pixels = (data.images[index] * (255.0 / 16.0)).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def check(condition: bool, what: str) -> None:
    print(f"  {'ok  ' if condition else 'FAIL'} {what}")
    if not condition:
        raise SystemExit(f"smoke check failed: {what}")


def exercise(client: IdembedClient, state: Path) -> None:
    ready = client.readyz()
    model = client.model()
    print(f"serving {ready.model_id}: {model.gallery.centers} centers, {model.gallery.enrolled} enrolled")
    check(ready.model_id == model.model_id, "readyz and /v1/model agree on the model")

    same = client.verify(digit_png(1, 0), digit_png(1, 0))
    similarity = same.similarity
    check(math.isclose(similarity, 1.0, abs_tol=1e-4), f"verify(x, x) similarity {similarity:.4f} = 1")
    check(same.same, "verify(x, x) says same")
    other = client.verify(digit_png(1, 0), digit_png(0, 0))
    check(-1.0 <= other.similarity <= 1.0, f"verify(1, 0) similarity {other.similarity:.4f} in [-1, 1]")
    check(other.threshold == model.manifest["thresholds"]["default"], "verify uses the calibrated threshold")

    for name, (digit, which) in ENROLLED.items():
        try:
            client.delete_identity(name)  # left over from an interrupted run against the same volume
        except IdembedError as exc:
            if exc.status != 404:
                raise
        record = client.enroll(name, images=[digit_png(digit, which)], metadata={"digit": digit})
        check(record.name == name and record.image_count == 1, f"enrolled {name!r}")
    _check_identified(client)
    summary = {"model_id": ready.model_id, "enrolled": sorted(ENROLLED)}
    state.write_text(json.dumps(summary, ensure_ascii=False))


def _check_identified(client: IdembedClient) -> None:
    probes = [digit_png(d, w) for d, w in ENROLLED.values()]
    results = client.identify(images=probes, top_k=3, threshold=0.999).results
    for name, result in zip(ENROLLED, results, strict=True):
        best = result.matches[0]
        found = f"{result.identity!r} ({best.source}, similarity {best.similarity:.4f})"
        check(result.identity == name and best.source == "enrolled", f"identify({name!r} image) -> {found}")


def check_after_restart(client: IdembedClient, state: Path, *, keep: bool) -> None:
    """Every identity `exercise` enrolled is still there and identified; then deleted unless `keep`."""
    before = json.loads(state.read_text())
    ready = client.readyz()
    check(ready.model_id == before["model_id"], f"same model after restart ({ready.model_id})")
    names = {item.name for item in client.list_identities(limit=1000).items}
    for name in before["enrolled"]:
        check(name in names, f"{name!r} survived the restart")
        metadata = client.get_identity(name).metadata
        check(metadata == {"digit": ENROLLED[name][0]}, f"{name!r} kept its metadata")
    _check_identified(client)
    if not keep:
        for name in before["enrolled"]:
            client.delete_identity(name)


def reload_to(client: IdembedClient, bundle: str) -> None:
    """Hot-reload a bundle that a training container exported into the models volume."""
    before = client.readyz().model_id
    reloaded = client.reload(bundle)
    check(reloaded.previous_model_id == before, f"reload replaced {before}")
    check(client.readyz().model_id == reloaded.model_id, f"now serving {reloaded.model_id} from {bundle!r}")
    vector = client.embed([digit_png(4, 0)]).embeddings[0]
    check(math.isclose(sum(x * x for x in vector), 1.0, abs_tol=1e-4), "the retrained model embeds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "phase", choices=["exercise", "check", "reload"], help="before or after the restart, or hot reload"
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="service base URL")
    parser.add_argument("--api-key", required=True, help="one of the service's IDEMBED_API_KEYS")
    parser.add_argument("--state", type=Path, help="file handing enrolled names to 'check'")
    parser.add_argument("--bundle", help="reload: folder name of the bundle inside the models volume")
    parser.add_argument("--keep", action="store_true", help="check: leave the identities enrolled")
    args = parser.parse_args(argv)
    if args.phase in ("exercise", "check") and args.state is None:
        parser.error(f"{args.phase} needs --state")
    if args.phase == "check" and not args.state.is_file():
        parser.error(f"--state {args.state}: missing; run the 'exercise' phase first")
    if args.phase == "reload" and not args.bundle:
        parser.error("reload needs --bundle")
    with IdembedClient(args.url, api_key=args.api_key, timeout=120) as client:
        try:
            if args.phase == "exercise":
                exercise(client, args.state)
            elif args.phase == "check":
                check_after_restart(client, args.state, keep=args.keep)
            else:
                reload_to(client, args.bundle)
        except IdembedError as exc:
            raise SystemExit(f"smoke check failed: {exc} (request id {exc.request_id})") from exc
    print(f"smoke {args.phase}: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
