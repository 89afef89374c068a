"""Where kernels run: the main thread, or a small shared pool of long-lived runner threads.

TVM gives every thread that calls a parallel kernel its own thread pool (a thread-local
singleton whose workers are never joined), and the executor gives every such thread an arena.
A server that calls ``run`` from short-lived threads (one per request) therefore grew by two
OS threads and an arena per request, forever. So ``run`` executes kernels only on long-lived
threads: inline on the main thread and on the runner threads, and for any other calling thread
on one of ``runner_count()`` shared runner threads (``NPUCC_RUN_THREADS``, default: the CPUs
this process may use), the caller waiting for the result. Thread count and memory stay
bounded whatever threads call; the cost is one hand-over (tens of µs) per call from a non-main
thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["on_runner", "runner_count", "is_runner_thread"]

T = TypeVar("T")
_local = threading.local()
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0   # a forked child has none of its parent's threads: it makes its own pool


def runner_count() -> int:
    env = os.environ.get("NPUCC_RUN_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _mark_runner() -> None:
    _local.runner = True


def is_runner_thread() -> bool:
    """True on the threads that run kernels inline: the main thread and the runners."""
    return (threading.current_thread() is threading.main_thread()
            or getattr(_local, "runner", False))


def on_runner(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a long-lived thread (see the module docstring); exceptions propagate."""
    global _pool, _pool_pid
    if is_runner_thread():
        return fn(*args)
    if _pool is None or _pool_pid != os.getpid():
        with _lock:
            if _pool is None or _pool_pid != os.getpid():
                _pool = ThreadPoolExecutor(runner_count(), thread_name_prefix="npucc-run",
                                           initializer=_mark_runner)
                _pool_pid = os.getpid()
    return _pool.submit(fn, *args).result()
