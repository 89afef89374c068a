"""Pass instruments: every debugging feature of the pass manager is one small class here.

An instrument sees the pipeline through six hooks (TVM's PassInstrument, MLIR's
PassInstrumentation). ``before`` hooks run in list order and ``after`` hooks in reverse
order, so the instrument listed last wraps the pass most closely (MLIR's rule)::

    start(graph, passes)          once, before the first pass
    should_run(run) -> bool       False from any instrument skips the pass
    before(run, graph)
    after(run, result)            result.graph is what the pass returned
    on_error(run, graph, error)   the pass (or an after hook) raised; may return a note
    finish(graph)                 once, after the last pass

Here: :class:`PrintIR` (stream or numbered files), :class:`Timing` (wall time, node counts,
pass stats), :class:`VerifyEach`, :class:`CrashReproducer`; the numeric check and bisection
are in ``compiler/numeric.py``.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from compiler.errors import NumericCheckError, PassVerificationError, VerificationError

if TYPE_CHECKING:
    from compiler.ir.graph import Graph, Node
    from compiler.pass_base import Pass, PassContext, PassResult

__all__ = ["PassRun", "Instrument", "PrintPipeline", "PrintIR", "Timing", "VerifyEach", "VerifyRoundtrip",
           "PassLimit", "CrashReproducer", "render_table"]


@dataclass
class PassRun:
    """One pass at one position of a pipeline, as the hooks see it."""

    index: int  # 0-based position in the pipeline
    pass_: Pass
    total: int
    nodes_before: int = 0
    seconds: float = 0.0  # wall time of Pass.run alone, set before the after hooks
    ctx: PassContext | None = None   # what the pass may read besides the graph

    @property
    def name(self) -> str:
        return self.pass_.name

    @property
    def text(self) -> str:
        return self.pass_.pipeline_text


class Instrument:
    """Base class: every hook does nothing."""

    def start(self, graph: Graph, passes: Sequence[Pass]) -> None:
        pass

    def should_run(self, run: PassRun) -> bool:
        return True

    def before(self, run: PassRun, graph: Graph) -> None:
        pass

    def after(self, run: PassRun, result: PassResult) -> None:
        pass

    def on_error(self, run: PassRun, graph: Graph, error: BaseException) -> str | None:
        return None

    def finish(self, graph: Graph) -> None:
        pass


_STAGE_FILE = re.compile(r"\d+-[A-Za-z0-9_.+\-]+\.(ir|safetensors)\Z")


def _selector(sel: bool | str | Iterable[str]) -> bool | frozenset[str]:
    if isinstance(sel, bool):
        return sel
    if isinstance(sel, str):
        return frozenset(s.strip() for s in sel.split(",") if s.strip())
    return frozenset(sel)


def _selected(sel: bool | frozenset[str], run: PassRun) -> bool:
    return sel if isinstance(sel, bool) else run.name in sel


class PrintIR(Instrument):
    """Print the IR before/after all passes or the named ones, to a stream or a folder.

    To a stream, each dump starts with MLIR's header line, a comment the IR parser skips::

        // -----// IR Dump After fuse-conv-act (#2) //----- //

    To ``dump_dir``: ``00-input.ir``, then ``NN-<pass>.ir`` after pass NN (1-based) and
    ``NN-<pass>.before.ir`` before it. Each stage file loads with ``compiler.ir.load``:
    its weights are ``NN-<pass>.safetensors`` beside it, written only when the stage's
    weights differ from the previous stage's and hard-linked to that file otherwise, so a
    big model costs its weight bytes once however many stages are dumped.

    ``only_if_changed`` skips the after-dump of a pass that reports ``changed=False``
    (MLIR's print-ir-after-change).
    """

    def __init__(self, before: bool | str | Iterable[str] = False,
                 after: bool | str | Iterable[str] = False, *, only_if_changed: bool = False,
                 stream: TextIO | None = None, dump_dir: str | os.PathLike | None = None):
        self.before_sel = _selector(before)
        self.after_sel = _selector(after)
        self.only_if_changed = only_if_changed
        self.stream = stream
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.files: list[Path] = []
        self._width = 2
        self._last_weights: tuple[Any, Path] | None = None

    # -- where a dump goes ----------------------------------------------------------
    def _emit(self, graph: Graph, header: str, filename: str) -> None:
        if self.dump_dir is None:
            out = self.stream or sys.stdout
            out.write(f"// -----// IR Dump {header} //----- //\n{graph}\n")
            out.flush()
        else:
            self._write(graph, header, self.dump_dir / filename)

    def _write(self, graph: Graph, header: str, path: Path) -> None:
        from compiler.ir.serialize import atomic_write, save, weights_path

        sig = tuple(sorted((n.attrs["ref"], id(graph.weights.get(n.attrs["ref"])))
                           for n in graph.nodes if n.op == "const" and n.attrs.get("ref")))
        wpath = weights_path(path)
        if self._last_weights is not None and self._last_weights[0] == sig:
            wpath.unlink(missing_ok=True)
            try:
                os.link(self._last_weights[1], wpath)
            except OSError:  # a file system without hard links: copy
                wpath.write_bytes(self._last_weights[1].read_bytes())
            atomic_write(path, f"// IR {header}\n{graph}")
        else:
            save(graph, path)
            atomic_write(path, f"// IR {header}\n{graph}")
            self._last_weights = (sig, wpath)
        self.files.append(path)

    def _stem(self, run: PassRun) -> str:
        return f"{run.index + 1:0{self._width}d}-{run.name}"

    # -- hooks -----------------------------------------------------------------------
    def start(self, graph: Graph, passes: Sequence[Pass]) -> None:
        self._width = max(2, len(str(len(passes))))
        self._last_weights = None
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            for old in self.dump_dir.iterdir():  # stages of an earlier run would mislead
                if _STAGE_FILE.match(old.name):
                    old.unlink()
            self._write(graph, "of the input", self.dump_dir / f"{0:0{self._width}d}-input.ir")

    def before(self, run: PassRun, graph: Graph) -> None:
        if _selected(self.before_sel, run):
            self._emit(graph, f"Before {run.text} (#{run.index + 1})",
                       f"{self._stem(run)}.before.ir")

    def after(self, run: PassRun, result: PassResult) -> None:
        if not _selected(self.after_sel, run):
            return
        if self.only_if_changed and not result.changed:
            return
        self._emit(result.graph, f"After {run.text} (#{run.index + 1})", f"{self._stem(run)}.ir")

    def on_error(self, run: PassRun, graph: Graph, error: BaseException) -> str | None:
        if _selected(self.after_sel, run) and not isinstance(error, NumericCheckError):
            try:
                self._emit(graph, f"After {run.text} (#{run.index + 1}) Failed",
                           f"{self._stem(run)}.failed.ir")
            except Exception:  # a graph broken enough not to print: the error says why
                pass
        return None


@dataclass
class TimingRecord:
    index: int
    pass_text: str
    seconds: float
    nodes_before: int
    nodes_after: int
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    failed: bool = False

    @property
    def delta(self) -> int:
        return self.nodes_after - self.nodes_before


def render_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]],
                 *, width: int = 120, right: Iterable[int] = ()) -> str:
    """A plain-text table drawn by rich (no colour codes), as a string."""
    from rich.console import Console
    from rich.table import Table

    right = set(right)
    table = Table(box=None, pad_edge=False)
    for i, c in enumerate(columns):
        table.add_column(c, justify="right" if i in right else "left", overflow="fold")
    for r in rows:
        table.add_row(*r)
    buf = io.StringIO()
    Console(file=buf, width=width, no_color=True, force_terminal=False,
            highlight=False).print(table)
    return title + "\n" + "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) \
        + "\n"


class Timing(Instrument):
    """Per-pass wall time, node count before → after (delta), changed flag and the pass's
    ``PassResult.stats``. ``records`` holds the data; ``report()`` renders the table, which
    is written to ``stream`` when the pipeline finishes (unless ``stream`` is False)."""

    def __init__(self, stream: TextIO | bool | None = None):
        self.stream = stream
        self.records: list[TimingRecord] = []

    def start(self, graph: Graph, passes: Sequence[Pass]) -> None:
        self.records = []

    def after(self, run: PassRun, result: PassResult) -> None:
        self.records.append(TimingRecord(run.index, run.text, run.seconds, run.nodes_before,
                                         len(result.graph.nodes), bool(result.changed),
                                         dict(result.stats or {})))

    def on_error(self, run: PassRun, graph: Graph, error: BaseException) -> str | None:
        if not any(r.index == run.index for r in self.records):
            self.records.append(TimingRecord(run.index, run.text, run.seconds,
                                             run.nodes_before, len(graph.nodes), True,
                                             failed=True))
        self.finish(graph)  # the table up to the failure
        return None

    @property
    def total_seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    def report(self) -> str:
        total = self.total_seconds or 1e-12
        rows = []
        for r in self.records:
            stats = ", ".join(f"{k}={v}" for k, v in r.stats.items()
                              if not (isinstance(v, int | float) and not isinstance(v, bool)
                                      and v == 0))  # zero counters are noise here
            rows.append([str(r.index + 1), r.pass_text, f"{r.seconds * 1e3:.2f}",
                         f"{100 * r.seconds / total:.1f}%", f"{r.nodes_before} → {r.nodes_after}",
                         f"{r.delta:+d}", "failed" if r.failed else ("yes" if r.changed else "no"),
                         stats])
        rows.append(["", "total", f"{self.total_seconds * 1e3:.2f}", "100.0%",
                     (f"{self.records[0].nodes_before} → {self.records[-1].nodes_after}"
                      if self.records else ""), "", "", ""])
        return render_table("Pass timing", ["#", "pass", "ms", "share", "nodes", "Δ",
                                            "changed", "stats"], rows, right=(0, 2, 3, 5))

    def finish(self, graph: Graph) -> None:
        if self.stream is False:
            return
        out = self.stream if self.stream not in (None, True) else sys.stdout
        out.write(self.report())
        out.flush()


class VerifyEach(Instrument):
    """Verify the input, then the graph every pass returns; a failure names the pass.

    After a pass the structure is checked whole and the per-node checks (attributes, type
    inference) run on the nodes the pass created or changed (``node_signature``), so verifying
    after every pass stays linear in what the passes do; a pass that reports no change is not
    re-verified (a false report is caught by the next verification, naming a later pass).
    The final graph's structure is checked whole, and the per-node checks run on every node
    changed since the last verification.
    """

    def __init__(self) -> None:
        self.seen: dict[int, tuple] = {}
        self.graph: Graph | None = None

    def _remember(self, graph: Graph) -> None:
        from compiler.ir.verify import node_signature

        self.seen = {id(n): (n, node_signature(graph, n)) for n in graph.nodes}
        self.graph = graph

    def start(self, graph: Graph, passes: Sequence[Pass]) -> None:
        from compiler.ir.verify import verify

        try:
            verify(graph)
        except VerificationError as e:
            raise VerificationError([f"the input graph (before any pass): {p}"
                                     for p in e.problems]) from None
        self._remember(graph)

    def after(self, run: PassRun, result: PassResult) -> None:

        if not result.changed and result.graph is self.graph:
            return   # the pass says it changed nothing; the next check would see it if it did
        try:
            self._verify_changes(result.graph)
        except VerificationError as e:
            raise PassVerificationError(run.text, run.index, e.problems) from None

    def _verify_changes(self, graph: Graph) -> None:
        """Verify ``graph``, with per-node checks only on nodes changed since the last time."""
        from compiler.ir.verify import node_signature, verify

        seen = self.seen
        fresh: dict[int, tuple] = {}

        def changed(n: Node) -> bool:
            sig = node_signature(graph, n)
            fresh[id(n)] = (n, sig)
            old = seen.get(id(n))
            return old is None or old[0] is not n or old[1] != sig

        verify(graph, recheck=changed)
        self.seen, self.graph = fresh, graph

    def finish(self, graph: Graph) -> None:
        try:
            self._verify_changes(graph)
        except VerificationError as e:
            raise VerificationError([f"the pipeline's result: {p}" for p in e.problems]) \
                from None


class PrintPipeline(Instrument):
    """Print the whole pipeline text once, before the first pass (``compile(...,
    debug={"print_pipeline": True})``): with ``npucc opt --target/--calibration`` it replays
    the run."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream

    def start(self, graph: Graph, passes: Sequence[Pass]) -> None:
        from compiler.pipeline import format_pipeline

        out = self.stream or sys.stdout
        out.write(f"// pipeline: {format_pipeline(passes)}\n")
        out.flush()


class VerifyRoundtrip(Instrument):
    """After every pass, check that the graph's text parses back and prints identically
    (MLIR's --verify-roundtrip); a failure names the pass and the first differing line."""

    def after(self, run: PassRun, result: PassResult) -> None:
        from compiler.errors import NpuccError, PassFailedError
        from compiler.ir.parser import parse

        text = str(result.graph)
        try:
            again = str(parse(text, result.graph.weights, source=f"<after {run.text}>"))
        except NpuccError as e:
            raise PassFailedError(run.text, run.index,
                                  f"left a graph whose text does not parse back: {e}") from None
        if again != text:
            a, b = text.splitlines(), again.splitlines()
            i = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                     min(len(a), len(b)))
            raise PassFailedError(
                run.text, run.index, f"left a graph whose text does not round-trip: line "
                f"{i + 1} prints as {a[i] if i < len(a) else '<end>'!r}, then as "
                f"{b[i] if i < len(b) else '<end>'!r}")


