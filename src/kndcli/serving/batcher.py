"""Dynamic micro-batching: concurrent requests share one forward pass.

Requests put their clip on a queue and await a future. A worker thread takes the first
waiting item, then gathers more until the batch is full or `max_wait_ms` has passed since
that first item, runs the batch function once on all of them and resolves each request's
future. The event loop never runs the model. `concurrency` worker threads gather and run
batches side by side: one per scoring process, so every process has a batch to work on.

Items wait in one queue per owner (a request), and batches take from the owners in turn:
a `/predict/batch` of 16 long files shares the workers with the single clips that arrive
after it, instead of making each of them wait for all 16 (fair scheduling).

A batch that fails is retried item by item, once: one poisoned item must not fail its
neighbours, and a crash is not always the item's doing (a worker killed while idle fails
whatever batch it is handed next), so even a batch of one gets its second try. Only an
item that fails alone too gets the error, unless the error is one of `final_errors`,
which fail the whole batch at once because trying again would not help (a missed
deadline would only hold a thread for another one).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")

_STOP = object()


class BatcherClosedError(RuntimeError):
    """The batcher is shutting down and takes no new work."""


class FairQueue:
    """A queue per owner; `get` takes one entry from each owner in turn (round robin).

    `stop` is returned by `get` once `close` was called and every queued entry was taken.
    """

    def __init__(self, stop: object) -> None:
        self._owners: OrderedDict[Hashable, deque[Any]] = OrderedDict()
        self._ready = threading.Condition()
        self._closed = False
        self._stop = stop

    def put(self, owner: Hashable, entry: Any) -> None:
        with self._ready:
            if self._closed:  # no worker may be left to take it
                raise BatcherClosedError("the service is shutting down")
            self._owners.setdefault(owner, deque()).append(entry)
            self._ready.notify()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def get(self, timeout: float | None = None) -> Any:
        """The next owner's oldest entry; raises queue.Empty after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._ready:
            while not self._owners:
                if self._closed:
                    return self._stop
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise queue.Empty
                self._ready.wait(remaining)
            owner, entries = next(iter(self._owners.items()))
            entry = entries.popleft()
            del self._owners[owner]
            if entries:  # the owner goes to the back of the line with what it has left
                self._owners[owner] = entries
            return entry


class MicroBatcher(Generic[In, Out]):
    """Run `fn(list_of_items) -> list_of_results` on batches gathered from concurrent callers."""

    def __init__(
        self,
        fn: Callable[[list[In]], Sequence[Out]],
        *,
        max_batch_size: int = 16,
        max_wait_ms: float = 5.0,
        concurrency: int = 1,
        on_batch: Callable[[int, float], None] | None = None,
        final_errors: tuple[type[Exception], ...] = (),
        name: str = "knd-batcher",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max(0.0, max_wait_ms) / 1000
        self.on_batch = on_batch
        self.final_errors = final_errors
        self.batches = 0  # forward passes run
        self.items = 0  # items scored
        self.largest_batch = 0
        self._queue = FairQueue(_STOP)
        self._closed = False
        self._count_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
            for i in range(concurrency)
        ]
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------------ callers
    def submit_future(self, item: In, owner: Hashable = None) -> Future[Out]:
        """Queue one item; its result (or exception) arrives on the returned future.

        Items of one `owner` are taken in turn with other owners' (None: its own owner).
        """
        if self._closed:
            raise BatcherClosedError("the service is shutting down")
        future: Future[Out] = Future()
        self._queue.put(owner if owner is not None else object(), (item, future))
        return future

    async def submit(self, item: In, timeout: float | None = None, owner: Hashable = None) -> Out:
        """Await one item's result from the event loop, without blocking it."""
        future = self.submit_future(item, owner)
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Finish the queued work, then stop the worker threads."""
        if self._closed:
            return
        self._closed = True
        self._queue.close()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ worker
    def _gather(self, first: tuple[In, Future[Out]]) -> tuple[list[tuple[In, Future[Out]]], bool]:
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                entry = self._queue.get(timeout=max(0.0, remaining))
            except queue.Empty:
                break
            if entry is _STOP:
                return batch, True
            batch.append(entry)
        return batch, False

    def _loop(self) -> None:
        stop = False
        while not stop:
            entry = self._queue.get()
            if entry is _STOP:
                break
            batch, stop = self._gather(entry)
            # A caller that gave up (timeout, disconnect) cancelled its future: skip it.
            live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
            if live:
                self._run(live)

    def _run(self, batch: list[tuple[In, Future[Out]]], *, alone: bool = False) -> None:
        """Run one batch; `alone` marks an item's second try, whose error is its answer."""
        start = time.perf_counter()
        try:
            results = self.fn([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(
                    f"batch function returned {len(results)} results for {len(batch)} items"
                )
        except self.final_errors as exc:
            for _, fut in batch:
                fut.set_exception(exc)
            return
        except Exception as exc:
            if not alone:
                for entry in batch:
                    self._run([entry], alone=True)
                return
            log.exception("inference failed")
            batch[0][1].set_exception(exc)
            return
        with self._count_lock:
            self.batches += 1
            self.items += len(batch)
            self.largest_batch = max(self.largest_batch, len(batch))
        if self.on_batch is not None:
            try:
                self.on_batch(len(batch), time.perf_counter() - start)
            except Exception:  # metrics must never take inference down
                log.exception("on_batch callback failed")
        for (_, fut), result in zip(batch, results, strict=True):
            fut.set_result(result)
