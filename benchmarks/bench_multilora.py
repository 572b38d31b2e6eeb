"""Multi-LoRA serving benchmark on one GPU: loraplex vs HF transformers / PEFT vs the memory roofline.

Random weights in Llama-3.2-3B's shape (bf16), no download. Prints a table and writes JSON.
    python benchmarks/bench_multilora.py --json out.json [--bases bf16,nf4]
``--bases bf16,nf4,fp8`` adds the same rows on a 4-bit NF4 base (quantization="bitsandbytes") and an FP8 one
(quantization="fp8": per-channel weights, per-token activations, FP8 matmuls), in the same run.
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
from common import (LLAMA_3_2_3B, Timer, adapter_bytes, kv_bytes_per_token, measure_hbm_bandwidth,  # noqa: E402
                    measure_matmul_peak, quant_weight_bytes, random_adapter, weight_bytes, write_config)


def run_engine(engine, batch: int, num_adapters: int, prompt_len: int, gen_len: int, seed: int,
               vocab_size: int = LLAMA_3_2_3B["vocab_size"]):
    from loraplex import SamplingParams
    from loraplex.lora.request import LoRARequest

    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True, detokenize=False)
    for i in range(batch):
        ids = torch.randint(0, vocab_size, (prompt_len,), generator=gen).tolist()
        lora = LoRARequest(f"a{i % num_adapters}", 1 + i % num_adapters, "") if num_adapters else None
        engine.add_request(f"s{seed}-b{batch}-n{num_adapters}-{i}", {"prompt_token_ids": ids}, params,
                           lora_request=lora)
    with Timer() as prefill:
        engine.step()  # every prompt fits the token budget, so step 1 is the whole prefill
    steps = 0
    with Timer() as decode:
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
    return prefill.seconds, decode.seconds, steps


def swap_ms(mgr, m, repeats: int = 10) -> float:
    """Host-to-device upload of one adapter from the host cache into the pool (pinned memory, side stream),
    evicted again between repeats; mean ms."""
    assert m.is_on_host and m.num_refs == 0, "swap_ms needs an idle adapter in the host cache"
    times = []
    for _ in range(repeats):
        if m.is_on_device:
            mgr.pool.evict(m)
        with Timer() as t:
            mgr.pool.upload(m)
            m.device_event.synchronize()
        m.device_event = m.host_event = None
        times.append(t.seconds)
    return sum(times) / len(times) * 1e3


def hf_generate(model, batch: int, prompt_len: int, gen_len: int, adapter_names=None) -> float:
    ids = torch.randint(0, LLAMA_3_2_3B["vocab_size"], (batch, prompt_len), device="cuda")
    kwargs = {"adapter_names": adapter_names} if adapter_names is not None else {}
    with Timer() as t:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_len, min_new_tokens=gen_len,
                       do_sample=False, pad_token_id=0, **kwargs)
    return t.seconds


def build_engine(model_dir: Path, max_loras: int, rank: int, max_num_seqs: int, adapters: dict,
                 quantization: str | None = None):
    from loraplex import EngineArgs, LLMEngine
    from loraplex.lora.request import LoRARequest

    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(model_dir), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
        quantization=quantization,
        enable_lora=max_loras > 0, max_loras=max(1, max_loras), max_lora_rank=rank, max_cpu_loras=max(1, max_loras),
        max_num_seqs=max_num_seqs, max_model_len=1024, max_num_batched_tokens=max(1024, max_num_seqs * 160),
        num_gpu_blocks_override=max_num_seqs * 1024 // 16 + 64))
    for i, (config, tensors) in adapters.items():
        engine.add_lora(LoRARequest(f"a{i}", i + 1, "", tensors=tensors, config=config))
    return engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", default="1,8,32,64")
    ap.add_argument("--adapter-counts", default="0,1,8,32")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--hf-gen-len", type=int, default=32, help="HF/PEFT are slow: time fewer tokens, report tok/s")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--hf-batch-sizes", default=None, help="batch sizes to run HF/PEFT at (default: all)")
    ap.add_argument("--bases", default="bf16", help="comma list of bf16, nf4 (4-bit bitsandbytes), fp8")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    bases = args.bases.split(",")
    if set(bases) - {"bf16", "nf4", "fp8"}:
        ap.error(f"--bases: unknown {sorted(set(bases) - {'bf16', 'nf4', 'fp8'})}")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    counts = [int(c) for c in args.adapter_counts.split(",")]
    cfg = LLAMA_3_2_3B
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "shape": "Llama-3.2-3B", "rank": args.rank, "prompt_len": args.prompt_len, "gen_len": args.gen_len}
    bw, peak = measure_hbm_bandwidth(), measure_matmul_peak()
    result.update(hbm_bytes_per_s=bw, bf16_flops_peak=peak)
    print(f"HBM copy bandwidth {bw / 1e12:.2f} TB/s, bf16 matmul peak {peak / 1e12:.0f} TFLOP/s", flush=True)
    max_adapters = max(counts)
    adapters = {i: random_adapter(cfg, args.rank, seed=i) for i in range(max_adapters)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_config(Path(tmp) / "llama-3.2-3b-shape")
        engine = None
        for base_kind in bases:
            quantization = {"nf4": "bitsandbytes", "fp8": "fp8"}.get(base_kind)
            base_bytes = quant_weight_bytes(cfg, base_kind)
            for n in counts:
                if engine is None or (n > 0) != (engine.lora_manager is not None) or (
                        engine.args.quantization != quantization):
                    # The base rows run on an engine without LoRA, as a base-model deployment would.
                    engine = None
                    gc.collect()  # the runner and its CUDA graphs reference each other
                    torch.cuda.empty_cache()
                    engine = build_engine(model_dir, max_adapters if n else 0, args.rank, max(batches),
                                          adapters if n else {}, quantization)
                    run_engine(engine, 4, min(2, n), 16, 4, seed=0)  # warm-up: Triton compiles, caches settle
                    mgr = engine.lora_manager
                    if mgr is not None and "adapter_swap_ms" not in result:
                        result["adapter_swap_ms"] = swap_ms(mgr, mgr.adapters["a0"])
                for b in batches:
                    # Untimed pass of the same shape: Triton specialises kernels on the batch size, and the first
                    # prefill of each shape would otherwise time their compilation.
                    run_engine(engine, b, n, args.prompt_len, 4, seed=10_000 + b + n)
                    prefill_s, decode_s, steps = run_engine(engine, b, n, args.prompt_len, args.gen_len, seed=b + n)
                    active = min(n, b)
                    ctx = args.prompt_len + args.gen_len / 2
                    roof_bytes = base_bytes + b * ctx * kv_bytes_per_token(cfg) + active * adapter_bytes(
                        cfg, args.rank)
                    step_ms = decode_s / steps * 1e3
                    flops = 2 * (weight_bytes(cfg) / 2) * b * args.prompt_len
                    rows.append({"base": base_kind, "adapters": n, "batch": b, "decode_ms_per_step": step_ms,
                                 "tokens_per_s": b * args.gen_len / (prefill_s + decode_s),
                                 "roofline_ms": roof_bytes / bw * 1e3,
                                 "ratio_to_roofline": step_ms / (roof_bytes / bw * 1e3),
                                 "prefill_tokens_per_s": b * args.prompt_len / prefill_s,
                                 "prefill_frac_of_peak": flops / prefill_s / peak})
                    print(json.dumps(rows[-1]), flush=True)
        engine = None
        gc.collect()
        torch.cuda.empty_cache()
        if not args.skip_hf:
            hf_rows(rows, batches, counts, adapters, args)
    base = {(r["base"], r["batch"]): r for r in rows if r["adapters"] == 0}
    bf16 = {(r["adapters"], r["batch"]): r for r in rows if r["base"] == "bf16"}
    for r in rows:
        if r["adapters"] and (r["base"], r["batch"]) in base:
            r["lora_overhead"] = r["decode_ms_per_step"] / base[r["base"], r["batch"]]["decode_ms_per_step"] - 1
        if r["base"] != "bf16" and (r["adapters"], r["batch"]) in bf16:
            r["tok_s_vs_bf16"] = r["tokens_per_s"] / bf16[r["adapters"], r["batch"]]["tokens_per_s"]
        if "hf_tokens_per_s" in r:
            r["speedup_vs_hf"] = r["tokens_per_s"] / r["hf_tokens_per_s"]
    result["rows"] = rows
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def hf_rows(rows, batches, counts, adapters, args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: v for k, v in LLAMA_3_2_3B.items() if k not in ("architectures", "torch_dtype")})
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    peft_model = None
    for n in counts:
        if n and peft_model is None:
            from peft import LoraConfig, get_peft_model

            lcfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                              target_modules=list(adapters[0][0]["target_modules"]))
            peft_model = get_peft_model(model, lcfg, adapter_name="a0")
            for i in range(1, max(counts)):
                peft_model.add_adapter(f"a{i}", lcfg)
            peft_model.eval()
        hf_batches = [int(b) for b in args.hf_batch_sizes.split(",")] if args.hf_batch_sizes else batches
        for b in [b for b in batches if b in hf_batches]:
            # Each configuration runs once untimed first: HF's first generate of a shape pays for kernel
            # selection and caches (on an H200, base batch 32: 168 tok/s cold, 855 and 844 after).
            if n == 0:
                target = model if peft_model is None else peft_model.base_model.model
                hf_generate(target, b, args.prompt_len, 4)
                seconds = hf_generate(target, b, args.prompt_len, args.hf_gen_len)
            else:
                names = [f"a{i % n}" for i in range(b)]
                hf_generate(peft_model, b, args.prompt_len, 4, adapter_names=names)
                seconds = hf_generate(peft_model, b, args.prompt_len, args.hf_gen_len, adapter_names=names)
            row = next((r for r in rows if r["base"] == "bf16" and r["adapters"] == n and r["batch"] == b), None)
            if row is None:  # --bases without bf16: nothing to set HF beside
                continue
            row["hf_tokens_per_s"] = b * args.hf_gen_len / seconds
            print(f"HF/PEFT adapters={n} batch={b}: {row['hf_tokens_per_s']:.1f} tok/s", flush=True)


def print_table(result) -> None:
    print(f"\n{result['gpu']}  {result['shape']} bf16  rank {result['rank']}  prompt {result['prompt_len']} "
          f"+ {result['gen_len']} new  HBM {result['hbm_bytes_per_s'] / 1e12:.2f} TB/s  "
          f"swap {result.get('adapter_swap_ms', float('nan')):.2f} ms")
    head = f"{'base':>5} {'adapters':>8} {'batch':>5} {'ms/step':>8} {'roof ms':>8} {'x roof':>7} {'tok/s':>9} {'HF tok/s':>9} " \
           f"{'x HF':>7} {'LoRA ovh':>8} {'prefill %pk':>11} {'x bf16':>6}"
    print(head)
    for r in result["rows"]:
        hf = r.get("hf_tokens_per_s", float("nan"))
        print(f"{r['base']:>5} {r['adapters']:>8} {r['batch']:>5} {r['decode_ms_per_step']:>8.2f} {r['roofline_ms']:>8.2f} "
              f"{r['ratio_to_roofline']:>7.2f} {r['tokens_per_s']:>9.0f} {hf:>9.1f} "
              f"{r.get('speedup_vs_hf', float('nan')):>7.1f} {r.get('lora_overhead', float('nan')) * 100:>7.1f}% "
              f"{r['prefill_frac_of_peak'] * 100:>10.1f}% {r.get('tok_s_vs_bf16', float('nan')):>6.2f}")


if __name__ == "__main__":
    main()
