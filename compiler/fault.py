"""Fault injection for testing the debugging path: ``NPUCC_INJECT_FAULT=<pass name>``.

When the variable names a pass, that pass raises :class:`InjectedFault` instead of running.
The message carries a fingerprint of everything the pass would have read: the input graph
(text and weights), its options, the target it names (by the description file's contents, not
its path) and the sample sets it names. A crash reproducer replays the failure exactly when
the replay prints the same fingerprint (tests/test_replay.py). The reproducer's command sets
the variable again, so it alone reproduces the failure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from compiler.errors import NpuccError

if TYPE_CHECKING:
    from compiler.ir.graph import Graph
    from compiler.pass_base import Pass, PassContext

__all__ = ["ENV", "InjectedFault", "check_injected_fault", "fingerprint"]

ENV = "NPUCC_INJECT_FAULT"


class InjectedFault(NpuccError):
    """The failure ``NPUCC_INJECT_FAULT`` asked for."""

    def __init__(self, pass_name: str, digest: str):
        self.pass_name, self.digest = pass_name, digest
        super().__init__(f"injected fault ({ENV}={pass_name}); the pass's input fingerprint "
                         f"is {digest}")


def check_injected_fault(p: Pass, graph: Graph, ctx: PassContext) -> None:
    """Raise :class:`InjectedFault` if ``NPUCC_INJECT_FAULT`` names ``p``."""
    if os.environ.get(ENV) == p.name:
        raise InjectedFault(p.name, fingerprint(p, graph, ctx))


def fingerprint(p: Pass, graph: Graph, ctx: PassContext) -> str:
    """sha256 (16 hex digits) of what ``p`` reads (see the module docstring)."""
    h = hashlib.sha256(str(graph).encode())
    for n in graph.find("const"):   # the text names weights; their bytes are here
        arr = np.ascontiguousarray(graph.const_value(n.output))
        h.update(f"{n.output.name}:{arr.dtype}:{arr.shape}".encode())
        h.update(arr.tobytes())
    for f in dataclasses.fields(p):
        value = getattr(p, f.name)
        h.update(f"{f.name}=".encode())
        if f.name == "target":
            h.update(_target_bytes(value or ctx.target))
        elif isinstance(value, str) and value.startswith("@"):
            for sample in ctx.resources.get(value[1:], []):
                for name in sorted(sample):
                    h.update(name.encode())
                    h.update(np.ascontiguousarray(sample[name]).tobytes())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()[:16]


def _target_bytes(target: Any) -> bytes:
    if target is None:
        return b"none"
    from targets.description import load_target

    desc = load_target(target)
    try:
        with open(desc.file, "rb") as f:
            return f.read()
    except OSError:
        return repr(desc).encode()
