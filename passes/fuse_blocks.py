"""``fuse-conv-blocks``: the blocks of depthwise-heavy networks as fewer, bigger kernels.

Runs after ``to-nhwc`` (it matches the NHWC graph that pass leaves) and after the activation
fusions. Four rewrites, each an option, each a fusion across values nothing else reads:

1. ``squeeze_excite``: ``global_avg_pool(x) -> conv2d 1x1 {act} -> conv2d 1x1 {gate}`` on
   the 1x1 map becomes one ``squeeze_excite(x, w1, b1, w2, b2)`` node (one kernel instead of
   three; the two weights reshaped to ``[C, Cr]`` / ``[Cr, C]`` at compile time).
2. ``input_scale``: ``mul(x, s)`` with ``s`` one factor per sample and channel (a squeeze-
   excitation gate), read only by a conv2d, becomes that conv's ``scale`` operand
   (``conv2d_fused{input_scale}``): the channel multiply happens as the conv loads its
   weights, and the scaled tensor never goes through memory.
3. ``residual``: ``add(conv(...), r)`` with ``r`` shaped like the result and the conv's
   result read by nothing else becomes ``conv2d_fused{residual}(..., r)``; an activation
   that is the add's only reader then fuses too (``act(conv + b + r)``: ResNet's ReLU after
   the add), when named in ``activations``.
4. ``input_transpose``: the NCHW->NHWC ``transpose`` that ``to-nhwc`` leaves in front of the
   first conv (the model's input), read only by that conv, becomes the conv's own input
   stage: ``conv2d_fused{layout="NCHW", out_layout="NHWC"}``.

5. ``depthwise_pointwise`` (off by default; A/B it with
   ``fuse-conv-blocks{depthwise_pointwise=true}``): a depthwise conv read only by a 1x1
   stride-1 conv (a ``conv2d``, or a ``conv2d_fused`` with a residual and no input scale),
   both NHWC f32 with constant weights, becomes one ``depthwise_pointwise`` node (the
   MobileNet block's depthwise and projection: the expanded tensor never goes through
   memory). It runs after the other rewrites and the activation fusion, so the 1x1 conv it
   takes already carries its residual and activation.

Depthwise convs are otherwise left alone (their kernel is depthwise.py's, with no such
operands).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from compiler.ir.graph import Graph, Node, Value
from compiler.ir.ops.nn import kernel_dims
from compiler.ir.ops.nn_fused import channel_shape, conv_fused_out_layout
from compiler.ir.types import is_float
from compiler.pass_base import Pass, PassContext, PassResult, register_pass
from passes._rewrite import const_array, erase_dead, new_const, only_user, replace_node
from passes.fusion import Activation, check_activations, fuse_activation

__all__ = ["FuseConvBlocks"]

RULE = "fuse-conv-blocks"
_CONVS = ("conv2d", "conv2d_fused")
_ACT_KEYS = ("activation", "clip_min", "clip_max")


def _count(stats: dict[str, int], key: str) -> None:
    stats[key] = stats.get(key, 0) + 1


def _channels(v: Value, layout: str) -> int:
    return v.shape[1] if layout == "NCHW" else v.shape[3]


def _is_depthwise(conv: Node) -> bool:
    g = conv.attrs["groups"]
    return g > 1 and g == _channels(conv.inputs[0], conv.attrs["layout"])


def _fused_parts(conv: Node) -> tuple[list[Value], dict[str, Any]]:
    """``conv``'s operands and attributes as a conv2d_fused (x, w, b, scale?, residual?)."""
    attrs = dict(conv.attrs)
    if conv.op == "conv2d_fused":
        return list(conv.inputs), attrs
    attrs.update(input_scale=False, residual=False, out_layout="")
    return list(conv.inputs), attrs


def _with_bias(graph: Graph, conv: Node, inputs: list[Value]) -> list[Value]:
    if len(inputs) >= 3:
        return inputs
    oc = kernel_dims(tuple(conv.inputs[1].shape), conv.attrs["kernel_layout"])[0]
    zero = new_const(graph, np.zeros(oc, conv.inputs[0].type.np_dtype),
                     name=f"{conv.name or RULE}.bias0", before=graph.nodes[0])
    return [*inputs, zero]


# -- 1. squeeze-excitation -----------------------------------------------------------------
def _one_by_one(conv: Node | None, layout: str) -> bool:
    if conv is None or conv.op != "conv2d" or conv.attrs["layout"] != layout:
        return False
    x = conv.inputs[0]
    hw = x.shape[2:4] if layout == "NCHW" else x.shape[1:3]
    kl = conv.attrs["kernel_layout"]
    _, _, kh, kw = kernel_dims(tuple(conv.inputs[1].shape), kl)
    return (tuple(hw) == (1, 1) and (kh, kw) == (1, 1) and conv.attrs["groups"] == 1
            and not any(conv.attrs["pads"]) and len(conv.inputs) == 3)


