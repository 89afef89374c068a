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
import functools
import importlib
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from compiler.ir.graph import Graph

__all__ = ["Pass", "PassResult", "PassContext", "register_pass", "pass_registry", "json_option", "lookup_pass", "format_option_value", "load_plugin", "plugin_of"]


@dataclass
class PassResult:
    graph: Graph
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)  # e.g. {"fused": 12, "transposes_left": 2}


@dataclass
class PassContext:
    """What a pass may read besides the graph and its own options.

    ``target``: the description passes fall back to when their ``target`` option is empty
    (``npucc opt --target``). ``resources``: sample sets bound to names, which options refer
    to as ``@name`` (``compiler/samples.py``): the pipeline text says what a pass ran on, and
    the crash reproducer saves each one it names. ``sample_inputs``: what the quantize pass
    hands its precision handlers (it resolved them from its ``calibration`` option).
    ``options``: results and caches passes leave for later ones and for the caller (plans,
    Hessians), never settings. ``remarks``: shown by the instruments."""

    target: Any = None
    sample_inputs: list[dict[str, Any]] | None = None
    resources: dict[str, Any] = field(default_factory=dict)
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
                parts.append(f"{f.name.replace('_', '-')}={format_option_value(v)}")
        return self.name + ("{" + ",".join(parts) + "}" if parts else "")


_BARE = re.compile(r"[A-Za-z0-9_.+\-@/]+\Z")


def format_option_value(v: Any) -> str:
    """An option value as pipeline text (``compiler/pipeline.lark``) that parses back to it."""
    if isinstance(v, tuple | list):
        return "[]" if not v else ",".join(format_option_value(x) for x in v)
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    s = str(v)
    return s if _BARE.match(s) and s.lower() != "none" else json.dumps(s)


def json_option(value: Any) -> str:
    """A mapping as the text of a JSON-object option (``quantize{precision=...}``,
    ``prune{config=...}``): key order kept, numpy scalars and arrays as numbers and lists.
    Raises TypeError for values JSON cannot hold."""
    def default(v: Any) -> Any:
        if hasattr(v, "tolist"):   # numpy scalars and arrays
            return v.tolist()
        raise TypeError(f"{type(v).__name__} is not JSON serializable")

    return json.dumps(value, separators=(",", ":"), default=default)


_PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _PASSES and _PASSES[cls.name] is not cls:
        raise ValueError(f"pass {cls.name!r} registered twice")
    _PASSES[cls.name] = cls
    return cls


PASS_GROUP = "npucc.passes"


@functools.cache
def pass_providers() -> tuple[Any, ...]:
    """The modules that provide passes: each ``npucc.passes`` entry point (the built-in
    ``passes`` package registers itself in pyproject.toml; an out-of-tree family does the
    same in its own). A provider's ``PASS_MODULES`` maps pass names to the modules that
    define them (imported on first use); its ``FAMILIES`` are imported for a full listing.
    The core never imports a provider by name."""
    from importlib.metadata import entry_points

    from compiler.errors import NpuccError

    found = [ep.load() for ep in entry_points(group=PASS_GROUP)]
    if not found:
        raise NpuccError(f"no pass provider is registered (entry-point group {PASS_GROUP!r}); "
                         "install npucc (pip install -e .) so its passes are found")
    return tuple(found)


def pass_registry() -> dict[str, type[Pass]]:
    """Every registered pass (imports every provider's modules)."""
    import compiler.builtin_passes  # noqa: F401  (verify, print-op-stats)

    for provider in pass_providers():
        modules = [*getattr(provider, "PASS_MODULES", {}).values(),
                   *getattr(provider, "FAMILIES", ())]
        for mod in dict.fromkeys(modules):
            importlib.import_module(mod)
    return dict(_PASSES)


def lookup_pass(name: str) -> type[Pass] | None:
    """The pass registered as ``name``, importing only its module when a provider names it."""
    if name in _PASSES:
        return _PASSES[name]
    import compiler.builtin_passes  # noqa: F401

    for provider in pass_providers():
        mod = getattr(provider, "PASS_MODULES", {}).get(name)
        if mod is not None:
            importlib.import_module(mod)
    if name not in _PASSES:
        pass_registry()
    return _PASSES.get(name)


_PLUGINS: dict[str, str] = {}  # module name -> how it was named to load_plugin


def load_plugin(spec: str) -> Any:
    """Import a module that registers passes: a ``.py`` file path or a module name.

    ``npucc opt --load-plugin`` uses this; a crash reproducer of a plugin's pass names the
    plugin again so the printed command replays on its own. Loading twice is a no-op."""
    import importlib
    import importlib.util
    import sys
    import zlib
    from pathlib import Path

    from compiler.errors import NpuccError

    if spec.endswith(".py") or "/" in spec:
        path = Path(spec).resolve()
        if not path.is_file():
            raise NpuccError(f"pass plugin {spec!r} is not a file")
        modname = f"npucc_plugin_{path.stem}_{zlib.crc32(str(path).encode()):08x}"
        if modname in sys.modules:
            return sys.modules[modname]
        module_spec = importlib.util.spec_from_file_location(modname, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[modname] = module
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[modname]
            raise
        _PLUGINS[modname] = str(path)
        return module
    try:
        module = importlib.import_module(spec)
    except ModuleNotFoundError as e:
        raise NpuccError(f"cannot import pass plugin {spec!r}: {e}") from None
    _PLUGINS[module.__name__] = spec
    return module


def plugin_of(cls: type) -> str | None:
    """The ``load_plugin`` argument that registered ``cls``, if it came from a plugin."""
    return _PLUGINS.get(cls.__module__)
