"""LoRA shrink+expand launch configs on the Llama-3.2-3B projections, timed as CUDA-graph replays.

    python benchmarks/bench_lora_kernels.py [--json out.json]

For each (tokens, distinct adapters) mix it times one decoder layer's four LoRA projections (qkv, o, gate_up,
down; rank 16) over 8 layers of distinct weights (more than the L2 holds), for every split-K size and expand
tile in the sweep, and prints microseconds per layer next to the bytes-over-bandwidth floor.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import measure_hbm_bandwidth  # noqa: E402

# (in_dim, slice out sizes) of each packed projection
PROJECTIONS = {"qkv": (3072, [3072, 1024, 1024]), "o": (3072, [3072]), "gate_up": (3072, [8192, 8192]),
               "down": (8192, [3072])}
NUM_LAYERS = 8


def build(num_tokens: int, num_adapters: int, rank: int, max_loras: int):
    from loraplex.kernels.lora_meta import LoRAKernelMeta

    meta = LoRAKernelMeta.allocate(num_tokens, max_loras, "cuda")
    for s in range(max_loras):
        meta.set_rank(s, rank)
    meta.prepare(torch.arange(num_tokens, dtype=torch.int32, device="cuda") % num_adapters)
    layers = []
    for _ in range(NUM_LAYERS):
        ops = []
        for in_dim, sizes in PROJECTIONS.values():
            x = torch.randn(num_tokens, in_dim, device="cuda", dtype=torch.bfloat16)
            a = torch.randn(len(sizes), max_loras, rank, in_dim, device="cuda", dtype=torch.bfloat16) * 0.01
            b = torch.randn(max_loras, sum(sizes), rank, device="cuda", dtype=torch.bfloat16) * 0.01
            y = torch.zeros(num_tokens, sum(sizes), device="cuda", dtype=torch.bfloat16)
            offsets = torch.tensor([0] + list(itertools.accumulate(sizes)), dtype=torch.int32, device="cuda")
            ops.append((y, x, a, b, offsets))
        layers.append(ops)
    # Each slice has its own A (rank x in_dim); B covers all output columns.
    active_bytes = sum(min(num_adapters, num_tokens) * rank * (len(sizes) * in_dim + sum(sizes)) * 2
                       for in_dim, sizes in PROJECTIONS.values())
    return meta, layers, active_bytes


def time_graph(fn, iters: int = 20) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(3):
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return sorted(times)[1] * 1e3  # median of 3, microseconds


def main() -> None:
    from loraplex.kernels import _triton_utils as tu
    from loraplex.kernels.lora_ops import add_lora

    ap = argparse.ArgumentParser()
    ap.add_argument("--mixes", default="1:1,32:8,32:32,64:32")
    ap.add_argument("--k-per-split", default="0,2048,1024,512,256", help="0 = no split")
    ap.add_argument("--expand-n", default="64,128,256")
    ap.add_argument("--expand-warps", default="4,8")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    bw = measure_hbm_bandwidth()
    orig_splits, orig_expand = tu.shrink_splits, tu.expand_config
    rows = []
    for mix in args.mixes.split(","):
        num_tokens, num_adapters = (int(v) for v in mix.split(":"))
        meta, layers, active_bytes = build(num_tokens, num_adapters, 16, 32)
        floor_us = active_bytes / bw * 1e6

        def run():
            for ops in layers:
                for y, x, a, b, offsets in ops:
                    add_lora(y, x, a, b, meta, offsets)

        us = time_graph(run) / NUM_LAYERS
        rows.append({"tokens": num_tokens, "adapters": num_adapters, "config": "default", "us_per_layer": us,
                     "floor_us": floor_us})
        print(f"tokens={num_tokens} adapters={num_adapters} default: {us:.1f} us/layer (floor {floor_us:.1f})",
              flush=True)
        for kps, bn, nw in itertools.product([int(v) for v in args.k_per_split.split(",")],
                                             [int(v) for v in args.expand_n.split(",")],
                                             [int(v) for v in args.expand_warps.split(",")]):
            tu.shrink_splits = (lambda n, k, kps=kps: 1 if kps == 0 or n > 256 else max(1, k // kps))

            def expand_config(n, total_out, max_rank, interpret, bn=bn, nw=nw):
                cfg = orig_expand(n, total_out, max_rank, interpret)
                return tu.LoRAConfig(cfg.BLOCK_M, min(bn, tu._p2(total_out)), cfg.BLOCK_K, nw, cfg.num_stages)

            tu.expand_config = expand_config
            try:
                us = time_graph(run) / NUM_LAYERS
            finally:
                tu.shrink_splits, tu.expand_config = orig_splits, orig_expand
            rows.append({"tokens": num_tokens, "adapters": num_adapters, "k_per_split": kps, "expand_n": bn,
                         "expand_warps": nw, "us_per_layer": us, "floor_us": floor_us})
        best = sorted((r for r in rows if r["tokens"] == num_tokens and r["adapters"] == num_adapters
                       and "k_per_split" in r), key=lambda r: r["us_per_layer"])[:6]
        for r in best:
            print(f"   k/split {r['k_per_split']:>5}  expand N {r['expand_n']:>3} warps {r['expand_warps']}: "
                  f"{r['us_per_layer']:.1f} us/layer", flush=True)
        del layers, meta
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"hbm_bytes_per_s": bw, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
