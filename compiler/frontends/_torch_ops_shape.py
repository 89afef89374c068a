"""ATen converters for the shape, indexing and reduction families.

Shapes of views come from torch's own shape propagation (``-1`` already resolved).
"""

from __future__ import annotations

from typing import Any

from compiler.frontends._torch_ops import axis_arg, conv
from compiler.frontends.torch import TorchImporter, Unsupported
from compiler.ir.graph import Value


@conv("view.default", "_unsafe_view.default", "reshape.default", "flatten.using_ints",
      "unsqueeze.default", "squeeze.dim", "squeeze.dims", "squeeze.default",
      "view_copy.default")
def _reshape(imp: TorchImporter, a: dict) -> Value:
    x = a["self"]
    shape = list(imp.out_type().shape)
    if list(x.shape) == shape:
        return x
    return imp.emit("reshape", x, shape=shape)


@conv("permute.default", "transpose.int", "t.default", "numpy_T.default")
def _permute(imp: TorchImporter, a: dict) -> Value:
    x = a["self"]
    r = x.type.rank
    key = str(imp.node.target)
    if "permute" in key:
        perm = [axis_arg(d, r) for d in a["dims"]]
    else:
        perm = list(range(r))
        if "transpose" in key:
            i, j = axis_arg(a["dim0"], r), axis_arg(a["dim1"], r)
        else:
            i, j = (0, 1) if r == 2 else (0, 0)
        perm[i], perm[j] = perm[j], perm[i]
    if perm == list(range(r)):
        return x
    return imp.emit("transpose", x, perm=perm)


@conv("expand.default", "expand_copy.default")
def _expand(imp: TorchImporter, a: dict) -> Value:
    x = a["self"]
    shape = list(imp.out_type().shape)
    if list(x.shape) == shape:
        return x
    return imp.emit("expand", x, shape=shape)


@conv("repeat.default")
def _repeat(imp: TorchImporter, a: dict) -> Value:
    x, reps = a["self"], list(a["repeats"])
    if len(reps) > x.type.rank:
        x = imp.emit("reshape", x, shape=[1] * (len(reps) - x.type.rank) + list(x.shape))
    return imp.emit("tile", x, repeats=reps)


@conv("cat.default")
def _cat(imp: TorchImporter, a: dict) -> Value:
    t = imp.out_type()
    xs = [imp.tensor(x, t.dtype) for x in a["tensors"]]
    xs = [x for x in xs if not (x.type.rank == 1 and x.shape[0] == 0 and t.rank != 1)]
    if len(xs) == 1:
        return xs[0]
    return imp.emit("concat", *xs, axis=axis_arg(a["dim"], t.rank))


@conv("split.Tensor", "split_with_sizes.default", "split_with_sizes_copy.default")
def _split(imp: TorchImporter, a: dict) -> list[Value]:
    x = a["self"]
    axis = axis_arg(a["dim"], x.type.rank)
    n = x.shape[axis]
    if "split_sizes" in a:
        sizes = list(a["split_sizes"])
    else:
        step = a["split_size"]
        sizes = [min(step, n - i) for i in range(0, n, step)] or [0]
    if len(sizes) == 1:
        return [x]
    return imp.emit_multi("split", [x], {"axis": axis, "sizes": sizes})


def _slice(imp: TorchImporter, x: Value, dim: int, start: Any, end: Any, step: int) -> Value:
    axis = axis_arg(dim, x.type.rank)
    n = x.shape[axis]
    start = 0 if start is None else start
    end = n if end is None else end
    start = max(0, min(n, start + n if start < 0 else start))
    end = max(0, min(n, end + n if end < 0 else end))
    if start == 0 and end == n and step == 1:
        return x
    return imp.emit("slice", x, starts=[start], ends=[end], axes=[axis], steps=[step])


@conv("slice.Tensor", "slice_copy.Tensor")
def _slice_op(imp: TorchImporter, a: dict) -> Value:
    return _slice(imp, a["self"], a["dim"], a["start"], a["end"], a["step"])


@conv("flip.default")
def _flip(imp: TorchImporter, a: dict) -> Value:
    x = a["self"]
    axes = sorted({axis_arg(d, x.type.rank) for d in a["dims"]})
    if not axes:
        return x
    return imp.emit("slice", x, starts=[x.shape[d] - 1 for d in axes],
                    ends=[-x.shape[d] - 1 for d in axes], axes=axes, steps=[-1] * len(axes))


@conv("select.int", "select_copy.int")
def _select(imp: TorchImporter, a: dict) -> Value:
    x = a["self"]
    i = a["index"]
    y = _slice(imp, x, a["dim"], i, i + 1 if i != -1 else None, 1)
    return imp.emit("reshape", y, shape=list(imp.out_type().shape))


@conv("embedding.default")
def _embedding(imp: TorchImporter, a: dict) -> Value:
    idx = a["indices"]
    if idx.dtype not in ("i64", "i32"):
        raise Unsupported(f"embedding indices of dtype {idx.dtype}")
    return imp.emit("gather", a["weight"], idx, axis=0)


@conv("index_select.default")
def _index_select(imp: TorchImporter, a: dict) -> Value:
    x = a["self"]
    return imp.emit("gather", x, a["index"], axis=axis_arg(a["dim"], x.type.rank))


