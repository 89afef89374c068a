"""Built-in pass families. Each module registers its passes on import.

``PASS_MODULES`` maps a pass name to the module defining it, so ``npucc opt -p fold-constants``
imports only what it needs. A new family adds its names here (or registers through the
``npucc.passes`` entry-point group, see ``load_all``).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

# pass name -> module (filled in by each family as it lands)
PASS_MODULES: dict[str, str] = {}
FAMILIES: tuple[str, ...] = ()


def load(name: str) -> None:
    """Import the module that defines pass ``name``, if we know it."""
    mod = PASS_MODULES.get(name)
    if mod is not None:
        importlib.import_module(mod)


def load_all() -> None:
    for mod in dict.fromkeys(list(PASS_MODULES.values()) + list(FAMILIES)):
        importlib.import_module(mod)
    for ep in entry_points(group="npucc.passes"):
        ep.load()
