"""A quantized Linear's product at decode batch sizes, per way of computing it, on the Llama-3.2-3B shapes: bf16
cuBLAS (the base), FP8 as the Linear computes it (per-token activation quantization + torch._scaled_mm), bitsandbytes'
matmul_4bit, and kernels/quant_matmul.py over a sweep of launch shapes. Each time is a CUDA graph of 20 calls
replayed, divided by 20; `x roof` is over the weight bytes at the measured copy bandwidth.

    python benchmarks/probe_quant_matmul.py [--rows 1,8,32,64,128] [--json out.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import measure_hbm_bandwidth  # noqa: E402

from loraplex.kernels.quant_matmul import QuantMatmulConfig, config, dequant_matmul, dequant_matmul_ref  # noqa: E402
from loraplex.layers import fp8  # noqa: E402

SHAPES = {"qkv": (5120, 3072), "o": (3072, 3072), "gate_up": (16384, 3072), "down": (3072, 8192)}


def graph_us(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[len(times) // 2]


class _Layer:  # what Fp8Weight.matmul reads
    def __init__(self, w, s):
        self.qweight, self.qscale, self.bias = w, s, None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,8,32,64,128")
    ap.add_argument("--sweep-rows", default="32")
    ap.add_argument("--json")
    args = ap.parse_args()
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    bw = measure_hbm_bandwidth()
    print(f"{torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    sweep = [QuantMatmulConfig(16, bn, bk, sk, 4, st) for bn, bk, sk, st in
             itertools.product((32, 64, 128), (64, 128, 256), (1, 2, 4), (3,))]
    rows = []
    for name, (n, k) in SHAPES.items():
        torch.manual_seed(0)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        wq, ws = fp8.quantize(w)
        codes, st = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        table = st.code.float().contiguous()
        absmax = st.absmax.float()
        codes_flat = codes.reshape(-1)
        fp8_weight = fp8.Fp8Weight("token", True)
        layer = _Layer(wq, ws)
        for m in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref8 = dequant_matmul_ref(x, "fp8", wq, ws, n)
            ref4 = dequant_matmul_ref(x, "nibble", codes_flat, absmax, n, table, 64)
            err8 = (dequant_matmul(x, "fp8", wq, ws, n).float() - ref8.float()).abs().max().item()
            err4 = (dequant_matmul(x, "nibble", codes_flat, absmax, n, table, 64).float()
                    - ref4.float()).abs().max().item()
            row = {"shape": name, "n": n, "k": k, "rows": m, "max_err_fp8": err8, "max_err_nf4": err4,
                   "roof_bf16_us": n * k * 2 / bw * 1e6, "roof_fp8_us": n * k / bw * 1e6,
                   "roof_nf4_us": (n * k / 2 + n * k / 64 * 4) / bw * 1e6}
            row["bf16_us"] = graph_us(lambda: torch.nn.functional.linear(x, w))
            row["fp8_scaled_mm_us"] = graph_us(lambda: fp8_weight.matmul(layer, x))
            row["nf4_bnb_us"] = graph_us(lambda: bnb.matmul_4bit(x, codes.t(), quant_state=st))
            default = config(m, n, k, False)
            row["default_cfg"] = default.__dict__
            row["fp8_kernel_us"] = graph_us(lambda: dequant_matmul(x, "fp8", wq, ws, n, cfg=default))
            row["nf4_kernel_us"] = graph_us(lambda: dequant_matmul(x, "nibble", codes_flat, absmax, n, table, 64,
                                                                   cfg=default))
            if str(m) in args.sweep_rows.split(","):
                for fmt, fn in (("fp8", lambda c: dequant_matmul(x, "fp8", wq, ws, n, cfg=c)),
                                ("nf4", lambda c: dequant_matmul(x, "nibble", codes_flat, absmax, n, table, 64,
                                                                 cfg=c))):
                    best = None
                    for c in sweep:
                        c = dataclasses.replace(c, BLOCK_M=min(max(16, 1 << (m - 1).bit_length()), 64))
                        try:
                            us = graph_us(lambda: fn(c))
                        except Exception as e:  # noqa: BLE001 - a shape that does not fit shared memory
                            print(f"  skip {c}: {type(e).__name__}", flush=True)
                            continue
                        if best is None or us < best[0]:
                            best = (us, c)
                    row[f"{fmt}_best_us"], row[f"{fmt}_best_cfg"] = best[0], best[1].__dict__
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'shape':>8} {'rows':>4} {'bf16':>7} {'roof16':>7} {'fp8 old':>8} {'fp8 new':>8} {'fp8 best':>8} "
          f"{'roof8':>6} {'nf4 bnb':>8} {'nf4 new':>8} {'nf4 best':>8} {'roof4':>6}   (us)")
    for r in rows:
        print(f"{r['shape']:>8} {r['rows']:>4} {r['bf16_us']:7.1f} {r['roof_bf16_us']:7.1f} "
              f"{r['fp8_scaled_mm_us']:8.1f} {r['fp8_kernel_us']:8.1f} {r.get('fp8_best_us', float('nan')):8.1f} "
              f"{r['roof_fp8_us']:6.1f} {r['nf4_bnb_us']:8.1f} {r['nf4_kernel_us']:8.1f} "
              f"{r.get('nf4_best_us', float('nan')):8.1f} {r['roof_nf4_us']:6.1f}")
    for r in rows:
        for fmt in ("fp8", "nf4"):
            if f"{fmt}_best_cfg" in r:
                print(f"best {fmt} {r['shape']} rows {r['rows']}: {r[f'{fmt}_best_cfg']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth": bw, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
