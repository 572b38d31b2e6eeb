"""Many adapters on one GPU: base, then 32 / 256 / 1024 distinct adapters, cold (first use from disk) and warm
(in the CPU cache), runtime churn, and the loader's time per adapter, all in one run.

Llama-3.2-3B's shape with random weights (bf16), rank-16 adapters on all seven projections written to disk as
distinct folders (hard links to a few weight files), 2048 requests of 128 prompt + 128 new tokens submitted at
once, max_num_seqs 256. Prints a table and writes JSON.
    python benchmarks/bench_many_adapters.py --json out.json
    python benchmarks/bench_many_adapters.py --shape tiny --requests 48 --adapter-counts 4,16   (CPU smoke run)
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
from common import (LLAMA_3_2_3B, adapter_bytes, kv_bytes_per_token, measure_hbm_bandwidth,  # noqa: E402
                    random_adapter, synchronize, weight_bytes, write_config)

TINY = {**LLAMA_3_2_3B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
        "rope_scaling": None}


def write_adapters(root: Path, cfg: dict, rank: int, num_adapters: int, num_files: int) -> list[Path]:
    """num_adapters PEFT folders; their weight files are hard links to num_files distinct ones."""
    from safetensors.torch import save_file

    sources, config = [], None
    for f in range(num_files):
        config, tensors = random_adapter(cfg, rank, seed=f)
        d = root / f"_weights{f}"
        d.mkdir(parents=True)
        save_file(tensors, str(d / "adapter_model.safetensors"))
        sources.append(d / "adapter_model.safetensors")
    dirs = []
    for i in range(num_adapters):
        d = root / f"adapter{i:05d}"
        d.mkdir()
        os.link(sources[i % num_files], d / "adapter_model.safetensors")
        (d / "adapter_config.json").write_text(json.dumps(config))
        dirs.append(d)
    return dirs


def build(model_dir: Path, args, lora: bool):
    from loraplex import EngineArgs, LLMEngine

    kwargs = dict(model=str(model_dir), load_format="dummy", skip_tokenizer_init=True,
                  dtype="bfloat16" if args.device == "cuda" else "float32", device=args.device,
                  max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  num_gpu_blocks_override=args.max_num_seqs * (args.max_model_len // 16) + 64)
    if lora:
        kwargs.update(enable_lora=True, max_loras=args.max_loras, max_lora_rank=args.rank,
                      max_cpu_loras=args.max_cpu_loras, lora_memory_fraction=args.lora_memory_fraction,
                      num_lora_loader_workers=args.loader_workers)
        if args.max_gpu_loras:
            kwargs["max_gpu_loras"] = args.max_gpu_loras
    return LLMEngine.from_engine_args(EngineArgs(**kwargs))


def run(engine, loras: list, args, seed: int, vocab: int, on_step=None) -> dict:
    """Submit one request per entry of loras (None = base) at once, step to the end; throughput, TTFT, and the
    distinct adapters of each decode step."""
    from loraplex import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=args.gen_len, ignore_eos=True, detokenize=False)
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab, (len(loras), args.prompt_len), generator=gen).tolist()
    mgr = engine.lora_manager
    before = dict(mgr.stats) if mgr is not None else {}
    synchronize()
    start = time.perf_counter()
    arrival, first = {}, {}
    for i, lora in enumerate(loras):
        rid = f"s{seed}-{i}"
        engine.add_request(rid, {"prompt_token_ids": prompts[i]}, params, lora_request=lora)
        arrival[rid] = time.perf_counter()
    tokens, errors, distinct, decode_ms = 0, 0, [], []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outs = engine.step()
        t1 = time.perf_counter()
        running = engine.scheduler.running
        if running and all(s.num_computed_tokens >= s.num_prompt_tokens for s in running):
            decode_ms.append((t1 - t0) * 1e3)
            distinct.append(len({id(s.lora_model) for s in running if s.lora_model is not None}))
        for o in outs:
            if o.request_id not in arrival:
                continue  # a churn request
            if o.request_id not in first and o.outputs[0].token_ids:
                first[o.request_id] = t1
            if o.finished:
                tokens += sum(len(c.token_ids) for c in o.outputs)
                errors += o.error is not None
        if on_step is not None:
            on_step(engine)
    synchronize()
    seconds = time.perf_counter() - start
    ttft = sorted(first[r] - arrival[r] for r in first if r in arrival)
    after = dict(mgr.stats) if mgr is not None else {}
    delta = {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))}
    return {"requests": len(loras), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "errors": errors, "ttft_p50_ms": 1e3 * ttft[len(ttft) // 2] if ttft else None,
            "ttft_p99_ms": 1e3 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else None,
            "decode_step_ms_median": statistics.median(decode_ms) if decode_ms else None,
            "mean_distinct_adapters": statistics.mean(distinct) if distinct else 0.0,
            "loads": int(delta.get("num_loads", 0)), "uploads": int(delta.get("num_uploads", 0)),
            "evictions": int(delta.get("num_evictions", 0)),
            "loader_ms_mean": 1e3 * delta["load_seconds"] / delta["num_loads"] if delta.get("num_loads") else None,
            "engine_thread_ms_per_step": 1e3 * delta.get("engine_seconds", 0.0) / max(1, len(decode_ms))}


def loader_probe(engine, dirs: list[Path], repeats: int) -> dict:
    """The loader job for one adapter, timed in this thread by stage: read (the load hook), validate + plan,
    pack into a host buffer (first: a new pinned buffer; then recycled ones)."""
    from loraplex.lora.plan import pack_pages, plan_adapter
    from loraplex.lora.peft_loader import read_peft_dir

    mgr = engine.lora_manager
    stages = {"read_ms": [], "plan_ms": [], "pack_ms": [], "total_ms": []}
    for i in range(repeats):
        t0 = time.perf_counter()
        config, tensors = read_peft_dir(dirs[i % len(dirs)], "probe")
        t1 = time.perf_counter()
        plan = plan_adapter(mgr.layout, config, tensors, "probe", mgr.max_lora_rank)
        buf = mgr.host.buffers.get(plan.rank)
        t2 = time.perf_counter()
        pack_pages(plan, mgr.layout, buf)
        t3 = time.perf_counter()
        mgr.host.buffers.put(buf)
        for key, v in (("read_ms", t1 - t0), ("plan_ms", t2 - t1), ("pack_ms", t3 - t2), ("total_ms", t3 - t0)):
            stages[key].append(v * 1e3)
    out = {k: statistics.median(v[1:] or v) for k, v in stages.items()}
    out["first_total_ms"] = stages["total_ms"][0]
    out["adapter_mb"] = plan.num_bytes / 1e6
    out["pinned"] = bool(buf.is_pinned()) if torch.cuda.is_available() else False
    return out


def churn_run(engine, stream_loras, churn_dirs, args, vocab: int, is_churn: bool, use: bool = False) -> dict:
    """128 long streams; with is_churn, every 100 ms an adapter is loaded (by the loaders) and unloaded; with use
    also, one short request runs with it in between (so it is uploaded, and its prefill takes an eager step
    beside the streams). Throughput counts the streams' tokens only."""
    from loraplex import SamplingParams
    from loraplex.lora.request import LoRARequest

    state = {"phase": "idle", "next": time.perf_counter() + 0.1, "k": 0, "cycles": 0, "future": None}
    short = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, detokenize=False)

    def on_step(eng):
        now = time.perf_counter()
        if not is_churn:
            return
        if state["phase"] == "idle" and now >= state["next"]:
            k = state["k"]
            state["req"] = LoRARequest(f"churn-{k}", 50_000 + k, str(churn_dirs[k % len(churn_dirs)]))
            state["future"] = eng.add_lora_async(state["req"])
            state["phase"], state["next"] = "loading", now + 0.1
        elif state["phase"] == "loading" and state["future"].done() and use:
            eng.add_request(f"churn-req-{state['k']}", {"prompt_token_ids": [1, 2, 3, 4]}, short,
                            lora_request=state["req"])
            state["phase"] = "using"
        elif state["phase"] == "loading" and state["future"].done():
            state["phase"] = "using"
        elif state["phase"] == "using" and f"churn-req-{state['k']}" not in eng.requests:
            eng.remove_lora(state["req"].lora_name)
            state["k"] += 1
            state["cycles"] += 1
            state["phase"] = "idle"

    res = run(engine, stream_loras, args, seed=777, vocab=vocab, on_step=on_step)
    res["churn_cycles"] = state["cycles"]
    res["tokens_per_s"] = len(stream_loras) * args.gen_len / res["seconds"]  # the streams' tokens only
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=["3b", "tiny"], default="3b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--requests", type=int, default=2048)
    ap.add_argument("--adapter-counts", default="32,256,1024")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=320)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--max-loras", type=int, default=128, help="distinct adapters in one batch")
    ap.add_argument("--max-cpu-loras", type=int, default=1024)
    ap.add_argument("--max-gpu-loras", type=int, default=None)
    ap.add_argument("--lora-memory-fraction", type=float, default=0.25)
    ap.add_argument("--loader-workers", type=int, default=4)
    ap.add_argument("--weight-files", type=int, default=8, help="distinct weight files behind the folders")
    ap.add_argument("--churn-streams", type=int, default=128)
    ap.add_argument("--churn-gen-len", type=int, default=512)
    ap.add_argument("--skip-churn", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cfg = LLAMA_3_2_3B if args.shape == "3b" else TINY
    counts = [int(c) for c in args.adapter_counts.split(",")]
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "shape": args.shape, "args": vars(args),
              "adapter_mb": adapter_bytes(cfg, args.rank) / 1e6}
    if args.device == "cuda":
        result["hbm_bytes_per_s"] = measure_hbm_bandwidth()
        # Loader processes pack into shared memory: the host cache must fit /dev/shm.
        shm_free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
        fit = int(0.9 * shm_free / adapter_bytes(cfg, args.rank))
        result["dev_shm_free_gb"] = shm_free / 1e9
        if fit < args.max_cpu_loras:
            print(f"/dev/shm holds {fit} adapters: max_cpu_loras {args.max_cpu_loras} -> {fit}", flush=True)
            args.max_cpu_loras = max(args.max_loras, fit)
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        model_dir = write_config(tmp / "model", cfg)
        t0 = time.perf_counter()
        dirs = write_adapters(tmp / "adapters", cfg, args.rank, max(counts) + 64, args.weight_files)
        print(f"wrote {len(dirs)} adapter folders in {time.perf_counter() - t0:.1f}s", flush=True)
        vocab = cfg["vocab_size"]

        engine = build(model_dir, args, lora=False)
        run(engine, [None] * min(64, args.requests), args, seed=1, vocab=vocab)  # warm-up: compiles, caches
        base = run(engine, [None] * args.requests, args, seed=2, vocab=vocab)
        rows.append({"workload": "base", **base})
        print(json.dumps(rows[-1]), flush=True)
        engine = None
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()

        from loraplex.lora.request import LoRARequest

        engine = build(model_dir, args, lora=True)
        mgr = engine.lora_manager
        result["pool_pages"] = mgr.pool.num_pages
        result["pool_adapters_of_max_rank"] = mgr.pool.num_pages // args.rank
        result["pool_gb"] = mgr.pool.num_bytes / 1e9
        result["loader"] = loader_probe(engine, dirs, repeats=12)
        print("loader", json.dumps(result["loader"]), flush=True)
        warm_up = [LoRARequest(f"warmup-{i}", 90_000 + i, str(dirs[-1 - i])) for i in range(4)]
        run(engine, [warm_up[i % 4] for i in range(64)], args, seed=3, vocab=vocab)
        next_id = 1
        for n in counts:
            names = [LoRARequest(f"n{n}-{i}", next_id + i, str(dirs[i])) for i in range(n)]
            next_id += n
            loras = [names[i % n] for i in range(args.requests)]
            for kind in ("cold", "warm"):
                if kind == "warm":
                    for r in names:  # every adapter in the CPU cache (most already are, from the cold run)
                        if not mgr.adapters[r.lora_name].is_materialized:
                            engine.add_lora(r)
                res = run(engine, loras, args, seed=10 + n, vocab=vocab)
                rows.append({"workload": f"{n} adapters, {kind}", **res})
                print(json.dumps(rows[-1]), flush=True)

        if not args.skip_churn:
            streams = [LoRARequest(f"stream-{i}", 70_000 + i, str(dirs[i])) for i in range(32)]
            for r in streams:
                engine.add_lora(r)
            churn_args = argparse.Namespace(**{**vars(args), "gen_len": args.churn_gen_len})
            stream_loras = [streams[i % 32] for i in range(args.churn_streams)]
            churn_dirs = dirs[-64:-4]
            quiet = churn_run(engine, stream_loras, churn_dirs, churn_args, vocab, is_churn=False)
            churn = churn_run(engine, stream_loras, churn_dirs, churn_args, vocab, is_churn=True)
            used = churn_run(engine, stream_loras, churn_dirs, churn_args, vocab, is_churn=True, use=True)
            rows.append({"workload": f"{args.churn_streams} streams, quiet", **quiet})
            rows.append({"workload": f"{args.churn_streams} streams, load+unload /100ms", **churn})
            rows.append({"workload": f"{args.churn_streams} streams, load+use+unload", **used})
            result["churn_slowdown"] = 1 - churn["tokens_per_s"] / quiet["tokens_per_s"]
            result["churn_used_slowdown"] = 1 - used["tokens_per_s"] / quiet["tokens_per_s"]
            for row in rows[-3:]:
                print(json.dumps(row), flush=True)
        result["lora_stats"] = dict(mgr.stats)
        engine = None
    base_tps = rows[0]["tokens_per_s"]
    for r in rows:
        r["ratio_to_base"] = r["tokens_per_s"] / base_tps
    if "hbm_bytes_per_s" in result:
        ctx = args.prompt_len + args.gen_len / 2
        for r in rows:
            if r["decode_step_ms_median"]:
                b = min(args.max_num_seqs, r["requests"])
                nbytes = weight_bytes(cfg) + b * ctx * kv_bytes_per_token(cfg) + \
                    r["mean_distinct_adapters"] * adapter_bytes(cfg, args.rank)
                r["decode_roofline_ms"] = nbytes / result["hbm_bytes_per_s"] * 1e3
    result["rows"] = rows
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def _f(v, fmt):
    return format(v, fmt) if v is not None else "-"