def _fc_matrix(graph: Graph, w: Value, kl: str) -> np.ndarray | None:
    """A 1x1 conv weight as the ``[in, out]`` matrix of ``x @ W``."""
    arr = const_array(graph, w)
    if arr is None:
        return None
    o, i, _, _ = kernel_dims(arr.shape, kl)
    return np.ascontiguousarray(arr.reshape(o, i).T if kl in ("OIHW", "OHWI") else
                                arr.reshape(i, o))


def _squeeze_excite(graph: Graph, gap: Node) -> str | None:
    layout = gap.attrs["layout"]
    x = gap.inputs[0]
    if x.type.rank != 4 or not is_float(x.dtype):
        return "not_4d_float"
    fc1 = only_user(graph, gap.output)
    if not _one_by_one(fc1, layout):
        return "no_1x1_conv_after_pool"
    fc2 = only_user(graph, fc1.output)
    if not _one_by_one(fc2, layout):
        return "no_second_1x1_conv"
    if fc2.attrs["activation"] == "clip":
        return "clip_gate"
    w1 = _fc_matrix(graph, fc1.inputs[1], fc1.attrs["kernel_layout"])
    w2 = _fc_matrix(graph, fc2.inputs[1], fc2.attrs["kernel_layout"])
    if w1 is None or w2 is None:
        return "weight_not_loaded"
    if w1.shape[0] != _channels(x, layout) or w2.shape[1] != w1.shape[0]:
        return "channels_mismatch"
    name = fc1.name or RULE
    ws = [new_const(graph, w1, name=f"{name}.se_w1", before=graph.nodes[0]), fc1.inputs[2],
          new_const(graph, w2, name=f"{name}.se_w2", before=graph.nodes[0]), fc2.inputs[2]]
    attrs = {k: fc1.attrs[k] for k in _ACT_KEYS}
    attrs.update(layout=layout, gate=fc2.attrs["activation"])
    replace_node(graph, fc2, "squeeze_excite", [x, *ws], attrs, rule=RULE, name_from=gap)
    erase_dead(graph, [fc1, gap])
    return None


# -- 2. channel scale into the conv that reads it -----------------------------------------
def _scale_operand(mul: Node, layout: str) -> tuple[Value, Value] | None:
    """(x, s) of ``mul(x, s)`` / ``mul(s, x)`` with ``s`` one factor per sample and channel."""
    a, b = mul.inputs
    for x, s in ((a, b), (b, a)):
        if x is s or x.type.rank != 4 or x.shape != mul.output.shape:
            continue
        if s.shape == channel_shape(x.shape[0], _channels(x, layout), layout):
            return x, s
    return None


def _input_scale(graph: Graph, mul: Node) -> str | None:
    conv = only_user(graph, mul.output)
    if conv is None or conv.op not in _CONVS or conv.inputs[0] is not mul.output:
        return "not_read_by_a_conv"
    if _is_depthwise(conv):
        return "depthwise_conv"
    inputs, attrs = _fused_parts(conv)
    if attrs["input_scale"]:
        return "already_scaled"
    found = _scale_operand(mul, attrs["layout"])
    if found is None or found[0].dtype != conv.output.dtype:
        return "not_a_channel_scale"
    x, s = found
    inputs = _with_bias(graph, conv, inputs)
    new_inputs = [x, inputs[1], inputs[2], s, *inputs[3:]]
    replace_node(graph, conv, "conv2d_fused", new_inputs, {**attrs, "input_scale": True},
                 rule=RULE)
    erase_dead(graph, [mul])
    return None


# -- 3. residual add into the conv's epilogue ---------------------------------------------
def _residual_conv(graph: Graph, add: Node) -> tuple[Node, Value] | None:
    a, b = add.inputs
    best = None
    for v, r in ((a, b), (b, a)):
        conv = v.producer
        if (conv is None or conv.op not in _CONVS or v is r or only_user(graph, v) is not add
                or r.shape != add.output.shape or r.dtype != add.output.dtype
                or v.shape != add.output.shape or conv.attrs["activation"] != "none"
                or conv.attrs.get("residual") or _is_depthwise(conv)
                or not is_float(v.dtype)):
            continue
        if best is None or graph.nodes.index(conv) > graph.nodes.index(best[0]):
            best = (conv, r)
    return best


def _residual(graph: Graph, add: Node) -> str | None:
    found = _residual_conv(graph, add)
    if found is None:
        return "no_single_use_conv_operand"
    conv, r = found
    inputs, attrs = _fused_parts(conv)
    inputs = _with_bias(graph, conv, inputs)
    replace_node(graph, add, "conv2d_fused", [*inputs, r], {**attrs, "residual": True},
                 rule=RULE, name_from=conv)
    erase_dead(graph, [conv])
    return None


