#!/usr/bin/env python
"""Load test of launch/serve.py on 127.0.0.1: images/s and p50/p99 latency with 1, 8 and 64 concurrent
clients (each sends --requests-per-client requests of --n images), dynamic batching on vs off (--max-batch 0),
same artifact, same run of this script. Prints a Markdown table (and writes --out JSON), with the CPU
time spent per request by the server's event loop (its main thread: HTTP, FastAPI, validation), by its
other threads (the batcher's forward passes and PNG encoding) and by this process (the clients): on a
small machine the clients compete with the server for the same cores.

Then, in this process, what a request costs besides HTTP: the forward pass per image at batch 1 and at
--max-batch, and the PNG encoding of one image. --pin puts the server on one core and the clients on
the others.

Each client has its own HTTP connection (its own httpx client): one shared httpx pool of 64 connections
spends most of its time scanning the pool (httpcore), which made the clients the bottleneck.

    python benchmarks/serve_load.py --artifact artifacts/cdcgan --requests-per-client 16 [--pin]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from serve_helpers import server_process  # noqa: E402


def _ticks(stat: Path) -> int:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def cpu_s(pid: int | None = None) -> tuple[float, float]:
    """CPU seconds (user + system) of this process, or of process ``pid`` split into (its main thread =
    uvicorn's event loop, all its other threads = the batcher's forward passes and PNG encoding)."""
    if pid is None:
        t = os.times()
        return t.user + t.system, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    main = other = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            ticks = _ticks(task / "stat")
        except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
            continue
        if task.name == str(pid):
            main += ticks
        else:
            other += ticks
    return main / hz, other / hz


async def load(url: str, server_pid: int, clients: int, per_client: int, n: int) -> dict:
    import httpx

    lat = []

    async def client(c, k0):
        for k in range(per_client):
            t = time.perf_counter()
            r = await c.post(url + "/generate", json={"class": k % 10, "n": n, "seed": k0 + k})
            r.raise_for_status()
            lat.append(time.perf_counter() - t)

    async with contextlib.AsyncExitStack() as stack:
        cs = [await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=600)) for _ in range(clients)]
        # connect and warm up
        await asyncio.gather(*[c.post("/generate", json={"class": 0, "n": n, "seed": 0}) for c in cs])
        m0 = (await cs[0].get("/metrics")).json()
        t0, s0, c0 = time.perf_counter(), cpu_s(server_pid), cpu_s()[0]
        await asyncio.gather(*[client(c, 1000 * i) for i, c in enumerate(cs)])
        wall, s1, c1 = time.perf_counter() - t0, cpu_s(server_pid), cpu_s()[0]
        m1 = (await cs[0].get("/metrics")).json()
    lat.sort()
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else [lat[0]] * 99
    per_request = 1000 / len(lat)
    return {"clients": clients, "requests": len(lat), "images_per_s": len(lat) * n / wall,
            "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000,
            "server_loop_cpu_ms_per_request": (s1[0] - s0[0]) * per_request,
            "server_threads_cpu_ms_per_request": (s1[1] - s0[1]) * per_request,
            "client_cpu_ms_per_request": (c1 - c0) * per_request,
            "images_per_forward": len(lat) * n / max(1, m1["forward_passes"] - m0["forward_passes"])}


def stage_costs(artifact: str, max_batch: int, repeats: int = 20) -> dict:
    """In this process, one thread: what a request costs the batcher thread besides HTTP. ms of the
    forward pass per image at batch 1 and at --max-batch, and ms to encode one image as the PNG reply."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gan.export import Artifact
    from gan.serve.app import png_bytes
    from gan.viz import make_grid_uint8, to_uint8

    torch.set_num_threads(1)
    art = Artifact(artifact, threads=1)
    z_dim = art.meta["z_dim"]

    def median_ms(fn):
        fn()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1000

    out = {}
    for b in (1, max(max_batch, 1)):
        z, y = torch.randn(b, z_dim), torch.zeros(b, dtype=torch.long)
        out[f"forward_ms_per_image_batch_{b}"] = median_ms(lambda: art(z, y)) / b
    img = to_uint8(art(torch.randn(1, z_dim), torch.zeros(1, dtype=torch.long)))
    out["png_ms_per_image"] = median_ms(lambda: png_bytes(make_grid_uint8(img, nrow=1)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True)
    p.add_argument("--clients", default="1,8,64")
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--n", type=int, default=1, help="images per request")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=5)
    p.add_argument("--pin", action="store_true",
                   help="server on the last core, clients on the others (so they do not compete for cores)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    server_cpus = None
    if args.pin:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            p.error("--pin needs at least 2 cores")
        server_cpus = {cores[-1]}
        os.sched_setaffinity(0, set(cores[:-1]))
        print(f"server on core {cores[-1]}, clients on cores {cores[:-1]}", flush=True)
    rows = []
    for label, batch in (("batching", str(args.max_batch)), ("no batching", "0")):
        with server_process("--artifact", args.artifact, "--max-batch", batch, "--max-wait-ms",
                            str(args.max_wait_ms), "--max-queue", "1024", cpus=server_cpus) as (url, proc):
            for c in [int(x) for x in args.clients.split(",")]:
                r = {"mode": label, **asyncio.run(load(url, proc.pid, c, args.requests_per_client, args.n))}
                print(json.dumps(r), flush=True)
                rows.append(r)
    print("\n| mode | clients | requests | images/s | p50 ms | p99 ms | images per forward | CPU ms/request: server "
          "event loop | server other threads | clients |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['images_per_s']:.1f} | {r['p50_ms']:.0f} | "
              f"{r['p99_ms']:.0f} | {r['images_per_forward']:.1f} | {r['server_loop_cpu_ms_per_request']:.2f} | "
              f"{r['server_threads_cpu_ms_per_request']:.2f} | {r['client_cpu_ms_per_request']:.2f} |")
    costs = stage_costs(args.artifact, args.max_batch)
    print("\nin-process, one thread: " + ", ".join(f"{k} {v:.3f}" for k, v in costs.items()))
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "stage_costs": costs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
