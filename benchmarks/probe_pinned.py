"""How to get page-locked host memory for whole-adapter buffers: time and bytes of each way, on this machine.

    python benchmarks/probe_pinned.py
"""
from __future__ import annotations

import time

import torch

ROWS, COLS = 16, 1519616  # one rank-16 adapter of the Llama-3.2-3B shape, bf16: 48.6 MB


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, (time.perf_counter() - t) * 1e3


def register(t):
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    assert int(err) == 0, err
    return t


KEEP = []


def main() -> None:
    nbytes = ROWS * COLS * 2
    dev = torch.empty(ROWS, COLS, dtype=torch.bfloat16, device="cuda")
    for name, fn in [
        # torch's pinned allocator first; then registration, whose ranges stay registered for the process
        ("torch pinned, 48.6 MB", lambda: torch.empty(ROWS, COLS, dtype=torch.bfloat16, pin_memory=True)),
        ("torch pinned, 1 GiB slab", lambda: torch.empty(2**29, dtype=torch.bfloat16, pin_memory=True)),
        ("touch, then register", lambda: register(torch.zeros(ROWS, COLS, dtype=torch.bfloat16))),
        ("register untouched", lambda: register(torch.empty(ROWS, COLS, dtype=torch.bfloat16))),
    ]:
        times = []
        for _ in range(3):
            buf, ms = timed(fn)
            times.append(ms)
            KEEP.append(buf)  # held: a freed registered range would come back from malloc still registered
        view = buf[: ROWS * COLS].view(ROWS, COLS) if buf.dim() == 1 else buf
        timed(lambda: dev.copy_(view, non_blocking=True))
        _, copy_ms = timed(lambda: dev.copy_(view, non_blocking=True))
        stats = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
        reserved = {k: v for k, v in stats.items() if "reserved" in k and "current" in k}
        print(f"{name:<26} {min(times):8.1f} ms  (runs {', '.join(f'{t:.0f}' for t in times)})  pinned "
              f"{view.is_pinned()}  H2D {nbytes / copy_ms / 1e6:.1f} GB/s  host allocator {reserved}", flush=True)


if __name__ == "__main__":
    main()
