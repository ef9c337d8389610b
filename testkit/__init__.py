"""Helpers shared by the tests and the benchmarks (not part of the served or trained product).

- `server`: a free 127.0.0.1 port, a server child process, readiness polling, stopping it by PID.
- `ort_timing`: onnxruntime timing loops (throughput, per-call latency) on ready tensors.
- `tiny_bundle`: the tiny real ONNX bundle the tests serve; `fault_bundles`: its faulty variants.
- `service_helpers`: the service tests' bundle handle, API key, in-process and live servers.
- `reliability`: the reliability suite's server; `load_generator`: closed-loop HTTP load.
- `onnx_graphs`: small ONNX embedders for import/quantize tests; `pg_local`: a throwaway PostgreSQL.

Importable from the repository root (pytest, `python -m ...`) and, once installed (`pip install -e .`),
from `python bench/<script>.py`.
"""
