"""Row statistics (mean, variance) for layer_norm over the last axis, with short dependency
chains.

One rfactor over the SIMD lanes (``nn_misc.row_schedule``) accumulates a row into one vector:
a chain of ``length / lanes`` dependent adds (24 for MiniLM's 384 floats at 16 lanes), then a
serial sum of the 16 lanes, twice per row (mean, then the centred squares): the row's latency,
not its arithmetic, sets the time. Here each statistic is ``PARTS`` vector accumulators
(``PARTS`` independent chains, a quarter as long) folded by a balanced tree
(:func:`tree_sum`), halves first, so LLVM reduces whole vectors before single lanes. The
summation order differs from a serial sum in the last bits only.
"""

from __future__ import annotations

from typing import Any

from targets.kernels.base import CpuInfo

__all__ = ["PARTS", "tree_width", "tree_sum", "tree_stats", "tree_row_schedule"]

PARTS = 4   # independent vector accumulators per row statistic


def tree_width(length: int, lanes: int) -> int:
    """The accumulator width (``PARTS`` vectors) when it divides ``length`` at least twice
    over, else 0 (the caller keeps the one-vector rfactor schedule)."""
    width = PARTS * lanes
    return width if lanes > 1 and length % width == 0 and length >= 2 * width else 0


def tree_sum(vals: list) -> Any:
    """``sum(vals)`` as a balanced tree, halves first: ``(v[0] + v[n/2]) + ...``. With the
    accumulator's lanes in order, the first levels add whole vectors."""
    if len(vals) == 1:
        return vals[0]
    half = len(vals) // 2
    return tree_sum(vals[:half]) + tree_sum(vals[half:])


def tree_stats(x_at, stat_shape: tuple[int, ...], length: int, width: int, dt: str):
    """``(mean_sum, var_sum)`` compute stages over the last axis: the row sum of ``x_at(row,
    k)`` and the row sum of its centred squares (each still to be divided by ``length``),
    through ``width``-wide partial sums (stages ``mean_part``, ``var_part``)."""
    from tvm import te, tirx

    inv_n = tirx.const(1.0 / length, dt)

    def parts(fn, name):
        def body(*i):
            kr = te.reduce_axis((0, length // width), "kr")
            return te.sum(fn(i[:-1], kr * width + i[-1]), axis=kr)
        return te.compute((*stat_shape, width), body, name=name)

    def folded(part, name):
        return te.compute(stat_shape, lambda *i: tree_sum([part[(*i, j)] for j in range(width)]),
                          name=name)
    mean = folded(parts(x_at, "mean_part"), "mean")

    def centred_sq(row, k):
        d = x_at(row, k) - mean[row] * inv_n
        return d * d
    var = folded(parts(centred_sq, "var_part"), "var")
    return mean, var


def tree_row_schedule(cpu: CpuInfo, n_rows_dims: int, width: int, lanes: int,
                      parallel: bool):
    """Schedule ``out`` row by row with :func:`tree_stats`' stages computed per row: the
    partial sums vectorised over their ``width`` lanes (several SIMD registers), the output
    pass vectorised over ``lanes``, rows parallel when ``parallel``."""
    def schedule(sch) -> None:
        from targets.kernels._te import inline_all

        inline_all(sch, keep={"mean", "var"})
        loops = sch.get_loops(sch.get_sblock("out"))
        _, kv = sch.split(loops[-1], [None, lanes])
        sch.vectorize(kv)
        rows = loops[:n_rows_dims]
        r = sch.fuse(*rows) if len(rows) > 1 else rows[0]
        if parallel and cpu.num_cores > 1:
            sch.parallel(r)
        for name in ("var", "var_part", "mean", "mean_part"):   # consumers first
            sch.compute_at(sch.get_sblock(name), r)
        for name in ("mean_part", "var_part"):
            blk = sch.get_sblock(name)
            j, kr = sch.get_loops(blk)[-2:]
            sch.reorder(kr, j)
            sch.vectorize(j)
            init = sch.decompose_reduction(blk, kr)
            sch.vectorize(sch.get_loops(init)[-1])
    return schedule
