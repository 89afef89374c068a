"""ONNX → IR converters: convolution, pooling, normalisation, softmax, pad, resize.

1-D convolutions and pools are imported as 2-D ones over a unit height (reshapes around);
3-D pools as two 2-D pools.
"""

from __future__ import annotations

import math

import numpy as np

from compiler.frontends.onnx_ctx import Ctx, Unsupported, converter
from compiler.frontends.onnx_ops import f32, norm_axis
from compiler.ir.graph import Value


def _auto_pads(c: Ctx, in_sizes, kernel, strides, dilations) -> list[int]:
    """ONNX pads (begins then ends) after resolving auto_pad."""
    n = len(kernel)
    auto = c.attr("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = list(c.attr("pads", [0] * 2 * n))
        if len(pads) != 2 * n:
            raise Unsupported(f"pads {pads} should have {2 * n} entries")
        return pads
    if auto == "VALID":
        return [0] * 2 * n
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise Unsupported(f"auto_pad={auto!r}; supported: NOTSET, VALID, SAME_UPPER, "
                          "SAME_LOWER")
    begins, ends = [], []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations, strict=True):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else big)
        ends.append(big if auto == "SAME_UPPER" else small)
    return begins + ends


def _geometry(c: Ctx, x_shape, kernel: list[int]):
    """(kernel, strides, pads, dilations) as 2-D lists; 1-D ops get a unit height."""
    n = len(kernel)
    if n not in (1, 2) or len(x_shape) != n + 2:
        raise Unsupported(f"only 1-D and 2-D windows are supported; input has shape "
                          f"{list(x_shape)} and kernel {kernel}")
    strides = list(c.attr("strides", [1] * n))
    dilations = list(c.attr("dilations", [1] * n))
    pads = _auto_pads(c, x_shape[2:], kernel, strides, dilations)
    if n == 1:
        return [1, kernel[0]], [1, strides[0]], [0, pads[0], 0, pads[1]], [1, dilations[0]]
    return kernel, strides, pads, dilations


def _to_2d(c: Ctx, x: Value) -> Value:
    n, ch, length = x.shape
    return c.emit("reshape", x, shape=[n, ch, 1, length])


def _from_2d(c: Ctx, y: Value) -> Value:
    n, ch, _, length = y.shape
    return c.emit("reshape", y, shape=[n, ch, length])


def _weight_2d(c: Ctx, i: int) -> Value:
    arr = c.const(i)
    if arr is not None and arr.ndim == 3:
        return c.graph.add_weight(c.node.input[i], arr.reshape(arr.shape[0], arr.shape[1], 1,
                                                               arr.shape[2]))
    w = c.value(i)
    if w.type.rank != 3:
        raise Unsupported(f"a 1-D convolution needs a 3-D weight, got {w.type}")
    return _to_2d(c, w)


@converter("Conv")
def _conv(c: Ctx):
    x_shape, w_shape = c.shape(0), c.shape(1)
    kernel = list(c.attr("kernel_shape", w_shape[2:]))
    k, s, p, d = _geometry(c, x_shape, kernel)
    one_d = len(kernel) == 1
    x = _to_2d(c, c.value(0)) if one_d else c.value(0)
    w = _weight_2d(c, 1) if one_d else c.value(1)
    ins = [x, w] + ([c.value(2)] if c.has(2) else [])
    y = c.emit("conv2d", *ins, strides=s, pads=p, dilations=d, groups=c.attr("group", 1))
    return [_from_2d(c, y) if one_d else y]