class PassLimit(Instrument):
    """Run only the first ``limit`` passes of the pipeline (LLVM's -opt-bisect-limit): the
    rest are skipped, so a failure can be narrowed down by hand."""

    def __init__(self, limit: int):
        self.limit = limit

    def should_run(self, run: PassRun) -> bool:
        return run.index < self.limit


class CrashReproducer(Instrument):
    """When a pass fails, save what it was given and return the one command that replays the
    failure: ``npucc opt crash_dir/<pass>.ir -p '<pass with its options>'``.

    Beside the IR (and its weights) go the sample sets the pass names (``@name`` options:
    ``<name>.npz``, passed back with ``--calibration name=...``) and a target file it names by
    path (copied, the option rewritten to the copy); a target given only through the context
    is passed with ``--target``. So the command alone, in a fresh process with nothing but
    this folder, runs the same pass on the same input with the same data and target.

    The graph is copied (structurally; weights shared) before every pass, so the reproducer
    holds exactly what the pass was given even if it mutated the graph before raising.
    Failures of the numeric check are not crashes and leave no reproducer."""

    def __init__(self, crash_dir: str | os.PathLike = "npucc-crash"):
        self.crash_dir = Path(crash_dir)
        self.written: list[Path] = []
        self._snapshot: Graph | None = None

    def before(self, run: PassRun, graph: Graph) -> None:
        self._snapshot = graph.copy()

    def after(self, run: PassRun, result: PassResult) -> None:
        self._snapshot = None

    def on_error(self, run: PassRun, graph: Graph, error: BaseException) -> str | None:
        from compiler.ir.serialize import save

        if isinstance(error, NumericCheckError) or self._snapshot is None:
            return None
        path = self.crash_dir / f"{run.name}.ir"
        try:
            save(self._snapshot, path)
            p, extra = self._inputs(run)
        except Exception as e:  # never hide the pass's own error behind ours
            sys.stderr.write(f"npucc: warning: could not write the reproducer {path}: {e}\n")
            return None
        self.written.append(path)
        command = replay_command(path, p, extra)
        from compiler.fault import ENV, InjectedFault

        if isinstance(error, InjectedFault):   # the replay must inject it again
            command = f"{ENV}={shlex.quote(error.pass_name)} {command}"
        return command

    def _inputs(self, run: PassRun) -> tuple[Pass, list[str]]:
        """Save the data and target the pass names; its (rewritten) pass and extra args."""
        import dataclasses
        import shutil

        from compiler.samples import sample_refs, save_samples

        p, extra = run.pass_, []
        ctx = run.ctx
        values = [getattr(p, f.name) for f in dataclasses.fields(p)]
        for name in sample_refs(values):
            if ctx is None or name not in ctx.resources:
                continue   # the pass itself says it is unbound: the replay says so too
            file = save_samples(self.crash_dir / f"{name}.npz", ctx.resources[name])
            self.written.append(file)
            extra += ["--calibration", f"{name}={file}"]
        if any(f.name == "target" for f in dataclasses.fields(p)):
            ref = p.target or self._context_target(ctx)
            if ref and Path(ref).is_file():
                copy = self.crash_dir / f"target-{Path(ref).name}"
                shutil.copyfile(ref, copy)
                self.written.append(copy)
                ref = str(copy)
            if p.target:
                p = dataclasses.replace(p, target=ref)
            elif ref:
                extra += ["--target", ref]
        return p, extra


    @staticmethod
    def _context_target(ctx: PassContext | None) -> str | None:
        if ctx is None or ctx.target is None:
            return None
        if isinstance(ctx.target, str | os.PathLike):
            return str(ctx.target)
        from targets.reference import target_reference

        return target_reference(ctx.target)


def replay_command(path: Path, p: Pass, extra: Sequence[str] = ()) -> str:
    """``npucc opt <path> -p '<pass>' [extra]``, plus ``--load-plugin`` when the pass came
    from one."""
    from compiler.pass_base import plugin_of

    cmd = ["npucc", "opt", str(path), "-p", p.pipeline_text, *extra]
    plugin = plugin_of(type(p))
    if plugin is not None:
        cmd += ["--load-plugin", plugin]
    return shlex.join(cmd)