@conv("index.Tensor")
def _index(imp: TorchImporter, a: dict) -> Value:
    """Advanced indexing with integer index tensors on adjacent dims: one gather.

    Several index tensors are combined into one flat index over the merged dims
    (row-major), so ``x[i, j]`` becomes ``gather(reshape(x), i * n1 + j)``; with constant
    indices that arithmetic folds at import.
    """
    x = a["self"]
    idx = list(a["indices"])
    while idx and idx[-1] is None:
        idx.pop()
    first = next(i for i, v in enumerate(idx) if v is not None)
    tensors = idx[first:]
    if any(v is None for v in tensors):
        raise Unsupported("index tensors on non-adjacent dims")
    if any(v.dtype not in ("i64", "i32") for v in tensors):
        raise Unsupported("boolean-mask indexing")
    k = len(tensors)
    dims = list(x.shape[first:first + k])
    tensors = [imp.tensor(v, "i64") for v in tensors]
    flat = None
    for v, n in zip(tensors, dims, strict=True):
        v = imp.emit("mod", v, imp.tensor(n, "i64"))  # wrap negative indices
        flat = v if flat is None else imp.emit(
            "add", imp.emit("mul", flat, imp.tensor(n, "i64")), v)
    assert flat is not None
    if k > 1:
        merged = 1
        for n in dims:
            merged *= n
        x = imp.emit("reshape", x, shape=[*x.shape[:first], merged, *x.shape[first + k:]])
    y = imp.emit("gather", x, flat, axis=first)
    return y


@conv("tril.default", "triu.default")
def _trilu(imp: TorchImporter, a: dict) -> Value:
    upper = "triu" in str(imp.node.target)
    return imp.emit("trilu", a["self"], upper=upper, k=int(a["diagonal"]))


@conv("cumsum.default")
def _cumsum(imp: TorchImporter, a: dict) -> Value:
    x = imp.tensor(a["self"], imp.out_type().dtype)
    return imp.emit("cumsum", x, axis=axis_arg(a["dim"], x.type.rank))


# -- reductions -------------------------------------------------------------------------
_REDUCE = {"mean": "reduce_mean", "sum": "reduce_sum", "amax": "reduce_max",
           "amin": "reduce_min", "prod": "reduce_prod"}


def _reduce_axes(dim: Any, rank: int) -> list[int]:
    if dim is None:
        return list(range(rank))
    dims = dim if isinstance(dim, list | tuple) else [dim]
    return sorted(axis_arg(d, rank) for d in dims) or list(range(rank))


def _reduce(imp: TorchImporter, a: dict) -> Value:
    key = str(imp.node.target).removeprefix("aten.").split(".")[0]
    x = imp.tensor(a["self"], imp.out_type().dtype)
    axes = _reduce_axes(a.get("dim"), x.type.rank)
    keep = bool(a.get("keepdim", False))
    return imp.emit(_REDUCE[key], x, axes=axes, keepdims=keep)


for _k in ("mean.dim", "mean.default", "sum.dim_IntList", "sum.default", "amax.default",
           "amin.default", "prod.dim_int", "prod.default"):
    conv(_k)(_reduce)


@conv("max.dim", "min.dim")
def _max_dim(imp: TorchImporter, a: dict) -> list[Value]:
    is_max = str(imp.node.target).startswith("aten.max")
    x = a["self"]
    axis = axis_arg(a["dim"], x.type.rank)
    keep = bool(a["keepdim"])
    vals = imp.emit("reduce_max" if is_max else "reduce_min", x, axes=[axis], keepdims=keep)
    idx = imp.emit("argmax" if is_max else "argmin", x, axis=axis, keepdims=keep)
    return [vals, idx]


@conv("argmax.default", "argmin.default")
def _argmax(imp: TorchImporter, a: dict) -> Value:
    x = a["self"]
    op = "argmax" if "argmax" in str(imp.node.target) else "argmin"
    if a["dim"] is None:
        x = imp.emit("reshape", x, shape=[x.type.size])
        y = imp.emit(op, x, axis=0, keepdims=False)
        return imp.emit("reshape", y, shape=list(imp.out_type().shape)) \
            if imp.out_type().rank else y
    return imp.emit(op, x, axis=axis_arg(a["dim"], x.type.rank), keepdims=bool(a["keepdim"]))


@conv("max.default", "min.default")
def _max_all(imp: TorchImporter, a: dict) -> Value:
    op = "reduce_max" if str(imp.node.target).startswith("aten.max") else "reduce_min"
    x = a["self"]
    return imp.emit(op, x, axes=list(range(x.type.rank)), keepdims=False)


@conv("any.dim", "any.dims", "any.default", "all.dim", "all.dims", "all.default")
def _any_all(imp: TorchImporter, a: dict) -> Value:
    """any/all as max/min over the mask cast to u8 (the catalogue has no boolean reduce)."""
    is_any = str(imp.node.target).startswith("aten.any")
    x = a["self"]
    if x.dtype != "bool":
        x = imp.emit("logical_not", imp.emit("equal", x, imp.tensor(0, x.dtype)))
    x = imp.emit("cast", x, to="u8")
    axes = _reduce_axes(a.get("dim"), x.type.rank)
    r = imp.emit("reduce_max" if is_any else "reduce_min", x, axes=axes,
                 keepdims=bool(a.get("keepdim", False)))
    return imp.emit("cast", r, to="bool")


@conv("var.correction", "var.dim", "std.correction", "std.dim")
def _var(imp: TorchImporter, a: dict) -> Value:
    x = a["self"]
    dt = x.dtype
    axes = _reduce_axes(a.get("dim"), x.type.rank)
    n = 1
    for ax in axes:
        n *= x.shape[ax]
    corr = a.get("correction")
    if corr is None:
        corr = 1 if a.get("unbiased", True) else 0
    d = imp.emit("sub", x, imp.emit("reduce_mean", x, axes=axes, keepdims=True))
    v = imp.emit("reduce_sum", imp.emit("mul", d, d), axes=axes,
                 keepdims=bool(a.get("keepdim", False)))
    v = imp.emit("div", v, imp.tensor(max(n - float(corr), 0.0), dt))
    return imp.emit("sqrt", v) if str(imp.node.target).startswith("aten.std") else v
