"""Serve a bundle's ONNX model through NVIDIA Triton (PyTriton) on 127.0.0.1: the benchmark's comparison.

Runs in its own virtual environment (PyTriton 0.7.0 ships a Triton server binary that works from a venv made
with Debian's /usr/bin/python3.11; see docs/performance.md), so it imports only `bundle/` from this
repository, never `service/`. The Triton model does the same work per image as `/v1/embed`: base64 PNG in,
decode + the bundle's preprocessing, one onnxruntime call per dynamic batch, L2-normalised embeddings out.

    /path/to/triton-venv/bin/python bench/triton_server.py --bundle models/default --http-port 8800
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundle.files import l2_normalize, load_bundle
from bundle.preprocess import preprocess_pil

MODEL_NAME = "idembed"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-queue-delay-us", type=int, default=0, help="dynamic batcher wait for more requests")
    args = p.parse_args()

    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    session = ort.InferenceSession(bundle.model_bytes, providers=["CPUExecutionProvider"])

    @batch
    def infer(image: np.ndarray) -> dict[str, np.ndarray]:
        pixels = [
            preprocess_pil(Image.open(io.BytesIO(base64.b64decode(row[0]))), m.preprocessing, m.input)
            for row in image
        ]
        out = session.run([m.embedding.output_name], {m.input.name: np.stack(pixels)})[0]
        return {"embedding": l2_normalize(out).astype(np.float32)}

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_address="127.0.0.1",
        metrics_port=args.metrics_port,
        allow_metrics=False,
        exit_on_error=True,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=MODEL_NAME,
            infer_func=infer,
            inputs=[Tensor(name="image", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="embedding", dtype=np.float32, shape=(m.embedding.dim,))],
            config=ModelConfig(
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
            ),
            strict=True,
        )
        triton.serve()


if __name__ == "__main__":
    main()
