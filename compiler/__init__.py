"""npucc: a model compiler for phone NPUs.

    from compiler import compile
    m = compile("model.onnx", target="kirin990")

``import compiler`` stays cheap: the driver (and TVM, torch, onnx) load on first use.
"""

from __future__ import annotations

from typing import Any

from compiler.errors import NpuccError

__all__ = ["compile", "compile_modes", "compile_llm", "make_update", "CompileOptions",
           "NpuccError"]


def compile(model: Any, target: Any = "host", pipeline: str | None = None,  # noqa: A001
            debug: Any = None, **kwargs: Any):
    """Compile ``model`` for ``target``; see :func:`compiler.driver.compile`."""
    from compiler.driver import compile as _compile

    return _compile(model, target, pipeline, debug, **kwargs)


def compile_modes(model: Any, target: Any = "host", modes: Any = None, **kwargs: Any):
    """One package holding the model compiled several ways (default: ``performance`` and
    ``accuracy``), switched at run time; see :func:`compiler.modes.compile_modes`."""
    from compiler.modes import compile_modes as _compile_modes

    return _compile_modes(model, target, modes, **kwargs)


def compile_llm(source: Any, target: Any = "host", **kwargs: Any):
    """Compile a decoder LLM (GGUF, transformers) to prefill + decode graphs with a static KV
    cache; returns the loaded model. See :func:`compiler.llm.compile.compile_llm`."""
    from compiler.llm.compile import compile_llm as _compile_llm

    return _compile_llm(source, target, **kwargs)


def make_update(old: Any, new: Any, out: Any, key: Any = None, **kwargs: Any):
    """Write the signed over-the-air delta from package ``old`` to package ``new``; see
    :func:`compiler.update.make_update`."""
    from compiler.update import make_update as _make

    return _make(old, new, out, key, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "CompileOptions":
        from compiler.driver import CompileOptions

        return CompileOptions
    raise AttributeError(f"module 'compiler' has no attribute {name!r}")
