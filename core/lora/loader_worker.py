"""A loader process (``python -m loraplex.lora.loader_worker ADDRESS``): reads, validates and packs adapters for
the engine's ProcessLoader, one at a time, into shared-memory host buffers the engine hands it.

Its own interpreter, so its Python never holds the engine's GIL. Plugins load as in the engine (entry points,
``LORAPLEX_PLUGINS``). Protocol over a multiprocessing connection: the engine sends ("init", layout, max_rank,
dtype, num_threads), then per job ("load", job, request fields); the worker answers ("rank", job, rank), the
engine ("buffer", job, shared-memory name), the worker ("done", job, num_bytes, seconds) -- or ("error", job,
type name, message, adapter name) at any point.
"""
from __future__ import annotations

import os
import sys
import time
from collections import OrderedDict
from multiprocessing import resource_tracker, shared_memory
from multiprocessing.connection import Client


_MAX_MAPPED = 64


def _attach(name: str) -> shared_memory.SharedMemory:
    shm = shared_memory.SharedMemory(name=name)
    try:  # the engine owns the segment: this process's tracker must not unlink it when the process ends
        resource_tracker.unregister(shm._name, "shared_memory")
    except Exception:
        pass
    return shm


def serve(conn) -> None:
    import torch

    from loraplex.lora.plan import pack_pages, plan_adapter
    from loraplex.lora.peft_loader import check_allowed, loraplex_load_adapter
    from loraplex.lora.request import LoRARequest

    _, layout, max_rank, dtype_name, num_threads = conn.recv()
    dtype = getattr(torch, dtype_name)
    torch.set_num_threads(num_threads)
    try:
        from loraplex.plugins.manager import get_plugin_manager

        pm = get_plugin_manager()
    except Exception:  # no plugins then: the built-in PEFT reader
        pm = None
    segments: OrderedDict[str, shared_memory.SharedMemory] = OrderedDict()  # mapped buffers, most recent last
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        _, job, fields = msg
        start = time.perf_counter()
        req = None
        try:
            req = LoRARequest(**fields)
            check_allowed(req)  # every read, reloads after an eviction too (allowed_paths)
            result = pm.hook.loraplex_load_adapter(lora_request=req) if pm is not None else None
            config, tensors = result if result is not None else loraplex_load_adapter(req)
            plan = plan_adapter(layout, config, tensors, req.lora_name, max_rank)
            conn.send(("rank", job, plan.rank))
            reply = conn.recv()
            if reply[0] != "buffer":
                continue  # the engine could not give a buffer; it has failed the job itself
            name = reply[2]
            if name not in segments:
                segments[name] = _attach(name)
                while len(segments) > _MAX_MAPPED:  # the engine may have dropped old buffers: unmap them
                    segments.popitem(last=False)[1].close()
            segments.move_to_end(name)
            count = plan.rank * layout.page_elems
            buf = torch.frombuffer(segments[name].buf, dtype=dtype, count=count).view(plan.rank, layout.page_elems)
            pack_pages(plan, layout, buf)
            del buf
            tower = {path: (a.numpy(), b.numpy()) for path, (a, b) in plan.tower.items()}  # fp32: pickles as numpy
            conn.send(("done", job, plan.num_bytes, time.perf_counter() - start, tower, bool(plan.pieces)))
        except Exception as e:
            conn.send(("error", job, type(e).__name__, str(e), getattr(e, "lora_name", None)
                       or (req.lora_name if req is not None else None)))


def main() -> None:
    conn = Client(sys.argv[1], family="AF_UNIX", authkey=bytes.fromhex(os.environ["LORAPLEX_LOADER_AUTHKEY"]))
    try:
        serve(conn)
    except (EOFError, ConnectionError, KeyboardInterrupt):
        pass  # the engine went away


if __name__ == "__main__":
    main()
