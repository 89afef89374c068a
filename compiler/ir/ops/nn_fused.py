"""Fused convolution blocks: ``conv2d_fused`` and ``squeeze_excite``.

Made by ``passes/fuse_blocks.py`` after the layout pass, so that a depthwise-heavy network
(MobileNet, EfficientNet) runs fewer, bigger kernels and fewer tensors go through memory.

``conv2d_fused(x, w, b, scale?, residual?)``
    ``act(conv2d(x * scale, w) + b + residual)``: conv2d's attributes, plus
    - ``input_scale``: a ``scale`` operand follows ``b``, one factor per sample and input
      channel, shaped ``[N, C, 1, 1]`` (``layout`` NCHW) or ``[N, 1, 1, C]`` (NHWC): the
      channel multiply of a squeeze-excitation block, applied as the conv reads its input;
    - ``residual``: a last operand shaped like the result is added before the activation
      (a residual connection; with activation ``none`` it is ``conv + b + residual``);
    - ``out_layout``: the result's layout when it differs from the input's ("" = the same):
      a stem conv reading the model's NCHW input and writing NHWC.
    ``b`` is required (zeros when the conv had none).

``squeeze_excite(x, w1, b1, w2, b2)``
    the gate of a squeeze-excitation block, ``gate(act(mean_hw(x) @ w1 + b1) @ w2 + b2)``,
    shaped like ``global_avg_pool(x)`` (``[N, 1, 1, C]`` NHWC, ``[N, C, 1, 1]`` NCHW);
    ``w1`` is ``[C, Cr]``, ``w2`` ``[Cr, C]``; ``activation`` (with ``clip_min`` /
    ``clip_max``) after the first product, ``gate`` after the second.
"""

from __future__ import annotations

from compiler.errors import OpError
from compiler.ir.ops._util import same_dtype
from compiler.ir.ops.nn import (
    ACTIVATION_ATTRS,
    ACTIVATIONS,
    CONV_ATTRS,
    KERNEL_LAYOUTS,
    LAYOUTS,
    accumulator_dtype,
    apply_activation,
    check_activation,
    conv2d_nchw,
    conv_infer,
    from_nchw,
    to_nchw,
)
from compiler.ir.registry import Attr, OpDef, register_op
from compiler.ir.types import TensorType, is_float

__all__ = ["conv_fused_out_layout", "channel_shape"]


def conv_fused_out_layout(attrs: dict) -> str:
    """The result layout of a ``conv2d_fused`` node."""
    return attrs.get("out_layout") or attrs["layout"]


def channel_shape(n: int, c: int, layout: str) -> tuple[int, int, int, int]:
    """Shape of a per-sample, per-channel tensor (a global pool's result) in ``layout``."""
    return (n, c, 1, 1) if layout == "NCHW" else (n, 1, 1, c)


def _relayout(shape: tuple[int, ...], src: str, dst: str) -> tuple[int, ...]:
    if src == dst:
        return shape
    return (shape[0], shape[3], shape[1], shape[2]) if dst == "NCHW" else \
        (shape[0], shape[2], shape[3], shape[1])


def _conv_fused_infer(types, attrs):
    n_in = 3 + int(attrs["input_scale"]) + int(attrs["residual"])
    if len(types) != n_in:
        raise OpError(f"conv2d_fused takes x, w, b{', scale' if attrs['input_scale'] else ''}"
                      f"{', residual' if attrs['residual'] else ''}: {n_in} operands, got "
                      f"{len(types)}")
    if not is_float(same_dtype(types, "conv2d_fused's operands")):
        raise OpError(f"conv2d_fused needs float operands, got {types[0]}")
    out = conv_infer(types[:3], attrs)[0]
    layout = attrs["layout"]
    x = types[0]
    if attrs["input_scale"]:
        c = x.shape[1] if layout == "NCHW" else x.shape[3]
        want = channel_shape(x.shape[0], c, layout)
        if types[3].shape != want:
            raise OpError(f"conv2d_fused's scale must be {list(want)} (one factor per sample "
                          f"and input channel, {layout}), got {types[3]}")
    shape = _relayout(out.shape, layout, conv_fused_out_layout(attrs))
    if attrs["residual"] and types[-1].shape != shape:
        raise OpError(f"conv2d_fused's residual must be shaped like the result "
                      f"{list(shape)}, got {types[-1]}")
    return [TensorType(shape, out.dtype)]


