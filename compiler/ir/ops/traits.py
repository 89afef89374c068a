"""Which ops have which trait (``compiler.ir.registry.TRAITS``), declared once, here.

Passes, the cost model and the exporters ask the registry (``ops_with("pool")``,
``get_op(op).has("broadcast")``) instead of keeping their own op lists. FLOPs per output
element are declared for the ops that are not one operation per element, each with where its
figure comes from.
"""

from compiler.ir.registry import declare_flops, declare_traits

declare_traits("broadcast", "add", "sub", "mul", "div", "max", "min", "pow", "mod", "sum",
               "where", "prelu", "equal", "less", "less_equal", "greater", "greater_equal",
               "logical_and", "logical_or", "logical_xor")
declare_traits("activation", "relu", "clip", "sigmoid", "gelu")
declare_traits("pool", "max_pool2d", "avg_pool2d", "global_avg_pool", "global_max_pool")
declare_traits("reduction", "reduce_mean", "reduce_sum", "reduce_max", "reduce_min",
               "reduce_prod", "argmax", "argmin", "cumsum", "global_avg_pool",
               "global_max_pool")
declare_traits("axis", "softmax", "log_softmax", "batch_norm")
declare_traits("view", "reshape", "identity")
declare_traits("data-movement", "transpose", "concat", "split", "slice", "gather", "pad",
               "tile", "expand", "shape", "fill", "arange", "trilu")
declare_traits("quantizable", "dense", "conv2d", "matmul")
declare_traits("layout", "conv2d", "qconv2d", "max_pool2d", "avg_pool2d", "global_avg_pool",
               "global_max_pool", "instance_norm")

# counted as the reference implementation's operations per output element (exp, sum,
# divide...); the cost model's efficiency factors absorb how fast a target runs them
_COUNTED = "operations of the reference implementation per output element"
for _op, _flops in {"softmax": 5, "log_softmax": 6, "layer_norm": 8, "instance_norm": 6,
                    "batch_norm": 2, "lrn": 8, "gelu": 8, "erf": 4, "resize": 4}.items():
    declare_flops(_op, _flops, _COUNTED)
