"""Where a prefill step's time goes: repeated timings, the top GPU kernels and the host profile of one prefill.

    python benchmarks/profile_prefill.py --configs 0:1,1:1,8:8 [--repeats 3]

Each config is ADAPTERS:BATCH on the Llama-3.2-3B shape (random bf16 weights, rank-16 adapters), prompt 128.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import itertools
import pstats
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_multilora import build_engine, run_engine  # noqa: E402
from common import LLAMA_3_2_3B, random_adapter, write_config  # noqa: E402
from profile_decode import kernel_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="0:1,1:1,8:8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]
    max_adapters = max(a for a, _ in configs)
    adapters = {i: random_adapter(LLAMA_3_2_3B, 16, seed=i) for i in range(max_adapters)}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_config(Path(tmp) / "m")
        engine = None
        for num_adapters, batch in configs:
            if engine is None or (num_adapters > 0) != (engine.lora_manager is not None):
                engine = None
                gc.collect()
                torch.cuda.empty_cache()
                engine = build_engine(model_dir, max_adapters if num_adapters else 0, 16, 64,
                                      adapters if num_adapters else {})
            times = [run_engine(engine, batch, num_adapters, 128, 2, seed=100 * r + batch)[0] * 1e3
                     for r in range(args.repeats)]
            print(f"\n=== adapters={num_adapters} batch={batch}: prefill ms " + " ".join(f"{t:.1f}" for t in times))
            seeds = itertools.count(1000)

            def prefill() -> None:
                run_engine(engine, batch, num_adapters, 128, 1, seed=next(seeds))

            for k in kernel_table(prefill, 1, args.top):
                print(f"  {k['us_per_step']:9.1f} us  {k['calls_per_step']:6.1f}x  {k['name']}")
            prof = cProfile.Profile()
            prof.enable()
            prefill()
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
            print(s.getvalue())


if __name__ == "__main__":
    main()
