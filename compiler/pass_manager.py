"""The pass manager: a plain loop over passes, with every debugging feature an instrument.

```python
from compiler.pass_manager import DebugOptions, run_pipeline

graph = run_pipeline(graph, "fold-constants,fuse-conv-act", debug=DebugOptions(
    print_ir_after=("fuse-conv-act",), time_passes=True, numeric_check=True, tolerance=1e-4,
    crash_dir="npucc-crash"))
```

Errors: a pass that raises becomes :class:`PassFailedError` naming the pass and its position
(with the replay command when a crash reproducer is active); a graph that no longer verifies
becomes :class:`PassVerificationError`; a numeric check over tolerance
:class:`NumericCheckError`. The graph may be modified in place: pass ``graph.copy()`` to keep
the original.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from compiler.errors import NpuccError, PassFailedError
from compiler.fault import check_injected_fault
from compiler.instruments import (
    CrashReproducer,
    Instrument,
    PassLimit,
    PassRun,
    PrintIR,
    PrintPipeline,
    Timing,
    VerifyEach,
    VerifyRoundtrip,
)
from compiler.pass_base import Pass, PassContext, PassResult
from runtime.bulk import bulk_work

if TYPE_CHECKING:
    from compiler.ir.graph import Graph

__all__ = ["PassManager", "DebugOptions", "run_pipeline"]

_I = TypeVar("_I", bound=Instrument)


class PassManager:
    """Run ``passes`` in order on a graph, calling the instruments' hooks around each.

    ``verify_each`` (on by default) appends a :class:`VerifyEach`, innermost, so the graph is
    verified before any other instrument looks at a pass's result."""

    def __init__(self, passes: Any, instruments: Sequence[Instrument] = (),
                 verify_each: bool = True):
        from compiler.pipeline import as_passes

        self.passes: list[Pass] = as_passes(passes)
        self.instruments: list[Instrument] = list(instruments)
        if verify_each and not any(isinstance(i, VerifyEach) for i in self.instruments):
            self.instruments.append(VerifyEach())
        self.index_offset = 0  # position of passes[0] in a larger pipeline (bisection)

    @classmethod
    def from_debug(cls, passes: Any, debug: DebugOptions | Mapping[str, Any] | None = None
                   ) -> PassManager:
        debug = DebugOptions.coerce(debug)
        return cls(passes, debug.instruments(), verify_each=debug.verify_each)

    def instrument(self, kind: type[_I]) -> _I | None:
        """The first instrument of type ``kind`` (to read its records after a run)."""
        return next((i for i in self.instruments if isinstance(i, kind)), None)

    def run(self, graph: Graph, ctx: PassContext | None = None) -> Graph:
        with bulk_work():   # no full GC passes over the graph while it is rewritten
            return self._run(graph, ctx)

    def _run(self, graph: Graph, ctx: PassContext | None) -> Graph:
        ctx = ctx if ctx is not None else PassContext()
        insts = self.instruments
        for inst in insts:
            inst.start(graph, self.passes)
        total = len(self.passes) + self.index_offset
        for i, p in enumerate(self.passes, start=self.index_offset):
            run = PassRun(i, p, total, nodes_before=len(graph.nodes), ctx=ctx)
            if not all(inst.should_run(run) for inst in insts):
                continue
            for inst in insts:
                inst.before(run, graph)
            result: PassResult | None = None
            try:
                t0 = time.perf_counter()
                try:
                    check_injected_fault(p, graph, ctx)
                    result = p.run(graph, ctx)
                finally:
                    run.seconds = time.perf_counter() - t0
                if not isinstance(result, PassResult):
                    raise TypeError(f"run() returned {type(result).__name__}, not a PassResult")
                for inst in reversed(insts):
                    inst.after(run, result)
            except Exception as e:
                raise self._failure(run, result.graph if result is not None else graph,
                                    e) from (None if isinstance(e, PassFailedError) else e)
            graph = result.graph
        for inst in insts:
            inst.finish(graph)
        return graph

    def _failure(self, run: PassRun, graph: Graph, error: Exception) -> PassFailedError:
        notes = []
        for inst in self.instruments:
            try:
                note = inst.on_error(run, graph, error)
            except Exception as e:  # an instrument must not hide the pass's error
                sys.stderr.write(f"npucc: warning: {type(inst).__name__}.on_error failed: "
                                 f"{e}\n")
                continue
            if note:
                notes.append(note)
        if isinstance(error, PassFailedError):
            err = error
        elif isinstance(error, NpuccError):
            err = PassFailedError(run.text, run.index, f"failed: {error}")
        else:
            err = PassFailedError(run.text, run.index,
                                  f"raised {type(error).__name__}: {error}")
        if notes and err.reproducer is None:
            err.reproducer = notes[0]
        return err


