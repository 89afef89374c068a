"""``npucc compile-llm`` and ``npucc generate``."""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["configure_compile_llm", "configure_generate"]


def configure_compile_llm(p: argparse.ArgumentParser) -> None:
    from compiler.llm.graphs import KV_CACHES
    from compiler.llm.mixed import PRESETS
    from compiler.llm.quantize import SCHEMES
    from compiler.llm.sparse import SPARSE_SCHEMES

    p.add_argument("model", help="a .gguf file or a transformers model folder")
    p.add_argument("-t", "--target", default="host", help="target name or .toml (default host)")
    p.add_argument("-o", "--output", required=True, help="the package directory to write")
    p.add_argument("--quantize", default=None, metavar="SCHEME",
                   help=f"weight-only quantization: {', '.join(SCHEMES)}; 2:4 sparse int4: "
                        f"{', '.join(SPARSE_SCHEMES)}; or a mixed-precision preset: "
                        f"{', '.join(PRESETS)} (default: f32)")
    p.add_argument("--size-budget-mb", type=float, default=None, metavar="N",
                   help="mixed precision: bits per matrix (8/4/3/2) chosen by sensitivity to "
                        "fit the package's weights in N MB (10^6 bytes); prints the plan")
    p.add_argument("--kv-cache", default="f32", metavar="TYPE",
                   help=f"KV cache type: {', '.join(KV_CACHES)} (int8: K and V int8 groups of "
                        f"32, like llama.cpp's --cache-type-k/v q8_0; k4v8: K int4 groups of 64, "
                        f"V int8 groups of 128 or per head; default f32)")
    p.add_argument("--decode-activations", default="f32", choices=["f32", "int8"],
                   help="int8: the decode step's int4 projections quantize their input to "
                        "int8 per block of 32 and take integer dot products (llama.cpp's Q4 x "
                        "Q8; VNNI); default f32")
    p.add_argument("--max-context", type=int, default=2048,
                   help="positions of the static KV cache (default 2048)")
    p.add_argument("--chunk", type=int, default=32, help="tokens per prefill call (default 32)")
    p.add_argument("--calibration", default=None, metavar="TEXT_FILE",
                   help="GPTQ / sensitivity calibration text (default: built-in English text)")
    p.set_defaults(func=_cmd_compile_llm)


def _cmd_compile_llm(args: argparse.Namespace) -> int:
    from compiler.llm.compile import compile_llm

    calib = None
    if args.calibration:
        with open(args.calibration, encoding="utf-8") as f:
            calib = f.read()
    t0 = time.perf_counter()
    m = compile_llm(args.model, args.target, max_context=args.max_context, chunk=args.chunk,
                    quantize=args.quantize, kv_cache=args.kv_cache, calibration=calib,
                    size_budget_mb=args.size_budget_mb,
                    decode_activations=args.decode_activations, output=args.output,
                    progress=lambda msg: print(f"  {msg}", file=sys.stderr))
    s = m.stats()
    print(f"wrote {args.output}: {s['package_bytes'] / 2**20:.1f} MiB "
          f"(weights {s['weight_bytes'] / 2**20:.1f} MiB, KV cache "
          f"{s['kv_cache_bytes'] / 2**20:.1f} MiB at run time ({args.kv_cache}), max_context "
          f"{s['max_context']}) "
          f"in {time.perf_counter() - t0:.0f} s")
    from compiler.llm.estimate import estimate_decode

    for target in dict.fromkeys([args.target, "kirin990"]):
        e = estimate_decode(m, target)
        print(f"estimated decode on {e['target']}: {e['summary']} (weights "
              f"{e['weights_ms']:.2f} ms + KV cache {e['kv_ms']:.2f} ms + launches "
              f"{e['fixed_ms']:.2f} ms)")
    return 0


def configure_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("package", help="an LLM package (npucc compile-llm)")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("-n", "--max-new-tokens", type=int, default=64)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the package's chat template (default on when it has one)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument("--truncate", action="store_true",
                   help="keep the last max_context tokens of a too-long prompt")
    p.add_argument("--trusted-key", action="append", default=None, metavar="PUB",
                   help="run only if the package is signed by this public key (repeatable; "
                   "default: NPUCC_TRUSTED_KEYS); sign with `npucc sign PKG --key KEY`")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    from runtime.llm import load

    m = load(args.package, trusted_keys=args.trusted_key)
    chat = args.chat and m.text.chat_template is not None
    out = sys.stdout
    try:
        for piece in m.stream(args.prompt, args.max_new_tokens, chat=chat,
                              temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, stop=args.stop,
                              truncate=args.truncate):
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        out.write("\n")
        st = m.last_stats
        print(f"[interrupted after {st.new_tokens} tokens]", file=sys.stderr)
        return 130
    st = m.last_stats
    out.write("\n")
    print(f"[{st.prompt_tokens} prompt tokens at {st.prefill_tokens_per_second:.1f} tok/s, "
          f"{st.new_tokens} new tokens at {st.decode_tokens_per_second:.1f} tok/s, "
          f"stop: {st.stop_reason}]", file=sys.stderr)
    return 0
