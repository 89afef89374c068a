"""Our ops written as ONNX nodes: the op tables and the writer behind
:func:`targets.export_onnx.region_to_onnx` (layout handling, QDQ around weights and
activations, f16 storage undone). See ``targets/export_onnx.py`` for the conventions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from compiler.errors import NpuccError
from compiler.ir import onnx_names
from compiler.ir.graph import Graph, Node, Value
from compiler.ir.types import to_numpy_dtype

__all__ = ["ExportError", "OPSET", "IR_VERSION", "SUPPORTED_OPS", "Writer", "value_info"]

OPSET = 17
IR_VERSION = 8   # onnxruntime 1.31 loads IR versions <= 13 (TVM-NOTES)
_FLOATS = ("f32", "f16", "bf16", "f64")
# the shared table of one-to-one ONNX operators (compiler/ir/onnx_names.py)
_UNARY = onnx_names.unary()
_BINARY = onnx_names.binary()
_LAYOUT_OPS = ("conv2d", "max_pool2d", "avg_pool2d", "global_avg_pool", "global_max_pool",
               "instance_norm")
_SHAPE_OPS = ("reshape", "transpose", "concat", "split", "slice", "gather", "tile", "expand",
              "pad")
_REDUCE = onnx_names.reductions()
SUPPORTED_OPS = tuple(sorted({*_UNARY, *_BINARY, *_LAYOUT_OPS, *_SHAPE_OPS, *_REDUCE, "cast",
                              "conv_transpose2d", "dense", "gemm", "matmul", "softmax",
                              "log_softmax", "clip", "leaky_relu", "gelu", "layer_norm"}))
_TO_NCHW, _TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


class ExportError(NpuccError):
    """A region cannot be written as ONNX (an op without an ONNX mapping)."""


# -- writing our ops as ONNX nodes ----------------------------------------------------------
def _qparams(lo: float, hi: float) -> tuple[float, int]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zp = int(np.clip(np.round(-128.0 - lo / scale), -128, 127))
    return float(scale), zp


class Writer:
    def __init__(self, graph: Graph, ranges: Mapping[str, tuple[float, float]], quantize: bool):
        self.g = graph
        self.ranges = ranges
        self.quantize = quantize
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.ir: dict[str, str] = {}      # IR value -> ONNX name, IR layout
        self.nchw: dict[str, str] = {}    # 4-D NHWC IR value -> ONNX name, NCHW
        self.scale: dict[str, float] = {}  # IR value -> activation scale (quantized)
        self.names: set[str] = set()
        self.counts = {"qdq_activations": 0, "qdq_weights": 0, "transposes": 0}
        self.last_wscale: np.ndarray | None = None

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def init(self, base: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str, n_out: int = 1,
           **attrs: Any) -> list[str]:
        from onnx import helper

        outs = [self.fresh(base if n_out == 1 else f"{base}_{i}") for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh(f"{op_type}_"
                                           f"{base}"), **attrs))
        return outs

    def op1(self, op_type: str, inputs: list[str], base: str, **attrs: Any) -> str:
        return self.op(op_type, inputs, base, **attrs)[0]

    # -- values and layouts ---------------------------------------------------------------
    def const(self, v: Value) -> str:
        arr = np.asarray(self.g.const_value(v))
        if arr.dtype.kind == "f" or arr.dtype.name == "bfloat16":
            arr = arr.astype(np.float32)
        return self.init(v.name, arr)

    def get(self, v: Value, nchw: bool = False) -> str:
        """``v`` as an ONNX tensor, in NCHW (for a 4-D NHWC value) or in the IR layout."""
        if v.name not in self.ir and v.name not in self.nchw:
            if self.g.const_value(v) is None:
                raise ExportError(f"value %{v.name} is read before it is defined")
            self.ir[v.name] = self.const(v)
        if nchw:
            if v.name not in self.nchw:
                self.nchw[v.name] = self.op1("Transpose", [self.ir[v.name]], f"{v.name}_nchw",
                                             perm=_TO_NCHW)
                self.counts["transposes"] += 1
            return self.nchw[v.name]
        if v.name not in self.ir:
            self.ir[v.name] = self.op1("Transpose", [self.nchw[v.name]], f"{v.name}_nhwc",
                                       perm=_TO_NHWC)
            self.counts["transposes"] += 1
        return self.ir[v.name]

    def define(self, v: Value, name: str, nchw: bool = False) -> None:
        """``name`` computes ``v`` (in NCHW when ``nchw``); activations get their QDQ pair."""
        if self.quantize and v.dtype in _FLOATS and v.name in self.ranges:
            s, zp = _qparams(*self.ranges[v.name])
            sn = self.init(f"{v.name}_scale", np.array(s, np.float32))
            zn = self.init(f"{v.name}_zp", np.array(zp, np.int8))
            q = self.op1("QuantizeLinear", [name, sn, zn], f"{v.name}_q")
            name = self.op1("DequantizeLinear", [q, sn, zn], f"{v.name}_dq")
            self.scale[v.name] = s
            self.counts["qdq_activations"] += 1
        (self.nchw if nchw else self.ir)[v.name] = name

    def has_nchw(self, v: Value) -> bool:
        return v.name in self.nchw

    def weight(self, v: Value, axis: int | None, arr: np.ndarray | None = None) -> str:
        """A constant weight: int8 per-channel (``axis``) or per-tensor, through DQ."""
        w = np.asarray(self.g.const_value(v) if arr is None else arr, np.float32)
        if not self.quantize:
            return self.init(v.name, w)
        red = tuple(i for i in range(w.ndim) if i != axis) if axis is not None else None
        amax = np.abs(w).max(axis=red) if w.size else np.zeros(())
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        shape = [1] * w.ndim
        if axis is not None:
            shape[axis] = -1
        q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        qn = self.init(f"{v.name}_quantized", q)
        sn = self.init(f"{v.name}_scale", scale)
        zn = self.init(f"{v.name}_zp", np.zeros(scale.shape, np.int8))
        attrs = {"axis": axis} if axis is not None else {}
        self.counts["qdq_weights"] += 1
        self.last_wscale = scale
        return self.op1("DequantizeLinear", [qn, sn, zn], f"{v.name}_dq", **attrs)

    def bias(self, b: Value, x: Value, wscale: np.ndarray | None) -> str:
        """Bias of a quantized conv/dense: int32 with scale s_x * s_w (else float)."""
        arr = np.asarray(self.g.const_value(b), np.float32)
        if not self.quantize or x.name not in self.scale or wscale is None:
            return self.init(b.name, arr)
        scale = (self.scale[x.name] * np.broadcast_to(wscale, arr.shape)).astype(np.float32)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.round(arr / scale), -2**31, 2**31 - 1).astype(np.int32)
        qn = self.init(f"{b.name}_quantized", q)
        sn = self.init(f"{b.name}_scale", scale)
        zn = self.init(f"{b.name}_zp", np.zeros(scale.shape, np.int32))
        return self.op1("DequantizeLinear", [qn, sn, zn], f"{b.name}_dq", axis=0)

    def activation(self, y: str, attrs: Mapping[str, Any], base: str) -> str:
        act = attrs.get("activation", "none")
        if act == "none":
            return y
        if act == "relu":
            return self.op1("Relu", [y], base)
        if act in ("relu6", "clip"):
            lo, hi = (0.0, 6.0) if act == "relu6" else (attrs["clip_min"], attrs["clip_max"])
            return self._clip(y, lo, hi, base)
        if act == "sigmoid":
            return self.op1("Sigmoid", [y], base)
        if act == "silu":
            return self.op1("Mul", [y, self.op1("Sigmoid", [y], base)], base)
        if act == "hard_swish":
            return self.op1("HardSwish", [y], base)
        if act == "hard_sigmoid":
            return self.op1("HardSigmoid", [y], base, alpha=1.0 / 6.0, beta=0.5)
        return self._gelu(y, "tanh" if act == "gelu_tanh" else "none", base)

    def _clip(self, y: str, lo: float, hi: float, base: str) -> str:
        ins = [y, self.init(f"{base}_min", np.array(max(lo, -3.4e38), np.float32)),
               self.init(f"{base}_max", np.array(min(hi, 3.4e38), np.float32))]
        return self.op1("Clip", ins, base)

    def _gelu(self, y: str, approximate: str, base: str) -> str:
        def c(v: float) -> str:
            return self.init(f"{base}_c", np.array(v, np.float32))
        if approximate == "tanh":
            cube = self.op1("Mul", [self.op1("Mul", [y, y], base), y], base)
            inner = self.op1("Add", [y, self.op1("Mul", [cube, c(0.044715)], base)], base)
            t = self.op1("Tanh", [self.op1("Mul", [inner, c(float(np.sqrt(2 / np.pi)))],
                                           base)], base)
        else:
            t = self.op1("Erf", [self.op1("Mul", [y, c(float(1 / np.sqrt(2)))], base)], base)
        half = self.op1("Mul", [y, c(0.5)], base)
        return self.op1("Mul", [half, self.op1("Add", [t, c(1.0)], base)], base)

    # -- one node -------------------------------------------------------------------------
    def node(self, n: Node) -> None:  # noqa: C901  (one branch per op family)
        a = n.attrs
        y = n.outputs[0]
        base = y.name
        if n.op == "cast":
            x = n.inputs[0]
            if x.dtype in _FLOATS and a["to"] in _FLOATS:   # f16 storage is undone: alias
                if x.name in self.nchw:
                    self.nchw[y.name] = self.nchw[x.name]
                if x.name in self.ir or x.name not in self.nchw:
                    self.ir[y.name] = self.get(x)
                if x.name in self.scale:
                    self.scale[y.name] = self.scale[x.name]
                return
            from onnx import TensorProto

            to = TensorProto.FLOAT if a["to"] in _FLOATS else _onnx_dtype(a["to"])
            self.define(y, self.op1("Cast", [self.get(x)], base, to=to))
            return
        if n.op == "conv2d":
            return self._conv(n)
        if n.op == "conv_transpose2d":
            x, w = n.inputs[0], n.inputs[1]
            ins = [self.get(x), self._w(w, 1)]
            if len(n.inputs) == 3:
                ins.append(self.bias(n.inputs[2], x, self.last_wscale))
            out = self.op1("ConvTranspose", ins, base, strides=a["strides"], pads=a["pads"],
                           dilations=a["dilations"], group=a["groups"],
                           output_padding=a["output_padding"])
            return self.define(y, out)
        if n.op in ("dense", "gemm", "matmul"):
            return self._linear(n)
        if n.op in ("max_pool2d", "avg_pool2d", "global_avg_pool", "global_max_pool"):
            return self._pool(n)
        if n.op in _UNARY or n.op in _BINARY or n.op in ("clip", "leaky_relu", "gelu"):
            return self._elementwise(n)
        if n.op in ("softmax", "log_softmax"):
            op = "Softmax" if n.op == "softmax" else "LogSoftmax"
            return self.define(y, self.op1(op, [self.get(n.inputs[0])], base, axis=a["axis"]))
        if n.op == "layer_norm":
            ins = [self.get(v) for v in n.inputs]
            return self.define(y, self.op1("LayerNormalization", ins, base, axis=a["axis"],
                                           epsilon=a["epsilon"]))
        if n.op in _REDUCE:
            return self._reduce(n)
        if n.op in _SHAPE_OPS:
            return self._shape(n)
        raise ExportError(f"{n.label}: op {n.op!r} has no ONNX mapping in the region "
                          f"exporter; supported: {', '.join(SUPPORTED_OPS)}")

    def _w(self, w: Value, axis: int | None) -> str:
        """A weight operand: quantized when constant (scale in last_wscale), else a value."""
        self.last_wscale = None
        if self.g.const_value(w) is not None:
            return self.weight(w, axis)
        return self.get(w)

    def _conv(self, n: Node) -> None:
        a = n.attrs
        x, w = n.inputs[0], n.inputs[1]
        nhwc = a["layout"] == "NHWC"
        wv = self.g.const_value(w)
        kl = a["kernel_layout"]
        self.last_wscale = None
        if wv is not None:
            arr = np.asarray(wv, np.float32)
            arr = {"OIHW": arr, "OHWI": arr.transpose(0, 3, 1, 2),
                   "HWIO": arr.transpose(3, 2, 0, 1)}[kl]
            wn = self.weight(w, 0, arr)
        else:
            wn = self.get(w)
            if kl != "OIHW":
                perm = {"OHWI": [0, 3, 1, 2], "HWIO": [3, 2, 0, 1]}[kl]
                wn = self.op1("Transpose", [wn], f"{w.name}_oihw", perm=perm)
        ins = [self.get(x, nchw=nhwc), wn]
        if len(n.inputs) == 3:
            ins.append(self.bias(n.inputs[2], x, self.last_wscale))
        out = self.op1("Conv", ins, n.outputs[0].name + "_conv", strides=a["strides"],
                       pads=a["pads"], dilations=a["dilations"], group=a["groups"])
        self.define(n.outputs[0], self.activation(out, a, n.outputs[0].name), nchw=nhwc)

    def _linear(self, n: Node) -> None:
        a = n.attrs
        y = n.outputs[0]
        x, w = n.inputs[0], n.inputs[1]
        const_w = self.g.const_value(w) is not None
        if n.op == "matmul":
            wn = self._w(w, 1 if w.type.rank == 2 else None)
            return self.define(y, self.op1("MatMul", [self.get(x), wn], y.name))
        if n.op == "gemm":
            tb = a["trans_b"]
            wn = self._w(w, 0 if tb else 1)
            ins = [self.get(x), wn]
            if len(n.inputs) == 3:
                ins.append(self.get(n.inputs[2]))
            return self.define(y, self.op1("Gemm", ins, y.name, alpha=a["alpha"], beta=a["beta"],
                                           transA=int(a["trans_a"]), transB=int(tb)))
        # dense: x[..., K] @ w[N, K]^T + b
        if x.type.rank == 2:
            wn = self._w(w, 0)
            ins = [self.get(x), wn]
            if len(n.inputs) == 3:
                ins.append(self.bias(n.inputs[2], x, self.last_wscale))
            out = self.op1("Gemm", ins, y.name + "_gemm", transB=1)
        else:
            self.last_wscale = None
            if const_w:
                wn = self.weight(w, 1, np.asarray(self.g.const_value(w), np.float32).T)
            else:
                wn = self.op1("Transpose", [self.get(w)], f"{w.name}_t", perm=[1, 0])
            out = self.op1("MatMul", [self.get(x), wn], y.name + "_mm")
            if len(n.inputs) == 3:
                b = self.bias(n.inputs[2], x, self.last_wscale)
                out = self.op1("Add", [out, b], y.name + "_add")
        self.define(y, self.activation(out, a, y.name))

    def _pool(self, n: Node) -> None:
        a = n.attrs
        y = n.outputs[0]
        nhwc = a["layout"] == "NHWC"
        x = self.get(n.inputs[0], nchw=nhwc)
        if n.op.startswith("global"):
            op = "GlobalAveragePool" if n.op == "global_avg_pool" else "GlobalMaxPool"
            return self.define(y, self.op1(op, [x], y.name), nchw=nhwc)
        attrs: dict[str, Any] = {"kernel_shape": a["kernel"], "strides": a["strides"],
                                 "pads": a["pads"], "ceil_mode": int(a["ceil_mode"])}
        if n.op == "max_pool2d":
            attrs["dilations"] = a["dilations"]
            out = self.op1("MaxPool", [x], y.name, **attrs)
        else:
            if a["dilations"] != [1, 1]:
                raise ExportError(f"{n.label}: dilated avg_pool2d needs opset 19 "
                                  f"(exporting opset {OPSET})")
            out = self.op1("AveragePool", [x], y.name,
                           count_include_pad=int(a["count_include_pad"]), **attrs)
        self.define(y, out, nchw=nhwc)

    def _elementwise(self, n: Node) -> None:
        y = n.outputs[0]
        # stay NCHW when every operand has an NCHW form or is a single element
        nchw = y.type.rank == 4 and any(self.has_nchw(v) for v in n.inputs) and all(
            self.has_nchw(v) or v.type.size == 1 for v in n.inputs)
        ins = [self.get(v, nchw=nchw and self.has_nchw(v)) for v in n.inputs]
        a = n.attrs
        if n.op in _UNARY:
            out = self.op1(_UNARY[n.op], ins, y.name)
        elif n.op in _BINARY:
            out = self.op1(_BINARY[n.op], ins, y.name)
        elif n.op == "clip":
            out = self._clip(ins[0], a["min"], a["max"], y.name)
        elif n.op == "leaky_relu":
            out = self.op1("LeakyRelu", ins, y.name, alpha=a["alpha"])
        else:
            out = self._gelu(ins[0], a["approximate"], y.name)
        self.define(y, out, nchw=nchw)

    def _reduce(self, n: Node) -> None:
        a = n.attrs
        y = n.outputs[0]
        x = self.get(n.inputs[0])
        attrs: dict[str, Any] = {"keepdims": int(a["keepdims"])}
        ins = [x]
        if n.op == "reduce_sum":
            if a["axes"]:
                ins.append(self.init(f"{y.name}_axes", np.array(a["axes"], np.int64)))
        elif a["axes"]:
            attrs["axes"] = a["axes"]
        self.define(y, self.op1(_REDUCE[n.op], ins, y.name, **attrs))

    def _shape(self, n: Node) -> None:
        a = n.attrs
        y = n.outputs[0]
        x = self.get(n.inputs[0])

        def ints(key: str, v: list[int]) -> str:
            return self.init(f"{y.name}_{key}", np.array(v, np.int64))
        if n.op == "reshape":
            out = self.op1("Reshape", [x, ints("shape", a["shape"])], y.name)
        elif n.op == "transpose":
            out = self.op1("Transpose", [x], y.name, perm=a["perm"])
        elif n.op == "concat":
            out = self.op1("Concat", [self.get(v) for v in n.inputs], y.name, axis=a["axis"])
        elif n.op == "gather":
            out = self.op1("Gather", [x, self.get(n.inputs[1])], y.name, axis=a["axis"])
        elif n.op == "tile":
            out = self.op1("Tile", [x, ints("repeats", a["repeats"])], y.name)
        elif n.op == "expand":
            out = self.op1("Expand", [x, ints("shape", a["shape"])], y.name)
        elif n.op == "pad":
            ins = [x, ints("pads", a["pads"])]
            if a["mode"] == "constant":
                ins.append(self.init(f"{y.name}_value", np.array(a["value"], np.float32)))
            out = self.op1("Pad", ins, y.name, mode=a["mode"])
        elif n.op == "slice":
            ins = [x, ints("starts", a["starts"]), ints("ends", a["ends"])]
            if a["axes"] or a["steps"]:
                axes = a["axes"] or list(range(len(a["starts"])))
                ins.append(ints("axes", axes))
                if a["steps"]:
                    ins.append(ints("steps", a["steps"]))
            out = self.op1("Slice", ins, y.name)
        else:  # split
            outs = self.op("Split", [x, ints("split", a["sizes"])], y.name,
                           n_out=len(n.outputs), axis=a["axis"])
            for v, o in zip(n.outputs, outs, strict=True):
                self.define(v, o)
            return
        self.define(y, out)


def _onnx_dtype(dtype: str) -> int:
    from onnx import helper


    return helper.np_dtype_to_tensor_dtype(np.dtype(to_numpy_dtype(dtype)))


def value_info(v: Value) -> Any:
    from onnx import TensorProto, helper

    et = TensorProto.FLOAT if v.dtype in _FLOATS else _onnx_dtype(v.dtype)
    return helper.make_tensor_value_info(v.name, et, list(v.shape))

