"""ONNX → IR converters for data-dependent indexing (GatherElements, GatherND, Scatter*),
and the refusal of ops whose output *shape* depends on input values (NonZero,
NonMaxSuppression, Unique...) unless their inputs are constants, when they fold at import.
"""

from __future__ import annotations

import numpy as np

from compiler.frontends.onnx_ctx import Ctx, DataDependent, Unsupported, converter

__all__ = ["data_dependent"]

_REDUCTIONS = {"none": "none", "add": "add", "mul": "mul", "max": "max", "min": "min"}


def data_dependent(c: Ctx, what: str) -> DataDependent:
    """The refusal of a node whose output shape depends on the values of its inputs."""
    return DataDependent(f"{what}, so its output shape depends on the input values")


def _reduction(c: Ctx) -> str:
    r = c.attr("reduction", "none")
    if r not in _REDUCTIONS:
        raise Unsupported(f"reduction={r!r} is not supported")
    return _REDUCTIONS[r]


@converter("GatherElements")
def _gather_elements(c: Ctx):
    return [c.emit("gather_elements", c.value(0), c.value(1), axis=c.attr("axis", 0))]


@converter("GatherND")
def _gather_nd(c: Ctx):
    return [c.emit("gather_nd", c.value(0), c.value(1), batch_dims=c.attr("batch_dims", 0))]


@converter("ScatterElements", "Scatter")
def _scatter_elements(c: Ctx):
    return [c.emit("scatter_elements", c.value(0), c.value(1), c.value(2),
                   axis=c.attr("axis", 0), reduction=_reduction(c))]


@converter("ScatterND")
def _scatter_nd(c: Ctx):
    return [c.emit("scatter_nd", c.value(0), c.value(1), c.value(2), reduction=_reduction(c))]


@converter("If")
def _if(c: Ctx):
    raise Unsupported("If is expanded by the importer (an importer bug if this is reached)")


@converter("NonZero")
def _nonzero(c: Ctx):
    x = c.const(0)
    if x is None:
        raise data_dependent(c, "it returns one column per non-zero input element")
    return [np.array(np.nonzero(x), dtype=np.int64).reshape(x.ndim, -1)]


@converter("NonMaxSuppression")
def _nms(c: Ctx):
    raise data_dependent(c, "it returns one row per box it keeps")


@converter("Unique")
def _unique(c: Ctx):
    raise data_dependent(c, "it returns one entry per distinct value")


@converter("Compress")
def _compress(c: Ctx):
    cond = c.const(1)
    if cond is None:
        raise data_dependent(c, "it keeps the slices its condition selects")
    axis = c.attr("axis")
    keep = np.flatnonzero(cond.astype(bool))
    if axis is None:
        flat = c.graph.make_node("reshape", [c.value(0)],
                                 {"shape": [int(np.prod(c.shape(0)))]}).output
        return [c.emit("gather", flat, c.const_value(keep.astype(np.int64)), axis=0)]
    return [c.emit("gather", c.value(0), c.const_value(keep.astype(np.int64)), axis=axis)]
