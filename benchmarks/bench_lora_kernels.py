"""LoRA shrink+expand launch configs on the Llama-3.2-3B projections, timed as CUDA-graph replays.

    python benchmarks/bench_lora_kernels.py [--json out.json]

For each (tokens, distinct adapters) mix it times one decoder layer's four LoRA projections (qkv, o, gate_up,
down; rank 16) over 8 layers of distinct weights (more than the L2 holds), for every split-K size and expand
tile in the sweep, for the grouped kernels and the per-token decode kernels, and prints microseconds per layer
next to the bytes-over-bandwidth floor.
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
    """One pool per projection in the runtime's layout (each page: A of every slice, then the B^T row), adapters
    on contiguous page runs, as the pool allocates them."""
    from loraplex.kernels.lora_meta import LoRAKernelMeta

    meta = LoRAKernelMeta(num_tokens, max_loras, rank, max_loras, "cuda")
    for s in range(max_loras):
        meta.set_entry(s, list(range(s * rank, (s + 1) * rank)), rank)
    meta.prepare(torch.arange(num_tokens, dtype=torch.int32, device="cuda") % num_adapters)
    num_pages = max_loras * rank
    layers = []
    for _ in range(NUM_LAYERS):
        ops = []
        for in_dim, sizes in PROJECTIONS.values():
            x = torch.randn(num_tokens, in_dim, device="cuda", dtype=torch.bfloat16)
            flat = torch.randn(num_pages, len(sizes) * in_dim + sum(sizes), device="cuda", dtype=torch.bfloat16) * 0.01
            a = flat[:, : len(sizes) * in_dim].view(num_pages, len(sizes), in_dim).permute(1, 0, 2)
            b = flat[:, len(sizes) * in_dim:]
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


def sweep_configs(args) -> list[dict]:
    """Launch configs to time: the grouped shrink over split-K size, followed by the grouped expand over its tile
    and warps, or by the per-token decode expand over its column tile."""
    configs = []
    for kps, bn, nw in itertools.product([int(v) for v in args.k_per_split.split(",")],
                                         [int(v) for v in args.expand_n.split(",")],
                                         [int(v) for v in args.expand_warps.split(",")]):
        configs.append({"shrink": "grouped", "expand": "grouped", "k_per_split": kps, "expand_n": bn,
                        "expand_warps": nw})
    for kps, bn in itertools.product([int(v) for v in args.k_per_split.split(",")],
                                     [int(v) for v in args.decode_n.split(",")]):
        configs.append({"shrink": "grouped", "expand": "decode", "k_per_split": kps, "decode_n": bn,
                        "expand_n": 128, "expand_warps": 4})
    return configs


def apply_config(cfg: dict, tu) -> None:
    kps = cfg["k_per_split"]
    tu.shrink_splits = (lambda n, k: 1 if kps == 0 or n > 256 else max(1, k // kps))
    orig_expand = tu.expand_config

    def expand_config(n, total_out, max_rank, interpret):
        c = orig_expand(n, total_out, max_rank, interpret)
        return tu.LoRAConfig(c.BLOCK_M, min(cfg["expand_n"], tu._p2(total_out)), c.BLOCK_K, cfg["expand_warps"],
                             c.num_stages)

    tu.expand_config = expand_config
    if "decode_n" in cfg:
        tu.decode_expand_block_n = lambda n, total_out, block_r, interpret: min(cfg["decode_n"], tu._p2(total_out))
    tu.use_decode_expand = lambda n, interpret: cfg["expand"] == "decode"


def main() -> None:
    from loraplex.kernels import _triton_utils as tu
    from loraplex.kernels.lora_ops import add_lora

    ap = argparse.ArgumentParser()
    ap.add_argument("--mixes", default="1:1,8:8,32:8,32:32,64:1,64:32,128:32,256:128,256:256")
    ap.add_argument("--k-per-split", default="0,2048,1024,512")
    ap.add_argument("--expand-n", default="128,256")
    ap.add_argument("--expand-warps", default="4")
    ap.add_argument("--decode-n", default="128,256,512,1024", help="per-token expand column tile")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    bw = measure_hbm_bandwidth()
    saved = {name: getattr(tu, name) for name in ("shrink_splits", "expand_config", "use_decode_expand",
                                                 "decode_expand_block_n")}
    rows = []
    for mix in args.mixes.split(","):
        num_tokens, num_adapters = (int(v) for v in mix.split(":"))
        meta, layers, active_bytes = build(num_tokens, num_adapters, 16, max(32, num_adapters))
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
        for cfg in sweep_configs(args):
            apply_config(cfg, tu)
            try:
                us = time_graph(run) / NUM_LAYERS
            finally:
                for name, fn in saved.items():
                    setattr(tu, name, fn)
            rows.append({"tokens": num_tokens, "adapters": num_adapters, **cfg, "us_per_layer": us,
                         "floor_us": floor_us})
        best = sorted((r for r in rows if r["tokens"] == num_tokens and r["adapters"] == num_adapters
                       and "k_per_split" in r), key=lambda r: r["us_per_layer"])
        for family in ("grouped", "decode"):
            for r in [r for r in best if r["expand"] == family][:3]:
                extra = f"decode N {r['decode_n']:>4}" if "decode_n" in r else f"expand N {r['expand_n']:>4}"
                print(f"   expand {family:>7} k/split {r['k_per_split']:>5} {extra}: {r['us_per_layer']:.1f} us/layer",
                      flush=True)
        layers = meta = None
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"hbm_bytes_per_s": bw, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
