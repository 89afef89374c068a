"""Fused convolution blocks: ``conv2d_fused``, ``depthwise_pointwise`` and ``squeeze_excite``.

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

``depthwise_pointwise(x, w_dw, b_dw, w_pw, b_pw, residual?)``
    ``act(conv1x1(dw_act(depthwise(x, w_dw) + b_dw), w_pw) + b_pw + residual)``: a depthwise
    conv (``strides``, ``pads``, ``dilations``; its activation ``dw_activation`` with
    ``dw_clip_min`` / ``dw_clip_max``) whose result only the 1x1 conv reads, as one kernel
    (the depthwise result is made row by row beside the 1x1 conv and never goes through
    memory). ``w_dw`` is ``[C, 1, KH, KW]`` and ``w_pw`` ``[OC, C, 1, 1]`` in
    ``kernel_layout``; ``residual`` (with ``residual``) is shaped like the result; the
    depthwise result is rounded to the operands' dtype before the 1x1 conv, as unfused.

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
    kernel_dims,
    to_nchw,
)
from compiler.ir.registry import Attr, OpDef, register_op
from compiler.ir.types import TensorType, is_float

__all__ = ["conv_fused_out_layout", "channel_shape", "dw_attrs", "pw_attrs"]


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


def _float_operands(op: str, names: list[str], types) -> None:
    """``types`` are one float operand per name of ``names``, else an OpError naming them."""
    if len(types) != len(names):
        raise OpError(f"{op} takes {', '.join(names)}: {len(names)} operands, got "
                      f"{len(types)}")
    if not is_float(same_dtype(types, f"{op}'s operands")):
        raise OpError(f"{op} needs float operands, got {types[0]}")


def _conv_fused_infer(types, attrs):
    _float_operands("conv2d_fused", ["x", "w", "b"] + ["scale"] * attrs["input_scale"]
                    + ["residual"] * attrs["residual"], types)
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


def dw_attrs(attrs: dict, channels: int) -> dict:
    """The depthwise conv2d's attributes inside a ``depthwise_pointwise`` node."""
    return {"strides": attrs["strides"], "pads": attrs["pads"], "dilations": attrs["dilations"],
            "groups": channels, "layout": attrs["layout"],
            "kernel_layout": attrs["kernel_layout"], "activation": attrs["dw_activation"],
            "clip_min": attrs["dw_clip_min"], "clip_max": attrs["dw_clip_max"]}


def pw_attrs(attrs: dict) -> dict:
    """The 1x1 conv's attributes inside a ``depthwise_pointwise`` node."""
    return {"strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1], "groups": 1,
            "layout": attrs["layout"], "kernel_layout": attrs["kernel_layout"],
            "activation": attrs["activation"], "clip_min": attrs["clip_min"],
            "clip_max": attrs["clip_max"]}


def _dwpw_infer(types, attrs):
    _float_operands("depthwise_pointwise", ["x", "w_dw", "b_dw", "w_pw", "b_pw"]
                    + ["residual"] * attrs["residual"], types)
    x, layout, kl = types[0], attrs["layout"], attrs["kernel_layout"]
    if x.rank != 4:
        raise OpError(f"depthwise_pointwise's input must be 4-D ({layout}), got {x}")
    c = x.shape[1] if layout == "NCHW" else x.shape[3]
    o, i, _, _ = kernel_dims(types[1].shape, kl) if types[1].rank == 4 else (0, 0, 0, 0)
    if (o, i) != (c, 1):
        raise OpError(f"depthwise_pointwise's w_dw must be a depthwise weight for {c} "
                      f"channels ([{c}, 1, KH, KW] as {kl}), got {types[1]}")
    dw = conv_infer(types[:3], dw_attrs(attrs, c))[0]
    _, _, kh, kw = kernel_dims(types[3].shape, kl) if types[3].rank == 4 else (0, 0, 0, 0)
    if (kh, kw) != (1, 1):
        raise OpError(f"depthwise_pointwise's w_pw must be a 1x1 weight ({kl}), got "
                      f"{types[3]}")
    out = conv_infer([dw, types[3], types[4]], pw_attrs(attrs))[0]
    if attrs["residual"] and types[5].shape != out.shape:
        raise OpError(f"depthwise_pointwise's residual must be shaped like the result "
                      f"{list(out.shape)}, got {types[5]}")
    return [out]


def _dwpw_ref(xs, attrs):
    x = xs[0]
    layout, kl = attrs["layout"], attrs["kernel_layout"]
    c = x.shape[1] if layout == "NCHW" else x.shape[3]
    dwa, pwa = dw_attrs(attrs, c), pw_attrs(attrs)
    ws = [w.transpose(0, 3, 1, 2) if kl == "OHWI" else w.transpose(3, 2, 0, 1)
          if kl == "HWIO" else w for w in (xs[1], xs[3])]
    xn = to_nchw(x, layout)
    d = conv2d_nchw(xn, ws[0], xs[2], dwa["strides"], dwa["pads"], dwa["dilations"], c,
                    keep_acc=True)
    d = apply_activation(d, dwa).astype(x.dtype, copy=False)
    y = conv2d_nchw(d, ws[1], xs[4], [1, 1], [0, 0, 0, 0], [1, 1], 1, keep_acc=True)
    if attrs["residual"]:
        y = y + to_nchw(xs[5], layout).astype(y.dtype, copy=False)
    return [from_nchw(apply_activation(y, pwa).astype(x.dtype, copy=False), layout)]


def _dwpw_verify(attrs):
    check_activation(attrs)
    check_activation({"activation": attrs["dw_activation"], "clip_min": attrs["dw_clip_min"],
                      "clip_max": attrs["dw_clip_max"]})


register_op(OpDef(
    "depthwise_pointwise", (5, 6),
    {"strides": CONV_ATTRS["strides"], "pads": CONV_ATTRS["pads"],
     "dilations": CONV_ATTRS["dilations"], "layout": Attr("str", "NHWC", LAYOUTS),
     "kernel_layout": Attr("str", "OHWI", KERNEL_LAYOUTS), **ACTIVATION_ATTRS,
     "dw_activation": Attr("str", "none", ACTIVATIONS, "the depthwise conv's activation"),
     "dw_clip_min": Attr("float", 0.0, doc="lower bound when dw_activation is clip"),
     "dw_clip_max": Attr("float", 6.0, doc="upper bound when dw_activation is clip"),
     "residual": Attr("bool", False, doc="a residual operand added before the activation")},
    _dwpw_infer, _dwpw_ref, verify=_dwpw_verify, family="nn",
    doc="a depthwise conv and the 1x1 conv reading it, with a residual add"))


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
