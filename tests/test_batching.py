"""DynamicBatcher: batching, splitting, bounded queue, failures, drain, metrics."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from edgecloud.serving.batching import DynamicBatcher
from edgecloud.serving.metrics import Metrics
from edgecloud.protocol.errors import ResourceExhausted, Unavailable

RNG = np.random.default_rng(0)


class Recorder:
    """fn for the batcher: records batch sizes; can be held to fill the queue."""

    def __init__(self, hold: bool = False) -> None:
        self.sizes: list[int] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, batch):
        self.sizes.append(int(batch.shape[0]))
        self.started.set()
        assert self.release.wait(10)
        if isinstance(batch, np.ndarray) and (batch < 0).any():
            raise ValueError("negative input")
        return batch * 2 + 1


def make(fn, **kw) -> DynamicBatcher:
    args = dict(max_batch_size=8, max_queue_delay_s=0.2, max_queue_size=64, name="m")
    args.update(kw)
    return DynamicBatcher(fn, **args)


def test_concurrent_requests_share_one_batch_and_get_their_rows():
    rec = Recorder()
    b = make(rec, max_queue_delay_s=0.3)
    items = [RNG.random((n, 3)).astype(np.float32) for n in (1, 2, 3)]
    futures = [b.submit(x) for x in items]
    for x, f in zip(items, futures):
        np.testing.assert_array_equal(f.result(5), x * 2 + 1)
        assert f.batch_size == 6
    assert rec.sizes == [6]
    b.close()


def test_full_batch_runs_without_waiting_for_the_delay():
    rec = Recorder()
    b = make(rec, max_batch_size=4, max_queue_delay_s=60.0)
    f1, f2, f3 = (b.submit(np.ones((2, 1), np.float32)) for _ in range(3))
    # 2 + 2 fill the batch: answered long before the 60 s delay would have elapsed.
    f1.result(5), f2.result(5)
    assert not f3.done()
    b.close()  # drains the last one without waiting for the delay
    assert f3.result(0).shape == (2, 1)
    assert rec.sizes == [4, 2]


def test_request_larger_than_max_batch_is_chunked_and_reassembled():
    rec = Recorder()
    b = make(rec, max_batch_size=4, max_queue_delay_s=0.0)
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    np.testing.assert_array_equal(b.submit(x).result(5), x * 2 + 1)
    assert rec.sizes == [4, 4, 2]
    b.close()


def test_tuple_and_dict_outputs_are_split_per_request():
    def fn(batch):
        return {"sum": batch.sum(axis=1), "pair": (batch, -batch)}

    b = make(fn, max_queue_delay_s=0.2)
    a, c = np.ones((2, 3), np.float32), np.full((1, 3), 5.0, np.float32)
    fa, fc = b.submit(a), b.submit(c)
    ra, rc = fa.result(5), fc.result(5)
    np.testing.assert_array_equal(ra["sum"], [3.0, 3.0])
    np.testing.assert_array_equal(rc["sum"], [15.0])
    np.testing.assert_array_equal(rc["pair"][1], -c)
    b.close()


def test_torch_tensors_are_batched():
    b = make(lambda t: t * 3, max_queue_delay_s=0.1)
    f1, f2 = b.submit(torch.ones(1, 2)), b.submit(torch.zeros(2, 2))
    assert torch.equal(f1.result(5), torch.full((1, 2), 3.0))
    assert torch.equal(f2.result(5), torch.zeros(2, 2))
    b.close()


def test_queue_full_raises_resource_exhausted_at_submit():
    rec = Recorder(hold=True)
    b = make(rec, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=3)
    busy = b.submit(np.ones((1, 1), np.float32))
    assert rec.started.wait(5)  # worker is inside fn; the queue is empty again
    queued = b.submit(np.ones((3, 1), np.float32))
    assert b.depth == 3
    with pytest.raises(ResourceExhausted, match="max_queue_size=3"):
        b.submit(np.ones((1, 1), np.float32))
    rec.release.set()
    assert busy.result(5).shape == (1, 1) and queued.result(5).shape == (3, 1)
    b.submit(np.ones((1, 1), np.float32)).result(5)  # room again
    b.close()


def test_exception_fails_only_its_batch_and_worker_survives():
    rec = Recorder()
    b = make(rec, max_queue_delay_s=0.0)
    bad = b.submit(-np.ones((2, 1), np.float32))
    with pytest.raises(ValueError, match="negative input"):
        bad.result(5)
    good = b.submit(np.ones((2, 1), np.float32))
    np.testing.assert_array_equal(good.result(5), np.full((2, 1), 3.0))
    b.close()


def test_wrong_row_count_from_fn_is_an_error():
    b = make(lambda x: x[:1], max_queue_delay_s=0.0)
    with pytest.raises(Exception, match="returned 1 rows for 2 samples"):
        b.submit(np.ones((2, 1), np.float32)).result(5)
    b.close()


def test_cancelled_while_queued_is_never_computed():
    rec = Recorder(hold=True)
    b = make(rec, max_batch_size=1, max_queue_delay_s=0.0)
    first = b.submit(np.ones((1, 1), np.float32))
    assert rec.started.wait(5)
    doomed = b.submit(np.full((1, 1), 7.0, np.float32))
    assert doomed.cancel()
    last = b.submit(np.ones((1, 1), np.float32))
    rec.release.set()
    first.result(5), last.result(5)
    assert rec.sizes == [1, 1]  # the cancelled one never reached fn
    b.close()


def test_close_drains_queue_then_refuses():
    rec = Recorder()
    b = make(rec, max_batch_size=100, max_queue_delay_s=60.0)
    futures = [b.submit(np.full((1, 1), i, np.float32)) for i in range(5)]
    b.close()
    assert [f.result(0).item() for f in futures] == [2 * i + 1 for i in range(5)]
    with pytest.raises(Unavailable):
        b.submit(np.ones((1, 1), np.float32))


def test_metrics_record_batch_sizes_and_queue_depth():
    metrics = Metrics("cloud")
    rec = Recorder(hold=True)
    b = make(rec, max_batch_size=4, max_queue_delay_s=0.0, metrics=metrics, name="mx")
    first = b.submit(np.ones((1, 1), np.float32))
    assert rec.started.wait(5)
    rest = [b.submit(np.ones((2, 1), np.float32)) for _ in range(2)]
    get = metrics.registry.get_sample_value
    assert get("edgecloud_queue_depth", {"model": "mx"}) == 4
    rec.release.set()
    for f in [first, *rest]:
        f.result(5)
    b.close()
    assert get("edgecloud_queue_depth", {"model": "mx"}) == 0
    assert get("edgecloud_batch_size_count", {"model": "mx"}) == 2
    assert get("edgecloud_batch_size_sum", {"model": "mx"}) == 5


# ---- inline compute on an idle batcher, solo_fn --------------------------------------------
def test_inline_submit_on_an_idle_batcher_computes_in_the_calling_thread():
    threads: list[threading.Thread] = []

    def fn(batch):
        threads.append(threading.current_thread())
        return batch * 2 + 1

    metrics = Metrics("edge")
    b = make(fn, max_queue_delay_s=0.0, metrics=metrics, name="mi")
    x = np.ones((3, 1), np.float32)
    future = b.submit(x, inline=True)
    assert future.done()  # answered before submit returned
    np.testing.assert_array_equal(future.result(0), x * 2 + 1)
    assert threads == [threading.current_thread()]
    assert future.batch_size == 3 and future.compute_s > 0 and future.queue_s >= 0
    get = metrics.registry.get_sample_value
    assert get("edgecloud_batch_size_count", {"model": "mi"}) == 1
    b.close()


def test_inline_submit_queues_behind_a_running_batch_and_still_batches():
    rec = Recorder(hold=True)
    b = make(rec, max_batch_size=8, max_queue_delay_s=0.0)
    first = b.submit(np.ones((1, 1), np.float32))
    assert rec.started.wait(5)  # the worker is inside fn
    # busy: inline requests queue (they return at once, unresolved) and share the next batch
    queued = [b.submit(np.ones((2, 1), np.float32), inline=True) for _ in range(3)]
    assert not any(f.done() for f in queued) and b.depth == 6
    rec.release.set()
    for f in [first, *queued]:
        f.result(5)
    assert rec.sizes == [1, 6]
    b.close()


def test_inline_caller_computing_blocks_the_worker_until_it_is_done():
    rec = Recorder(hold=True)
    b = make(rec, max_batch_size=8, max_queue_delay_s=0.0)
    done: list = []
    caller = threading.Thread(target=lambda: done.append(b.submit(np.ones((1, 1), np.float32), inline=True)))
    caller.start()
    assert rec.started.wait(5)  # the caller's thread is inside fn
    later = [b.submit(np.ones((1, 1), np.float32)) for _ in range(2)]
    assert not any(f.done() for f in later) and rec.sizes == [1]  # one batch at a time
    rec.release.set()
    caller.join(5)
    assert done and done[0].result(0).shape == (1, 1)
    for f in later:
        f.result(5)
    assert rec.sizes == [1, 2]
    b.close()


def test_inline_keeps_the_queue_limit_close_and_the_delay():
    rec = Recorder()
    b = make(rec, max_batch_size=8, max_queue_delay_s=0.0, max_queue_size=2)
    with pytest.raises(ResourceExhausted, match="max_queue_size=2"):
        b.submit(np.ones((3, 1), np.float32), inline=True)
    b.close()
    with pytest.raises(Unavailable):
        b.submit(np.ones((1, 1), np.float32), inline=True)
    # with a queue delay a lone request waits for company, even when asked for inline
    b = make(rec, max_batch_size=8, max_queue_delay_s=0.3)
    f1 = b.submit(np.ones((1, 1), np.float32), inline=True)
    assert not f1.done()
    f2 = b.submit(np.ones((2, 1), np.float32), inline=True)
    f1.result(5), f2.result(5)
    assert rec.sizes[-1] == 3
    # a request larger than one batch is chunked by the worker as before
    b2 = make(rec, max_batch_size=4, max_queue_delay_s=0.0)
    np.testing.assert_array_equal(b2.submit(np.ones((10, 1), np.float32), inline=True).result(5),
                                  np.full((10, 1), 3.0))
    b.close(), b2.close()


def test_inline_failure_goes_to_the_future_and_the_batcher_keeps_working():
    rec = Recorder()
    b = make(rec, max_queue_delay_s=0.0)
    bad = b.submit(-np.ones((2, 1), np.float32), inline=True)
    with pytest.raises(ValueError, match="negative input"):
        bad.result(0)
    assert b.submit(np.ones((1, 1), np.float32), inline=True).result(0).shape == (1, 1)
    assert b.submit(np.ones((1, 1), np.float32)).result(5).shape == (1, 1)  # worker still there
    b.close()


def test_solo_fn_serves_a_request_alone_and_fn_serves_shared_batches():
    calls: list[tuple[str, int]] = []

    def fn(batch):
        calls.append(("rows", int(batch.shape[0])))
        return batch * 2 + 1

    def solo(item):
        calls.append(("solo", int(item.shape[0])))
        return {"whole": item.sum()}  # any object: handed over as is

    b = make(fn, max_batch_size=8, max_queue_delay_s=0.2, solo_fn=solo)
    alone = b.submit(np.ones((3, 1), np.float32))
    assert alone.result(5) == {"whole": 3.0}
    pair = [b.submit(np.ones((1, 1), np.float32)) for _ in range(2)]
    for f in pair:
        np.testing.assert_array_equal(f.result(5), np.full((1, 1), 3.0))
    chunked = make(fn, max_batch_size=2, max_queue_delay_s=0.0, solo_fn=solo)
    assert chunked.submit(np.ones((3, 1), np.float32)).result(5).shape == (3, 1)  # pieces: rows
    assert calls[:2] == [("solo", 3), ("rows", 2)]
    assert ("solo", 3) not in calls[2:] and ("solo", 2) not in calls[2:]
    b.close(), chunked.close()
