"""The error types npucc raises on bad input.

Every error a user can cause derives from :class:`NpuccError`; anything else escaping
from the compiler is a bug in the compiler. Messages name the model part at fault
(node, value, input, file:line:column) and say what would be accepted instead.
"""

from __future__ import annotations

__all__ = [
    "NpuccError",
    "ParseError",
    "VerificationError",
    "OpError",
    "UnsupportedOpsError",
    "ImportError_",
    "InputError",
]


class NpuccError(Exception):
    """Base class of every error caused by what a user gave us."""


class ParseError(NpuccError):
    """Malformed IR text. ``line`` and ``column`` are 1-based."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None,
                 source: str | None = None):
        self.line, self.column, self.source = line, column, source
        where = ""
        if line is not None:
            where = f"{source or '<text>'}:{line}:{column}: "
        super().__init__(where + message)


class OpError(NpuccError):
    """An op's type inference or verifier rejected its operands or attributes.

    Raised without node context by op definitions; the graph verifier re-raises it as a
    :class:`VerificationError` naming the node.
    """


class VerificationError(NpuccError):
    """The graph is not well formed. The message names every offending node."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            super().__init__(f"{len(self.problems)} problems:\n  " + "\n  ".join(self.problems))


class UnsupportedOpsError(NpuccError):
    """A model uses ops we cannot import. Lists every unsupported node at once."""

    def __init__(self, nodes: list[tuple[str, str, str]]):
        # (node name, op type, reason)
        self.nodes = list(nodes)
        lines = [f"{name or '<unnamed>'} ({op}){': ' + why if why else ''}"
                 for name, op, why in self.nodes]
        super().__init__(
            f"the model has {len(self.nodes)} unsupported node(s):\n  " + "\n  ".join(lines)
            + "\nRewrite these ops in the source model, or file an issue naming them."
        )


class ImportError_(NpuccError):
    """The model could not be imported (malformed file, dynamic shape we cannot resolve...)."""


class InputError(NpuccError, ValueError):
    """Inputs given at run time do not match the graph's inputs (name, shape or dtype)."""
