"""A micro-batcher: one worker thread owns the model; requests wait in a bounded queue.

The worker takes the oldest waiting job. If that job may be batched, it keeps collecting waiting
jobs with the same key (compatible settings) until their weights (images) reach `max_batch` or
`window_s` has passed since it started collecting, then hands them to `run` in one call. Jobs of
other keys keep their place in the queue. `run(key, payloads)` returns one result per payload,
each a value or an exception that fails only that job.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

Runner = Callable[[Hashable, Sequence[Any]], Sequence[Any]]


class QueueFull(Exception):
    """The queue holds `max_queue` jobs already; the caller should come back later."""


class ShuttingDown(Exception):
    """The batcher was stopped before this job ran."""


@dataclass(eq=False)
class Job:
    """A queued request: `run` gets its payload, its future gets run's result for it."""

    key: Hashable
    payload: Any
    weight: int = 1  # how much of a batch this job fills (images)
    batchable: bool = True
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """The bounded queue and the worker thread that drains it in batches (see the module docstring)."""

    def __init__(self, run: Runner, *, max_batch: int, window_s: float, max_queue: int) -> None:
        self._run, self.max_batch, self.window_s, self.max_queue = run, max_batch, window_s, max_queue
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    @property
    def depth(self) -> int:
        """Jobs waiting (not yet running)."""
        with self._cond:
            return len(self._pending)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="blip3o-model-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Fail waiting jobs, let the running batch finish, end the worker."""
        with self._cond:
            self._stopped = True
            waiting, self._pending = list(self._pending), deque()
            self._cond.notify_all()
        for job in waiting:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ShuttingDown("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, key: Hashable, payload: Any, *, weight: int = 1, batchable: bool = True) -> Future:
        """Queue a job; its future resolves to run's result for it. Raises QueueFull past `max_queue`."""
        job = Job(key, payload, weight, batchable)
        with self._cond:
            if self._stopped:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting already")
            self._pending.append(job)
            self._cond.notify_all()
        # a job given up on (timeout, disconnect) leaves the queue at once instead of holding a place
        job.future.add_done_callback(lambda f: self._forget(job) if f.cancelled() else None)
        return job.future

    def _forget(self, job: Job) -> None:
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if live:
                self._execute(live)

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._pending and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            first = self._pending[0]
            if not first.batchable:
                return [self._pending.popleft()]
            deadline = time.monotonic() + self.window_s
            while True:
                batch = self._compatible(first)
                left = deadline - time.monotonic()
                if sum(job.weight for job in batch) >= self.max_batch or left <= 0 or self._stopped:
                    break
                self._cond.wait(left)
            for job in batch:
                self._pending.remove(job)
            return batch

    def _compatible(self, first: Job) -> list[Job]:
        """`first` (if still waiting) and the waiting jobs that can share its call, oldest first."""
        batch, weight = [], 0
        for job in self._pending:
            if job is first or (job.batchable and job.key == first.key):
                if batch and weight + job.weight > self.max_batch:
                    continue
                batch.append(job)
                weight += job.weight
        return batch

    def _execute(self, jobs: list[Job]) -> None:
        try:
            results = self._run(jobs[0].key, [job.payload for job in jobs])
            if len(results) != len(jobs):
                raise RuntimeError(f"batch runner returned {len(results)} results for {len(jobs)} jobs")
        except Exception as e:  # the runner failed as a whole: every job of the batch learns why
            results = [e] * len(jobs)
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
