"""Serving a generator: :mod:`gan.serve.model` (load a run or artifact, seeded z), :mod:`gan.serve.batcher`
(dynamic batching), :mod:`gan.serve.app` (FastAPI app: /generate, /info, /health, /metrics, the page)."""
