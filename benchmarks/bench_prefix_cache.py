"""Prefix caching and chunked prefill (issue #17), offline engine, one run.

(a) Shared prefixes: 8 adapters, each with its own 1,024-token system prompt; 64 requests per adapter (the system
    prompt + 128 tokens of their own, 128 new tokens, ignore_eos), submitted at once, adapters interleaved.
    Throughput and time to first token (p50/p99) with prefix caching on and off (chunked prefill on in both).
(b) A long prompt among decodes: 64 streams decode; one 16,000-token prompt arrives. Inter-token latency of the
    running streams (p50/p99/max), and its own time to first token, with
    chunked prefill on (a 2,048-token budget) and off (the budget must then hold the whole prompt); the window
    runs from its arrival to its 8th token.

Llama-3.2-3B's shape with random weights (bf16), rank-16 adapters on all seven projections. Prints a table and
writes JSON.
    python benchmarks/bench_prefix_cache.py --json out.json
    python benchmarks/bench_prefix_cache.py --tiny --device cpu          (smoke run, seconds)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_many_adapters import TINY, write_adapters  # noqa: E402
from common import LLAMA_3_2_3B, synchronize, write_config  # noqa: E402


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def build(model_dir: Path, args, **kw):
    from loraplex import EngineArgs, LLMEngine

    return LLMEngine.from_engine_args(EngineArgs(
        model=str(model_dir), load_format="dummy", skip_tokenizer_init=True, device=args.device,
        dtype="bfloat16" if args.device == "cuda" else "float32", seed=0, **kw))


def _free() -> None:
    """Give the last engine's memory back (the caller dropped its reference first): the next one sizes its KV
    cache from what is free."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _tokens(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---------------------------------------------------------------------------------------------- (a)
def shared_prefix_run(engine, loras, args, vocab: int, seed: int) -> dict:
    """All requests at once; throughput over the whole run, TTFT from submission to the step that returned the
    request's first token."""
    from loraplex import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=args.gen_len, ignore_eos=True, detokenize=False)
    systems = [_tokens(args.system_len, 1000 + a, vocab) for a in range(len(loras))]
    jobs = []
    for i in range(args.requests_per_adapter * len(loras)):
        a = i % len(loras)  # interleaved: every adapter's traffic arrives together
        jobs.append((f"s{seed}-{i}", systems[a] + _tokens(args.own_len, seed * 100_000 + i, vocab), loras[a]))
    before = dict(engine.stats)
    synchronize()
    start = time.perf_counter()
    arrival, first = {}, {}
    for rid, ids, lora in jobs:
        engine.add_request(rid, {"prompt_token_ids": ids}, params, lora_request=lora)
        arrival[rid] = time.perf_counter()
    tokens = errors = steps = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        steps += 1
        for o in outs:
            if o.request_id not in first and o.outputs[0].token_ids:
                first[o.request_id] = now
            if o.finished:
                tokens += sum(len(c.token_ids) for c in o.outputs)
                errors += o.error is not None
    synchronize()
    seconds = time.perf_counter() - start
    ttft = [first[r] - arrival[r] for r in first]
    queries = engine.stats["num_prefix_cache_queries"] - before["num_prefix_cache_queries"]
    hits = engine.stats["num_prefix_cache_hits"] - before["num_prefix_cache_hits"]
    return {"requests": len(jobs), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "errors": errors, "steps": steps, "ttft_p50_ms": 1e3 * _pct(ttft, 0.5),
            "ttft_p99_ms": 1e3 * _pct(ttft, 0.99),
            "prefix_cache_hit_rate": hits / queries if queries else 0.0,
            "prompt_tokens_computed": sum(len(ids) for _, ids, _ in jobs) - hits}


