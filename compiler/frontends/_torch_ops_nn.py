"""ATen converters for the nn family: convolutions, normalisations, softmax, pooling,
padding, upsampling. Spatial ops are NCHW, as torch is."""

from __future__ import annotations

from typing import Any

import numpy as np

from compiler.frontends._torch_ops import axis_arg, conv, pair_arg
from compiler.frontends.torch import TorchImporter, Unsupported
from compiler.ir.graph import Value


# -- nn ---------------------------------------------------------------------------------
def _conv2d(imp: TorchImporter, x: Value, w: Value, b: Value | None, stride: Any, padding: Any,
            dilation: Any, groups: int, transposed: bool = False,
            output_padding: Any = (0, 0)) -> Value:
    if isinstance(padding, str):
        raise Unsupported(f"padding={padding!r} (give explicit pads)")
    one_d = x.type.rank == 3
    if one_d:  # conv1d as conv2d over a height of 1
        x = imp.emit("reshape", x, shape=[x.shape[0], x.shape[1], 1, x.shape[2]])
        w = imp.emit("reshape", w, shape=[*w.shape[:2], 1, w.shape[2]])
        stride, dilation = [1, pair_arg(stride)[0]], [1, pair_arg(dilation)[0]]
        padding, output_padding = [0, pair_arg(padding)[0]], [0, pair_arg(output_padding)[0]]
    elif x.type.rank != 4:
        raise Unsupported(f"{x.type.rank - 2}-D convolution")
    s, p, d = pair_arg(stride), pair_arg(padding), pair_arg(dilation)
    ins = [x, w] if b is None else [x, w, b]
    attrs = dict(strides=s, pads=[p[0], p[1], p[0], p[1]], dilations=d, groups=int(groups))
    if transposed:
        y = imp.emit("conv_transpose2d", *ins, output_padding=pair_arg(output_padding), **attrs)
    else:
        y = imp.emit("conv2d", *ins, **attrs)
    if one_d:
        y = imp.emit("reshape", y, shape=list(imp.out_type().shape))
    return y


@conv("convolution.default")
def _convolution(imp: TorchImporter, a: dict) -> Value:
    return _conv2d(imp, a["input"], a["weight"], a["bias"], a["stride"], a["padding"],
                   a["dilation"], a["groups"], a["transposed"], a["output_padding"])


@conv("conv2d.default", "conv1d.default")
def _conv2d_op(imp: TorchImporter, a: dict) -> Value:
    return _conv2d(imp, a["input"], a["weight"], a["bias"], a["stride"], a["padding"],
                   a["dilation"], a["groups"])


def _norm_params(imp: TorchImporter, w: Value | None, b: Value | None, shape: list[int],
                 dt: str) -> tuple[Value, Value]:
    w = w if w is not None else imp.const(np.ones(shape), dt)
    b = b if b is not None else imp.const(np.zeros(shape), dt)
    return w, b


@conv("_native_batch_norm_legit_no_training.default")
def _bn_no_training(imp: TorchImporter, a: dict) -> list:
    x = a["input"]
    w, b = _norm_params(imp, a["weight"], a["bias"], [x.shape[1]], x.dtype)
    y = imp.emit("batch_norm", x, w, b, a["running_mean"], a["running_var"],
                 epsilon=float(a["eps"]), axis=1)
    return [y, None, None]


@conv("batch_norm.default", "_native_batch_norm_legit.default")
def _bn(imp: TorchImporter, a: dict) -> Any:
    if a["training"]:
        raise Unsupported("batch norm in training mode (call module.eval())")
    r = _bn_no_training(imp, a)
    return r[0] if str(imp.node.target) == "aten.batch_norm.default" else r


@conv("native_layer_norm.default", "layer_norm.default")
def _layer_norm(imp: TorchImporter, a: dict) -> Any:
    x = a["input"]
    shape = list(a["normalized_shape"])
    w, b = a["weight"], a["bias"]
    w = w if w is not None else imp.const(np.ones(shape), x.dtype)
    ins = [x, w] if b is None else [x, w, b]
    y = imp.emit("layer_norm", *ins, axis=x.type.rank - len(shape), epsilon=float(a["eps"]))
    return y if str(imp.node.target) == "aten.layer_norm.default" else [y, None, None]


@conv("_softmax.default", "softmax.int", "_log_softmax.default", "log_softmax.int")
def _softmax(imp: TorchImporter, a: dict) -> Value:
    op = "log_softmax" if "log" in str(imp.node.target) else "softmax"
    x = imp.tensor(a["self"], imp.out_type().dtype)
    return imp.emit(op, x, axis=axis_arg(a["dim"], x.type.rank))


@conv("max_pool2d_with_indices.default", "max_pool2d.default")
def _max_pool(imp: TorchImporter, a: dict) -> Any:
    x = a["self"]
    k = pair_arg(a["kernel_size"])
    s = pair_arg(a["stride"]) if a["stride"] else k
    p = pair_arg(a["padding"])
    y = imp.emit("max_pool2d", x, kernel=k, strides=s, pads=[p[0], p[1], p[0], p[1]],
                 dilations=pair_arg(a["dilation"]), ceil_mode=bool(a["ceil_mode"]))
    return [y, None] if "indices" in str(imp.node.target) else y