# -- 4. the model's input transpose into the first conv -----------------------------------
def _input_transpose(graph: Graph, tr: Node) -> str | None:
    if list(tr.attrs["perm"]) != [0, 2, 3, 1] or tr.inputs[0].type.rank != 4:
        return "not_nchw_to_nhwc"
    conv = only_user(graph, tr.output)
    if conv is None or conv.op not in _CONVS or conv.inputs[0] is not tr.output:
        return "not_read_by_a_conv"
    inputs, attrs = _fused_parts(conv)
    if attrs["layout"] != "NHWC" or conv_fused_out_layout(attrs) != "NHWC":
        return "conv_not_nhwc"
    if _is_depthwise(conv) or attrs["input_scale"]:
        return "depthwise_or_scaled"
    inputs = _with_bias(graph, conv, inputs)
    replace_node(graph, conv, "conv2d_fused", [tr.inputs[0], *inputs[1:]],
                 {**attrs, "layout": "NCHW", "out_layout": "NHWC"}, rule=RULE)
    erase_dead(graph, [tr])
    return None


# -- 5. a depthwise conv and the 1x1 conv reading it -------------------------------------
def _pointwise_reason(graph: Graph, conv: Node) -> str | None:
    a = conv.attrs
    if a["layout"] != "NHWC" or conv_fused_out_layout(a) != "NHWC" or a.get("input_scale"):
        return "not_plain_nhwc"
    if a["groups"] != 1 or list(a["strides"]) != [1, 1] or any(a["pads"]):
        return "not_1x1_stride_1"
    if kernel_dims(tuple(conv.inputs[1].shape), a["kernel_layout"])[2:] != (1, 1):
        return "not_1x1_stride_1"
    if conv.output.dtype != "f32" or const_array(graph, conv.inputs[1]) is None:
        return "not_f32_const_weight"
    return None


def _depthwise_pointwise(graph: Graph, conv: Node) -> str | None:
    reason = _pointwise_reason(graph, conv)
    if reason:
        return reason
    dw = conv.inputs[0].producer
    if dw is None or dw.op != "conv2d" or not _is_depthwise(dw) \
            or dw.output.shape[3] != dw.inputs[0].shape[3] \
            or only_user(graph, dw.output) is not conv:
        return "input_not_a_single_use_depthwise"
    if dw.attrs["layout"] != "NHWC" or dw.attrs["kernel_layout"] != conv.attrs["kernel_layout"]:
        return "depthwise_layout_differs"
    if const_array(graph, dw.inputs[1]) is None:
        return "depthwise_weight_not_const"
    inputs, attrs = _fused_parts(conv)
    inputs = _with_bias(graph, conv, inputs)
    dwi = _with_bias(graph, dw, list(dw.inputs))
    d = dw.attrs
    new = {"strides": d["strides"], "pads": d["pads"], "dilations": d["dilations"],
           "layout": "NHWC", "kernel_layout": d["kernel_layout"],
           "dw_activation": d["activation"], "dw_clip_min": d["clip_min"],
           "dw_clip_max": d["clip_max"], "residual": bool(attrs["residual"]),
           **{k: attrs[k] for k in _ACT_KEYS}}
    replace_node(graph, conv, "depthwise_pointwise", [*dwi, inputs[1], inputs[2],
                                                      *inputs[3:]], new, rule=RULE)
    erase_dead(graph, [dw])
    return None


_REWRITES = (("squeeze_excite", "global_avg_pool", _squeeze_excite),
             ("input_scale", "mul", _input_scale),
             ("residual", "add", _residual),
             ("input_transpose", "transpose", _input_transpose))


@register_pass
@dataclass(frozen=True)
class FuseConvBlocks(Pass):
    """Squeeze-excitation gates, channel scales, residual adds and the input transpose fused
    into conv kernels (module docstring). Before: the NHWC graph of ``to-nhwc``. After: no
    ``mul`` by a per-channel gate, ``add`` of a single-use conv result or input transpose is
    left where the conv could take it; every fused conv is ``conv2d_fused`` (or, with
    ``depthwise_pointwise``, a ``depthwise_pointwise`` with the depthwise conv before it)."""

    name: ClassVar[str] = "fuse-conv-blocks"
    squeeze_excite: bool = True
    input_scale: bool = True
    residual: bool = True
    input_transpose: bool = True
    activations: tuple[Activation, ...] = ("relu", "relu6", "clip")
    depthwise_pointwise: bool = False

    def __post_init__(self) -> None:
        check_activations(self.name, self.activations)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats: dict[str, int] = {}
        for option, op, rewrite in _REWRITES:
            if not getattr(self, option):
                continue
            for node in graph.find(op):
                reason = rewrite(graph, node)
                _count(stats, f"{option}.skipped.{reason}" if reason else option)
        if self.residual:  # act(conv + b + r): the activation reading the add
            acts = fuse_activation(graph, "conv2d_fused", self.activations, self.name)
            stats.update({f"activation.{k}": v for k, v in acts.stats.items()})
        if self.depthwise_pointwise:
            for node in [n for n in graph.nodes if n.op in _CONVS]:
                reason = _depthwise_pointwise(graph, node)
                _count(stats, f"depthwise_pointwise.skipped.{reason}" if reason
                       else "depthwise_pointwise")
        changed = any(k in stats for k, _, _ in _REWRITES) or \
            "depthwise_pointwise" in stats or stats.get("activation.fused", 0) > 0
        return PassResult(graph, changed, stats)
