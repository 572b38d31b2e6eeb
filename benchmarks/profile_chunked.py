"""Step timeline of bench_prefix_cache's workload (b): where a long prompt's chunked prefill spends its time.

    python benchmarks/profile_chunked.py [--json out.json] [--tiny --device cpu]

Runs the workload (64 decode streams, one 16,000-token prompt arriving) a few times on one engine and records,
per step: wall time, tokens and sequences scheduled, the longest query, and the Triton kernels compiled during
it (a compile inside the window shows up as a step far slower than its neighbours). Prints the slowest steps of
each run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_many_adapters import TINY  # noqa: E402
from bench_prefix_cache import _tokens, build  # noqa: E402
from common import LLAMA_3_2_3B, synchronize, write_config  # noqa: E402


def _hook_compiles(events: list) -> None:
    try:
        import triton.knobs as knobs
    except ImportError:
        return

    def hook(*args, **kw):
        fn = kw.get("fn")
        events.append(getattr(fn, "name", None) or str(kw.get("repr", "?"))[:60])
        return None  # go on compiling

    knobs.runtime.jit_cache_hook = hook


def run(engine, args, vocab: int, warm_steps: int, tag: str, compiles: list) -> dict:
    from loraplex import SamplingParams

    stream = SamplingParams(temperature=0, max_tokens=args.stream_tokens, ignore_eos=True, detokenize=False)
    for i in range(args.streams):
        engine.add_request(f"{tag}-stream-{i}", {"prompt_token_ids": _tokens(args.stream_prompt_len, 50 + i, vocab)},
                           stream)
    launches: list = []
    launch = engine.runner.launch

    def traced(seqs, num_new, input_ids=None):
        launches.append((len(seqs), sum(num_new), max(num_new), input_ids is not None))
        return launch(seqs, num_new, input_ids)

    engine.runner.launch = traced
    timeline, step, done = [], 0, False
    try:
        while engine.has_unfinished_requests():
            if step == warm_steps:
                engine.add_request(f"{tag}-long", {"prompt_token_ids": _tokens(args.long_len, 7, vocab)},
                                   SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False))
            n_launch, n_comp = len(launches), len(compiles)
            synchronize()
            t0 = time.perf_counter()
            outs = engine.step()
            synchronize()
            ms = 1e3 * (time.perf_counter() - t0)
            timeline.append({"step": step, "ms": round(ms, 2), "launches": launches[n_launch:],
                             "compiled": compiles[n_comp:], "long_arrived": step >= warm_steps})
            step += 1
            if any(o.request_id == f"{tag}-long" and o.finished for o in outs):
                done = True
            if done:
                for rid in [r for r in engine.requests if r.startswith(f"{tag}-stream-")]:
                    engine.abort_request(rid)
    finally:
        engine.runner.launch = launch
    window = [t for t in timeline if t["long_arrived"]]
    return {"run": tag, "steps": len(timeline), "window_steps": len(window),
            "window_ms": round(sum(t["ms"] for t in window), 1),
            "slowest": sorted(window, key=lambda t: -t["ms"])[: args.top], "timeline": timeline}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--stream-prompt-len", type=int, default=128)
    ap.add_argument("--stream-tokens", type=int, default=2048)
    ap.add_argument("--long-len", type=int, default=16000)
    ap.add_argument("--chunk-budget", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3, help="the first warms up as bench_prefix_cache's does")
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.tiny:
        args.streams, args.stream_prompt_len, args.stream_tokens, args.long_len, args.chunk_budget = 4, 8, 64, 512, 64
    cfg = TINY if args.tiny else LLAMA_3_2_3B
    compiles: list = []
    _hook_compiles(compiles)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_config(Path(tmp) / "model", cfg)
        engine = build(model_dir, args, enable_chunked_prefill=True, enable_prefix_caching=False,
                       max_num_seqs=args.streams + 1, max_model_len=args.long_len + 64,
                       max_num_batched_tokens=args.chunk_budget)
        print(f"compiled while building: {len(compiles)}", flush=True)
        for r in range(args.runs):
            res = run(engine, args, cfg["vocab_size"], 2 if r == 0 else 32, f"r{r}", compiles)
            results.append(res)
            print(f"\nrun {r}: {res['window_steps']} steps, {res['window_ms']} ms from the long prompt's arrival")
            for t in res["slowest"]:
                print(f"  step {t['step']:>4} {t['ms']:>9.1f} ms  launches {t['launches']}  compiled {t['compiled']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
