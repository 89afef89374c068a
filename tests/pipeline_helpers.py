"""The graph ``compile`` would hand to code generation, without generating code."""

from __future__ import annotations

from typing import Any

__all__ = ["host_graph"]


def host_graph(model: Any, target: str = "host", **options: Any):
    """``model`` (an .onnx path...) through ``target``'s default pipeline with the passes
    ``compile(model, target, **options)`` adds (``quantize=``, ``calibration=``...)."""
    from compiler.driver import CompileOptions, compile_pipeline, import_model
    from compiler.pass_base import PassContext
    from compiler.pass_manager import run_pipeline
    from targets.description import load_target

    opts = CompileOptions(**options)
    desc = load_target(target)
    ctx = PassContext(target=desc)
    return run_pipeline(import_model(str(model), opts),
                        compile_pipeline(desc.default_pipeline, opts, desc, ctx), ctx=ctx)
