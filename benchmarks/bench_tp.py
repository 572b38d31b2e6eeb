"""Tensor parallelism on one host: TP=1 against TP=N in one run, with many adapters.

Llama-3.1-8B's shape (random bf16 weights, no download), 32 distinct rank-16 adapters on all seven projections,
batch 32 and 128. For each: decode ms per step, tok/s, the per-GPU memory roofline (each rank reads 1/N of the
weights, KV cache and adapters per step) and the scaling efficiency (TP=1 step time / (N x TP=N step time)).
The TP=N engine starts its own ranks (loraplex.engine.tp_ranks). Prints a table and writes JSON.
    python benchmarks/bench_tp.py --tp 2 --json out.json
``--tiny --device cpu`` runs a tiny shape on the CPU (gloo), to check the script itself.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_multilora import run_engine  # noqa: E402
from common import (LLAMA_3_1_8B, adapter_bytes, kv_bytes_per_token, measure_hbm_bandwidth,  # noqa: E402
                    random_adapter, weight_bytes, write_config)

TINY = {**LLAMA_3_1_8B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32, "vocab_size": 1024}


def build(model_dir: Path, tp: int, args, adapters: dict):
    from loraplex import EngineArgs, LLMEngine
    from loraplex.lora.request import LoRARequest

    batch = max(args.batches)
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(model_dir), load_format="dummy", skip_tokenizer_init=True, device=args.device,
        dtype="bfloat16" if args.device == "cuda" else "float32", tensor_parallel_size=tp, enable_lora=True,
        max_loras=args.adapters, max_lora_rank=args.rank, max_cpu_loras=args.adapters, max_num_seqs=batch,
        max_model_len=1024, max_num_batched_tokens=max(1024, batch * (args.prompt_len + 32)),
        num_gpu_blocks_override=batch * 1024 // 16 + 64 if args.device == "cuda" else None))
    for i, (config, tensors) in adapters.items():
        engine.add_lora(LoRARequest(f"a{i}", i + 1, "", tensors=tensors, config=config))
    return engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--batch-sizes", default="32,128")
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny shape (checks the script on the CPU)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batch_sizes.split(",")]
    cfg = TINY if args.tiny else LLAMA_3_1_8B
    is_cuda = args.device == "cuda"
    bw = measure_hbm_bandwidth() if is_cuda else float("nan")
    result = {"gpu": torch.cuda.get_device_name() if is_cuda else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "shape": "tiny" if args.tiny else "Llama-3.1-8B", "tp": args.tp,
              "adapters": args.adapters, "rank": args.rank, "hbm_bytes_per_s": bw, "rows": []}
    adapters = {i: random_adapter(cfg, args.rank, seed=i) for i in range(args.adapters)}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_config(Path(tmp) / "shape", cfg)
        for tp in (1, args.tp):
            engine = build(model_dir, tp, args, adapters)
            vocab = cfg["vocab_size"]
            run_engine(engine, 4, 2, 16, 4, seed=0, vocab_size=vocab)  # warm-up: compiles, caches
            for b in args.batches:
                run_engine(engine, b, args.adapters, args.prompt_len, 4, seed=10_000 + b, vocab_size=vocab)
                prefill_s, decode_s, steps = run_engine(engine, b, args.adapters, args.prompt_len, args.gen_len,
                                                        seed=b, vocab_size=vocab)
                ctx = args.prompt_len + args.gen_len / 2
                step_bytes = (weight_bytes(cfg) + b * ctx * kv_bytes_per_token(cfg)
                              + min(b, args.adapters) * adapter_bytes(cfg, args.rank)) / tp
                row = {"tp": tp, "batch": b, "decode_ms_per_step": decode_s / steps * 1e3,
                       "tokens_per_s": b * args.gen_len / (prefill_s + decode_s),
                       "roofline_ms_per_gpu": step_bytes / bw * 1e3}
                row["ratio_to_roofline"] = row["decode_ms_per_step"] / row["roofline_ms_per_gpu"]
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
            del engine
            gc.collect()
            if is_cuda:
                torch.cuda.empty_cache()
    one = {r["batch"]: r for r in result["rows"] if r["tp"] == 1}
    for r in result["rows"]:
        if r["tp"] != 1:
            r["scaling_efficiency"] = one[r["batch"]]["decode_ms_per_step"] / (r["tp"] * r["decode_ms_per_step"])
            r["tok_s_vs_tp1"] = r["tokens_per_s"] / one[r["batch"]]["tokens_per_s"]
    print(f"\n{result['gpu']}  {result['shape']} bf16  {args.adapters} adapters of rank {args.rank}  "
          f"prompt {args.prompt_len} + {args.gen_len} new")
    print(f"{'tp':>3} {'batch':>5} {'ms/step':>8} {'roof ms':>8} {'x roof':>7} {'tok/s':>9} {'x TP1':>6} {'eff':>5}")
    for r in result["rows"]:
        print(f"{r['tp']:>3} {r['batch']:>5} {r['decode_ms_per_step']:>8.2f} {r['roofline_ms_per_gpu']:>8.2f} "
              f"{r['ratio_to_roofline']:>7.2f} {r['tokens_per_s']:>9.0f} {r.get('tok_s_vs_tp1', 1.0):>6.2f} "
              f"{r.get('scaling_efficiency', 1.0):>5.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
