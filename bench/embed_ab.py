"""Paired A/B of two service checkouts (or settings, or bundles) on one face-sized bundle, rounds interleaved.

    python bench/embed_ab.py --a /path/to/old/checkout --b . --rounds 4 --raw        # before/after a change
    python bench/embed_ab.py --a . --b . --a-env IDEMBED_INFERENCE_WORKERS=1 --raw    # two settings
    python bench/embed_ab.py --a . --b . --b-bundle bench/results/bundles/facecnn-112-rgb-int8-static  # int8

Both servers run at once (idle when not measured). Each round, in alternating order: sequential 1-image
/v1/embed requests on each (p50 and the server's CPU per request), optionally raw onnxruntime (single-call p50
with its default options, and the best batch-32 throughput of embed_bench's three configurations), then a
closed loop of `--conc` connections on each. On a shared host the ratios of one round are what to quote: the
medians of the paired differences and ratios are printed last. ~25 s per round.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import embed_bench as eb

from bundle.preprocess import preprocess_pil
from service.model import EmbeddingModel, RuntimeOptions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", type=Path, required=True, help="checkout of server A")
    p.add_argument("--b", type=Path, required=True, help="checkout of server B")
    p.add_argument("--a-env", nargs="*", default=[], metavar="IDEMBED_X=V")
    p.add_argument("--b-env", nargs="*", default=[], metavar="IDEMBED_X=V")
    p.add_argument("--bundle", type=Path, default=eb.RESULTS / "bundles" / "facecnn-112-rgb")
    p.add_argument("--b-bundle", type=Path, default=None, help="B serves this bundle instead (same input)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--lat-n", type=int, default=300, help="sequential requests per round and server")
    p.add_argument("--seconds", type=float, default=3.0, help="closed-loop phase per round and server")
    p.add_argument("--conc", type=int, default=32)
    p.add_argument("--raw", action="store_true", help="also time raw onnxruntime each round")
    p.add_argument("--out", type=Path, default=eb.RESULTS / "embed_ab.json")
    a = p.parse_args()
    bundle = a.bundle.resolve()
    model = EmbeddingModel.load(bundle)
    pngs = eb.sample_pngs(model, 64, 0)
    m = model.manifest
    del model
    reqs = [eb.embed_request([b]) for b in pngs]
    batch = np.stack([preprocess_pil(Image.open(io.BytesIO(b)), m.preprocessing, m.input) for b in pngs[:32]])
    server_args = argparse.Namespace(
        max_batch_size=32, batch_wait_ms=0.0, log_level="INFO", inline_max_ms=0.5, server_env=[]
    )

    def start(repo: Path, env: list[str], served: Path) -> tuple:
        port = eb.free_port()
        settings = dict(kv.split("=", 1) for kv in env)
        tmp = Path(tempfile.mkdtemp())
        return eb.start_server(server_args, served.resolve(), port, tmp, settings, repo=repo.resolve()), port

    def raw_round() -> tuple[float, float]:
        one = EmbeddingModel.load(bundle, RuntimeOptions())
        p50 = eb.ms(eb.ort_latency(one, batch[:1], a.lat_n), 0.5)
        del one
        best = 0.0
        for options, callers in eb.RAW_CONFIGS.values():
            session = EmbeddingModel.load(bundle, options)
            best = max(best, eb.ort_throughput(session, batch, 1.5, callers))
            del session
        return p50, best

    keys = ("p50_ms", "cpu_ms_per_request", "images_per_s", "server_cores", "mean_batch")
    res: dict = {
        "A": {k: [] for k in keys},
        "B": {k: [] for k in keys},
        "raw_p50_ms": [],
        "raw_images_per_s": [],
    }
    pa, port_a = start(a.a, a.a_env, bundle)
    pb, port_b = start(a.b, a.b_env, a.b_bundle or bundle)
    servers = {"A": (port_a, pa), "B": (port_b, pb)}
    try:
        for r in range(a.rounds):
            order = ("A", "B") if r % 2 == 0 else ("B", "A")
            for name in order:
                port, proc = servers[name]
                cpu0 = eb.process_cpu_s(proc.pid)
                times = asyncio.run(eb.http_latency(port, reqs, a.lat_n))
                res[name]["p50_ms"].append(eb.ms(times, 0.5))
                res[name]["cpu_ms_per_request"].append(
                    (eb.process_cpu_s(proc.pid) - cpu0) / (a.lat_n + 20) * 1e3
                )
            if a.raw:
                p50, tput = raw_round()
                res["raw_p50_ms"].append(p50)
                res["raw_images_per_s"].append(tput)
            for name in order:
                port, proc = servers[name]
                if a.seconds > 0:
                    phase = asyncio.run(eb.http_throughput(port, proc.pid, reqs, 1, a.conc, a.seconds))
                    res[name]["images_per_s"].append(phase.images_per_s)
                    res[name]["server_cores"].append(phase.server_cpu_cores)
                    res[name]["mean_batch"].append(phase.mean_batch_size)
            print(
                f"round {r}: p50 A {res['A']['p50_ms'][-1]:.3f} B {res['B']['p50_ms'][-1]:.3f} ms", flush=True
            )
    finally:
        for _, proc in servers.values():
            proc.stop()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    med = statistics.median
    A, B = res["A"], res["B"]
    print(
        f"p50 A {med(A['p50_ms']):.3f} B {med(B['p50_ms']):.3f} ms; paired B-A "
        f"{med([b - x for x, b in zip(A['p50_ms'], B['p50_ms'], strict=True)]):+.3f} ms"
    )
    print(
        f"server CPU per sequential request A {med(A['cpu_ms_per_request']):.3f} B "
        f"{med(B['cpu_ms_per_request']):.3f} ms"
    )
    if a.seconds > 0:
        ratio = med([b / x for x, b in zip(A["images_per_s"], B["images_per_s"], strict=True)])
        print(
            f"conc {a.conc}: A {med(A['images_per_s']):.0f} B {med(B['images_per_s']):.0f} img/s, paired B/A "
            f"{ratio:.3f}; server cores A {med(A['server_cores']):.2f} B {med(B['server_cores']):.2f}"
        )
    if a.raw:
        raw = res["raw_p50_ms"]
        print(
            f"raw onnxruntime 1-call p50 {med(raw):.3f} ms: overhead A "
            f"{med([x - r for x, r in zip(A['p50_ms'], raw, strict=True)]):.3f} B "
            f"{med([x - r for x, r in zip(B['p50_ms'], raw, strict=True)]):.3f} ms"
        )
        if a.seconds > 0:
            tputs = res["raw_images_per_s"]
            print(
                f"raw batch-32 {med(tputs):.0f} img/s: service/raw A "
                f"{med([x / t for x, t in zip(A['images_per_s'], tputs, strict=True)]):.3f} B "
                f"{med([x / t for x, t in zip(B['images_per_s'], tputs, strict=True)]):.3f}"
            )


if __name__ == "__main__":
    main()
