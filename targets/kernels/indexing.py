"""Indexing kernels: gather_elements, gather_nd, scatter_elements, scatter_nd.

Every index read at run time is wrapped once (negative -> ``+ dim``) and clamped into
``[0, dim)`` before use, so a bad index gives a wrong value, never an access outside a
buffer (a package's inputs are untrusted). Gathers are index maps with the generic schedule;
scatters are TOPI's sequential scatter loops (copy ``x``, then apply the updates in order,
which gives ONNX's last-write-wins and the reductions) fed by a normalised-index stage.
"""

from __future__ import annotations

from targets.kernels._te import generic, placeholders, prim_func
from targets.kernels._te import load as _load
from targets.kernels.base import KernelImpl, KernelRequest, register_kernel

__all__: list[str] = []

_TOPI_REDUCTION = {"none": "update", "add": "add", "mul": "mul", "max": "max", "min": "min"}


def _fix_index(v, dim: int):
    """A run-time index as int32, wrapped once and clamped into ``[0, dim)``."""
    from tvm import te, tirx

    v = v.astype("int32")
    v = tirx.Select(v < 0, v + dim, v)
    return te.min(te.max(v, 0), max(dim - 1, 0))


def _simple(req: KernelRequest, args: list, note: str) -> KernelImpl:
    return KernelImpl(prim_func(args, generic(req.cpu, req.output_types[0].dtype)), note=note)


@register_kernel("gather_elements")
def gather_elements(req: KernelRequest) -> KernelImpl:
    from tvm import te

    X, Idx = placeholders(req)
    xt, out = req.input_types[0], req.output_types[0]
    axis = req.attrs["axis"] % xt.rank
    dim = xt.shape[axis]

    def body(*o):
        i = list(o)
        i[axis] = _fix_index(_load(Idx, o), dim)
        return _load(X, i)

    return _simple(req, [X, Idx, te.compute(out.shape, body, name="out")], "gather_elements")


@register_kernel("gather_nd")
def gather_nd(req: KernelRequest) -> KernelImpl:
    from tvm import te

    X, Idx = placeholders(req)
    xt, it, out = req.input_types[0], req.input_types[1], req.output_types[0]
    b = req.attrs["batch_dims"]
    m = it.shape[-1]
    r = it.rank - 1  # index dims of the output (batch dims included)

    def body(*o):
        pos = list(o[:r])
        picked = [_fix_index(_load(Idx, pos + [j]), xt.shape[b + j]) for j in range(m)]
        return _load(X, list(o[:b]) + picked + list(o[r:]))

    return _simple(req, [X, Idx, te.compute(out.shape, body, name="out")], "gather_nd")


@register_kernel("scatter_elements")
def scatter_elements(req: KernelRequest) -> KernelImpl:
    from tvm import te, topi

    X, Idx, U = placeholders(req)
    xt, it = req.input_types[0], req.input_types[1]
    axis = req.attrs["axis"] % xt.rank
    norm = te.compute(it.shape, lambda *i: _fix_index(_load(Idx, i), xt.shape[axis]),
                      name="indices")
    Y = topi.scatter_elements(X, norm, U, axis, _TOPI_REDUCTION[req.attrs["reduction"]])
    return _simple(req, [X, Idx, U, Y], f"scatter_elements {req.attrs['reduction']}")


@register_kernel("scatter_nd")
def scatter_nd(req: KernelRequest) -> KernelImpl:
    from tvm import te, topi

    X, Idx, U = placeholders(req)
    xt, it = req.input_types[0], req.input_types[1]
    m = it.shape[-1]
    # TOPI takes the index tuple first: [m, positions...]
    norm = te.compute((m,) + it.shape[:-1],
                      lambda j, *p: _select_dim(_load(Idx, list(p) + [j]), j, xt.shape[:m]),
                      name="indices")
    Y = topi.scatter_nd(X, norm, U, _TOPI_REDUCTION[req.attrs["reduction"]])
    return _simple(req, [X, Idx, U, Y], f"scatter_nd {req.attrs['reduction']}")


def _select_dim(v, j, dims: tuple[int, ...]):
    """``_fix_index(v, dims[j])`` for a loop variable ``j``."""
    from tvm import tirx

    out = _fix_index(v, dims[-1])
    for d in range(len(dims) - 2, -1, -1):
        out = tirx.Select(j == d, _fix_index(v, dims[d]), out)
    return out
