"""Kernel families; importing this package registers every kernel builder."""

from targets.kernels import (  # noqa: F401
    attention,
    attention_q,
    conv,
    dw_pointwise,
    elementwise,
    embed_q,
    gemv_sparse,
    indexing,
    linalg,
    llm,
    llm_kv,
    nn_misc,
    pool,
    quant,
    quant_weight,
    reduce,
    shape,
    squeeze_excite,
)
