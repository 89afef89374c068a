"""Built-in pass families. Each module registers its passes on import.

This package is a pass provider: pyproject.toml registers it in the ``npucc.passes``
entry-point group, and the pass registry (``compiler.pass_base``) finds it there, never by
name. ``PASS_MODULES`` maps a pass name to the module defining it, so
``npucc opt -p fold-constants`` imports only what it needs; ``FAMILIES`` are imported for a
full listing. A new family adds its names here, or registers its own provider module.
"""

from __future__ import annotations

# pass name -> module (filled in by each family as it lands)
PASS_MODULES: dict[str, str] = {
    **dict.fromkeys(("fold-constants", "dce", "cse", "fold-batchnorm", "simplify-reshapes",
                     "canonicalize"), "passes.canonicalize"),
    **dict.fromkeys(("fuse-matmul-add", "fuse-gemm", "fuse-conv-act", "fuse-conv-relu",
                     "fuse-dense-act"), "passes.fusion"),
    "fuse-attention": "passes.attention",
    "to-nhwc": "passes.layout",
    "fuse-conv-blocks": "passes.fuse_blocks",
    "quantize": "passes.quantization.insert",
    "lower-quantized": "passes.quantization.lower",
    "partition": "passes.partition",
    "npu-numerics": "passes.npu_numerics",
    "prune": "passes.pruning",
}
FAMILIES: tuple[str, ...] = ("passes.canonicalize", "passes.fusion", "passes.attention",
                             "passes.layout", "passes.fuse_blocks")

# The graph-level pipeline every target starts from (targets may replace or extend it).
# fold-batchnorm runs after the fusions to dense so BN reading a conv folds into it first;
# fuse-conv-relu is fuse-conv-act under the name the acceptance tests print after.
DEFAULT_PIPELINE = ("canonicalize,fuse-matmul-add,fuse-gemm,fold-batchnorm,fuse-conv-relu,"
                    "fuse-dense-act,to-nhwc,canonicalize")