def bench_shared_prefix(model_dir: Path, adapter_dirs: list[Path], args, vocab: int) -> list[dict]:
    from loraplex.lora.request import LoRARequest

    rows = []
    for caching in (False, True):
        engine = build(model_dir, args, enable_prefix_caching=caching, enable_chunked_prefill=True,
                       max_num_seqs=args.max_num_seqs, max_model_len=args.system_len + args.own_len + args.gen_len,
                       max_num_batched_tokens=args.max_num_batched_tokens, enable_lora=True,
                       max_loras=args.num_adapters, max_lora_rank=args.rank, max_cpu_loras=args.num_adapters)
        loras = [LoRARequest(f"a{i}", i + 1, str(d)) for i, d in enumerate(adapter_dirs)]
        for lora in loras:
            engine.add_lora(lora)
        # Warm-up (kernels compiled, adapters uploaded) on other prompts; then nothing of them stays cached.
        warm = argparse.Namespace(**{**vars(args), "requests_per_adapter": 2})
        shared_prefix_run(engine, loras, warm, vocab, seed=1)
        if not engine.reset_prefix_cache():
            raise RuntimeError("the warm-up left blocks in use")
        res = shared_prefix_run(engine, loras, args, vocab, seed=2)
        rows.append({"workload": f"shared prefix, caching {'on' if caching else 'off'}", **res})
        print(json.dumps(rows[-1]), flush=True)
        del engine
        _free()
    return rows


# ---------------------------------------------------------------------------------------------- (b)
def long_prompt_run(engine, args, vocab: int) -> dict:
    """Streams decode; after warm_steps a long prompt (8 new tokens) arrives. ITL of the streams from its arrival
    to its last token: its prefill (one step, or its chunks) and its 7 decode steps."""
    from loraplex import SamplingParams

    stream = SamplingParams(temperature=0, max_tokens=args.stream_tokens, ignore_eos=True, detokenize=False)
    for i in range(args.streams):
        engine.add_request(f"stream-{i}", {"prompt_token_ids": _tokens(args.stream_prompt_len, 50 + i, vocab)},
                           stream)
    last: dict[str, float] = {}
    gaps: list[float] = []
    step, arrived, long_first, long_done, long_out = 0, None, None, None, None
    while engine.has_unfinished_requests():
        if step == args.warm_steps:
            engine.add_request("long", {"prompt_token_ids": _tokens(args.long_len, 7, vocab)},
                               SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False))
            synchronize()
            arrived = time.perf_counter()
        in_window = arrived is not None and long_done is None  # from its arrival to its last token
        outs = engine.step()
        now = time.perf_counter()
        step += 1
        for o in outs:
            if o.request_id == "long":
                if long_first is None and o.outputs[0].token_ids:
                    long_first = now
                if o.finished:
                    long_done, long_out = now, o
                continue
            if o.request_id in last and in_window:
                gaps.append(now - last[o.request_id])
            last[o.request_id] = now
        if long_done is not None:
            for rid in [r for r in engine.requests if r.startswith("stream-")]:
                engine.abort_request(rid)  # the window is over
    return {"streams": args.streams, "long_prompt": args.long_len, "itl_samples": len(gaps),
            "itl_p50_ms": 1e3 * _pct(gaps, 0.5) if gaps else None,
            "itl_p99_ms": 1e3 * _pct(gaps, 0.99) if gaps else None,
            "itl_max_ms": 1e3 * max(gaps) if gaps else None,
            "long_ttft_ms": 1e3 * (long_first - arrived) if long_first and arrived else None,
            "long_tokens": len(long_out.outputs[0].token_ids) if long_out else None,
            "long_error": str(long_out.error) if long_out is not None and long_out.error is not None else None}