@conv("avg_pool2d.default")
def _avg_pool(imp: TorchImporter, a: dict) -> Value:
    if a["divisor_override"] is not None:
        raise Unsupported("avg_pool2d with divisor_override")
    k = pair_arg(a["kernel_size"])
    s = pair_arg(a["stride"]) if a["stride"] else k
    p = pair_arg(a["padding"])
    return imp.emit("avg_pool2d", a["self"], kernel=k, strides=s,
                    pads=[p[0], p[1], p[0], p[1]], ceil_mode=bool(a["ceil_mode"]),
                    count_include_pad=bool(a["count_include_pad"]))


@conv("adaptive_avg_pool2d.default", "_adaptive_avg_pool2d.default")
def _adaptive_avg_pool(imp: TorchImporter, a: dict) -> Value:
    x = a["self"]
    out = pair_arg(a["output_size"])
    if x.type.rank != 4:
        raise Unsupported(f"adaptive pooling of a rank-{x.type.rank} tensor")
    if out == [1, 1]:
        return imp.emit("global_avg_pool", x)
    h, w = x.shape[2:]
    if h % out[0] or w % out[1]:
        raise Unsupported(f"adaptive pooling {h}x{w} -> {out[0]}x{out[1]} (not a divisor)")
    k = [h // out[0], w // out[1]]
    return imp.emit("avg_pool2d", x, kernel=k, strides=k)


@conv("constant_pad_nd.default")
def _pad(imp: TorchImporter, a: dict) -> Value:
    x, pad = a["self"], list(a["pad"])
    if any(p < 0 for p in pad):
        raise Unsupported("negative padding")
    begins, ends = [0] * x.type.rank, [0] * x.type.rank
    for i in range(len(pad) // 2):
        begins[x.type.rank - 1 - i], ends[x.type.rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
    return imp.emit("pad", x, pads=begins + ends, mode="constant", value=float(a["value"]))


@conv("reflection_pad1d.default", "reflection_pad2d.default", "replication_pad1d.default",
      "replication_pad2d.default")
def _pad_mode(imp: TorchImporter, a: dict) -> Value:
    mode = "reflect" if "reflection" in str(imp.node.target) else "edge"
    x, pad = a["self"], list(a["padding"])
    r = x.type.rank
    begins, ends = [0] * r, [0] * r
    for i in range(len(pad) // 2):
        begins[r - 1 - i], ends[r - 1 - i] = pad[2 * i], pad[2 * i + 1]
    return imp.emit("pad", x, pads=begins + ends, mode=mode)


@conv("native_group_norm.default", "group_norm.default")
def _group_norm(imp: TorchImporter, a: dict) -> Any:
    """GroupNorm as layer_norm over [N, G, C/G * spatial], then the per-channel affine."""
    x = a["input"]
    n, c = x.shape[0], x.shape[1]
    groups = int(a.get("group", a.get("num_groups")))
    rest = x.type.size // (n * groups)
    y = imp.emit("reshape", x, shape=[n, groups, rest])
    y = imp.emit("layer_norm", y, imp.const(np.ones(rest), x.dtype), axis=2,
                 epsilon=float(a["eps"]))
    y = imp.emit("reshape", y, shape=list(x.shape))
    bshape = [c] + [1] * (x.type.rank - 2)
    if a["weight"] is not None:
        y = imp.emit("mul", y, imp.emit("reshape", a["weight"], shape=bshape))
    if a["bias"] is not None:
        y = imp.emit("add", y, imp.emit("reshape", a["bias"], shape=bshape))
    return y if str(imp.node.target) == "aten.group_norm.default" else [y, None, None]


def _upsample(imp: TorchImporter, a: dict, mode: str) -> Value:
    x = imp.tensor(a.get("input", a.get("self")))
    out = imp.out_type()
    r = x.type.rank
    factors = a.get("scale_factors")
    if factors is None and a.get("scales_h") is not None:
        factors = [a["scales_h"], a["scales_w"]]
    if factors:
        scales = [1.0] * (r - len(factors)) + [float(f) for f in factors]
    else:
        scales = [o / i for o, i in zip(out.shape, x.shape, strict=True)]
    attrs: dict[str, Any] = {"scales": scales, "sizes": list(out.shape)}
    if mode == "nearest":
        attrs.update(mode="nearest", coordinate_transformation_mode="asymmetric",
                     nearest_mode="floor")
    else:
        ctm = "align_corners" if a["align_corners"] else "half_pixel"
        attrs.update(mode="linear", coordinate_transformation_mode=ctm)
    return imp.emit("resize", x, **attrs)


@conv("upsample_nearest2d.vec", "upsample_nearest2d.default", "upsample_nearest1d.vec")
def _upsample_nearest(imp: TorchImporter, a: dict) -> Value:
    return _upsample(imp, a, "nearest")


@conv("upsample_bilinear2d.vec", "upsample_bilinear2d.default", "upsample_linear1d.vec")
def _upsample_linear(imp: TorchImporter, a: dict) -> Value:
    return _upsample(imp, a, "linear")
