"""FileCheck tests: every ``tests/filecheck/**/*.ir`` file runs its ``// RUN:`` lines.

A RUN line is a shell pipeline (bash, pipefail) such as
``// RUN: npucc opt %s -p fuse-conv-act | filecheck %s``, continued onto the next RUN line
by a trailing ``\\``. Substitutions, as in lit: ``%s`` the file, ``%S`` its folder, ``%t`` a
fresh temporary path, ``%p`` the plugin of test-only passes (tests/pm_test_passes.py).
``npucc`` runs this checkout's ``compiler.cli``, ``filecheck`` the PyPI package's
executable, and ``not CMD`` succeeds when CMD fails. The command runs in a temporary
folder, so crash reproducers land there.

Every graph in every .ir file (chunks split at ``// -----``) must also round-trip:
parse -> print -> parse prints identically. A chunk holding ``// NO-ROUNDTRIP`` (e.g. one
that is malformed on purpose) is skipped.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILECHECK_DIR = Path(__file__).parent / "filecheck"
FILES = sorted(FILECHECK_DIR.glob("**/*.ir"))
PLUGIN = Path(__file__).parent / "pm_test_passes.py"


def run_lines(path: Path) -> list[str]:
    """The commands of a file's RUN lines (a trailing backslash continues a command)."""
    cmds, cur = [], ""
    for line in path.read_text().splitlines():
        m = re.match(r"\s*//\s*RUN:(.*)$", line)
        if not m:
            continue
        part = m.group(1).strip()
        if part.endswith("\\"):
            cur += part[:-1] + " "
            continue
        cmds.append(cur + part)
        cur = ""
    if cur:
        cmds.append(cur)
    return cmds


def _filecheck() -> str:
    exe = shutil.which("filecheck") or str(Path(sys.executable).parent / "filecheck")
    if not Path(exe).exists():
        pytest.fail("the `filecheck` executable is missing: pip install filecheck")
    return exe


def substitute(cmd: str, path: Path, tmp: Path) -> str:
    subs = {"%s": shlex.quote(str(path)), "%S": shlex.quote(str(path.parent)),
            "%t": shlex.quote(str(tmp / "t")), "%p": shlex.quote(str(PLUGIN))}
    return re.sub(r"%[sStp]", lambda m: subs[m.group(0)], cmd)


def run_file(path: Path, tmp: Path) -> list[tuple[str, subprocess.CompletedProcess]]:
    prelude = (f'npucc() {{ {shlex.quote(sys.executable)} -m compiler.cli "$@"; }}\n'
               f'filecheck() {{ {shlex.quote(_filecheck())} "$@"; }}\n'
               'not() { if "$@"; then return 1; else return 0; fi; }\n')
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH",
                                                                               ""),
               OMP_NUM_THREADS="1")
    results = []
    for cmd in run_lines(path):
        full = substitute(cmd, path, tmp)
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", prelude + full], cwd=tmp,
                              env=env, capture_output=True, text=True, timeout=300)
        results.append((full, proc))
        if proc.returncode != 0:
            break
    return results


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(FILECHECK_DIR)) for p in FILES])
def test_filecheck(path: Path, tmp_path: Path) -> None:
    cmds = run_lines(path)
    assert cmds, f"{path} has no // RUN: line"
    for full, proc in run_file(path, tmp_path):
        assert proc.returncode == 0, (f"RUN failed (exit {proc.returncode}): {full}\n"
                                      f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")


def _chunks(path: Path) -> list[tuple[int, str]]:
    from compiler.cli_opt import split_input_file

    return [(line, c) for line, c in split_input_file(path.read_text())
            if re.search(r"^\s*graph\s+@", c, re.M) and "// NO-ROUNDTRIP" not in c]


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(FILECHECK_DIR)) for p in FILES])
def test_roundtrip(path: Path) -> None:
    from compiler.ir.parser import parse

    for first_line, chunk in _chunks(path):
        g = parse("\n" * first_line + chunk, source=str(path))
        text = str(g)
        again = str(parse(text, source=f"{path} (printed)"))
        assert again == text, f"{path}:{first_line + 1}: print(parse(print(g))) differs"
