"""Hardware target descriptions: one validated TOML file per target (schema: targets/README.md).

``load_target("kirin990")`` finds a built-in description (a ``.toml`` file in this folder);
``load_target("path/to/board.toml")`` reads any file. The result is a tree of frozen
dataclasses; nothing here imports TVM until :meth:`CpuDesc.tvm` is called.

Every problem in a file raises :class:`TargetError` naming the file, the key (``[npu.ops]
conv2d.max_kernel``) and what would be accepted: a misspelt key gets the closest valid key
(difflib) and the list of valid keys, an unknown op name the closest registered ops.
"""

from __future__ import annotations

import difflib
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from compiler.errors import NpuccError
from compiler.ir.registry import all_ops
from compiler.ir.types import DTYPES
from targets.cost_desc import CostDesc, parse_cost

__all__ = ["TargetError", "TargetDescription", "CpuDesc", "Cluster", "NpuDesc", "NpuOp",
           "MemoryDesc", "load_target", "list_targets", "TARGETS_DIR"]

TARGETS_DIR = Path(__file__).resolve().parent

ARCHES = ("x86_64", "aarch64")
COMPUTE_DTYPES = ("fp16", "int8")
LAYOUTS = ("NCHW", "NHWC")
# compute dtype -> IR dtypes the NPU holds tensors in
_NPU_TENSOR_DTYPE = {"fp16": "f16", "int8": "i8"}


class TargetError(NpuccError):
    """A target description is missing, malformed or names something that does not exist.

    ``file`` is the description's path (or name), ``key`` the dotted key at fault.
    """

    def __init__(self, message: str, file: str | None = None, key: str | None = None):
        self.file, self.key, self.detail = file, key, message
        where = file or "<target>"
        if key:
            where += f": {key}"
        super().__init__(f"{where}: {message}")


# -- the description --------------------------------------------------------------------
@dataclass(frozen=True)
class Cluster:
    """A group of identical CPU cores."""

    name: str
    cores: int
    core: str              # e.g. "cortex-a76"
    ghz: float
    fma_pipes: int = 1     # SIMD FMA pipelines per core (A76: 2, A55: 1)


@dataclass(frozen=True)
class CpuDesc:
    tvm_target: Mapping[str, Any]  # read-only; tvm_target_dict() gives a copy for TVM
    arch: str
    simd_bits: int
    clusters: tuple[Cluster, ...]
    threads: int                   # threads a kernel's parallel loops use
    cross_compiler: str | None = None
    fp16_simd: bool = False        # half-precision vector arithmetic (ARMv8.2 fullfp16)
    int8_dot: bool = False         # 8-bit dot-product instructions (sdot / vpdpbusd)
    node_overhead_us: float = 2.0  # fixed cost per kernel call
    efficiency: float = 1.0        # fraction of peak FLOP/s the cost model assumes
    l1d_kb: int | None = None
    l2_kb: int | None = None
    file: str = field(default="", compare=False, repr=False)
    detected: Any = field(default=None, compare=False, repr=False)  # targets.host.HostCpu

    def tvm_target_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dict(self.tvm_target)))

    def tvm(self) -> Any:
        """The ``tvm.target.Target`` (built on first use); TVM's complaints become ours."""
        key = json.dumps(dict(self.tvm_target), sort_keys=True)
        if key not in _TVM_TARGETS:
            try:
                import tvm

                _TVM_TARGETS[key] = tvm.target.Target(self.tvm_target_dict())
            except Exception as e:  # TVM raises its own error types (ValueError, TVMError...)
                msg = str(e).strip().splitlines()
                raise TargetError(f"TVM refuses this target: {msg[-1] if msg else e!r}",
                                  self.file, "[cpu] tvm_target") from None
        return _TVM_TARGETS[key]

    def fastest_cores(self, n: int | None = None) -> list[Cluster]:
        """``n`` (default ``threads``) cores, fastest first, each as a one-core Cluster."""
        n = self.threads if n is None else n
        cores = [c for c in sorted(self.clusters, key=lambda c: -c.ghz * c.fma_pipes)
                 for _ in range(c.cores)]
        return [Cluster(c.name, 1, c.core, c.ghz, c.fma_pipes) for c in cores[:n]]

    @property
    def total_cores(self) -> int:
        return sum(c.cores for c in self.clusters)


