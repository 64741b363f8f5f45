"""Micro-batching: concurrent requests share forward passes, through a bounded queue that never hangs.

Every forward pass runs on one dedicated thread (not asyncio's shared default executor): torch's
OpenMP runtime keeps a pool of worker threads per calling thread, so one caller means one warm pool
for the server's life instead of one per executor thread that happens to take a batch (idle pools
spin before they sleep, on cores the event loop needs), and other ``to_thread`` work never waits
behind a forward pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lorafed.serve.infer import ServingModel, predict_proba
from lorafed.serve.limits import RequestError, ServeLimits

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    texts: list[str]
    pairs: list[str] | None
    explain: bool
    future: asyncio.Future[Any]
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    """The bounded queue and its one worker task (started and stopped by the app's lifespan).

    Args:
        sm: The model.
        limits: Batch size, wait, queue bound.
    """

    def __init__(self, sm: ServingModel, limits: ServeLimits) -> None:
        self.sm, self.limits = sm, limits
        self.queue: asyncio.Queue[_Job] | None = None
        self.task: asyncio.Task[None] | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.batches = 0

    def start(self) -> None:
        """Create the queue, the model thread and the worker on the running loop."""
        self.queue = asyncio.Queue(maxsize=self.limits.max_queue)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafed-model")
        self.task = asyncio.create_task(self._work(), name="lorafed-predict-worker")

    async def stop(self) -> None:
        """Cancel the worker, release the model thread and fail jobs still queued (503)."""
        if self.task is not None:
            self.task.cancel()
            with suppress(asyncio.CancelledError):
                await self.task
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)  # a running batch finishes on its own
        while self.queue is not None and not self.queue.empty():
            job = self.queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(RequestError(503, "shutting_down", "the server is stopping"))

    async def submit(self, texts: list[str], pairs: list[str] | None, explain: bool) -> dict[str, Any]:
        """Queue one request and wait for its result.

        Raises:
            RequestError: 503 when the queue is full or the server is stopping, 504 on timeout.
        """
        if self.queue is None or self.task is None or self.task.done():
            raise RequestError(503, "not_ready", "the prediction worker is not running")
        job = _Job(texts, pairs, explain, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise RequestError(
                503,
                "queue_full",
                f"the server is busy: {self.limits.max_queue} requests are waiting; retry later",
                "max_queue",
                self.limits.max_queue,
                self.queue.qsize(),
            ) from None
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.limits.request_timeout_s)
        except TimeoutError:
            job.future.cancel()
            raise RequestError(
                504,
                "timeout",
                f"no answer within {self.limits.request_timeout_s:g} s",
                "request_timeout_s",
                self.limits.request_timeout_s,
                None,
            ) from None

    async def _work(self) -> None:
        assert self.queue is not None
        while True:
            jobs = [await self.queue.get()]
            size = len(jobs[0].texts)
            deadline = time.perf_counter() + self.limits.max_wait_ms / 1000
            while size < self.limits.max_batch:
                wait = deadline - time.perf_counter()
                try:
                    job = self.queue.get_nowait() if wait <= 0 else await asyncio.wait_for(self.queue.get(), wait)
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                jobs.append(job)
                size += len(job.texts)
            jobs = [j for j in jobs if not j.future.done()]  # timed out while queued
            if not jobs:
                continue
            try:
                results = await asyncio.get_running_loop().run_in_executor(self.executor, self.run_batch, jobs)
            except Exception as exc:  # a model failure answers 500 to these jobs; the worker lives on
                logger.exception("prediction batch failed")
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(RequestError(500, "internal", f"prediction failed: {exc}"))
                continue
            self.batches += 1
            for j, res in zip(jobs, results, strict=True):
                if not j.future.done():
                    j.future.set_result(res)

    def run_batch(self, jobs: Sequence[_Job]) -> list[dict[str, Any]]:
        """Probabilities for every job (texts with and without pairs run as separate passes), then attributions.

        Runs on the model thread (``self.executor``); the only place the model is called.
        """
        probs: list[np.ndarray | None] = [None] * len(jobs)
        for with_pairs in (False, True):
            idx = [i for i, j in enumerate(jobs) if (j.pairs is not None) == with_pairs]
            if not idx:
                continue
            texts = [t for i in idx for t in jobs[i].texts]
            pairs = [p for i in idx for p in (jobs[i].pairs or [])] if with_pairs else None
            out = predict_proba(self.sm, texts, pairs, batch_size=self.limits.max_batch)
            start = 0
            for i in idx:
                n = len(jobs[i].texts)
                probs[i] = out[start : start + n]
                start += n
        results = []
        for j, p in zip(jobs, probs, strict=True):
            assert p is not None
            preds = []
            for k, row in enumerate(p):
                top = int(np.argmax(row))
                rec: dict[str, Any] = {
                    "label": self.sm.labels[top],
                    "score": float(row[top]),
                    "probabilities": {lab: float(x) for lab, x in zip(self.sm.labels, row, strict=True)},
                }
                if j.explain:
                    from lorafed.serve.explain import token_attributions

                    pair = j.pairs[k] if j.pairs is not None else None
                    rec["attributions"] = token_attributions(
                        self.sm, j.texts[k], pair, target=top, steps=self.limits.explain_steps
                    )
                preds.append(rec)
            results.append({"predictions": preds})
        return results
