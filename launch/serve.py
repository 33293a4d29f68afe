#!/usr/bin/env python
"""Serve a generator over HTTP (FastAPI + uvicorn): POST /generate, GET /info, /health, /metrics, the page
at /, OpenAPI docs at /docs.

    python launch/serve.py --artifact artifacts/cdcgan-ts --port 8000
    python launch/serve.py --run runs/cdcgan [--best] --max-batch 64 --max-wait-ms 5
    curl -X POST localhost:8000/generate -H 'Content-Type: application/json' \
         -d '{"class": "cat", "n": 16, "seed": 1}' -o cats.png

The model is loaded (and checked) before the port is bound: a missing run or artifact exits 2.
--max-batch 0 turns dynamic batching off (one forward pass per request).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", "--run-dir", dest="run", help="run directory (its newest export, or --best)")
    src.add_argument("--artifact", help="directory written by launch/export.py")
    p.add_argument("--best", action="store_true", help="with --run: RUN/best instead of RUN/export")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--max-batch", type=int, default=64, help="images per forward pass (0 = no batching)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long the first request waits for company")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503")
    p.add_argument("--max-n", type=int, default=64, help="images per request")
    args = p.parse_args(argv)
    for name in ("max_batch", "max_queue", "max_n", "max_wait_ms"):
        if getattr(args, name) < (0 if name in ("max_batch", "max_wait_ms") else 1):
            p.error(f"--{name.replace('_', '-')} must be >= {0 if name in ('max_batch', 'max_wait_ms') else 1}")

    from gan.serve.model import ModelError, load_artifact, load_run

    try:
        if args.device.startswith("cuda"):
            import torch
            if not torch.cuda.is_available():
                raise ModelError(f"--device {args.device}: no CUDA device here; use --device cpu")
        model = load_artifact(args.artifact, args.device) if args.artifact else load_run(args.run, args.device, args.best)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import uvicorn

    from gan.serve.app import create_app

    app = create_app(model, args.max_batch, args.max_wait_ms, args.max_queue, args.max_n)
    print(f"serving {model.info['model']} ({model.info['format']}) from {model.info['source']} on "
          f"http://{args.host}:{args.port}/", flush=True)
    if app.state.batcher.note and args.max_batch:
        print(f"note: {app.state.batcher.note}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
