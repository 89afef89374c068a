"""npucc: a model compiler for phone NPUs.

    from compiler import compile
    m = compile("model.onnx", target="kirin990")

``import compiler`` stays cheap: the driver (and TVM, torch, onnx) load on first use.
"""

from __future__ import annotations

from typing import Any

from compiler.errors import NpuccError

__all__ = ["compile", "CompileOptions", "NpuccError"]


def compile(model: Any, target: Any = "host", pipeline: str | None = None,  # noqa: A001
            debug: Any = None, **kwargs: Any):
    """Compile ``model`` for ``target``; see :func:`compiler.driver.compile`."""
    from compiler.driver import compile as _compile

    return _compile(model, target, pipeline, debug, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "CompileOptions":
        from compiler.driver import CompileOptions

        return CompileOptions
    raise AttributeError(f"module 'compiler' has no attribute {name!r}")
