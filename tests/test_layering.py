"""Layering rules, checked on the source (README, "The pieces"):

- no module imports a ``_private`` name from another module, and a ``_private`` module is
  imported only from inside its own top-level package (``runtime._tvm`` by ``runtime.*``);
- no pass imports the driver, and the core of the pass manager (``compiler.pass_base``,
  ``pass_manager``, ``pipeline``, ``instruments``, ``compiler.ir``) never imports ``passes``:
  it finds pass providers through the ``npucc.passes`` entry-point group.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("compiler", "passes", "runtime", "targets", "bench", "examples")
CORE = ("compiler/pass_base.py", "compiler/pass_manager.py", "compiler/pipeline.py",
        "compiler/instruments.py", "compiler/ir")


def _modules(*folders: str):
    for folder in folders:
        base = ROOT / folder
        for path in sorted([base] if base.suffix == ".py" else base.rglob("*.py")):
            yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _top_package(path: Path) -> str:
    return path.relative_to(ROOT).parts[0]


def _imports(tree: ast.AST):
    """(line, imported module, names) of every import, relative imports resolved away."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, []


def _is_module(module: str, name: str) -> bool:
    base = ROOT.joinpath(*module.split("."), name)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def test_no_private_name_is_imported_from_another_module():
    bad = []
    for path, tree in _modules(*PRODUCT, "tests"):
        for line, module, names in _imports(tree):
            # `from pkg import _mod` imports a module: the next test's rule
            bad += [f"{path.relative_to(ROOT)}:{line}: from {module} import {n}"
                    for n in names if _private(n) and not _is_module(module, n)]
    assert not bad, "private names imported across modules (make them public):\n" + \
        "\n".join(bad)


def test_private_modules_are_imported_only_inside_their_package():
    bad = []
    for path, tree in _modules(*PRODUCT):
        here = _top_package(path)
        for line, module, names in _imports(tree):
            parts = module.split(".")
            # `from pkg import _mod` imports a private module of pkg
            full = [module] + [f"{module}.{n}" for n in names if _is_module(module, n)]
            for name in full:
                if any(_private(p) for p in name.split(".")) and parts[0] != here:
                    bad.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert not bad, "private modules imported from outside their package:\n" + "\n".join(bad)


def test_passes_do_not_import_the_driver_and_the_core_does_not_import_passes():
    bad = []
    for path, tree in _modules("passes"):
        bad += [f"{path.relative_to(ROOT)}:{line}: {module}"
                for line, module, _ in _imports(tree) if module.startswith("compiler.driver")]
    for path, tree in _modules(*CORE):
        bad += [f"{path.relative_to(ROOT)}:{line}: {module}" for line, module, _ in
                _imports(tree) if module == "passes" or module.startswith("passes.")]
    assert not bad, "layering broken:\n" + "\n".join(bad)


def test_the_registry_finds_the_builtin_passes_through_the_entry_point():
    code = ("import sys; from compiler.pass_base import lookup_pass, pass_providers; "
            "assert 'passes' not in sys.modules; p = lookup_pass('prune'); "
            "print([m.__name__ for m in pass_providers()], p.__module__, "
            "sorted({m.split('.')[1] for m in sys.modules if m.startswith('passes.')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.strip()
    # found through the provider, and only the family defining the pass is imported
    assert out == "['passes'] passes.pruning ['pruning']", out