def print_table(result) -> None:
    ld = result["loader"]
    print(f"\n{result['device']}  {result['shape']}  rank {result['args']['rank']}  adapter "
          f"{result['adapter_mb']:.1f} MB  pool {result['pool_adapters_of_max_rank']} adapters "
          f"({result['pool_gb']:.1f} GB)  max_loras {result['args']['max_loras']}")
    print(f"loader per adapter: {ld['total_ms']:.1f} ms (read {ld['read_ms']:.1f}, validate {ld['plan_ms']:.1f}, "
          f"pack {ld['pack_ms']:.1f}); first, with a new pinned buffer: {ld['first_total_ms']:.1f} ms; "
          f"pinned: {ld['pinned']}")
    head = (f"{'workload':<38} {'tok/s':>8} {'x base':>7} {'loads':>6} {'loader ms':>9} {'TTFT p50':>9} "
            f"{'p99':>8} {'adapters/step':>13} {'step ms':>8} {'roof ms':>8}")
    print(head)
    for r in result["rows"]:
        print(f"{r['workload']:<38} {r['tokens_per_s']:>8.0f} {r['ratio_to_base']:>7.2f} {r['loads']:>6} "
              f"{_f(r['loader_ms_mean'], '.1f'):>9} {_f(r['ttft_p50_ms'], '.0f'):>9} {_f(r['ttft_p99_ms'], '.0f'):>8} "
              f"{r['mean_distinct_adapters']:>13.1f} {_f(r['decode_step_ms_median'], '.2f'):>8} "
              f"{_f(r.get('decode_roofline_ms'), '.2f'):>8}")
    if "churn_slowdown" in result:
        print(f"churn lowers the streams' throughput by {result['churn_slowdown'] * 100:.1f}% (load+unload every "
              f"100 ms), {result['churn_used_slowdown'] * 100:.1f}% (with a request per cycle)")


if __name__ == "__main__":
    main()