_TVM_TARGETS: dict[str, Any] = {}


@dataclass(frozen=True)
class NpuOp:
    """One op the NPU accepts, with its limits (None: no limit)."""

    op: str
    dtypes: tuple[str, ...]
    max_rank: int
    max_batch: int | None = None     # dim 0 of rank >= 3 operands and results
    max_channels: int | None = None  # channel axis (by ``layout`` attr) or last axis
    max_kernel: int | None = None    # kernel height and width
    max_stride: int | None = None
    max_dilation: int | None = None
    const_inputs: tuple[int, ...] = ()  # operand positions that must be constants
    attrs: Mapping[str, tuple[Any, ...]] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class NpuDesc:
    name: str
    compute_dtype: str            # "fp16" | "int8": what f32 work is computed in
    layout: str                   # preferred activation layout
    channel_align: int            # channels are padded to a multiple of this
    fp16_tops: float              # peak, 1 MAC = 2 ops
    int8_tops: float
    buffer_bytes: int             # on-chip buffer
    ops: Mapping[str, NpuOp]
    node_overhead_us: float = 5.0    # per op inside a region
    region_overhead_us: float = 50.0  # per launch of a region (sync, scheduling)
    efficiency: float = 1.0

    @property
    def tensor_dtype(self) -> str:
        """The IR dtype float tensors have on the NPU ("f16" for an fp16 NPU)."""
        return _NPU_TENSOR_DTYPE[self.compute_dtype]

    def supports(self, op: str) -> bool:
        return op in self.ops


@dataclass(frozen=True)
class MemoryDesc:
    dram_gbps: float
    budget_mb: float

    @property
    def budget_bytes(self) -> int:
        return int(self.budget_mb * 2**20)


@dataclass(frozen=True)
class TargetDescription:
    name: str
    file: str
    description: str
    cpu: CpuDesc
    npu: NpuDesc | None
    memory: MemoryDesc
    default_pipeline: str
    cost: CostDesc | None = None   # the [cost] section (targets/cost_desc.py); always set by
                                   # load_target, defaults = the plain roofline

    @property
    def has_npu(self) -> bool:
        return self.npu is not None

    def cpu_info(self) -> Any:
        """The kernel builders' view of the CPU (``targets.kernels.base.CpuInfo``)."""
        from targets.host import cpu_info_for

        extra = {}
        if self.cpu.l1d_kb:
            extra["l1d_bytes"] = self.cpu.l1d_kb * 1024
        if self.cpu.l2_kb:
            extra["l2_bytes"] = self.cpu.l2_kb * 1024
        return cpu_info_for(self.cpu.tvm_target_dict(), arch=self.cpu.arch,
                            num_cores=self.cpu.threads, **extra)


