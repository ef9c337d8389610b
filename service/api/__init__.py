"""HTTP layer: thin FastAPI routes over the runtime, with schemas, errors, auth, middleware and metrics."""
