"""Fan independent pieces of a search out: in this process, or on a Ray cluster.

The expensive searches (head importance by output error, per-layer pruning and mixed-precision
sensitivity) are many independent interpreter runs. They call :func:`map_tasks`:

    results = map_tasks(fn, shared, tasks, executor="ray")

which returns ``[fn(shared, t) for t in tasks]`` in task order. ``executor``:

- ``"serial"`` (default): that list comprehension, here.
- ``"ray"``: one Ray task per item; ``shared`` (the graph, the samples...) is pickled once
  (on a deep stack: a graph is a deeply nested object), put in Ray's object store once, and
  unpickled once per worker (cached there while the tasks of one call run). Ray is imported only then
  (``pip install 'npucc[distributed]'``). Without a running Ray, ``ray.init()`` starts a local
  cluster (all cores of this machine); ``Ray(address="ray://head:10001")`` or
  ``NPUCC_RAY_ADDRESS`` joins an existing cluster instead; a caller that already ran
  ``ray.init(...)`` keeps its cluster.

``fn`` must be a module-level function (Ray ships it by reference) and deterministic; each task
computes exactly what the serial loop computes for that item, so the results are identical.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from compiler.errors import NpuccError

__all__ = ["Ray", "map_tasks", "EXECUTORS"]

EXECUTORS = ("serial", "ray")


@dataclass(frozen=True)
class Ray:
    """Run on Ray: ``address`` of a cluster (default ``NPUCC_RAY_ADDRESS``, else a local
    cluster), ``num_cpus`` for a local one (default: all)."""

    address: str | None = None
    num_cpus: int | None = None

    def init(self) -> Any:
        try:
            import ray
        except ImportError as e:
            raise NpuccError("executor='ray' needs Ray: pip install 'npucc[distributed]'"
                             ) from e
        if not ray.is_initialized():
            address = self.address or os.environ.get("NPUCC_RAY_ADDRESS")
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address:
                ray.init(address=address, **kw)
            else:
                ray.init(num_cpus=self.num_cpus, **kw)
        return ray


def _resolve(executor: str | Ray | None) -> Ray | None:
    if executor is None or executor == "serial":
        return None
    if executor == "ray":
        return Ray()
    if isinstance(executor, Ray):
        return executor
    raise NpuccError(f"executor {executor!r} is not known; accepted: {', '.join(EXECUTORS)} "
                     f"or compiler.parallel.Ray(address=...)")


_CACHE: dict[str, Any] = {}   # in a Ray worker: the last shared object, unpickled once


def _deep(fn: Callable[[], Any]) -> Any:
    """``fn()`` on a thread with a large stack and recursion limit: a graph's nodes, values and
    use lists make a deeply nested object that pickle walks recursively."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["v"] = fn()
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller)
            out["e"] = e

    old_stack, old_limit = threading.stack_size(), sys.getrecursionlimit()
    threading.stack_size(512 << 20)
    sys.setrecursionlimit(max(old_limit, 200_000))
    try:
        t = threading.Thread(target=run, name="npucc-pickle")
        t.start()
        t.join()
    finally:
        threading.stack_size(old_stack)
        sys.setrecursionlimit(old_limit)
    if "e" in out:
        raise out["e"]
    return out["v"]


def _call(fn: Callable, token: str, blob: bytes, task: Any) -> Any:
    shared = _CACHE.get(token)
    if shared is None:
        _CACHE.clear()
        shared = _CACHE[token] = _deep(lambda: pickle.loads(blob))
    return fn(shared, task)


def map_tasks(fn: Callable[[Any, Any], Any], shared: Any, tasks: Sequence[Any],
              executor: str | Ray | None = "serial") -> list[Any]:
    """``[fn(shared, t) for t in tasks]``, here or on Ray (module docstring)."""
    ray_exec = _resolve(executor)
    if ray_exec is None or not tasks:
        return [fn(shared, t) for t in tasks]
    ray = ray_exec.init()
    remote = ray.remote(_call)
    blob = _deep(lambda: pickle.dumps(shared, protocol=pickle.HIGHEST_PROTOCOL))
    ref = ray.put(blob)     # once in the object store; each worker unpickles it once
    token = uuid.uuid4().hex
    return ray.get([remote.remote(fn, token, ref, t) for t in tasks])
