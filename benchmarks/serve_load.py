#!/usr/bin/env python
"""Load test of launch/serve.py on 127.0.0.1: images/s and p50/p99 latency with 1, 8 and 64 concurrent
clients (each sends --requests-per-client requests of --n images), dynamic batching on vs off (--max-batch 0),
same artifact, same run of this script. Prints a Markdown table (and writes --out JSON).

    python benchmarks/serve_load.py --artifact artifacts/cdcgan-ts --requests-per-client 4
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from serve_helpers import running_server  # noqa: E402


async def load(url: str, clients: int, per_client: int, n: int) -> dict:
    import httpx

    lat = []

    async def client(c, k0):
        for k in range(per_client):
            t = time.perf_counter()
            r = await c.post(url + "/generate", json={"class": k % 10, "n": n, "seed": k0 + k})
            r.raise_for_status()
            lat.append(time.perf_counter() - t)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        await c.post(url + "/generate", json={"class": 0, "n": n, "seed": 0})  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*[client(c, 1000 * i) for i in range(clients)])
        wall = time.perf_counter() - t0
    lat.sort()
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else [lat[0]] * 99
    return {"clients": clients, "requests": len(lat), "images_per_s": len(lat) * n / wall,
            "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True)
    p.add_argument("--clients", default="1,8,64")
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--n", type=int, default=1, help="images per request")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=5)
    p.add_argument("--out")
    args = p.parse_args(argv)
    rows = []
    for label, batch in (("batching", str(args.max_batch)), ("no batching", "0")):
        with running_server("--artifact", args.artifact, "--max-batch", batch, "--max-wait-ms",
                            str(args.max_wait_ms), "--max-queue", "1024") as url:
            for c in [int(x) for x in args.clients.split(",")]:
                r = {"mode": label, **asyncio.run(load(url, c, args.requests_per_client, args.n))}
                print(json.dumps(r), flush=True)
                rows.append(r)
    print("\n| mode | clients | requests | images/s | p50 ms | p99 ms |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['images_per_s']:.1f} | {r['p50_ms']:.0f} | "
              f"{r['p99_ms']:.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
