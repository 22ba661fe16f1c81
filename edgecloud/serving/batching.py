"""A dynamic batcher: many small requests -> one call of ``fn`` on their concatenation.

On 2 CPU cores one gRPC round trip costs about as much as one batch-1 inference, so the
servers queue requests for at most ``max_queue_delay_s`` and run them together (as Triton's
dynamic batcher does).

Rules:

* Each submitted item is a batch of >= 1 samples along dim 0: a numpy array, a torch tensor,
  or a tuple/list/dict of them with the same leading size.
* A batch holds at most ``max_batch_size`` samples. Requests are never split across batches,
  except a single request larger than ``max_batch_size``: it is cut into chunks of
  ``max_batch_size`` (the last chunk may share a batch with the next requests), and its
  future resolves to the chunk results concatenated in order.
* The oldest queued request waits at most ``max_queue_delay_s`` for the batch to fill.
* If queued samples + the new request would exceed ``max_queue_size``, :meth:`submit` raises
  :class:`ResourceExhausted` at once (bounded queue, explicit overload).
* ``fn(batch)`` returns an array/tensor or a tuple/list/dict of them with the batch's samples
  along dim 0; each request gets its rows. An exception in ``fn`` fails exactly the futures of
  that batch; the worker keeps going.
* Optional ``solo_fn(item)``: used instead of ``fn`` for a batch that is exactly one whole
  request (the usual case at low load); its result goes to that request as is, without
  concatenating, row-checking or slicing, so it may be a richer object than rows.
* A future cancelled while still queued is dropped before compute.
* :meth:`close` stops accepting and drains: everything already queued is still computed.
* ``submit(item, inline=True)`` (for callers that block on the answer anyway): when nothing
  is queued or computing, ``max_queue_delay_s`` is 0 and ``item`` fits one batch, ``fn`` runs
  right away in the calling thread and the returned future is already resolved. That saves two
  thread wake-ups (caller -> worker -> caller) per request when the server is idle, and keeps
  the compute on the thread whose caches hold the request. Otherwise it queues as usual;
  either way only one batch computes at a time, so requests arriving meanwhile still batch
  together behind it. With a queue delay > 0 a lone request still waits for company.

Futures are :class:`BatchFuture` and carry ``queue_s``, ``compute_s`` and ``batch_size`` of
the batch that answered them (the last chunk's, for a chunked request), for latency metrics.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

import numpy as np

from edgecloud.serving.metrics import Metrics
from edgecloud.protocol.errors import InferenceError, ResourceExhausted, Unavailable


class BatchFuture(Future):
    """A Future plus the timing of the batch that computed it."""

    queue_s: float = 0.0       # from submit to the start of the batch's compute
    compute_s: float = 0.0     # the batch's ``fn`` time
    batch_size: int = 0        # samples in that batch


# ---- pytrees of arrays/tensors ---------------------------------------------------------
def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, Mapping):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    if isinstance(tree, (tuple, list)):
        return [leaf for v in tree for leaf in _leaves(v)]
    return [tree]


def batch_len(tree: Any) -> int:
    """Samples along dim 0 (all leaves must agree)."""
    leaves = _leaves(tree)
    if not leaves:
        raise ValueError("empty item: nothing to batch")
    sizes = {int(leaf.shape[0]) if getattr(leaf, "ndim", 0) else -1 for leaf in leaves}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(f"batch items need one leading dimension shared by all tensors; got {sizes}")
    return sizes.pop()


def _cat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, Mapping):
        return {k: _cat([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([p[i] for p in parts]) for i in range(len(first)))
    if len(parts) == 1:
        return first
    if isinstance(first, np.ndarray):
        return np.concatenate(parts, axis=0)
    import torch  # only when torch tensors are batched (the edge)

    return torch.cat(parts, dim=0)


def _slice(tree: Any, start: int, stop: int) -> Any:
    if isinstance(tree, Mapping):
        return {k: _slice(v, start, stop) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_slice(v, start, stop) for v in tree)
    return tree[start:stop]


class _Request:
    """One submitted item; may be cut into several pieces when larger than a batch."""

    __slots__ = ("future", "n", "pieces_left", "results", "failed", "started", "t_submit")

    def __init__(self, future: BatchFuture, n: int, pieces: int) -> None:
        self.future = future
        self.n = n
        self.pieces_left = pieces
        self.results: list[Any] = [None] * pieces
        self.failed = False
        self.started = False
        self.t_submit = time.perf_counter()


class _Piece:
    __slots__ = ("request", "index", "data", "n", "t_enqueue")

    def __init__(self, request: _Request, index: int, data: Any, n: int) -> None:
        self.request = request
        self.index = index
        self.data = data
        self.n = n
        self.t_enqueue = request.t_submit


class DynamicBatcher:
    """Queue + one worker thread that runs ``fn`` on concatenated requests (see module doc)."""

    def __init__(
        self,
        fn: Callable[[Any], Any],
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        name: str = "",
        metrics: Metrics | None = None,
        solo_fn: Callable[[Any], Any] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_queue_delay_s < 0:
            raise ValueError("max_batch_size, max_queue_size must be >= 1 and delay >= 0")
        self.fn = fn
        self.solo_fn = solo_fn
        self.max_batch_size = int(max_batch_size)
        self.max_queue_delay_s = float(max_queue_delay_s)
        self.max_queue_size = int(max_queue_size)
        self.name = name
        self.metrics = metrics
        self._queue: collections.deque[_Piece] = collections.deque()
        self._depth = 0  # queued samples
        self._cond = threading.Condition()
        self._closed = False
        self._busy = False  # a batch is computing (in the worker or inline in a caller)
        self._depth_gauge: Any = None  # metric children, made on first use
        self._batch_hist: Any = None
        self._worker = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self._worker.start()

    @property
    def depth(self) -> int:
        """Samples waiting (not yet in a running batch)."""
        with self._cond:
            return self._depth

    @property
    def closed(self) -> bool:
        return self._closed

    def _report_depth(self) -> None:
        if self.metrics is not None:
            if self._depth_gauge is None:
                self._depth_gauge = self.metrics.queue_depth.labels(model=self.name)
            self._depth_gauge.set(self._depth)

    def _admit(self, n: int) -> None:
        """Raise unless ``n`` more samples may enter (caller holds the lock)."""
        if self._closed:
            raise Unavailable(f"batcher {self.name!r} is shut down")
        if self._depth + n > self.max_queue_size:
            raise ResourceExhausted(
                f"queue of {self.name!r} is full: {self._depth} samples waiting, "
                f"{n} more would exceed max_queue_size={self.max_queue_size}"
            )

    def submit(self, item: Any, *, inline: bool = False) -> BatchFuture:
        """Queue ``item`` (>= 1 samples along dim 0); the future resolves to its output rows.

        With ``inline=True`` an idle batcher computes ``item`` in the calling thread before
        returning (see the module doc); use it only where the caller waits for the result.

        Raises :class:`ResourceExhausted` when the queue cannot take ``item``'s samples, and
        :class:`Unavailable` after :meth:`close`.
        """
        n = batch_len(item)
        if n < 1:
            raise ValueError("a batch item needs at least one sample")
        future = BatchFuture()
        if inline and self.max_queue_delay_s == 0 and n <= self.max_batch_size:
            request = _Request(future, n, 1)
            piece = _Piece(request, 0, item, n)
            with self._cond:
                self._admit(n)
                run_now = not self._busy and not self._queue
                if run_now:
                    self._busy = True
                    request.started = True
                    future.set_running_or_notify_cancel()  # fresh future: always True
                else:
                    self._queue.append(piece)
                    self._depth += n
                    self._report_depth()
                    self._cond.notify()
            if run_now:
                try:
                    self._compute([piece])
                finally:
                    with self._cond:
                        self._busy = False
                        if self._queue:
                            self._cond.notify()
            return future
        step = self.max_batch_size
        starts = list(range(0, n, step))
        request = _Request(future, n, len(starts))
        pieces = [
            _Piece(request, i, item if len(starts) == 1 else _slice(item, s, min(s + step, n)),
                   min(s + step, n) - s)
            for i, s in enumerate(starts)
        ]
        with self._cond:
            self._admit(n)
            self._queue.extend(pieces)
            self._depth += n
            self._report_depth()
            self._cond.notify()
        return future

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting, compute everything queued, stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout)

    # ---- worker ------------------------------------------------------------------------
    def _take_batch(self) -> list[_Piece] | None:
        """Wait for work, let the batch fill (bounded by the delay), pop it. None = exit."""
        with self._cond:
            while not self._queue or self._busy:
                if self._closed and not self._queue:
                    return None
                self._cond.wait()
            deadline = self._queue[0].t_enqueue + self.max_queue_delay_s
            while self._depth < self.max_batch_size and not self._closed:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch: list[_Piece] = []
            total = 0
            while self._queue and (not batch or total + self._queue[0].n <= self.max_batch_size):
                piece = self._queue.popleft()
                self._depth -= piece.n
                request = piece.request
                if request.failed:
                    continue
                if not request.started:
                    request.started = True
                    if not request.future.set_running_or_notify_cancel():
                        request.failed = True  # cancelled while queued: drop all its pieces
                        continue
                batch.append(piece)
                total += piece.n
            self._report_depth()
            self._busy = bool(batch)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if batch:
                try:
                    self._compute(batch)
                finally:
                    with self._cond:
                        self._busy = False

    def _compute(self, batch: list[_Piece]) -> None:
        total = sum(p.n for p in batch)
        solo = self.solo_fn is not None and len(batch) == 1 and len(batch[0].request.results) == 1
        t0 = time.perf_counter()
        try:
            if solo:
                result = self.solo_fn(batch[0].data)
            else:
                data = _cat([p.data for p in batch])
                result = self.fn(data)
                rows = batch_len(result)
                if rows != total:
                    raise InferenceError(
                        f"batch function of {self.name!r} returned {rows} rows for {total} samples"
                    )
        except BaseException as exc:  # noqa: BLE001 - handed to the callers, worker survives
            compute_s = time.perf_counter() - t0
            for piece in batch:
                self._fail(piece.request, exc, t0, compute_s, total)
            return
        compute_s = time.perf_counter() - t0
        if self.metrics is not None:
            if self._batch_hist is None:
                self._batch_hist = self.metrics.batch_size.labels(model=self.name)
            self._batch_hist.observe(total)
        if solo:
            request = batch[0].request
            if not request.failed:
                request.pieces_left = 0
                fut = request.future
                fut.queue_s = t0 - request.t_submit
                fut.compute_s = compute_s
                fut.batch_size = total
                fut.set_result(result)
            return
        offset = 0
        for piece in batch:
            request = piece.request
            rows_of = _slice(result, offset, offset + piece.n)
            offset += piece.n
            if request.failed:
                continue
            request.results[piece.index] = rows_of
            request.pieces_left -= 1
            if request.pieces_left == 0:
                fut = request.future
                fut.queue_s = t0 - request.t_submit
                fut.compute_s = compute_s
                fut.batch_size = total
                fut.set_result(_cat(request.results) if len(request.results) > 1 else rows_of)

    @staticmethod
    def _fail(request: _Request, exc: BaseException, t0: float, compute_s: float, total: int) -> None:
        if request.failed:
            return
        request.failed = True
        fut = request.future
        fut.queue_s = t0 - request.t_submit
        fut.compute_s = compute_s
        fut.batch_size = total
        fut.set_exception(exc)