def _conv_fused_ref(xs, attrs):
    x, w, b = xs[0], xs[1], xs[2]
    layout, kl = attrs["layout"], attrs["kernel_layout"]
    acc = accumulator_dtype(x.dtype)
    xn = to_nchw(x, layout).astype(acc, copy=False)
    if attrs["input_scale"]:
        xn = xn * to_nchw(xs[3], layout).astype(acc, copy=False)
    if kl == "OHWI":
        w = w.transpose(0, 3, 1, 2)
    elif kl == "HWIO":
        w = w.transpose(3, 2, 0, 1)
    y = conv2d_nchw(xn, w, b, attrs["strides"], attrs["pads"], attrs["dilations"],
                    attrs["groups"], keep_acc=True)
    if attrs["residual"]:
        y = y + to_nchw(xs[-1], conv_fused_out_layout(attrs)).astype(acc, copy=False)
    y = apply_activation(y, attrs).astype(x.dtype, copy=False)
    return [from_nchw(y, conv_fused_out_layout(attrs))]


register_op(OpDef(
    "conv2d_fused", (3, 5),
    {**CONV_ATTRS, "layout": Attr("str", "NCHW", LAYOUTS),
     "kernel_layout": Attr("str", "OIHW", KERNEL_LAYOUTS), **ACTIVATION_ATTRS,
     "input_scale": Attr("bool", False, doc="a per-sample, per-input-channel scale operand"),
     "residual": Attr("bool", False, doc="a residual operand added before the activation"),
     "out_layout": Attr("str", "", ("", *LAYOUTS), "the result's layout, '' = layout")},
    _conv_fused_infer, _conv_fused_ref, verify=check_activation, family="nn",
    doc="conv2d with an input channel scale, a residual add and a result layout"))


def _se_infer(types, attrs):
    x, w1, b1, w2, b2 = types
    dtype = same_dtype(types, "squeeze_excite's operands")
    if not is_float(dtype):
        raise OpError(f"squeeze_excite needs float operands, got {x}")
    layout = attrs["layout"]
    if x.rank != 4:
        raise OpError(f"squeeze_excite's input must be 4-D ({layout}), got {x}")
    n, c = x.shape[0], (x.shape[1] if layout == "NCHW" else x.shape[3])
    if w1.rank != 2 or w1.shape[0] != c:
        raise OpError(f"squeeze_excite's w1 must be [{c}, Cr], got {w1}")
    cr = w1.shape[1]
    for t, want, what in ((b1, (cr,), "b1"), (w2, (cr, c), "w2"), (b2, (c,), "b2")):
        if t.shape != want:
            raise OpError(f"squeeze_excite's {what} must be {list(want)}, got {t}")
    return [TensorType(channel_shape(n, c, layout), dtype)]


def _se_ref(xs, attrs):
    x, w1, b1, w2, b2 = xs
    acc = accumulator_dtype(x.dtype)
    xn = to_nchw(x, attrs["layout"]).astype(acc, copy=False)
    m = xn.mean(axis=(2, 3), dtype=acc)
    h = apply_activation(m @ w1.astype(acc) + b1.astype(acc), attrs)
    s = apply_activation(h @ w2.astype(acc) + b2.astype(acc), {"activation": attrs["gate"]})
    return [s.astype(x.dtype).reshape(channel_shape(x.shape[0], s.shape[1], attrs["layout"]))]


def _se_verify(attrs):
    check_activation(attrs)
    if attrs["gate"] == "clip":
        raise OpError("squeeze_excite: gate='clip' has no bounds; use relu6 or hard_sigmoid")


register_op(OpDef(
    "squeeze_excite", (5, 5),
    {"layout": Attr("str", "NCHW", LAYOUTS), **ACTIVATION_ATTRS,
     "gate": Attr("str", "sigmoid", ACTIVATIONS, "activation of the second product")},
    _se_infer, _se_ref, verify=_se_verify, family="nn",
    doc="squeeze-excitation gate: global mean, two small products and activations"))