_FUSED_ACTIVATIONS = {"Relu": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid"}


@converter("com.microsoft.FusedConv")
def _fused_conv(c: Ctx):
    """onnxruntime's optimizer output (ORT_ENABLE_EXTENDED): Conv, plus an optional
    residual operand ``Z``, then ``activation`` with ``activation_params``."""
    (y,) = _conv(c)
    if c.has(3):
        y = c.emit("add", y, c.value(3))
    act = c.attr("activation")
    params = [float(p) for p in c.attr("activation_params", [])]
    if act in _FUSED_ACTIVATIONS:
        return [c.emit(_FUSED_ACTIVATIONS[act], y)]
    if act == "LeakyRelu":
        return [c.emit("leaky_relu", y, alpha=params[0] if params else 0.01)]
    if act == "Clip":
        lo, hi = params if len(params) == 2 else (float("-inf"), float("inf"))
        return [c.emit("clip", y, min=lo, max=hi)]
    if act == "HardSigmoid":
        alpha, beta = params if len(params) == 2 else (0.2, 0.5)
        return [c.emit("hard_sigmoid", y, alpha=alpha, beta=beta)]
    if act in (None, "", "Identity"):
        return [y]
    raise Unsupported(f"FusedConv activation {act!r}")


@converter("ConvTranspose")
def _conv_transpose(c: Ctx):
    x_shape, w_shape = c.shape(0), c.shape(1)
    if len(x_shape) not in (3, 4) or len(w_shape) != len(x_shape):
        raise Unsupported(f"only 1-D and 2-D transposed convolutions are supported, input "
                          f"{list(x_shape)}, weight {list(w_shape)}")
    one_d = len(x_shape) == 3

    def pair(name: str, default: int) -> list[int]:
        v = list(c.attr(name, [default] * (len(x_shape) - 2)))
        if len(v) != len(x_shape) - 2:
            raise Unsupported(f"{name} {v} should have {len(x_shape) - 2} entries")
        return [default] + v if one_d else v

    kernel = ([1] if one_d else []) + list(c.attr("kernel_shape", w_shape[2:]))
    strides, dil, opad = pair("strides", 1), pair("dilations", 1), pair("output_padding", 0)
    sizes = ([1] if one_d else []) + list(x_shape[2:])
    auto = c.attr("auto_pad", "NOTSET")
    out_shape = c.attr("output_shape")
    if out_shape is None and auto in ("SAME_UPPER", "SAME_LOWER"):
        out_shape = [sizes[i] * strides[i] for i in range(2)]
    elif out_shape is not None:
        out_shape = ([1] if one_d else []) + list(out_shape)[-(len(x_shape) - 2):]
    if out_shape is not None:
        begins, ends = [], []
        for i in range(2):
            full = strides[i] * (sizes[i] - 1) + opad[i] + (kernel[i] - 1) * dil[i] + 1
            total = full - out_shape[i]
            if total < 0:  # a larger output: the extra rows/columns are output padding
                opad[i] -= total
                total = 0
            small, big = total // 2, total - total // 2
            upper = auto != "SAME_LOWER"
            begins.append(small if upper else big)
            ends.append(big if upper else small)
        pads = begins + ends
    elif auto == "VALID":
        pads = [0, 0, 0, 0]
    else:
        pads = list(c.attr("pads", [0] * 2 * (len(x_shape) - 2)))
        if one_d and len(pads) == 2:
            pads = [0, pads[0], 0, pads[1]]
    x = _to_2d(c, c.value(0)) if one_d else c.value(0)
    w = _weight_2d(c, 1) if one_d else c.value(1)
    ins = [x, w] + ([c.value(2)] if c.has(2) else [])
    y = c.emit("conv_transpose2d", *ins, strides=strides, pads=pads, dilations=dil,
               groups=c.attr("group", 1), output_padding=opad)
    return [_from_2d(c, y) if one_d else y]


def _pool(c: Ctx, op: str, **extra):
    if c.output_used(1):
        raise Unsupported("the Indices output of MaxPool is not supported")
    x_shape = c.shape(0)
    kernel = list(c.attr("kernel_shape"))
    if len(kernel) == 3 and len(x_shape) == 5:
        return [_pool_3d(c, op, kernel, **extra)]
    k, s, p, d = _geometry(c, x_shape, kernel)
    one_d = len(kernel) == 1
    x = _to_2d(c, c.value(0)) if one_d else c.value(0)
    y = c.emit(op, x, kernel=k, strides=s, pads=p, dilations=d,
               ceil_mode=bool(c.attr("ceil_mode", 0)), **extra)
    return [_from_2d(c, y) if one_d else y]


def _pool_3d(c: Ctx, op: str, kernel: list[int], **extra) -> Value:
    """A 3-D max/average pool as two 2-D ones: over (H, W) with D folded into the channels,
    then over D. Exact: a box window's max (and its sum and its count of valid or of all
    cells, ceil-mode overhang excluded) factor per axis."""
    x = c.value(0)
    n, ch, depth, h, w = x.shape
    strides = list(c.attr("strides", [1, 1, 1]))
    dil = list(c.attr("dilations", [1, 1, 1]))
    pads = _auto_pads(c, x.shape[2:], kernel, strides, dil)
    ceil = bool(c.attr("ceil_mode", 0))
    y = c.emit("reshape", x, shape=[n, ch * depth, h, w])
    y = c.emit(op, y, kernel=kernel[1:], strides=strides[1:], dilations=dil[1:],
               pads=[pads[1], pads[2], pads[4], pads[5]], ceil_mode=ceil, **extra)
    oh, ow = y.shape[2:]
    y = c.emit("reshape", y, shape=[n, ch, depth, oh * ow])
    y = c.emit(op, y, kernel=[kernel[0], 1], strides=[strides[0], 1], dilations=[dil[0], 1],
               pads=[pads[0], 0, pads[3], 0], ceil_mode=ceil, **extra)
    return c.emit("reshape", y, shape=[n, ch, y.shape[2], oh, ow])


@converter("MaxPool")
def _max_pool(c: Ctx):
    return _pool(c, "max_pool2d")


@converter("AveragePool")
def _avg_pool(c: Ctx):
    return _pool(c, "avg_pool2d", count_include_pad=bool(c.attr("count_include_pad", 0)))


@converter("GlobalAveragePool")
def _gap(c: Ctx):
    return [c.emit("global_avg_pool", c.value(0))]


@converter("GlobalMaxPool")
def _gmp(c: Ctx):
    return [c.emit("global_max_pool", c.value(0))]


@converter("BatchNormalization")
def _batch_norm(c: Ctx):
    if c.attr("training_mode", 0) or any(c.output_used(i) for i in (1, 2)):
        raise Unsupported("training mode (running mean/var outputs) is not supported")
    ins = [c.value(i) for i in range(5)]
    return [c.emit("batch_norm", *ins, epsilon=f32(c.attr("epsilon", 1e-5)))]


@converter("InstanceNormalization")
def _instance_norm(c: Ctx):
    ins = [c.value(i) for i in range(3)]
    return [c.emit("instance_norm", *ins, epsilon=f32(c.attr("epsilon", 1e-5)))]


@converter("LayerNormalization")
def _layer_norm(c: Ctx):
    eps = f32(c.attr("epsilon", 1e-5))
    ins = [c.value(0), c.value(1)] + ([c.value(2)] if c.has(2) else [])
    y = c.emit("layer_norm", *ins, axis=c.attr("axis", -1), epsilon=eps)
    if not (c.output_used(1) or c.output_used(2)):
        return [y]
    # the statistics outputs, in float32 (stash_type=1)
    x = ins[0]
    rank = x.type.rank
    axes = list(range(norm_axis(c.attr("axis", -1), rank), rank))
    if x.type.dtype != "f32":
        x = c.emit("cast", x, to="f32")
    mean = c.emit("reduce_mean", x, axes=axes)
    d = c.emit("sub", x, mean)
    var = c.emit("reduce_mean", c.emit("mul", d, d), axes=axes)
    eps_v = c.const_value(np.array(eps, np.float32))
    inv = c.emit("reciprocal", c.emit("sqrt", c.emit("add", var, eps_v)))
    return [y, mean, inv]


@converter("LRN")
def _lrn(c: Ctx):
    return [c.emit("lrn", c.value(0), size=c.attr("size"), alpha=f32(c.attr("alpha", 1e-4)),
                   beta=f32(c.attr("beta", 0.75)), bias=f32(c.attr("bias", 1.0)))]


@converter("Softmax", "LogSoftmax")
def _softmax(c: Ctx):
    op = "softmax" if c.op_type == "Softmax" else "log_softmax"
    return [c.emit(op, c.value(0), axis=c.attr("axis", -1))]


@converter("Pad")
def _pad(c: Ctx):
    rank = len(c.shape(0))
    pads = c.ints(1, "pads")
    if c.has(3):
        axes = [norm_axis(a, rank) for a in c.ints(3, "axes")]
        if len(pads) != 2 * len(axes):
            raise Unsupported(f"pads {pads} should have {2 * len(axes)} entries for axes "
                              f"{axes}")
        full = [0] * (2 * rank)
        for j, a in enumerate(axes):
            full[a], full[a + rank] = pads[j], pads[j + len(axes)]
        pads = full
    value = 0.0
    if c.has(2):
        value = float(c.static(2, "constant_value").reshape(-1)[0])
    mode = c.attr("mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise Unsupported(f"mode={mode!r}; supported: constant, reflect, edge, wrap")
    if not any(pads):
        return [c.raw(0)]
    return [c.emit("pad", c.value(0), pads=pads, mode=mode, value=value)]


@converter("Resize")
def _resize(c: Ctx):
    shape = c.shape(0)
    rank = len(shape)
    if 0 in shape:
        raise Unsupported(f"cannot resize the empty tensor {c.type(0)}")
    ctm = c.attr("coordinate_transformation_mode", "half_pixel")
    axes = [norm_axis(a, rank) for a in c.attr("axes", list(range(rank)))]
    scales_in = c.static(2, "scales") if c.has(2) else None
    if scales_in is not None and scales_in.size == 0:
        scales_in = None
    sizes_in = c.static(3, "sizes") if c.has(3) else None
    scales = [1.0] * rank
    sizes: list[int] = []
    if sizes_in is not None and sizes_in.size:
        want = [int(v) for v in sizes_in.reshape(-1)]
        if len(want) != len(axes):
            raise Unsupported(f"sizes {want} should have {len(axes)} entries")
        policy = c.attr("keep_aspect_ratio_policy", "stretch")
        ratios = [want[j] / shape[a] for j, a in enumerate(axes)]
        if policy != "stretch":
            r = min(ratios) if policy == "not_larger" else max(ratios)
            ratios = [r] * len(axes)
            want = [int(math.floor(r * shape[a] + 0.5)) for a in axes]
        sizes = list(shape)
        for j, a in enumerate(axes):
            scales[a] = ratios[j]
            sizes[a] = want[j]
    elif scales_in is not None:
        vals = [float(v) for v in scales_in.reshape(-1)]
        if len(vals) != len(axes):
            raise Unsupported(f"scales {vals} should have {len(axes)} entries")
        for j, a in enumerate(axes):
            scales[a] = vals[j]
    else:
        raise Unsupported("neither scales nor sizes is given")
    roi: list[float] = []
    if ctm == "tf_crop_and_resize":
        given = [float(v) for v in c.static(1, "roi").reshape(-1)]
        if len(given) != 2 * len(axes):
            raise Unsupported(f"roi {given} should have {2 * len(axes)} entries")
        roi = [0.0] * rank + [1.0] * rank
        for j, a in enumerate(axes):
            roi[a], roi[a + rank] = given[j], given[j + len(axes)]
    mode = c.attr("mode", "nearest")
    if mode not in ("nearest", "linear", "cubic"):
        raise Unsupported(f"mode={mode!r}; supported: nearest, linear, cubic")
    return [c.emit("resize", c.value(0), scales=scales, sizes=sizes, mode=mode,
                   coordinate_transformation_mode=ctm,
                   nearest_mode=c.attr("nearest_mode", "round_prefer_floor"),
                   cubic_coeff_a=f32(c.attr("cubic_coeff_a", -0.75)),
                   exclude_outside=bool(c.attr("exclude_outside", 0)), roi=roi,
                   extrapolation_value=f32(c.attr("extrapolation_value", 0.0)),
                   antialias=bool(c.attr("antialias", 0)) and mode != "nearest")]



@converter("DepthToSpace", "SpaceToDepth")
def _depth_space(c: Ctx):
    shape = c.shape(0)
    if len(shape) != 4:
        raise Unsupported(f"needs a 4-D NCHW input, got {list(shape)}")
    n, ch, h, w = shape
    b = c.attr("blocksize")
    if b is None or b < 1:
        raise Unsupported(f"blocksize={b} must be a positive integer")
    x = c.value(0)
    if c.op_type == "SpaceToDepth":
        if h % b or w % b:
            raise Unsupported(f"H={h} and W={w} must be multiples of blocksize {b}")
        t = c.emit("reshape", x, shape=[n, ch, h // b, b, w // b, b])
        t = c.emit("transpose", t, perm=[0, 3, 5, 1, 2, 4])
        return [c.emit("reshape", t, shape=[n, ch * b * b, h // b, w // b])]
    if ch % (b * b):
        raise Unsupported(f"C={ch} must be a multiple of blocksize^2 = {b * b}")
    if c.attr("mode", "DCR") == "DCR":
        t = c.emit("reshape", x, shape=[n, b, b, ch // (b * b), h, w])
        t = c.emit("transpose", t, perm=[0, 3, 4, 1, 5, 2])
    else:
        t = c.emit("reshape", x, shape=[n, ch // (b * b), b, b, h, w])
        t = c.emit("transpose", t, perm=[0, 1, 4, 2, 5, 3])
    return [c.emit("reshape", t, shape=[n, ch // (b * b), h * b, w * b])]


@converter("GroupNormalization")
def _group_norm(c: Ctx):
    shape = c.shape(0)
    x = c.value(0)
    if len(shape) < 3 or x.type.dtype not in ("f32", "f16", "f64", "bf16"):
        raise Unsupported(f"needs a float input of rank >= 3, got {x.type}")
    groups = c.attr("num_groups")
    n, ch = shape[0], shape[1]
    if not groups or ch % groups:
        raise Unsupported(f"num_groups={groups} must divide the {ch} channels")
    eps = f32(c.attr("epsilon", 1e-5))
    xr = c.emit("reshape", x, shape=[n, groups, math.prod(shape[1:]) // groups])
    mean = c.emit("reduce_mean", xr, axes=[2])
    d = c.emit("sub", xr, mean)
    var = c.emit("reduce_mean", c.emit("mul", d, d), axes=[2])
    eps_v = c.const_value(np.array(eps, x.type.np_dtype))
    y = c.emit("div", d, c.emit("sqrt", c.emit("add", var, eps_v)))
    y = c.emit("reshape", y, shape=list(shape))
    per_channel = [1, ch] + [1] * (len(shape) - 2)
    params = []
    for i in (1, 2):
        p = c.value(i)
        if p.type.shape == (groups,) and groups != ch:  # opset 18: one value per group
            p = c.emit("reshape", p, shape=[groups, 1])
            p = c.emit("expand", p, shape=[groups, ch // groups])
        params.append(c.emit("reshape", p, shape=per_channel))
    return [c.emit("add", c.emit("mul", y, params[0]), params[1])]
