"""npucc: a model compiler for phone NPUs."""

from compiler.errors import NpuccError

__all__ = ["NpuccError"]
