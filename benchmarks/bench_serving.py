"""Serving benchmark: a real `loraplex serve` process against an asyncio HTTP client on the same machine, beside the
offline engine on the same workload, in one run (issue #21).

Workload: random-token prompts of --prompt-len tokens, --gen-len new tokens each (ignore_eos), spread round-robin
over --num-adapters rank-16 adapters and the base model; Llama-3.2-3B's shape with random (dummy) weights whose
vocabulary is a byte-level BPE tokenizer trained here, so every sampled token decodes to text and the server does
its real per-token work (detokenizing, JSON, SSE). Streams with fixed concurrency (closed loop: each of C clients
sends its next request when the previous one ends) and a Poisson request rate; for each: throughput (generated
tokens per second), time to first token and inter-token latency (p50, p99). The offline figure per concurrency C is
LLMEngine on one wave of C requests submitted at once, after a warm-up wave, in a process of its own; its TTFT is
that wave's prefill (the first token of every request comes from one prefill step when the token budget holds it).

    python benchmarks/bench_serving.py --json out.json                       (H200: 3B shape)
    python benchmarks/bench_serving.py --shape tiny --concurrency 1,8 --num-adapters 2 --rate 0   (CPU smoke run)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import LLAMA_3_2_3B, random_adapter, write_config, write_tokenizer  # noqa: E402

TINY = {**LLAMA_3_2_3B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rope_scaling": None}


# ---------------------------------------------------------------------- set-up
def prepare(root: Path, args) -> tuple[Path, list[Path], int]:
    from safetensors.torch import save_file

    vocab = write_tokenizer(root / "model", args.vocab_size)
    cfg = {**(LLAMA_3_2_3B if args.shape == "3b" else TINY), "vocab_size": vocab, "bos_token_id": 0,
           "eos_token_id": 0}
    model = write_config(root / "model", cfg)
    adapters = []
    for i in range(args.num_adapters):
        config, tensors = random_adapter(cfg, args.rank, seed=i)
        d = root / f"a{i}"
        d.mkdir()
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps(config))
        adapters.append(d)
    return model, adapters, vocab


def engine_kwargs(args) -> dict:
    return dict(load_format="dummy", max_num_seqs=args.max_num_seqs, max_model_len=args.prompt_len + args.gen_len + 16,
                max_num_batched_tokens=args.max_num_batched_tokens, enable_lora=True, max_loras=args.max_loras,
                max_lora_rank=args.rank, max_cpu_loras=max(args.num_adapters, args.max_loras), disable_log_stats=True,
                device=args.device)


def workload(num: int, vocab: int, args, seed: int) -> list[tuple[list[int], str | None]]:
    """(prompt token ids, adapter name or None) per request; adapters round-robin with the base."""
    rng = random.Random(seed)
    names = [f"a{i}" for i in range(args.num_adapters)] + [None]
    return [([rng.randrange(1, vocab) for _ in range(args.prompt_len)], names[i % len(names)]) for i in range(num)]


# ---------------------------------------------------------------------- offline
def offline_main(args) -> None:
    """In a process of its own: one wave of C requests per concurrency C, after a warm-up wave."""
    from loraplex import EngineArgs, LLMEngine, SamplingParams
    from loraplex.lora.request import LoRARequest

    model, adapters, vocab = Path(args.model), [Path(a) for a in args.adapter_dirs], args.vocab
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(model), **engine_kwargs(args)))
    loras = {f"a{i}": LoRARequest(f"a{i}", i + 1, str(d)) for i, d in enumerate(adapters)}
    params = SamplingParams(temperature=0, max_tokens=args.gen_len, ignore_eos=True)
    results = {}
    for c in [0] + args.concurrency:  # 0: the warm-up (largest wave)
        size = max(args.concurrency) if c == 0 else c
        reqs = workload(size, vocab, args, seed=1000 + c)
        start = time.monotonic()
        for i, (ids, name) in enumerate(reqs):
            engine.add_request(f"{c}-{i}", {"prompt_token_ids": ids}, params, lora_request=loras.get(name))
        tokens, first = 0, []
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    tokens += len(out.outputs[0].token_ids)
                    first.append(out.metrics["first_token_time"] - start)
        wall = time.monotonic() - start
        if c:
            results[c] = {"tok_s": tokens / wall, "ttft_p50_ms": 1e3 * statistics.median(first), "wall_s": wall}
            print(f"offline C={c}: {tokens / wall:,.0f} tok/s, TTFT p50 {1e3 * statistics.median(first):.0f} ms",
                  file=sys.stderr, flush=True)
    print(json.dumps(results))


def run_offline(args, model: Path, adapters: list[Path], vocab: int) -> dict:
    cmd = [sys.executable, __file__, "--offline-worker", "--model", str(model), "--vocab", str(vocab),
           "--adapter-dirs", *map(str, adapters)] + _forward(args)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def _forward(args) -> list[str]:
    return ["--shape", args.shape, "--device", args.device, "--prompt-len", str(args.prompt_len),
            "--gen-len", str(args.gen_len), "--rank", str(args.rank), "--num-adapters", str(args.num_adapters),
            "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
            "--max-loras", str(args.max_loras), "--concurrency", ",".join(map(str, args.concurrency))]


# ---------------------------------------------------------------------- client
async def _request(port: int, body: bytes) -> tuple[float, list[float], int, bool]:
    """One streamed completion over a raw HTTP/1.1 connection: (start, event times, completion tokens, ok).
    Raw sockets, not an HTTP library, so the client's own per-event cost stays far below the server's."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    status = await reader.readline()
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    times, last, buf = [], b"", b""
    while True:  # chunked transfer encoding: size line, data, CRLF
        size_line = await reader.readline()
        if not size_line:
            break
        size = int(size_line.strip() or b"0", 16)
        if size == 0:
            break
        chunk = await reader.readexactly(size + 2)
        buf += chunk[:-2]
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            if event.startswith(b"data: {"):
                if b'"text": "' in event or b'"text":"' in event:
                    times.append(time.monotonic())
                last = event
    writer.close()
    tokens = 0
    if last:
        usage = json.loads(last[6:]).get("usage") or {}
        tokens = usage.get("completion_tokens", 0)
    return start, times, tokens, status.split()[1:2] == [b"200"]


