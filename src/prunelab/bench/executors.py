"""Where tasks run: local worker processes, or a Ray cluster.

Both yield ``(task, result)`` as tasks finish and carry phase messages from workers back to the
sweep's display through a queue.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch

from prunelab.bench import worker
from prunelab.errors import PrunelabError

Task = dict[str, Any]


def default_threads(jobs: int) -> int:
    """Torch threads per run: the machine's cores split between the parallel jobs."""
    return max(1, (os.cpu_count() or 1) // max(jobs, 1))


def _init_local(messages: Any) -> None:
    worker.set_progress(lambda key, text: messages.put((key, text)))


class InlineExecutor:
    """Tasks one after another in this process: no start-up cost, for ``--jobs 1``."""

    def __init__(self) -> None:
        self.messages: queue.SimpleQueue = queue.SimpleQueue()
        worker.set_progress(lambda key, text: self.messages.put((key, text)))

    def run(self, tasks: list[Task], poll: Callable[[], None]) -> Iterator[tuple[Task, dict]]:
        threads = torch.get_num_threads()
        try:
            for task in tasks:
                result = worker.execute(task)
                poll()
                yield task, result
        finally:
            torch.set_num_threads(threads)

    def close(self) -> None:
        worker.set_progress(worker.ignore_progress)


class LocalExecutor:
    """``jobs`` worker processes on this machine (spawned: safe with torch's thread pools)."""

    def __init__(self, jobs: int):
        self.jobs = jobs
        self._context = multiprocessing.get_context("spawn")
        self.messages = self._context.Queue()
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.jobs, mp_context=self._context, initializer=_init_local,
                                   initargs=(self.messages,))

    def _submit(self, task: Task) -> Any:
        try:
            return self._pool.submit(worker.execute, task)
        except BrokenProcessPool:  # a worker of an earlier batch died: start afresh
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            return self._pool.submit(worker.execute, task)

    def run(self, tasks: list[Task], poll: Callable[[], None]) -> Iterator[tuple[Task, dict]]:
        """Results as tasks finish. When a worker dies (killed, out of memory), the pool breaks
        and fails every task in it; those are run once more on a fresh pool, and fail only if
        that breaks too."""
        for attempt in (1, 2):
            futures = {self._submit(task): task for task in tasks}
            pending, broken = set(futures), []
            while pending:
                finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                poll()
                for future in finished:
                    task = futures[future]
                    try:
                        result = future.result()
                    except BrokenProcessPool as exc:
                        if attempt == 1:
                            broken.append(task)
                            continue
                        result = {"status": "failed", "error": f"worker process died: {exc}"}
                    yield task, result
            if not broken:
                return
            tasks = broken

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.messages.close()


class RayExecutor:
    """Tasks on a Ray cluster (``address``: ``auto``, ``ray://host:port``, or None to start one
    on this machine). Each task reserves ``threads`` CPUs."""

    def __init__(self, jobs: int, threads: int, address: str | None):
        try:
            import ray
            from ray.util.queue import Queue
        except ImportError:
            raise PrunelabError(
                "the ray executor needs Ray: pip install 'prunelab[ray]' (or pip install ray)"
            ) from None
        self.ray = ray
        options: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False,
                                   "include_dashboard": False}
        if address:
            options["address"] = address
        else:
            options["num_cpus"] = jobs * threads
        try:
            ray.init(**options)
        except (ConnectionError, RuntimeError, ray.exceptions.RayError) as exc:
            raise PrunelabError(
                f"cannot reach the Ray cluster at {address!r}: {exc}. Check the address, and if "
                "the cluster uses token authentication give this machine its token "
                "(RAY_AUTH_TOKEN or ~/.ray/auth_token, see `ray get-auth-token`)"
            ) from None
        self.messages = Queue()
        self._remote = ray.remote(num_cpus=threads)(_ray_execute)

    def run(self, tasks: list[Task], poll: Callable[[], None]) -> Iterator[tuple[Task, dict]]:
        refs = {self._remote.remote(task, self.messages): task for task in tasks}
        pending = list(refs)
        while pending:
            finished, pending = self.ray.wait(pending, num_returns=1, timeout=0.2)
            poll()
            for ref in finished:
                task = refs[ref]
                try:
                    yield task, self.ray.get(ref)
                except self.ray.exceptions.RayError as exc:
                    yield task, {"status": "failed", "error": f"ray task failed: {exc}"}

    def close(self) -> None:
        self.messages.shutdown()
        self.ray.shutdown()


def _ray_execute(task: Task, messages: Any) -> dict:
    worker.set_progress(lambda key, text: messages.put_nowait((key, text)))
    return worker.execute(task)


def drain(messages: Any) -> list[tuple[str, str]]:
    """Every phase message waiting in the queue (one round trip for Ray's queue)."""
    if hasattr(messages, "get_nowait_batch"):
        waiting = messages.qsize()
        return messages.get_nowait_batch(waiting) if waiting else []
    out = []
    while True:
        try:
            out.append(messages.get_nowait())
        except (queue.Empty, Exception):  # ray's queue raises its own Empty
            return out
