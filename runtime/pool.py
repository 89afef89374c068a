"""npucc's parallel launcher: dynamic chunks instead of TVM's static split.

Every kernel library built by ``targets.tvm_codegen.compile_funcs`` carries the launcher of
``runtime/native/npucc_pool.c``. :func:`load_library` loads a library into TVM and points the
library's ``__TVMBackendParallelLaunch`` slot (filled by TVM's loader with TVM's own pool) at
that launcher: each parallel loop is cut into ``chunks_per_thread`` × threads chunks which the
threads (the calling one included) take from a shared counter, so a thread that another
process keeps off its core takes fewer chunks instead of stalling the launch.

Libraries without the launcher (built before it existed, or where no C compiler could build
it) and libraries whose code calls ``TVMBackendParallelBarrier`` (which needs every task
running at once) keep TVM's pool.

Settings, read when a library is loaded:

- threads: ``TVM_NUM_THREADS`` if the user set it, else the package target's cores that this
  process may use (``runtime._tvm.default_threads`` sets it; :func:`pool_threads`);
- ``NPUCC_POOL_CHUNKS``: chunks per thread and launch (default 8). TVM's loop body cuts a
  loop of extent E into chunks of ceil(E / chunks) iterations, so with 8 chunks the extents
  14, 21, 28, 35 and 42 that CNNs' 14x14 and 7x7 stages give (rows, row x channel tiles) ran
  as 7 chunks, 4 on one thread and 3 on the other (the kernel 14% slower than an even split);
  16 chunks split them evenly. An uncontended chunk claim costs ~5 ns (an empty 2-thread
  launch 0.09 -> 0.17 µs, bench/pool_overhead.py on a loaded 2-core x86 host);
- ``NPUCC_POOL_SPIN_US``: how long an idle worker spins before it sleeps (default 50 µs:
  enough to bridge the gap between one kernel's launches and the next's; a spinning worker
  competes with other processes for the core. With a busy-loop process on one core of
  two (bench/threads_burner.py, machine at load 9-17) resnet50's burner-case median was
  lowest with 0-20 µs and highest with 200 µs in three alternating runs; quiet-case
  differences were within that load's noise);
- ``NPUCC_POOL_PROBE_US``: the per-loop launch decision (default 50 µs; 0: off, every launch
  is shared out). Each parallel loop's first launches are shared out and timed; a loop whose
  best such launch took less than this is then timed on the calling thread alone (twice, if
  both are 25% slower; else three times), and from then on runs alone if that measured a
  fifth faster, else shared out (re-measured every 2048 launches of the loop; the margin
  keeps a loop timed while another process held the second core from staying on one thread
  once the core is free: mobilenet_v3_small decided at load 8 put 20 of 27 loops alone).
  Like onnxruntime's per-op cost check (TryParallelFor), small kernels stay on the caller
  when waking and feeding a second thread costs more than it gains; where that happens is each loop's own timing on the machine it
  runs on, not a tuned constant. The 50 µs only bounds which loops are worth a serial
  launch to find out: a launch costs 0.1-0.2 µs with the workers spinning and ~3 µs when
  they must be woken (bench/pool_overhead.py), under 10% of a 50 µs loop, so a longer loop
  could only win alone if it did not scale at all;
- ``NPUCC_POOL=tvm``: keep TVM's pool for every library (for comparisons).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SOURCE", "PoolStats", "LibraryPool", "load_library", "pool_threads",
           "library_pool", "launcher_addons"]

SOURCE = Path(__file__).resolve().parent / "native" / "npucc_pool.c"
LAUNCH = "npucc_parallel_launch"
SLOT = "__TVMBackendParallelLaunch"
BARRIER = "__TVMBackendParallelBarrier"
MAX_THREADS = 64
DEFAULT_CHUNKS = 8
DEFAULT_SPIN_US = 50
DEFAULT_PROBE_US = 50

# id(tvm module) -> its LibraryPool, or None. Written at every load_library (TVM modules take
# no weak references): an id reused by a later module is overwritten before it is looked up
_POOLS: dict[int, LibraryPool | None] = {}


@dataclass(frozen=True)
class PoolStats:
    threads: int
    launches: int          # parallel launches shared out by the pool
    serial_launches: int   # launches run on the calling thread (nested, concurrent, 1 thread)
    chunks: tuple[int, ...]   # chunks run per thread; [0] is the launching thread
    caller_launches: int = 0  # launches the per-loop decision kept on the calling thread
    caller_loops: int = 0     # parallel loops decided "calling thread alone"
    shared_loops: int = 0     # parallel loops decided "shared out"
    wakes: int = 0            # launches that had to wake sleeping workers


def pool_threads() -> int:
    """The pool's thread count: ``TVM_NUM_THREADS`` (the user's, or the target's cores this
    process may use, set by ``import_tvm``), else the usable cores."""
    value = os.environ.get("TVM_NUM_THREADS", "")
    if value.strip():
        try:
            return max(1, min(MAX_THREADS, int(value)))
        except ValueError:
            raise ValueError(f"TVM_NUM_THREADS={value!r} is not a whole number; set it to "
                             f"the number of threads kernels may use") from None
    try:
        return max(1, min(MAX_THREADS, len(os.sched_getaffinity(0))))
    except AttributeError:  # not Linux
        return max(1, min(MAX_THREADS, os.cpu_count() or 1))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a whole number") from None


class LibraryPool:
    """The launcher inside one loaded kernel library (its functions, by address)."""

    def __init__(self, handle: ctypes.CDLL, slot: ctypes.c_void_p):
        self._slot = slot                      # the library's __TVMBackendParallelLaunch
        self._launchers = {"tvm": slot.value,  # what TVM's loader put there
                           "npucc": ctypes.cast(getattr(handle, LAUNCH), ctypes.c_void_p).value}
        self._configure = handle.npucc_pool_configure
        self._configure.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self._configure.restype = ctypes.c_int
        self._stats = handle.npucc_pool_stats
        self._stats.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int]
        self._stats.restype = ctypes.c_int
        self._reset = handle.npucc_pool_reset_stats
        self._reset.restype = None
        self._stall = handle.npucc_pool_stall_thread
        self._stall.argtypes = [ctypes.c_int]
        self._stall.restype = None
        self._stall_us = getattr(handle, "npucc_pool_stall_us", None)  # older libraries: none
        if self._stall_us is not None:
            self._stall_us.argtypes = [ctypes.c_int]
            self._stall_us.restype = None
        self._adaptive = getattr(handle, "npucc_pool_adaptive", None)   # older: none
        if self._adaptive is not None:
            self._adaptive.argtypes = [ctypes.c_int, ctypes.c_int]
            self._adaptive.restype = None
            self._adaptive_stats = handle.npucc_pool_adaptive_stats
            self._adaptive_stats.argtypes = [ctypes.POINTER(ctypes.c_int64)]
            self._adaptive_stats.restype = None
        self.threads = 1

    def configure(self, threads: int, chunks_per_thread: int = DEFAULT_CHUNKS,
                  spin_us: int = DEFAULT_SPIN_US) -> int:
        """Set the thread count (caller included), chunks per thread and spin time; running
        workers are stopped and restarted at the next launch."""
        self.threads = int(self._configure(int(threads), int(chunks_per_thread), int(spin_us)))
        return self.threads

    def decide_per_loop(self, probe_us: int = DEFAULT_PROBE_US) -> bool:
        """Turn the per-loop launch decision on (``probe_us`` > 0: loops whose best shared-out
        launch is under ``probe_us`` µs are also timed on the calling thread alone) or off (0:
        every launch is shared out); forgets the decisions taken. False if this library's
        launcher predates it (then every launch is shared out)."""
        if self._adaptive is None:
            return False
        self._adaptive(int(probe_us > 0), max(0, int(probe_us)))
        return True

    def use(self, launcher: str) -> None:
        """Send this library's parallel launches to ``"npucc"`` (this pool) or ``"tvm"``
        (TVM's pool; for comparisons in one process). Not while a kernel of it runs."""
        if launcher not in self._launchers:
            raise ValueError(f"launcher {launcher!r}: use 'npucc' or 'tvm'")
        self._slot.value = self._launchers[launcher]

    def stats(self) -> PoolStats:
        buf = (ctypes.c_int64 * (2 + MAX_THREADS))()
        n = self._stats(buf, MAX_THREADS)
        extra = (ctypes.c_int64 * 4)()
        if self._adaptive is not None:
            self._adaptive_stats(extra)
        return PoolStats(n, buf[0], buf[1], tuple(buf[2:2 + n]), *extra)

    def reset_stats(self) -> None:
        self._reset()

    def stall_thread(self, index: int | None, hold_us: int = 0) -> None:
        """Tests: thread ``index`` (0 = the launching thread) holds every chunk it takes until
        all chunks of the launch are taken, as a descheduled thread would, then sleeps
        ``hold_us`` µs more before running it (its time off the core); None: no stall."""
        if hold_us and self._stall_us is None:
            raise RuntimeError("this library's launcher predates stall holds; rebuild it")
        if self._stall_us is not None:
            self._stall_us(int(hold_us) if index is not None else 0)
        self._stall(-1 if index is None else int(index))


def _open_loaded(path: str) -> ctypes.CDLL | None:
    """A ctypes handle on the library the dynamic loader already has at ``path`` (never a
    second copy); None if it is not loaded."""
    try:
        return ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_NOW)
    except OSError:
        return None


