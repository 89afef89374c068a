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
    "PipelineError",
    "PassFailedError",
    "PassVerificationError",
    "NumericCheckError",
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


class PipelineError(NpuccError):
    """Malformed pipeline text, an unknown pass or option, or a bad option value.

    ``column`` is 1-based into ``text``; the message shows the text with a caret under it.
    """

    def __init__(self, message: str, text: str | None = None, column: int | None = None):
        self.text, self.column = text, column
        if text is not None and column is not None:
            message = (f"pipeline:1:{column}: {message}\n  {text}\n  " + " " * (column - 1)
                       + "^")
        super().__init__(message)


class PassFailedError(NpuccError):
    """A pass raised (or broke the graph). Names the pass, its position and the cause;
    ``reproducer`` is the command that replays the failure, when one was written."""

    def __init__(self, pass_text: str, index: int, message: str,
                 reproducer: str | None = None):
        self.pass_text, self.index, self.reproducer = pass_text, index, reproducer
        self.detail = message
        super().__init__(f"pass '{pass_text}' (#{index + 1} in the pipeline) {message}")

    def __str__(self) -> str:  # the reproducer may be attached after construction
        text = f"pass '{self.pass_text}' (#{self.index + 1} in the pipeline) {self.detail}"
        if self.reproducer:
            text += f"\nreproduce with:\n  {self.reproducer}"
        return text


class PassVerificationError(PassFailedError):
    """The graph a pass returned does not verify; ``problems`` are the verifier's."""

    def __init__(self, pass_text: str, index: int, problems: list[str],
                 reproducer: str | None = None):
        self.problems = list(problems)
        msg = "broke the graph: " + (problems[0] if len(problems) == 1 else
                                     f"{len(problems)} problems:\n  " + "\n  ".join(problems))
        super().__init__(pass_text, index, msg, reproducer)


class NumericCheckError(PassFailedError):
    """After a pass, the outputs on the sample inputs differ from the unoptimised graph's by
    more than the tolerance."""