@dataclass
class DebugOptions:
    """Pass-level debugging, as one value (``compile(..., debug=...)`` takes it or a dict).

    Pass names in ``print_ir_before`` / ``print_ir_after`` select every occurrence of that
    pass. With ``dump_dir`` the selected dumps go to numbered files there instead of the
    stream, and with no selection at all every stage is dumped. Streams default to stdout.
    """

    print_pipeline: bool = False  # print the whole pipeline text (what replays the run)
    print_ir_before_all: bool = False
    print_ir_before: tuple[str, ...] = ()
    print_ir_after_all: bool = False
    print_ir_after: tuple[str, ...] = ()
    print_ir_after_change: bool = False  # only after passes that report changed=True
    print_ir_stream: TextIO | None = None
    dump_dir: str | os.PathLike | None = None
    time_passes: bool = False
    verify_each: bool = True
    verify_roundtrip: bool = False  # after each pass: print -> parse -> print is identical
    pass_limit: int | None = None  # run only the first N passes (skip the rest)
    numeric_check: bool = False
    sample_inputs: Any = None  # {name: array} or a list of them; None: generated
    seed: int = 0
    int_range: Any = (0, 100)  # (lo, hi) half-open, or {input name: (lo, hi)}
    tolerance: float | None = None  # with numeric_check: raise past it, naming the pass
    tolerance_metric: str = "max_abs"  # max_abs | max_rel | cosine (1 - cosine)
    crash_dir: str | os.PathLike | None = None  # write a reproducer when a pass fails
    report_stream: TextIO | None = None  # timing and numeric tables

    def __post_init__(self) -> None:
        for f in ("print_ir_before", "print_ir_after"):
            v = getattr(self, f)
            if isinstance(v, str):
                v = tuple(s.strip() for s in v.split(",") if s.strip())
            setattr(self, f, tuple(v))

    @classmethod
    def coerce(cls, debug: DebugOptions | Mapping[str, Any] | None) -> DebugOptions:
        if debug is None:
            return cls()
        if isinstance(debug, DebugOptions):
            return debug
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(debug) - known)
        if unknown:
            raise NpuccError(f"unknown debug option(s) {', '.join(unknown)}; known: "
                             + ", ".join(sorted(known)))
        return cls(**debug)

    def instruments(self) -> list[Instrument]:
        """The instruments these options ask for, in hook order (see instruments.py)."""
        from compiler.pipeline import get_pass_class

        for n in self.print_ir_before + self.print_ir_after:
            get_pass_class(n)  # an unknown name is an error, listing the known passes
        insts: list[Instrument] = []
        if self.print_pipeline:
            insts.append(PrintPipeline(self.print_ir_stream))
        if self.pass_limit is not None:
            insts.append(PassLimit(self.pass_limit))
        if self.crash_dir is not None:
            insts.append(CrashReproducer(self.crash_dir))
        if self.numeric_check or self.tolerance is not None:
            from compiler.numeric import NumericCheck

            insts.append(NumericCheck(self.sample_inputs, seed=self.seed,
                                      int_range=self.int_range, tolerance=self.tolerance,
                                      metric=self.tolerance_metric, stream=self.report_stream))
        before: bool | tuple[str, ...] = self.print_ir_before_all or self.print_ir_before
        after: bool | tuple[str, ...] = self.print_ir_after_all or self.print_ir_after
        if self.print_ir_after_change and not after:
            after = True
        if self.dump_dir is not None and not before and not after:
            after = True
        if before or after:
            insts.append(PrintIR(before, after, only_if_changed=self.print_ir_after_change,
                                 stream=self.print_ir_stream, dump_dir=self.dump_dir))
        if self.verify_roundtrip:
            insts.append(VerifyRoundtrip())
        if self.time_passes:
            insts.append(Timing(self.report_stream))
        return insts


def run_pipeline(graph: Graph, pipeline: Any, ctx: PassContext | None = None,
                 debug: DebugOptions | Mapping[str, Any] | None = None) -> Graph:
    """Run ``pipeline`` (text, passes, or pass classes) on ``graph`` with the debugging that
    ``debug`` asks for; returns the resulting graph (``graph`` may be modified in place)."""
    return PassManager.from_debug(pipeline, debug).run(graph, ctx)