def _attach(module: Any, path: str) -> str:
    """Point ``module``'s parallel launches at its npucc launcher; returns which launcher its
    parallel loops use: ``"npucc"``, ``"tvm"`` or ``"none"`` (it has no parallel loop)."""
    handle = _open_loaded(path)
    if handle is None:
        return "tvm"
    try:
        try:
            slot = ctypes.c_void_p.in_dll(handle, SLOT)
        except ValueError:
            return "none"  # no parallel loop in this library
        if (not hasattr(handle, LAUNCH) or hasattr(handle, BARRIER)
                or os.environ.get("NPUCC_POOL", "").strip().lower() == "tvm"):
            return "tvm"   # an older library, one whose code needs TVM's barrier, or asked
        pool = LibraryPool(handle, slot)
        pool.configure(pool_threads(), max(1, _env_int("NPUCC_POOL_CHUNKS", DEFAULT_CHUNKS)),
                       max(0, _env_int("NPUCC_POOL_SPIN_US", DEFAULT_SPIN_US)))
        pool.decide_per_loop(max(0, _env_int("NPUCC_POOL_PROBE_US", DEFAULT_PROBE_US)))
        pool.use("npucc")
    finally:
        # drop the reference RTLD_NOLOAD took: the library stays loaded exactly as long as
        # TVM's module holds it (and the function addresses above stay valid that long)
        ctypes.CDLL(None).dlclose(ctypes.c_void_p(handle._handle))
    _POOLS[id(module)] = pool
    return "npucc"


