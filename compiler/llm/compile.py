"""``compile_llm``: a decoder LLM -> an LLM package (prefill + decode graphs, one weights
file, a static KV cache) -> a loaded :class:`runtime.llm.LanguageModel`.

Both graphs go through the target's normal pass pipeline and the normal kernel codegen
(:func:`targets.tvm_codegen.build_library`). Weights are quantized once, on the spec, before
either graph exists (:mod:`compiler.llm.quantize`), so the two graphs read the very same
arrays; the package stores each distinct array once (identical arrays of the two kernel
libraries are found by content).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import NpuccError
from compiler.llm.graphs import (
    INPUT_IDS,
    INPUT_POS,
    OUTPUT_LOGITS,
    build_step_graph,
    cache_names,
    cache_types,
    check_decode_activations,
    check_kv_cache,
    kv_cache_layout,
)
from compiler.llm.hf_import import LlmSpec, load_transformers, spec_from_transformers
from compiler.llm.stream import ArrayFile, stream_spec, streamable

__all__ = ["compile_llm", "load_spec"]

ARCH = {"x86_64": "x86_64", "AMD64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def load_spec(source: Any, tokenizer: Any = None) -> LlmSpec:
    """A spec from a .gguf path, a transformers folder, a transformers model or a spec."""
    if isinstance(source, LlmSpec):
        return source
    if isinstance(source, str | os.PathLike):
        model, tok = load_transformers(source)
        return spec_from_transformers(model, tokenizer if tokenizer is not None else tok)
    if hasattr(source, "config") and hasattr(source, "state_dict"):
        return spec_from_transformers(source, tokenizer)
    raise NpuccError(f"cannot compile a {type(source).__name__} as an LLM: give a .gguf file, "
                     f"a transformers model folder or a transformers causal-LM model")


def compile_llm(source: Any, target: Any = "host", *, max_context: int = 2048, chunk: int = 32,
                quantize: str | None = None, kv_cache: str = "f32", calibration: Any = None,
                tokenizer: Any = None, output: str | os.PathLike | None = None,
                work_dir: str | os.PathLike | None = None, progress: Any = None,
                size_budget_mb: float | None = None, sensitivity: Any = None,
                decode_activations: str = "f32"):
    """Compile a decoder LLM and return the loaded model (``runtime.llm.LanguageModel``).

    ``source``: a GGUF file, a transformers folder or model (Llama, Qwen2, GPT-2 families).
    ``max_context``: positions of the static KV cache. ``chunk``: tokens per prefill call.
    ``quantize``: None (f32), ``"int8"``, ``"int4-g32"``, ``"int4-g128"``, optionally with
    ``"-gptq"`` (e.g. ``"int4-g32-gptq"``; GPTQ calibrates on ``calibration``: text, token
    ids, or by default a built-in English text). ``kv_cache``: the KV cache's type, ``"f32"``,
    ``"int8"`` (K and V int8, groups of 32: llama.cpp's q8_0) or ``"k4v8"`` (K int4 groups of
    64, V int8 groups of 128 or per head), quantized per token by the kernel that writes it
    (:mod:`compiler.llm.graphs`). ``output``: where the package is written
    (default: inside ``work_dir``); ``m.save(path)`` copies it elsewhere.
    ``size_budget_mb``: mixed precision, a scheme per matrix chosen to fit the weights in that
    many MB with the least predicted loss; ``quantize="seed-2b"``: the seed's fixed recipe
    (:mod:`compiler.llm.mixed`; ``sensitivity``: a measured ``Sensitivity`` to reuse). The plan
    is printed through ``progress`` and recorded in the manifest (``precision_plan``).
    ``decode_activations``: ``"f32"`` or ``"int8"``: the decode graph's int4 projections
    quantize their input to int8 per block of 32 and take integer dot products (llama.cpp's
    Q4 x Q8 dot; ``vpdpbusd`` where the CPU has AVX512-VNNI); the prefill graph keeps f32.
    """
    from compiler.llm.quantize import parse_scheme, quantize_spec
    from runtime.llm import LanguageModel
    from runtime.llm_package import LlmPackage

    say = progress or (lambda msg: None)
    if max_context < 1 or chunk < 1:
        raise NpuccError(f"max_context and chunk must be >= 1 (got {max_context}, {chunk})")
    from compiler.llm.mixed import is_mixed, quantize_mixed

    mixed = is_mixed(quantize, size_budget_mb)
    scheme = None if mixed else parse_scheme(quantize)
    kv_cache = check_kv_cache(kv_cache)
    act_bits = check_decode_activations(decode_activations)
    chunk = min(chunk, max_context)
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="npucc-llm-"))
    work.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="scratch-", dir=work))
    store = None
    try:
        if streamable(source) and not mixed and (scheme is None or scheme.method == "rtn"):
            say(f"streaming {source}: one block of rows read, quantized and written at a time")
            spec, store = stream_spec(source, scheme, scratch, tokenizer, say)
        else:
            spec = load_spec(source, tokenizer)
            if mixed:
                spec = quantize_mixed(spec, quantize, size_budget_mb, max_context=max_context,
                                      calibration=calibration, sensitivity=sensitivity,
                                      progress=say)
            elif scheme is not None:
                say(f"quantizing weights ({quantize})")
                spec = quantize_spec(spec, scheme, calibration=calibration,
                                     max_context=max_context, chunk=chunk)
        if spec.arch == "gpt2" and max_context > spec.max_positions:
            raise NpuccError(f"max_context {max_context} exceeds the model's "
                             f"{spec.max_positions} learned positions")
        path = _build(spec, target, max_context, chunk, kv_cache, work, scratch, output, say,
                      act_bits)
    except BaseException:
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if store is not None:
            store.close()
        shutil.rmtree(scratch, ignore_errors=True)
    package = LlmPackage.load(path, written_here=True)
    if work_dir is None:
        _own_work_folder(package, work, package_inside=output is None)
    return LanguageModel(package)


def _own_work_folder(package: Any, work: Path, package_inside: bool) -> None:
    """The temporary folder compile_llm made goes when it is no longer needed: at once if the
    package was written elsewhere (only the build folders are in it), else when the loaded
    ``package`` is garbage-collected (mapped weights and loaded libraries survive the unlink
    on POSIX; ``m.save(path)`` copies the folder while the model lives)."""
    if package_inside:
        weakref.finalize(package, shutil.rmtree, str(work), True)
    else:
        shutil.rmtree(work, ignore_errors=True)


def _build(spec: LlmSpec, target: Any, max_context: int, chunk: int, kv_cache: str, work: Path,
           scratch: Path, output: Any, say: Any, act_bits: int = 0) -> Path:
    """Both graphs compiled, their weights spilled to ``scratch`` graph by graph (one
    graph's packed weights in memory at a time), the package written; returns its path."""
    layout = kv_cache_layout(kv_cache, spec.head_dim)
    desc, cpu = _target(target)
    graphs, libs = {}, {}
    weights = ArrayFile(scratch / "weights.spill")
    blobs: dict[str, str] = {}   # content hash -> key
    for name, tokens in (("prefill", chunk), ("decode", 1)):
        say(f"{name}: building and compiling the {tokens}-token graph")
        g = _lower(build_step_graph(spec, tokens, max_context, kv_cache=layout,
                                    act_bits=act_bits if name == "decode" else 0), desc)
        from targets.tvm_codegen import build_library

        lib = build_library(g, cpu, work / name)
        graphs[name] = _plan(g, lib, tokens, cache_names(spec.layers, layout), weights, blobs)
        graphs[name]["library"] = f"{name}.so"
        libs[f"{name}.so"] = lib.lib_path
        del lib, g     # its packed weights are in the spill file now
    state = {n: {"shape": list(t.shape), "dtype": t.dtype}
             for n, t in cache_types(spec, max_context, layout).items()}
    manifest = {"target": {"name": desc.name, "tvm": cpu.tvm_target, "arch": cpu.arch},
                "model": {"name": spec.name, "arch": spec.arch, "vocab": spec.vocab,
                          "layers": spec.layers, "kv_heads": spec.kv_heads,
                          "head_dim": spec.head_dim, "max_context": max_context,
                          "chunk": chunk, "bos_id": spec.bos_id, "eos_ids": spec.eos_ids,
                          "chat_template": spec.chat_template,
                          "quantize": spec.scheme, "kv_cache": kv_cache,
                          "decode_activations": "int8" if act_bits else "f32",
                          "kv_cache_layout": layout.describe() if layout else None,
                          "precision_plan": spec.precision},
                "state": state, "graphs": graphs}
    from runtime.llm_package import write_llm_package

    path = Path(output) if output is not None else work / "model.npkg"
    say(f"writing {path}")
    try:
        return write_llm_package(path, manifest, weights, libs, spec.tokenizer_json)
    finally:
        weights.close()


def _target(target: Any):
    from targets.description import load_target

    desc = load_target(target)
    here = ARCH.get(platform.machine(), platform.machine())
    if desc.cpu.arch != here:
        raise NpuccError(f"compile_llm builds for the CPU it runs on ({here}); target "
                         f"{desc.name!r} is {desc.cpu.arch}")
    return desc, desc.cpu_info()


def _lower(graph, desc):
    from compiler.pass_base import PassContext
    from compiler.pass_manager import run_pipeline

    ctx = PassContext(target=desc)
    g = run_pipeline(graph, desc.default_pipeline, ctx=ctx)
    if any(n.device is None for n in g.nodes if n.op != "const"):
        g = run_pipeline(g, "partition", ctx=ctx)
    return g


def _plan(graph, lib, tokens: int, state_names: list[str], weights: dict[str, np.ndarray],
          blobs: dict[str, str]) -> dict[str, Any]:
    """The graph's entry of llm.json: steps, tensor bindings and its arena plan."""
    from runtime.memory_pool import PlanStep, PlanTensor, plan_memory

    types = {v.name: v.type for v in graph.values()}
    state = dict(zip([v.name for v in graph.inputs[2:]], state_names, strict=True))
    state.update(zip([v.name for v in graph.outputs[1:]], state_names, strict=True))
    io = {graph.inputs[0].name: INPUT_IDS, graph.inputs[1].name: INPUT_POS,
          graph.outputs[0].name: OUTPUT_LOGITS}
    tensors: dict[str, dict[str, Any]] = {}
    for s in lib.steps:
        for a in s.args:
            if a in tensors:
                continue
            if a in lib.weights:
                arr = np.ascontiguousarray(lib.weights[a])
                digest = hashlib.sha256(arr).hexdigest() + str(arr.dtype) \
                    + str(arr.shape)
                if digest not in blobs:
                    key = a if a not in weights else f"{a}.{len(weights)}"
                    blobs[digest], weights[key] = key, arr
                tensors[a] = {"shape": list(arr.shape), "dtype": _short(arr.dtype),
                              "bind": "weight", "key": blobs[digest]}
            else:
                t = types[a]
                tensors[a] = {"shape": list(t.shape), "dtype": t.dtype,
                              "bind": "state" if a in state else "arena"}
                if a in state:
                    tensors[a]["key"] = state[a]
    # a reshape of an arena tensor is a view of the same bytes: no kernel call, one buffer
    alias: dict[str, str] = {}
    for s in lib.steps:
        src = s.inputs[0] if s.op == "reshape" and len(s.inputs) == 1 else None
        if src is not None and tensors[src]["bind"] == "arena" and src not in io \
                and s.outputs[0] not in io:
            alias[s.outputs[0]] = alias.get(src, src)
    steps_kept = [s for s in lib.steps if not (s.op == "reshape" and s.outputs[0] in alias)]
    arena = [n for n, t in tensors.items() if t["bind"] == "arena" and n not in alias]
    inputs = (graph.inputs[0].name, graph.inputs[1].name)

    def root(names):
        return tuple(dict.fromkeys(alias.get(x, x) for x in names if alias.get(x, x) in arena))

    plan = plan_memory([PlanTensor(n, _nbytes(tensors[n]), "input" if n in inputs else
                                   "output" if n in io else "intermediate") for n in arena],
                       [PlanStep(root((*s.inputs, *s.extra_consts)), root(s.outputs))
                        for s in steps_kept])
    plan.check()
    for n, t in tensors.items():
        if t["bind"] == "arena":
            t["offset"] = plan.offsets[alias.get(n, n)]
    # the runtime finds the interface under fixed names
    renamed = {old: new for old, new in io.items()}
    steps = [{"kernel": s.symbol, "node": s.node, "op": s.op,
              "args": [renamed.get(a, a) for a in s.args]} for s in steps_kept]
    tensors = {renamed.get(n, n): t for n, t in tensors.items()}
    return {"tokens": tokens, "arena_bytes": plan.arena_bytes, "steps": steps,
            "tensors": tensors}


def _short(dtype: Any) -> str:
    from runtime.llm_package import dtype_name

    return dtype_name(dtype)


def _nbytes(t: Mapping[str, Any]) -> int:
    from runtime.llm_package import tensor_nbytes

    return tensor_nbytes(t["shape"], t["dtype"])
