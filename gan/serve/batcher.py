"""Dynamic batching: requests wait in a bounded asyncio queue; one worker takes the first, gathers more
until ``max_batch`` images or ``max_wait_ms`` have passed, runs ONE forward pass, and splits the result.
A full queue raises :class:`QueueFull` (the app answers 503 + Retry-After). ``max_batch=0`` turns
batching off: one forward pass per request. A model with several modes (the VAE's generate and
reconstruct) passes a dict of forward functions by mode; requests of different modes never share a
forward pass (the next one of another mode leads the next batch), and all share one queue and thread.

Nothing heavy runs on the event loop, which only parses and answers HTTP. The forward passes run one
at a time in the batcher's forward thread (torch has its own intra-op threads); each request's
``finish`` (the app's PNG encoding) runs in a second, encoder thread, so encoding one batch overlaps
the next batch's forward pass. torch and libpng release the GIL while they work."""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time

import torch


class QueueFull(RuntimeError):
    pass


class Batcher:
    def __init__(self, model, max_batch: int = 64, max_wait_ms: float = 5.0, max_queue: int = 256,
                 note: str | None = None):
        self.model, self.max_batch, self.max_wait = model, max_batch, max_wait_ms / 1000
        self.note = note  # why batching is off for this model, if it is (gan.serve.app.batch_dependence)
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=max_queue)
        self.batch_sizes: collections.Counter = collections.Counter()  # images per forward pass -> count
        self.requests = self.rejected = self.forwards = 0
        self._task: asyncio.Task | None = None
        self._carry = None  # a request that did not fit into the previous batch leads the next one
        self._forward = self._encode = None  # the two threads (single-worker executors)
        self._finishing: set[asyncio.Task] = set()  # batches being encoded

    def start(self) -> None:
        self._forward = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batcher-forward")
        self._encode = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batcher-encode")
        self._task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for task in list(self._finishing):
            task.cancel()
        for pool in (self._forward, self._encode):
            if pool:
                pool.shutdown(wait=True)

    async def submit(self, z: torch.Tensor, y: torch.Tensor | None = None, finish=None, mode: str | None = None):
        """This request's images, ``model(z, y)`` (N, ...), or ``finish(images)`` computed in the batcher's
        encoder thread after the forward pass (an exception in it fails this request only). ``z``: the batched
        input (noise or images), ``y``: classes or None; ``mode``: the key of ``model`` when it is a dict."""
        fut = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((z, y, fut, finish, mode))
        except asyncio.QueueFull:
            self.rejected += 1
            raise QueueFull(f"{self.queue.maxsize} requests are already waiting") from None
        self.requests += 1
        return await fut

    async def _gather(self) -> list:
        if self._carry is not None:  # the request that did not fit into the previous batch
            items, self._carry = [self._carry], None
        else:
            items = [await self.queue.get()]
        if self.max_batch <= 0:
            return items
        n = len(items[0][0])
        deadline = time.monotonic() + self.max_wait
        while n < self.max_batch:
            if self.queue.empty():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    break
            else:
                nxt = self.queue.get_nowait()
            if n + len(nxt[0]) > self.max_batch or nxt[4] != items[0][4]:  # overflow, or another mode:
                # it leads the next batch
                self._carry = nxt
                break
            items.append(nxt)
            n += len(nxt[0])
        return items

    def _run(self, items: list) -> list:
        """Forward thread: one forward pass for all ``items``; each request's part of the output."""
        mode = items[0][4]
        model = self.model[mode] if isinstance(self.model, dict) else self.model
        y = None if items[0][1] is None else torch.cat([it[1] for it in items])
        out = model(torch.cat([it[0] for it in items]), y)
        return list(out.split([len(it[0]) for it in items]))

    @staticmethod
    def _finish_all(parts: list, items: list) -> list:
        """Encoder thread: each request's ``finish`` on its part; one ``(ok, value or exception)`` each."""
        results = []
        for part, (_, _, _, finish, _) in zip(parts, items):
            try:
                results.append((True, finish(part) if finish else part))
            except Exception as e:  # noqa: BLE001 (that request gets its own error)
                results.append((False, e))
        return results

    @staticmethod
    def _answer(items: list, results: list) -> None:
        for (ok, value), it in zip(results, items):
            if not it[2].done():
                (it[2].set_result if ok else it[2].set_exception)(value)

    async def _finish(self, parts: list, items: list) -> None:
        results = await asyncio.get_running_loop().run_in_executor(self._encode, self._finish_all, parts, items)
        self._answer(items, results)

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._gather()
            items = [it for it in items if not it[2].cancelled()]
            if not items:
                continue
            try:
                parts = await loop.run_in_executor(self._forward, self._run, items)
            except Exception as e:  # noqa: BLE001 (the forward pass failed: every waiting request gets the error)
                self._answer(items, [(False, e)] * len(items))
                continue
            self.forwards += 1
            self.batch_sizes[sum(len(it[0]) for it in items)] += 1
            task = loop.create_task(self._finish(parts, items))  # encode while the next batch runs forward
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)

    def stats(self) -> dict:
        return {"max_batch": self.max_batch, "max_wait_ms": self.max_wait * 1000, "queue_size": self.queue.qsize(),
                "queue_limit": self.queue.maxsize, "requests": self.requests, "rejected": self.rejected,
                "forward_passes": self.forwards,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                **({"note": self.note} if self.note else {})}
