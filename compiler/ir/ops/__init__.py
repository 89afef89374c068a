"""Op families. Importing this package registers every op in the registry."""

from compiler.ir.ops import (
    add_norm,  # noqa: F401
    attention,  # noqa: F401
    attention_q,  # noqa: F401
    core,  # noqa: F401
    elementwise,  # noqa: F401
    embed_q,  # noqa: F401
    indexing,  # noqa: F401
    linalg,  # noqa: F401
    llm,  # noqa: F401
    llm_kv,  # noqa: F401
    nn,  # noqa: F401
    nn_fused,  # noqa: F401
    nn_norm,  # noqa: F401
    nn_resize,  # noqa: F401
    quant,  # noqa: F401
    quant_sparse,  # noqa: F401
    quant_weight,  # noqa: F401
    reduce,  # noqa: F401
    shape,  # noqa: F401
    traits,  # noqa: F401, E402  (after every op is registered)
)
