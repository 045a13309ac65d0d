"""Where tasks run: local worker processes, or a Ray cluster.

Each yields ``(task, result)`` as tasks finish, and ``drain()`` hands the sweep's display the
phase messages its workers sent since the last call. A task starts only once ``claim(task)`` says
so, right before it would start; a task it refuses (another sweep process has it) is yielded
as ``(task, None)``. ``close(wait=False)`` stops at once, abandoning the tasks in flight.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch

from prunelab.bench import worker
from prunelab.errors import PrunelabError

Task = dict[str, Any]
Claim = Callable[[Task], bool]
PARENT_POLL_SECONDS = 1.0


def _any_task(task: Task) -> bool:
    return True


def default_threads(jobs: int) -> int:
    """Torch threads per run: the machine's cores split between the parallel jobs."""
    return max(1, (os.cpu_count() or 1) // max(jobs, 1))


def _init_local(messages: Any, parent: int) -> None:
    worker.set_progress(lambda key, text: messages.put((key, text)))
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True,
                     name="prunelab-parent-watch").start()


def _exit_with_parent(parent: int) -> None:
    """Stop this worker when the sweep process that started it is gone (killed, say with
    ``kill PID``, which does not reach the workers): finishing the run would only burn the
    CPU for nobody. Its claim lapses and the next sweep runs the task again."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)


class InlineExecutor:
    """Tasks one after another in this process: no start-up cost, for ``--jobs 1``."""

    def __init__(self) -> None:
        self._messages: queue.SimpleQueue = queue.SimpleQueue()
        worker.set_progress(lambda key, text: self._messages.put((key, text)))

    def drain(self) -> list[tuple[str, str]]:
        return _drained(self._messages)

    def run(self, tasks: list[Task], poll: Callable[[], None], claim: Claim = _any_task
            ) -> Iterator[tuple[Task, dict | None]]:
        threads = torch.get_num_threads()
        try:
            for task in tasks:
                if not claim(task):
                    yield task, None
                    continue
                result = worker.execute(task)
                poll()
                yield task, result
        finally:
            torch.set_num_threads(threads)

    def close(self, wait: bool = True) -> None:
        worker.set_progress(worker.ignore_progress)


class LocalExecutor:
    """``jobs`` worker processes on this machine (spawned: safe with torch's thread pools)."""

    def __init__(self, jobs: int):
        self.jobs = jobs
        self._context = multiprocessing.get_context("spawn")
        self._messages = self._context.Queue()
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.jobs, mp_context=self._context, initializer=_init_local,
                                   initargs=(self._messages, os.getpid()))

    def drain(self) -> list[tuple[str, str]]:
        return _drained(self._messages)

    def _submit(self, task: Task) -> Any:
        try:
            return self._pool.submit(worker.execute, task)
        except BrokenProcessPool:  # a worker of an earlier batch died: start afresh
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            return self._pool.submit(worker.execute, task)

    def run(self, tasks: list[Task], poll: Callable[[], None], claim: Claim = _any_task
            ) -> Iterator[tuple[Task, dict | None]]:
        """Results as tasks finish; at most ``jobs`` tasks are handed to the pool at a time, each
        claimed just before. When a worker dies (killed, out of memory), the pool breaks and
        fails every task in it; those are run once more on a fresh pool, and fail only if that
        breaks too."""
        waiting = list(reversed(tasks))
        running: dict[Any, Task] = {}
        retried: set[str] = set()
        while waiting or running:
            while waiting and len(running) < self.jobs:
                task = waiting.pop()
                if task["key"] not in retried and not claim(task):
                    yield task, None
                    continue
                running[self._submit(task)] = task
            if not running:
                continue
            finished, _ = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
            poll()
            for future in finished:
                task = running.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool as exc:
                    if task["key"] not in retried:
                        retried.add(task["key"])
                        waiting.append(task)
                        continue
                    result = {"status": "failed", "error": f"worker process died: {exc}"}
                yield task, result

    def close(self, wait: bool = True) -> None:
        if not wait:  # stop now: the runs in flight are abandoned (their claims lapse)
            for process in list((self._pool._processes or {}).values()):
                process.terminate()
        self._pool.shutdown(wait=wait, cancel_futures=True)
        self._messages.close()