def _body(ids: list[int], name: str | None, gen_len: int) -> bytes:
    return json.dumps({"model": name or "base", "prompt": ids, "max_tokens": gen_len, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()


async def closed_loop(port: int, reqs: list, concurrency: int, gen_len: int) -> list:
    queue = list(reversed(reqs))
    results = []

    async def client():
        while queue:
            ids, name = queue.pop()
            results.append(await _request(port, _body(ids, name, gen_len)))

    await asyncio.gather(*[client() for _ in range(concurrency)])
    return results


async def poisson(port: int, reqs: list, rate: float, gen_len: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    tasks = []
    for ids, name in reqs:
        tasks.append(asyncio.create_task(_request(port, _body(ids, name, gen_len))))
        await asyncio.sleep(rng.expovariate(rate))
    return await asyncio.gather(*tasks)


def summarize(results: list) -> dict:
    ok = [r for r in results if r[3]]
    start, end = min(r[0] for r in results), max(r[1][-1] if r[1] else r[0] for r in results)
    ttft = [r[1][0] - r[0] for r in ok if r[1]]
    itl = [b - a for r in ok for a, b in zip(r[1], r[1][1:])]
    tokens = sum(r[2] for r in ok)

    def pct(xs, q):
        return 1e3 * statistics.quantiles(xs, n=100)[q - 1] if len(xs) >= 2 else (1e3 * xs[0] if xs else None)

    return {"num_requests": len(results), "num_failed": len(results) - len(ok), "tok_s": tokens / (end - start),
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "itl_p50_ms": pct(itl, 50),
            "itl_p99_ms": pct(itl, 99)}


# ---------------------------------------------------------------------- server
def start_server(args, model: Path, adapters: list[Path], log: Path) -> tuple[subprocess.Popen, int]:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kw = engine_kwargs(args)
    cmd = [sys.executable, "-m", "loraplex.server.cli", "serve", str(model), "--served-model-name", "base",
           "--host", "127.0.0.1", "--port", str(port), "--load-format", "dummy", "--device", args.device,
           "--max-num-seqs", str(kw["max_num_seqs"]), "--max-model-len", str(kw["max_model_len"]),
           "--max-num-batched-tokens", str(kw["max_num_batched_tokens"]), "--enable-lora",
           "--max-loras", str(kw["max_loras"]), "--max-lora-rank", str(kw["max_lora_rank"]),
           "--max-cpu-loras", str(kw["max_cpu_loras"]), "--disable-log-stats", "--uvicorn-log-level", "warning",
           "--lora-modules", *[f"a{i}={d}" for i, d in enumerate(adapters)]] + args.server_args
    out = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the server did not start:\n" + log.read_text()[-3000:])
        time.sleep(0.5)


def run_server(args, model: Path, adapters: list[Path], vocab: int, root: Path, label: str) -> dict:
    proc, port = start_server(args, model, adapters, root / f"server-{label}.log")
    results = {}
    try:
        # Warm-up: CUDA graphs, every adapter resident, the event loop's paths.
        asyncio.run(closed_loop(port, workload(max(args.concurrency), vocab, args, seed=7),
                                max(args.concurrency), args.gen_len))
        for c in args.concurrency:
            reqs = workload(args.waves * c, vocab, args, seed=1000 + c)
            results[f"C={c}"] = summarize(asyncio.run(closed_loop(port, reqs, c, args.gen_len)))
            print(f"server[{label}] C={c}: {results[f'C={c}']}", file=sys.stderr, flush=True)
        if args.rate > 0:
            reqs = workload(int(args.rate * args.rate_seconds), vocab, args, seed=99)
            results[f"rate={args.rate:g}"] = summarize(asyncio.run(poisson(port, reqs, args.rate, args.gen_len)))
            print(f"server[{label}] rate={args.rate:g}: {results[f'rate={args.rate:g}']}", file=sys.stderr, flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=["3b", "tiny"], default="3b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-adapters", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=32768)
    ap.add_argument("--max-loras", type=int, default=32)
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32, 128, 256, 512])
    ap.add_argument("--waves", type=int, default=2, help="requests per concurrency C: waves x C")
    ap.add_argument("--rate", type=float, default=40.0, help="Poisson requests per second (0: skip)")
    ap.add_argument("--rate-seconds", type=float, default=10.0)
    ap.add_argument("--transports", default="process,api2,thread",
                    help="process: the engine-core process (serve's default); apiN: with --api-server-count N; "
                         "thread: --disable-frontend-multiprocessing (the engine in the API server's process)")
    ap.add_argument("--server-args", nargs=argparse.REMAINDER, default=[])
    ap.add_argument("--json", default=None)
    ap.add_argument("--offline-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--adapter-dirs", nargs="*", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.offline_worker:
        offline_main(args)
        return
    root = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    model, adapters, vocab = prepare(root, args)
    offline = run_offline(args, model, adapters, vocab)
    servers = {}
    base_server_args = list(args.server_args)
    for transport in args.transports.split(","):
        extra = {"process": [], "thread": ["--disable-frontend-multiprocessing"]}.get(transport)
        if extra is None:
            extra = ["--api-server-count", transport.removeprefix("api")]
        args.server_args = base_server_args + extra
        servers[transport] = run_server(args, model, adapters, vocab, root, transport)
    rows = []
    print(f"\n{'workload':<12} {'offline tok/s':>13} {'offline TTFT':>12}", end="")
    for t in servers:
        print(f" | {t + ' tok/s':>14} {'ratio':>6} {'TTFT p50/p99':>14} {'ITL p50/p99':>12}", end="")
    print()
    for key in servers[next(iter(servers))]:
        c = int(key[2:]) if key.startswith("C=") else None
        off = offline.get(c, {})
        line = f"{key:<12} {off.get('tok_s', float('nan')):>13,.0f} {off.get('ttft_p50_ms', float('nan')):>10.0f}ms"
        row = {"workload": key, "offline": off}
        for t, res in servers.items():
            r = res[key]
            ratio = r["tok_s"] / off["tok_s"] if off else float("nan")
            line += (f" | {r['tok_s']:>14,.0f} {ratio:>6.2f} {r['ttft_p50_ms']:>6.0f}/{r['ttft_p99_ms']:<6.0f}ms "
                     f"{r['itl_p50_ms']:>4.0f}/{r['itl_p99_ms']:<4.0f}ms")
            row[t] = {**r, "ratio_to_offline": ratio}
        print(line)
        rows.append(row)
    if args.json:
        meta = {"shape": args.shape, "num_adapters": args.num_adapters, "rank": args.rank, "vocab": vocab,
                "prompt_len": args.prompt_len, "gen_len": args.gen_len, "max_num_seqs": args.max_num_seqs,
                "commit": os.environ.get("LORAPLEX_COMMIT")}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
