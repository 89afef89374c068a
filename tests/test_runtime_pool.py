"""npucc's parallel launcher (runtime/pool.py, runtime/native/npucc_pool.c; issue 18 point 3).

Kernels built by compile_funcs carry the launcher; loading them points their parallel launches
at it. Checked: results against numpy for chunk counts that do not divide the loop, at several
thread counts; that work is shared dynamically (a thread held on its first chunk, as a
descheduled thread would be, ends with at most one chunk per launch and the other threads run
the rest; without a stall the chunk counts add up); the per-loop launch decision (a tiny loop
ends on the caller, a long one stays shared out, decisions are measured again); that the
launching thread blocks rather
than spins while such a thread holds the last chunk; concurrent and nested launches; that a
library built without the launcher keeps TVM's pool; that every package loader (the sealed
in-memory library) installs it; the clear error when no C compiler exists, and the fallback
when the launcher does not compile.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest

from runtime._tvm import import_tvm
from runtime.package_io import SealedLibrary
from runtime.pool import launcher_addons, library_pool, load_library
from targets.tvm_codegen import compile_funcs, export_with_launcher, host_cpu

ROWS, COLS = 37, 64   # 37 rows: no chunk count used below divides it


def _funcs():
    """Two parallel kernels: a row-scaled copy (one parallel loop) and a row sum."""
    tvm = import_tvm()
    from tvm import s_tir, te

    x = te.placeholder((ROWS, COLS), "float32", "X")
    y = te.compute((ROWS, COLS), lambda i, j: x[i, j] * (i + 1).astype("float32"), "Y")
    r = te.reduce_axis((0, COLS), "r")
    s = te.compute((ROWS,), lambda i: te.sum(x[i, r], axis=r), "S")
    # heavy: a few ms of work, so that a worker is on a core before the caller took every chunk
    h = te.placeholder((64, 1 << 16), "float32", "H")
    rh = te.reduce_axis((0, 1 << 16), "rh")
    hs = te.compute((64,), lambda i: te.sum(te.sqrt(te.abs(h[i, rh])), axis=rh), "HS")
    out = {}
    for name, (args, blk) in {"scale": ([x, y], "Y"), "rowsum": ([x, s], "S"),
                              "heavy": ([h, hs], "HS")}.items():
        sch = s_tir.Schedule(te.create_prim_func(args))
        sch.parallel(sch.get_loops(sch.get_sblock(blk))[0])
        out[name] = sch.mod["main"]
    return tvm, out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tvm, funcs = _funcs()
    return tvm, compile_funcs(funcs, host_cpu(), tmp_path_factory.mktemp("pool") / "k.so")


def _run(tvm, mod, x):
    tx = tvm.runtime.tensor(x)
    ty = tvm.runtime.tensor(np.zeros((ROWS, COLS), np.float32))
    ts = tvm.runtime.tensor(np.zeros(ROWS, np.float32))
    mod["scale"](tx, ty)
    mod["rowsum"](tx, ts)
    return ty.numpy(), ts.numpy()


def _check(got, x):
    np.testing.assert_array_equal(got[0], x * np.arange(1, ROWS + 1, dtype=np.float32)[:, None])
    np.testing.assert_allclose(got[1], x.sum(1, dtype=np.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads,chunks", [(1, 4), (2, 1), (2, 4), (3, 7), (4, 16), (2, 64)])
def test_results_at_any_split(built, threads, chunks):
    tvm, path = built
    mod = load_library(tvm, path, require=True)
    pool = library_pool(mod)
    assert pool is not None
    pool.configure(threads, chunks)
    assert pool.decide_per_loop(0)   # every launch shared out, however small
    pool.reset_stats()
    x = np.random.default_rng(threads * 100 + chunks).standard_normal((ROWS, COLS), np.float32)
    for _ in range(20):
        _check(_run(tvm, mod, x), x)
    st = pool.stats()
    assert st.threads == threads
    if threads == 1:
        assert st.launches == 0 and st.serial_launches == 40
    else:   # every chunk of every launch ran exactly once, on some thread
        assert st.launches == 40 and st.serial_launches == 0
        assert sum(st.chunks) == 40 * threads * chunks


@pytest.mark.parametrize("stalled", [0, 1])
def test_a_stalled_thread_takes_fewer_chunks(built, stalled):
    """Thread ``stalled`` holds the chunk it takes until every chunk of the launch is taken
    (as if descheduled): the others run all the rest, where TVM's static split would have
    waited for it with half the work."""
    tvm, path = built
    mod = load_library(tvm, path, require=True)
    pool = library_pool(mod)
    pool.configure(2, 8)
    pool.decide_per_loop(0)
    pool.reset_stats()
    pool.stall_thread(stalled)
    x = np.random.default_rng(7).standard_normal((ROWS, COLS), np.float32)
    try:
        for _ in range(25):
            _check(_run(tvm, mod, x), x)
    finally:
        pool.stall_thread(None)
    st = pool.stats()
    launches = 50
    assert st.launches == launches and sum(st.chunks) == launches * 16
    assert st.chunks[stalled] <= launches           # at most one chunk per launch
    assert st.chunks[1 - stalled] >= launches * 15  # the other thread ran the rest


def test_launching_thread_blocks_while_a_stalled_worker_holds_a_chunk(built):
    """A worker off its core with the last chunk: the launching thread, out of chunks, blocks
    (so the kernel can move that worker onto its idle core) rather than spinning or yielding
    on its core for the whole stall. Its CPU time stays a small part of the wall time."""
    import time

    tvm, path = built
    mod = load_library(tvm, path, require=True)
    pool = library_pool(mod)
    pool.configure(2, 4, spin_us=1_000_000)   # the worker spins: it claims chunks at once
    pool.decide_per_loop(0)
    h = np.random.default_rng(3).standard_normal((64, 1 << 16), np.float32)
    th, ts = tvm.runtime.tensor(h), tvm.runtime.tensor(np.zeros(64, np.float32))
    mod["heavy"](th, ts)                   # workers started
    pool.reset_stats()
    pool.stall_thread(1, hold_us=20_000)   # 20 ms off the core for each chunk it takes
    try:
        wall, cpu = time.perf_counter(), time.thread_time()
        for _ in range(40):
            mod["heavy"](th, ts)
            if pool.stats().chunks[1] >= 3:
                break
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    finally:
        pool.stall_thread(None)
        pool.configure(2, 4)
    np.testing.assert_allclose(ts.numpy(), np.sqrt(np.abs(h)).sum(1, dtype=np.float64), rtol=1e-4)
    held = pool.stats().chunks[1]
    assert held >= 3, "the worker never took a chunk"
    assert wall >= held * 0.020             # every held chunk was waited for
    assert cpu < 0.5 * wall, f"launching thread busy {cpu * 1e3:.1f} of {wall * 1e3:.1f} ms"


def _heavy(tvm, rows=64):
    h = np.random.default_rng(3).standard_normal((rows, 1 << 16), np.float32)
    return h, tvm.runtime.tensor(h), tvm.runtime.tensor(np.zeros(rows, np.float32))


def _decided_pool(built, probe_us: int = 200):
    """The built library loaded on 2 threads x 64 chunks (a launch of the 37-row loop then
    hands out 128 chunks, most of them empty: clearly slower than one call on the caller,
    whether the worker is on a core or not), its per-loop decision at ``probe_us``,
    statistics reset."""
    tvm, path = built
    mod = load_library(tvm, path, require=True)
    pool = library_pool(mod)
    pool.configure(2, 64)
    assert pool.decide_per_loop(probe_us)
    pool.reset_stats()
    return tvm, mod, pool


def test_small_loop_runs_on_the_caller_big_loop_is_shared(built):
    """The per-loop launch decision: a 37x64 loop (well under a microsecond of work) is timed
    shared out, then on the caller alone, and stays on the caller; a loop of milliseconds is
    never timed serially and stays shared out. Results are the same either way."""
    tvm, mod, pool = _decided_pool(built)
    x = np.random.default_rng(11).standard_normal((ROWS, COLS), np.float32)
    tx = tvm.runtime.tensor(x)
    ty = tvm.runtime.tensor(np.zeros((ROWS, COLS), np.float32))
    want = x * np.arange(1, ROWS + 1, dtype=np.float32)[:, None]
    for _ in range(20):
        ty.copyfrom(np.zeros((ROWS, COLS), np.float32))
        mod["scale"](tx, ty)
        np.testing.assert_array_equal(ty.numpy(), want)
    st = pool.stats()
    assert (st.launches, st.caller_launches, st.caller_loops) == (3, 17, 1), st
    assert st.serial_launches == 17 and sum(st.chunks) == 3 * 2 * 64

    h, th, ts = _heavy(tvm)
    pool.reset_stats()
    for _ in range(8):
        mod["heavy"](th, ts)
    np.testing.assert_allclose(ts.numpy(), np.sqrt(np.abs(h)).sum(1, dtype=np.float64), rtol=1e-4)
    st = pool.stats()
    assert st.launches == 8 and st.caller_launches == 0 and st.shared_loops == 1, st
    pool.decide_per_loop(0)


def test_loop_decision_is_measured_again(built):
    """A decision is re-measured after 2048 launches of its loop (load changes): three shared
    launches, three on the caller, then the decision again."""
    tvm, mod, pool = _decided_pool(built)
    x = np.random.default_rng(12).standard_normal((ROWS, COLS), np.float32)
    tx = tvm.runtime.tensor(x)
    ty = tvm.runtime.tensor(np.zeros((ROWS, COLS), np.float32))
    f = mod["scale"]
    for _ in range(6 + 2048):
        f(tx, ty)
    assert pool.stats().launches == 3
    for _ in range(6):
        f(tx, ty)
    st = pool.stats()
    assert st.launches == 6 and st.caller_launches == 3 + 2048 + 3 and st.caller_loops == 1, st
    np.testing.assert_array_equal(ty.numpy(), x * np.arange(1, ROWS + 1, dtype=np.float32)[:, None])
    pool.decide_per_loop(0)


def test_concurrent_callers(built):
    """Launches from several Python threads at once: one holds the pool, the others run
    serially on their own thread; every result is right."""
    tvm, path = built
    mod = load_library(tvm, path, require=True)
    pool = library_pool(mod)
    pool.configure(2, 4)
    pool.decide_per_loop(200)   # concurrent callers while loops are being decided
    pool.reset_stats()
    errors = []

    def work(seed):
        x = np.random.default_rng(seed).standard_normal((ROWS, COLS), np.float32)
        try:
            for _ in range(30):
                _check(_run(tvm, mod, x), x)
        except BaseException as e:  # reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[0]
    st = pool.stats()
    assert st.launches + st.serial_launches == 4 * 30 * 2


def test_library_without_launcher_keeps_tvm_pool(tmp_path):
    tvm, funcs = _funcs()
    exe = tvm.compile(tvm.IRModule({k: f.with_attr("global_symbol", k) for k, f in funcs.items()}),
                      tvm.target.Target(host_cpu().tvm_target))
    exe.export_library(str(tmp_path / "old.so"))     # as packages were built before
    mod = load_library(tvm, tmp_path / "old.so")
    assert library_pool(mod) is None
    x = np.random.default_rng(3).standard_normal((ROWS, COLS), np.float32)
    _check(_run(tvm, mod, x), x)
    with pytest.raises(RuntimeError, match="TVM's thread pool"):
        load_library(tvm, tmp_path / "old.so", require=True)


def test_sealed_library_installs_launcher(built, monkeypatch):
    """Every package loader goes through SealedLibrary.load (the verified bytes in a memfd)."""
    tvm, path = built
    sealed = SealedLibrary(path.read_bytes())
    try:
        mod = sealed.load(tvm)
        pool = library_pool(mod)
        assert pool is not None and pool.threads >= 1
        x = np.random.default_rng(4).standard_normal((ROWS, COLS), np.float32)
        _check(_run(tvm, mod, x), x)
        monkeypatch.setenv("NPUCC_POOL", "tvm")
        assert library_pool(sealed.load(tvm)) is None   # the user asked for TVM's pool
    finally:
        sealed.close()


def test_no_c_compiler_is_a_clear_error(monkeypatch):
    import_tvm()
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(RuntimeError, match="no C compiler found.*install gcc"):
        launcher_addons()


def test_launcher_that_does_not_compile_falls_back(tmp_path):
    """A compiler that cannot build the launcher: the library is built without it (warning),
    and its loops run on TVM's pool."""
    tvm, funcs = _funcs()
    from tvm.support import cc

    def picky(output, objects, options=None):
        if any(str(o).endswith("npucc_pool.c") for o in objects):
            raise RuntimeError("Compilation error:\nnpucc_pool.c: unsupported here")
        cc.create_shared(output, objects, options)

    picky.output_format = "so"
    exe = tvm.compile(tvm.IRModule({k: f.with_attr("global_symbol", k) for k, f in funcs.items()}),
                      tvm.target.Target(host_cpu().tvm_target))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        export_with_launcher(exe, str(tmp_path / "k.so"), picky)
    assert any("keeps TVM's thread pool" in str(x.message) for x in w)
    mod = load_library(tvm, tmp_path / "k.so")
    assert library_pool(mod) is None
    x = np.random.default_rng(5).standard_normal((ROWS, COLS), np.float32)
    _check(_run(tvm, mod, x), x)