def _check_listening(address: str, timeout: float = 5.0) -> None:
    """Fail at once where nothing listens at a ``host:port`` (or ``ray://host:port``) address:
    ``ray.init`` would retry the connection for minutes before giving up."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit():
        return  # ``auto`` and other forms: Ray resolves them, and fails fast itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise PrunelabError(
            f"nothing answers at the Ray address {address!r} ({exc.strerror or exc}): start the "
            "cluster (`ray start --head` on its head node) or check the host and port"
        ) from None


class RayExecutor:
    """Tasks on a Ray cluster (``address``: ``auto``, ``ray://host:port``, or None to start one
    on this machine), run by ``jobs`` long-lived worker actors of ``threads`` CPUs each.

    Actors rather than plain tasks: like the local pool's processes, each imports torch and
    loads the data once and keeps them for every task it runs. Ray would otherwise kill idle
    task workers after a second (between the dense models and the runs, say) and start fresh
    ones that pay those costs again.
    """

    def __init__(self, jobs: int, threads: int, address: str | None):
        try:
            import ray
        except ImportError:
            raise PrunelabError(
                "the ray executor needs Ray: pip install 'prunelab[ray]' (or pip install ray)"
            ) from None
        self.ray = ray
        options: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False,
                                   "include_dashboard": False}
        if address:
            _check_listening(address)
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
        self._inbox = ray.remote(num_cpus=0)(_Inbox).remote()
        self._drained_at = 0.0
        self._actor_class = ray.remote(num_cpus=threads)(_RayWorker)
        self._idle = [self._new_actor() for _ in range(self._fitting(jobs, threads))]

    def _fitting(self, jobs: int, threads: int) -> int:
        """As many of ``jobs`` actors as the cluster has CPUs for right now: an actor that
        cannot be placed would hold its tasks forever, since the others never free theirs."""
        cpus = int(self.ray.cluster_resources().get("CPU", 0))
        if cpus < threads:
            self.ray.shutdown()
            raise PrunelabError(
                f"the Ray cluster has {cpus} CPU(s) and each run asks for {threads} thread(s): "
                "give the sweep fewer threads (spec key `threads`) or the cluster more CPUs")
        fitting = min(jobs, cpus // threads)
        if fitting < jobs:
            warnings.warn(f"the Ray cluster has {cpus} CPUs: running {fitting} job(s) of "
                          f"{threads} thread(s) instead of {jobs}", stacklevel=3)
        return fitting

    def _new_actor(self) -> Any:
        return self._actor_class.remote(self._inbox)

    def drain(self, every: float = 1.0) -> list[tuple[str, str]]:
        """Messages waiting in the inbox actor; at most one round trip per ``every`` seconds,
        since each competes with the runs for the cores."""
        now = time.monotonic()
        if now - self._drained_at < every:
            return []
        self._drained_at = now
        return self.ray.get(self._inbox.take.remote())

    def run(self, tasks: list[Task], poll: Callable[[], None], claim: Claim = _any_task
            ) -> Iterator[tuple[Task, dict | None]]:
        """Results as tasks finish; each task goes to the next idle actor. When an actor dies
        (killed, out of memory), a fresh one takes its place and runs its task once more; the
        task fails only if that actor dies too."""
        waiting = list(reversed(tasks))
        running: dict[Any, tuple[Task, Any]] = {}
        retried: set[str] = set()
        while waiting or running:
            while waiting and self._idle:
                task = waiting.pop()
                if task["key"] not in retried and not claim(task):
                    yield task, None
                    continue
                actor = self._idle.pop()
                running[actor.execute.remote(task)] = (task, actor)
            if not running:
                continue
            finished, _ = self.ray.wait(list(running), num_returns=1, timeout=0.2)
            poll()
            for ref in finished:
                task, actor = running.pop(ref)
                try:
                    result = self.ray.get(ref)
                except self.ray.exceptions.RayActorError as exc:
                    actor = self._new_actor()
                    if task["key"] not in retried:
                        retried.add(task["key"])
                        waiting.append(task)
                        self._idle.append(actor)
                        continue
                    result = {"status": "failed", "error": f"ray worker died: {exc}"}
                except self.ray.exceptions.RayError as exc:
                    result = {"status": "failed", "error": f"ray task failed: {exc}"}
                self._idle.append(actor)
                yield task, result

    def close(self, wait: bool = True) -> None:
        self.ray.shutdown()  # the actors belong to this driver: they go with it


class _RayWorker:
    """One Ray actor: a worker process that runs tasks one at a time, keeping loaded data."""

    def __init__(self, inbox: Any):
        # fire and forget: a worker never waits for its progress message to be delivered
        worker.set_progress(lambda key, text: inbox.put.remote(key, text), every=2.0)

    def execute(self, task: Task) -> dict:
        return worker.execute(task)


class _Inbox:
    """A Ray actor collecting the workers' phase messages until the driver takes them."""

    def __init__(self) -> None:
        self._messages: list[tuple[str, str]] = []

    def put(self, key: str, text: str) -> None:
        self._messages.append((key, text))

    def take(self) -> list[tuple[str, str]]:
        taken, self._messages = self._messages, []
        return taken


def _drained(messages: Any) -> list[tuple[str, str]]:
    """Every message waiting in a local queue."""
    out = []
    while True:
        try:
            out.append(messages.get_nowait())
        except queue.Empty:
            return out
