"""What a pass is: a frozen dataclass with a kebab-case name whose fields are its options.

```python
@register_pass
@dataclass(frozen=True)
class FuseConvAct(Pass):
    '''Fold a relu/relu6/clip that is the only user of a conv2d into the conv's activation.
    Before: conv2d -> relu. After: conv2d{activation="relu"}.'''
    name: ClassVar[str] = "fuse-conv-relu"
    activations: tuple[str, ...] = ("relu", "relu6", "clip")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult: ...
```

Options are the dataclass fields (bool, int, float, str, or tuple of those); a pipeline text
``fuse-conv-relu{activations=relu,relu6}`` sets them. The registry maps names to classes;
family modules in ``passes/`` register on import and are imported lazily by name
(``passes/__init__.py`` lists which module holds which pass).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from compiler.ir.graph import Graph

__all__ = ["Pass", "PassResult", "PassContext", "register_pass", "pass_registry",
           "pass_options"]


@dataclass
class PassResult:
    graph: Graph
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)  # e.g. {"fused": 12, "transposes_left": 2}


@dataclass
class PassContext:
    """What a pass may read besides the graph: the target description, sample inputs, and a
    place to leave statistics and remarks (shown by the instruments)."""

    target: Any = None
    sample_inputs: list[dict[str, Any]] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    remarks: list[str] = field(default_factory=list)

    def remark(self, text: str) -> None:
        self.remarks.append(text)


@dataclass(frozen=True)
class Pass:
    name: ClassVar[str] = ""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    @property
    def pipeline_text(self) -> str:
        """This pass as pipeline text, with the options that differ from their defaults."""
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            if v != default:
                text = ",".join(map(_fmt, v)) if isinstance(v, tuple) else _fmt(v)
                parts.append(f"{f.name.replace('_', '-')}={text}")
        return self.name + ("{" + ",".join(parts) + "}" if parts else "")


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


_PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _PASSES and _PASSES[cls.name] is not cls:
        raise ValueError(f"pass {cls.name!r} registered twice")
    _PASSES[cls.name] = cls
    return cls


def pass_registry() -> dict[str, type[Pass]]:
    """Every registered pass (imports the built-in families on first call)."""
    import passes  # noqa: F401  (its __init__ imports the families lazily on demand)

    passes.load_all()
    return dict(_PASSES)


def pass_options(cls: type[Pass]) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}
