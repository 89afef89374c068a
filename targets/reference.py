"""A target as pipeline text names it, and back.

Passes that read the target (``partition``, ``npu-numerics``) take it as their ``target``
option, so the pipeline text of a compile replays on its own: ``partition{target=kirin990}``
names a built-in description, ``partition{target=boards/x.toml}`` a file. An empty option falls
back to ``PassContext.target`` (``npucc opt --target``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compiler.errors import NpuccError
from targets.description import TARGETS_DIR, TargetDescription, load_target

__all__ = ["target_reference", "target_for_pass"]


def target_reference(desc: TargetDescription) -> str | None:
    """The text that loads ``desc`` again: a built-in target's name, or its file's absolute
    path; None for a description that did not come from a file."""
    if not desc.file:
        return None
    path = Path(desc.file).resolve()
    if path.parent == TARGETS_DIR.resolve() and path.stem == desc.name:
        return desc.name
    if not path.is_file():
        return None
    return str(path)


def target_for_pass(option: str, fallback: Any, pass_name: str) -> TargetDescription:
    """The description a pass runs for: its ``target`` option, else the context's."""
    if option:
        return load_target(option)
    if fallback is None:
        raise NpuccError(f"the {pass_name} pass needs a target: give it as an option "
                          f"({pass_name}{{target=kirin990}}, or a .toml path) or run "
                          f"`npucc opt --target NAME`")
    return load_target(fallback)
