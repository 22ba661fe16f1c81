"""Run seeded jobs in order-preserving fan-out: inline, a spawn process pool, or Ray tasks.

Why each part:

* **results in job order**, whatever order they finish in, so the caller's output never depends on
  scheduling;
* **shared data once**: a large read-only object (test images, crafted attacks) goes to a
  temporary file for the local pool (each worker loads it once) and into Ray's object store once
  for a cluster, instead of being pickled into every task;
* **Ray retries** a task whose worker or node died (``max_retries``), so a node removed mid-job
  costs time, not the result; the task is re-run from its own seed and gives the same answer;
* Ray is optional (``pip install edgecloud[ray]``); without ``--ray`` / ``RAY_ADDRESS`` it is
  never imported.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

J = TypeVar("J")
R = TypeVar("R")

RAY_RETRIES = 3


def ray_address(flag: str | None = None) -> str | None:
    """The Ray cluster to use: ``--ray ADDRESS`` else ``RAY_ADDRESS`` else None (local pool).
    ``auto`` lets Ray find a running cluster; ``local`` starts a private one-node cluster."""
    value = flag or os.environ.get("RAY_ADDRESS") or None
    return value.strip() if value else None


class _SharedFile:
    """A shared object saved once for the local pool; loaded once per worker process."""

    _loaded: dict[str, Any] = {}

    def __init__(self, path: str) -> None:
        self.path = path

    def get(self) -> Any:
        if self.path not in self._loaded:
            import torch

            self._loaded.clear()  # one run's data at a time per worker
            self._loaded[self.path] = torch.load(self.path, weights_only=False)
        return self._loaded[self.path]


def _call_local(fn: Callable[..., R], job: Any, shared: _SharedFile | None) -> R:
    return fn(job) if shared is None else fn(job, shared.get())


def _call_ray(fn: Callable[..., R], job: Any, shared: Any, has_shared: bool) -> R:
    # a top-level ObjectRef argument arrives resolved: ``shared`` is the object itself
    return fn(job, shared) if has_shared else fn(job)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_tasks(fn: Callable[..., R], jobs: Sequence[J], *, shared: Any = None, workers: int | None = None,
              ray: str | None = None, cpus_per_task: float = 1.0, progress: bool = False,
              desc: str = "jobs") -> list[R]:
    """``[fn(job) for job in jobs]`` (``fn(job, shared)`` when ``shared`` is given), fanned out.

    ``ray``: a Ray address (see :func:`ray_address`): one Ray task per job, ``cpus_per_task``
    CPUs each. Otherwise ``workers`` spawned processes (default: one per core, at most one per
    job; 1 runs inline). ``fn`` and the jobs must be picklable (module-level function, plain data).
    """
    jobs = list(jobs)
    if not jobs:
        return []
    if ray:
        return _run_ray(fn, jobs, shared, ray, cpus_per_task, progress, desc)
    n = max(1, min(workers or cores(), len(jobs)))
    if n == 1:
        bar = tqdm(jobs, desc=desc, disable=not progress, leave=False)
        return [fn(job) if shared is None else fn(job, shared) for job in bar]
    import multiprocessing

    with tempfile.TemporaryDirectory(prefix="edgecloud-jobs-") as tmp:
        ref = None
        if shared is not None:
            import torch

            path = str(Path(tmp) / "shared.pt")
            torch.save(shared, path)
            ref = _SharedFile(path)
        results: list[Any] = [None] * len(jobs)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=n, mp_context=ctx) as pool:
            futures = {pool.submit(_call_local, fn, job, ref): i for i, job in enumerate(jobs)}
            for fut in tqdm(as_completed(futures), total=len(futures), desc=desc, disable=not progress):
                results[futures[fut]] = fut.result()
    return results


def _run_ray(fn: Callable[..., R], jobs: list[Any], shared: Any, address: str, cpus_per_task: float,
             progress: bool, desc: str) -> list[R]:
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuntimeError("--ray needs Ray: pip install 'edgecloud[ray]'") from exc
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address != "local":
            kwargs["address"] = address
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            raise ConnectionError(f"--ray {address}: no Ray cluster answers there ({exc})") from exc
    task = ray.remote(num_cpus=cpus_per_task, max_retries=RAY_RETRIES)(_call_ray)
    shared_ref = ray.put(shared) if shared is not None else None
    refs = [task.remote(fn, job, shared_ref, shared is not None) for job in jobs]
    if progress:
        pending = list(refs)
        with tqdm(total=len(refs), desc=f"{desc} (ray)") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update(len(done))
    return ray.get(refs)
