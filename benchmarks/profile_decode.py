"""Where a decode step's time goes: full engine step vs graph replay (GPU only), the top kernels, the host side.

    python benchmarks/profile_decode.py --configs 0:1,0:32,32:32 [--json out.json]

Each config is ADAPTERS:BATCH on the Llama-3.2-3B shape (random bf16 weights, rank-16 adapters on all seven
projections). Set LORAPLEX_FUSED_OPS before running to compare the fused elementwise kernels.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_multilora import build_engine  # noqa: E402
from common import LLAMA_3_2_3B, Timer, random_adapter, write_config  # noqa: E402


def add_requests(engine, batch: int, num_adapters: int, gen_len: int, tag: str) -> None:
    from loraplex import SamplingParams
    from loraplex.lora.request import LoRARequest

    params = SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True, detokenize=False)
    gen = torch.Generator().manual_seed(0)
    for i in range(batch):
        ids = torch.randint(0, LLAMA_3_2_3B["vocab_size"], (128,), generator=gen).tolist()
        lora = LoRARequest(f"a{i % num_adapters}", 1 + i % num_adapters, "") if num_adapters else None
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": ids}, params, lora_request=lora)


def kernel_table(fn, steps: int, top: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append({"name": e.key[:90], "us_per_step": t / steps, "calls_per_step": e.count / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    calls = sum(r["calls_per_step"] for r in rows)
    return [{"name": "TOTAL", "us_per_step": total, "calls_per_step": calls}] + rows[:top]


def profile_config(engine, num_adapters: int, batch: int, top: int) -> dict:
    add_requests(engine, batch, num_adapters, 200, f"p{num_adapters}-{batch}")
    engine.step()  # prefill
    for _ in range(5):
        engine.step()
    n = 30
    with Timer() as t:
        for _ in range(n):
            engine.step()
    out = {"adapters": num_adapters, "batch": batch, "step_ms": t.seconds / n * 1e3}
    gr = engine.runner.graph_runner
    if gr is not None:
        bs = next(b for b in gr.batch_sizes if b >= batch)
        graph = gr.graphs[bs]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        torch.cuda.synchronize()
        start.record()
        for _ in range(n):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        out["replay_ms"] = start.elapsed_time(end) / n
        out["kernels"] = kernel_table(graph.replay, 5, top)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        engine.step()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
    out["host_profile"] = s.getvalue()
    while engine.has_unfinished_requests():
        engine.step()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="0:1,0:32,32:32")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--host-profile", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]
    max_adapters = max(a for a, _ in configs)
    adapters = {i: random_adapter(LLAMA_3_2_3B, 16, seed=i) for i in range(max_adapters)}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_config(Path(tmp) / "m")
        engine, engine_lora = None, None
        for num_adapters, batch in configs:
            if engine is None or engine_lora != (num_adapters > 0):
                engine = None
                gc.collect()
                torch.cuda.empty_cache()
                engine = build_engine(model_dir, max_adapters if num_adapters else 0, 16, 64,
                                      adapters if num_adapters else {})
                engine_lora = num_adapters > 0
            r = profile_config(engine, num_adapters, batch, args.top)
            results.append(r)
            print(f"\n=== adapters={num_adapters} batch={batch}: step {r['step_ms']:.2f} ms, "
                  f"graph replay {r.get('replay_ms', float('nan')):.2f} ms")
            for k in r.get("kernels", []):
                print(f"  {k['us_per_step']:9.1f} us  {k['calls_per_step']:6.1f}x  {k['name']}")
            if args.host_profile:
                print(r["host_profile"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
