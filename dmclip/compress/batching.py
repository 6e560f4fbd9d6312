"""The server's model thread: requests that arrive together are captioned in one decoder call."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import torch

from dmclip.compress.codec import Payload


class Job:
    """One request waiting for the model thread."""

    def __init__(self, payload: Payload, tokens: torch.Tensor | None):
        self.payload, self.tokens = payload, tokens
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()


class ModelQueue:
    """One thread owns the model. It takes the jobs that are waiting (up to ``batch_images`` images,
    waiting ``batch_wait`` s for more once it has one) and captions jobs whose restored sequences have the
    same length in one call; each job gets back its own rows. The short wait lets clients that send at
    about the same time share a call instead of falling out of step (the `compress serve` rows of docs/benchmarks.md). It is
    skipped once it holds a job from every open connection (``peers()``): a connection has at most one
    request in flight, so no other can come, and a lone client never waits."""

    def __init__(self, handler, batch_images: int, batch_wait: float, stats_add: Callable[..., None],
                 peers: Callable[[], int] | None = None):
        self.handler, self.batch_images, self.batch_wait = handler, batch_images, batch_wait
        self.peers = peers
        self.batched = callable(getattr(handler, "restore", None)) and callable(getattr(handler, "caption", None))
        self._queue: queue.Queue[Job] = queue.Queue()
        self._stats_add = stats_add
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dmclip-compress-model", daemon=True)
        self._thread.start()

    def submit(self, payload: Payload) -> Job:
        """Restore in the caller's thread (cheap: the payload fits the model) and queue the job."""
        job = Job(payload, self.handler.restore(payload) if self.batched else None)
        self._queue.put(job)
        return job

    def alive(self) -> bool:
        """Whether the model thread still runs (a job submitted to a dead one would never be answered)."""
        return self._thread.is_alive()

    def close(self, timeout: float) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _take(self) -> list[Job]:
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        jobs, images = [first], first.payload.batch
        deadline = time.monotonic() + self.batch_wait
        while images < self.batch_images:
            if self.peers is not None and len(jobs) >= self.peers() and self._queue.empty():
                break
            try:
                job = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0)) \
                    if self.batch_wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            jobs.append(job)
            images += job.payload.batch
        return jobs

    def _run(self) -> None:
        # after stop, the jobs already queued are still answered: their connections wait for them
        while not (self._stop.is_set() and self._queue.empty()):
            jobs = self._take()
            if not self.batched:
                for job in jobs:
                    self._finish([job], lambda j=job: [dict(self.handler(j.payload))])
                continue
            groups: dict[tuple, list[Job]] = {}
            for job in jobs:
                groups.setdefault(tuple(job.tokens.shape[1:]), []).append(job)
            for group in groups.values():
                self._caption(group)

    def _caption(self, group: list[Job]) -> None:
        def call() -> list[dict]:
            tokens = torch.cat([j.tokens for j in group]) if len(group) > 1 else group[0].tokens
            captions = list(self.handler.caption(tokens))
            out, start = [], 0
            for job in group:
                out.append({"captions": captions[start:start + job.payload.batch],
                            "restored_tokens": tokens.shape[1], "decoder_batch": tokens.shape[0]})
                start += job.payload.batch
            return out

        if not self._finish(group, call) and len(group) > 1:
            for job in group:  # one request that breaks the model must not fail the others batched with it
                job.error = None
                self._finish([job], lambda j=job: [self._caption_one(j)])

    def _caption_one(self, job: Job) -> dict:
        return {"captions": list(self.handler.caption(job.tokens)), "restored_tokens": job.tokens.shape[1],
                "decoder_batch": job.payload.batch}

    def _finish(self, jobs: list[Job], call: Callable[[], list[dict]]) -> bool:
        try:
            results = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting connection, which replies
            for job in jobs:
                job.error = exc
            if len(jobs) == 1:
                jobs[0].done.set()
            return False
        self._stats_add(decoder_calls=1, images=sum(j.payload.batch for j in jobs))
        for job, result in zip(jobs, results):
            job.result = result
            job.done.set()
        return True