def load_library(tvm: Any, path: str | os.PathLike, *, memfd: bool = False,
                 require: bool = False) -> Any:
    """Load the kernel library at ``path`` into TVM and give its parallel loops npucc's
    launcher (when the library carries it). ``memfd``: ``path`` is ``/proc/self/fd/N``
    (TVM's ``load_module`` would pick the loader by the file's resolved name). ``require``:
    raise RuntimeError if the library has parallel loops but they would stay on TVM's pool."""
    path = str(path)
    if memfd:
        module = tvm.get_global_func("ffi.Module.load_from_file.so")(path, "so")
    else:
        module = tvm.runtime.load_module(path)
    _POOLS[id(module)] = None
    used = _attach(module, path)
    if require and used == "tvm":
        raise RuntimeError(f"{path}: its parallel loops would run on TVM's thread pool (built "
                           f"without runtime/native/npucc_pool.c, or NPUCC_POOL=tvm)")
    return module


def library_pool(module: Any) -> LibraryPool | None:
    """The launcher serving a module loaded by :func:`load_library` (None: TVM's pool)."""
    return _POOLS.get(id(module))


def launcher_addons(cross: bool = False) -> list[str]:
    """Extra sources for ``export_library(addons=...)``: the launcher's C file, compiled and
    linked with the kernels by the compiler TVM links them with. For a host build, raises
    RuntimeError naming what to do when no C compiler is on PATH (TVM cannot link any kernel
    library without one; a cross compiler is checked where it is chosen)."""
    if not cross:
        from tvm.support import cc

        if not cc.get_cc():
            raise RuntimeError("no C compiler found (looked for $CXX, $CC, g++, gcc, clang++, "
                               "clang, c++, cc on PATH): TVM needs one to link kernels.so; "
                               "install gcc (apt-get install g++) or set CXX")
    return [str(SOURCE)]