def bench_long_prompt(model_dir: Path, args, vocab: int) -> list[dict]:
    rows = []
    max_len = args.long_len + 64
    for chunked in (False, True):
        budget = args.chunk_budget if chunked else max_len
        # No prefix caching: the warm-up's prompts would otherwise be found again.
        engine = build(model_dir, args, enable_chunked_prefill=chunked, enable_prefix_caching=False,
                       max_num_seqs=max(args.streams + 1, 2), max_model_len=max_len, max_num_batched_tokens=budget)
        warm = argparse.Namespace(**{**vars(args), "warm_steps": 2})
        long_prompt_run(engine, warm, vocab)
        res = long_prompt_run(engine, args, vocab)
        rows.append({"workload": f"long prompt, chunked {'on' if chunked else 'off'} (budget {budget})", **res})
        print(json.dumps(rows[-1]), flush=True)
        del engine
        _free()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny shape and workload (a smoke run in seconds on CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--system-len", type=int, default=1024)
    ap.add_argument("--own-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--requests-per-adapter", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--stream-prompt-len", type=int, default=128)
    ap.add_argument("--stream-tokens", type=int, default=2048, help="long enough to outlive the window")
    ap.add_argument("--warm-steps", type=int, default=32, help="decode steps before the long prompt arrives")
    ap.add_argument("--long-len", type=int, default=16000)
    ap.add_argument("--chunk-budget", type=int, default=2048)
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.tiny:
        for key, value in dict(num_adapters=2, rank=8, system_len=64, own_len=16, gen_len=8, requests_per_adapter=4,
                               max_num_seqs=16, max_num_batched_tokens=128, streams=4, stream_prompt_len=8,
                               stream_tokens=64, warm_steps=3, long_len=512, chunk_budget=64).items():
            setattr(args, key, value)
    cfg = TINY if args.tiny else LLAMA_3_2_3B
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "shape": "tiny" if args.tiny else "llama-3.2-3b", "args": vars(args)}
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        model_dir = write_config(tmp / "model", cfg)
        if not args.skip_a:
            dirs = write_adapters(tmp / "adapters", cfg, args.rank, args.num_adapters, args.num_adapters)
            rows += bench_shared_prefix(model_dir, dirs, args, cfg["vocab_size"])
        if not args.skip_b:
            rows += bench_long_prompt(model_dir, args, cfg["vocab_size"])
    result["rows"] = rows
    off = next((r for r in rows if r["workload"] == "shared prefix, caching off"), None)
    on = next((r for r in rows if r["workload"] == "shared prefix, caching on"), None)
    if on and off:
        result["ttft_p50_speedup"] = off["ttft_p50_ms"] / on["ttft_p50_ms"]
        result["throughput_ratio"] = on["tokens_per_s"] / off["tokens_per_s"]
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def _f(v, fmt):
    return format(v, fmt) if v is not None else "-"


def print_table(result) -> None:
    print(f"\n{result['device']}  {result['shape']}")
    shared = [r for r in result["rows"] if r["workload"].startswith("shared")]
    if shared:
        print(f"{'workload':<28} {'tok/s':>8} {'TTFT p50 ms':>12} {'p99':>8} {'hit rate':>9} {'prefill tok':>12}")
        for r in shared:
            print(f"{r['workload']:<28} {r['tokens_per_s']:>8.0f} {r['ttft_p50_ms']:>12.0f} {r['ttft_p99_ms']:>8.0f} "
                  f"{100 * r['prefix_cache_hit_rate']:>8.1f}% {r['prompt_tokens_computed']:>12}")
        if "ttft_p50_speedup" in result:
            print(f"caching on: TTFT p50 {result['ttft_p50_speedup']:.1f}x lower, throughput "
                  f"{result['throughput_ratio']:.2f}x")
    long = [r for r in result["rows"] if r["workload"].startswith("long")]
    if long:
        print(f"{'workload':<40} {'ITL p50 ms':>11} {'p99':>8} {'max':>8} {'long TTFT ms':>13}")
        for r in long:
            print(f"{r['workload']:<40} {_f(r['itl_p50_ms'], '.1f'):>11} {_f(r['itl_p99_ms'], '.1f'):>8} "
                  f"{_f(r['itl_max_ms'], '.1f'):>8} {_f(r['long_ttft_ms'], '.0f'):>13}")


if __name__ == "__main__":
    main()
