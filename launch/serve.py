#!/usr/bin/env python
"""Serve a run's network over HTTP (FastAPI + uvicorn), every mode of its family: POST /generate (the GAN,
the VAE), POST /reconstruct (the VAE) and POST /translate (pix2pix) with an uploaded image; GET /info,
/health, /metrics, the page at /, OpenAPI docs at /docs.

    python launch/serve.py --artifact artifacts/cdcgan-ts --port 8000
    python launch/serve.py --run runs/cdcgan [--best] --max-batch 64 --max-wait-ms 5
    curl -X POST localhost:8000/generate -H 'Content-Type: application/json' \
         -d '{"class": "cat", "n": 16, "seed": 1}' -o cats.png
    curl -F file=@sketch.png localhost:8000/translate -o photo.png

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
    p.add_argument("--max-upload-bytes", type=int, default=8 * 1024 * 1024,
                   help="largest request body of an image upload (reconstruct, translate); larger: 413")
    args = p.parse_args(argv)
    for name in ("max_batch", "max_queue", "max_n", "max_wait_ms", "max_upload_bytes"):
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

    app = create_app(model, args.max_batch, args.max_wait_ms, args.max_queue, args.max_n,
                     max_upload_bytes=args.max_upload_bytes)
    print(f"serving {model.info['model']} ({model.info['family']}: {', '.join(model.modes)}; {model.info['format']}) "
          f"from {model.info['source']} on http://{args.host}:{args.port}/", flush=True)
    if app.state.batcher.note and args.max_batch:
        print(f"note: {app.state.batcher.note}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