# -- reading ----------------------------------------------------------------------------
def list_targets() -> list[str]:
    """Names of the built-in targets (the .toml files next to this module)."""
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def load_target(name_or_path: str | Path | TargetDescription,
                cpu: str | None = None) -> TargetDescription:
    """A built-in target by name (``"kirin990"``) or any description file by path.

    ``cpu`` replaces a detected CPU (``[cpu] detect``, as in ``host``) by a named one: an LLVM
    CPU name or portable level such as ``"x86-64-v3"``. Targets that describe their CPU in
    full ignore it."""
    if isinstance(name_or_path, TargetDescription):
        return name_or_path
    text = str(name_or_path)
    path = Path(text)
    looks_like_path = (isinstance(name_or_path, Path) or text.endswith(".toml")
                       or "/" in text or "\\" in text)
    if not looks_like_path:
        path = TARGETS_DIR / f"{text}.toml"
        if not path.is_file():
            names = list_targets()
            close = difflib.get_close_matches(text, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TargetError(f"no built-in target {text!r}; {hint}built-in targets: "
                              f"{', '.join(names)} (or give the path of a .toml file)")
    if not path.is_file():
        raise TargetError("no such file", str(path))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise TargetError(f"not valid TOML: {e}", str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise TargetError(f"cannot read: {e}", str(path)) from None
    return _parse(data, str(path), default_name=path.stem, cpu=cpu)


def _parse(data: dict[str, Any], file: str, default_name: str,
           cpu: str | None = None) -> TargetDescription:
    r = _Reader(file)
    top = r.table(data, "", {"name": str, "description": str, "cpu": dict, "npu": dict,
                             "memory": dict, "pipeline": dict, "cost": dict},
                  required=("cpu", "memory"))
    cpu = (_detected_cpu(r, top["cpu"], cpu) if isinstance(top["cpu"], dict)
           and "detect" in top["cpu"] else _parse_cpu(r, top["cpu"]))
    npu = _parse_npu(r, top["npu"]) if "npu" in top else None
    mem = r.table(top["memory"], "memory", {"dram_gbps": float, "budget_mb": float},
                  required=("dram_gbps", "budget_mb"))
    for k in ("dram_gbps", "budget_mb"):
        r.positive(mem[k], f"[memory] {k}")
    pipe = r.table(top.get("pipeline", {}), "pipeline", {"default": str})
    cost = parse_cost(r, top.get("cost"), cpu, npu, top["cpu"], top.get("npu"),
                      Path(file).parent)
    return TargetDescription(
        name=top.get("name", default_name), file=file, description=top.get("description", ""),
        cpu=cpu, npu=npu, memory=MemoryDesc(mem["dram_gbps"], mem["budget_mb"]),
        default_pipeline=pipe.get("default", ""), cost=cost)


def _parse_cpu(r: _Reader, raw: dict[str, Any]) -> CpuDesc:
    t = r.table(raw, "cpu", {
        "tvm_target": dict, "arch": str, "simd_bits": int, "clusters": list, "threads": int,
        "cross_compiler": str, "fp16_simd": bool, "int8_dot": bool, "node_overhead_us": float,
        "efficiency": float, "l1d_kb": int, "l2_kb": int,
    }, required=("tvm_target", "arch", "simd_bits", "clusters", "threads"))
    r.choice(t["arch"], ARCHES, "[cpu] arch")
    if t["simd_bits"] not in (128, 256, 512):
        r.fail("[cpu] simd_bits", f"{t['simd_bits']} is not a vector width; valid: 128, 256, 512")
    tvm_t = t["tvm_target"]
    if tvm_t.get("kind") != "llvm":
        r.fail("[cpu] tvm_target", f'kind must be "llvm" (got {tvm_t.get("kind")!r})')
    triple = tvm_t.get("mtriple", "")
    if t["arch"] == "aarch64" and not str(triple).startswith("aarch64"):
        r.fail("[cpu] tvm_target.mtriple", f"arch is aarch64, so mtriple must start with "
               f"'aarch64' (e.g. 'aarch64-linux-android'; TVM does not treat 'arm64-...' as "
               f"AArch64), got {triple!r}")
    clusters = []
    for i, c in enumerate(t["clusters"]):
        key = f"cpu.clusters[{i}]"
        if not isinstance(c, dict):
            r.fail(f"[{key}]", f"must be a table {{name, cores, core, ghz}}, got {c!r}")
        c = r.table(c, key, {"name": str, "cores": int, "core": str, "ghz": float,
                             "fma_pipes": int}, required=("name", "cores", "core", "ghz"))
        for k in ("cores", "ghz"):
            r.positive(c[k], f"[{key}] {k}")
        clusters.append(Cluster(c["name"], c["cores"], c["core"], c["ghz"],
                                c.get("fma_pipes", 1)))
    if not clusters:
        r.fail("[cpu] clusters", "needs at least one cluster")
    total = sum(c.cores for c in clusters)
    if not 1 <= t["threads"] <= total:
        r.fail("[cpu] threads", f"{t['threads']} is not in 1..{total} (the cores listed)")
    for k in ("node_overhead_us", "efficiency"):
        if k in t:
            r.positive(t[k], f"[cpu] {k}", allow_zero=k != "efficiency")
    return CpuDesc(
        tvm_target=MappingProxyType(dict(tvm_t)), arch=t["arch"], simd_bits=t["simd_bits"],
        clusters=tuple(clusters), threads=t["threads"], cross_compiler=t.get("cross_compiler"),
        fp16_simd=t.get("fp16_simd", False), int8_dot=t.get("int8_dot", False),
        node_overhead_us=t.get("node_overhead_us", 2.0), efficiency=t.get("efficiency", 1.0),
        l1d_kb=t.get("l1d_kb"), l2_kb=t.get("l2_kb"), file=r.file)


def _detected_cpu(r: _Reader, raw: dict[str, Any], override: str | None) -> CpuDesc:
    """``[cpu] detect = "native"`` (or a level name): the CPU table filled by detection
    (``targets.host``); only what cannot be detected may be written beside it."""
    from targets.host import detect_host

    t = r.table(raw, "cpu", {"detect": str, "threads": int, "node_overhead_us": float,
                             "efficiency": float, "fma_pipes": int}, required=("detect",))
    level = override or (None if t["detect"] == "native" else t["detect"])
    try:
        host = detect_host(level)
    except NpuccError as e:
        r.fail("[cpu] detect", str(e))
    threads = t.get("threads", host.cores)
    if not 1 <= threads <= host.cores:
        r.fail("[cpu] threads", f"{threads} is not in 1..{host.cores} (the usable cores)")
    for k in ("node_overhead_us", "efficiency"):
        if k in t:
            r.positive(t[k], f"[cpu] {k}", allow_zero=k != "efficiency")
    info = host.cpu_info()
    # a clock neither cpufreq nor /proc/cpuinfo gives: ASSUMED 2 GHz (cost model only)
    cluster = Cluster("host", host.cores, host.mcpu, host.ghz or 2.0, t.get("fma_pipes", 1))
    return CpuDesc(
        tvm_target=MappingProxyType({**host.tvm_target(), "num-cores": threads}),
        arch=host.arch, simd_bits=info.simd_bits, clusters=(cluster,), threads=threads,
        fp16_simd=info.fp16_arith, int8_dot=info.int8_dot,
        node_overhead_us=t.get("node_overhead_us", 2.0), efficiency=t.get("efficiency", 1.0),
        l1d_kb=(host.l1d_bytes or 0) // 1024 or None, l2_kb=(host.l2_bytes or 0) // 1024 or None,
        file=r.file, detected=host)


_OP_KEYS: dict[str, type] = {
    "dtypes": list, "max_rank": int, "max_batch": int, "max_channels": int, "max_kernel": int,
    "max_stride": int, "max_dilation": int, "const_inputs": list, "attrs": dict,
}


def _parse_npu(r: _Reader, raw: dict[str, Any]) -> NpuDesc:
    t = r.table(raw, "npu", {
        "name": str, "compute_dtype": str, "layout": str, "channel_align": int,
        "fp16_tops": float, "int8_tops": float, "buffer_bytes": int, "dtypes": list,
        "max_rank": int, "max_batch": int, "node_overhead_us": float,
        "region_overhead_us": float, "efficiency": float, "ops": dict,
    }, required=("name", "compute_dtype", "layout", "channel_align", "fp16_tops", "int8_tops",
                 "buffer_bytes", "dtypes", "ops"))
    r.choice(t["compute_dtype"], COMPUTE_DTYPES, "[npu] compute_dtype")
    r.choice(t["layout"], LAYOUTS, "[npu] layout")
    for k in ("channel_align", "buffer_bytes"):
        r.positive(t[k], f"[npu] {k}")
    for k in ("fp16_tops", "int8_tops", "node_overhead_us", "region_overhead_us"):
        if k in t:
            r.positive(t[k], f"[npu] {k}", allow_zero=True)
    if "efficiency" in t:
        r.positive(t["efficiency"], "[npu] efficiency")
    dtypes = r.dtypes(t["dtypes"], "[npu] dtypes")
    max_rank = t.get("max_rank", 4)
    max_batch = t.get("max_batch")
    ops = {}

    registered = all_ops()
    valid_ops = sorted(k for k in registered if k != "const")
    for op, spec in t["ops"].items():
        key = f"[npu.ops] {op}"
        if op not in registered or op == "const":
            close = difflib.get_close_matches(op, valid_ops, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            r.fail(key, f"{op!r} is not a registered op; {hint}valid ops: {', '.join(valid_ops)}")
        if not isinstance(spec, dict):
            r.fail(key, f"must be a table of limits (e.g. {op} = {{}}), got {spec!r}")
        s = r.table(spec, f"npu.ops.{op}", _OP_KEYS)
        attrs = {}
        schema = registered[op].attrs
        for a, allowed in s.get("attrs", {}).items():
            akey = f"[npu.ops] {op}.attrs.{a}"
            if a not in schema:
                r.unknown_key(a, list(schema), akey, what=f"attribute of {op}")
            if not isinstance(allowed, list):
                r.fail(akey, f"must be a list of allowed values, got {allowed!r}")
            choices = schema[a].choices
            if choices is not None:
                bad = [v for v in allowed if v not in choices]
                if bad:
                    r.fail(akey, f"{', '.join(map(repr, bad))} not a value of {op}.{a}; "
                           f"valid: {', '.join(map(repr, choices))}")
            attrs[a] = tuple(allowed)
        const_inputs = s.get("const_inputs", [])
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                   for i in const_inputs):
            r.fail(f"[npu.ops] {op}.const_inputs", "must be a list of operand positions (>= 0)")
        for k in ("max_rank", "max_batch", "max_channels", "max_kernel", "max_stride",
                  "max_dilation"):
            if k in s:
                r.positive(s[k], f"[npu.ops] {op}.{k}")
        ops[op] = NpuOp(
            op=op,
            dtypes=r.dtypes(s["dtypes"], f"[npu.ops] {op}.dtypes") if "dtypes" in s else dtypes,
            max_rank=s.get("max_rank", max_rank), max_batch=s.get("max_batch", max_batch),
            max_channels=s.get("max_channels"), max_kernel=s.get("max_kernel"),
            max_stride=s.get("max_stride"), max_dilation=s.get("max_dilation"),
            const_inputs=tuple(const_inputs), attrs=MappingProxyType(attrs))
    return NpuDesc(
        name=t["name"], compute_dtype=t["compute_dtype"], layout=t["layout"],
        channel_align=t["channel_align"], fp16_tops=t["fp16_tops"], int8_tops=t["int8_tops"],
        buffer_bytes=t["buffer_bytes"], ops=MappingProxyType(ops),
        node_overhead_us=t.get("node_overhead_us", 5.0),
        region_overhead_us=t.get("region_overhead_us", 50.0),
        efficiency=t.get("efficiency", 1.0))


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "a table"}


class _Reader:
    """Checks tables against a {key: type} schema; every failure names file and key."""

    def __init__(self, file: str):
        self.file = file

    def fail(self, key: str, message: str) -> None:
        raise TargetError(message, self.file, key)

    def unknown_key(self, key: str, valid: list[str], where: str, what: str = "key") -> None:
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        self.fail(where, f"unknown {what} {key!r}; {hint}valid: {', '.join(valid) or 'none'}")

    def table(self, raw: Any, section: str, schema: dict[str, type],
              required: tuple[str, ...] = ()) -> dict[str, Any]:
        name = f"[{section}]" if section else "top level"
        if not isinstance(raw, dict):
            self.fail(name, f"must be a table, got {raw!r}")
        for key, value in raw.items():
            where = f"[{section}] {key}" if section else key
            if key not in schema:
                self.unknown_key(key, list(schema), where)
            want = schema[key]
            ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
            if want is float:
                ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok:
                self.fail(where, f"must be {_TYPE_NAMES[want]}, got {type(value).__name__} "
                          f"{value!r}")
        missing = [k for k in required if k not in raw]
        if missing:
            self.fail(name, f"missing required key(s): {', '.join(missing)}")
        return {k: float(v) if schema[k] is float else v for k, v in raw.items()}

    def choice(self, value: str, choices: tuple[str, ...], key: str) -> None:
        if value not in choices:
            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            self.fail(key, f"{value!r} is not valid; {hint}valid: {', '.join(choices)}")

    def positive(self, value: float, key: str, allow_zero: bool = False) -> None:
        if not (math.isfinite(value) and (value >= 0 if allow_zero else value > 0)):
            self.fail(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

    def dtypes(self, values: list[Any], key: str) -> tuple[str, ...]:

        for v in values:
            if not isinstance(v, str) or v not in DTYPES:
                close = difflib.get_close_matches(str(v), list(DTYPES), n=1, cutoff=0.5)
                hint = f"did you mean {close[0]!r}? " if close else ""
                self.fail(key, f"{v!r} is not a dtype; {hint}valid: {', '.join(DTYPES)}")
        if not values:
            self.fail(key, "needs at least one dtype")
        return tuple(values)
