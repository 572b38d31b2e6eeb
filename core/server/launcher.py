"""Several API server processes over one engine-core process (``loraplex serve --api-server-count N``).

This process binds the listening socket, starts the engine-core process, then N API server processes that share
the socket (the kernel spreads connections over them) and each attach to the core with a client of their own
(``ProcEngineClient.attach``): tokenizing, templates, detokenizing and SSE then run on N cores. /metrics adds up
the request counters of all N (prometheus_client's multiprocess mode, in a temporary directory) beside the
engine's gauges. It stays to watch: when an API server exits, or on SIGTERM / Ctrl-C, it stops the API servers
(each drains within uvicorn's grace period), then the engine. When the engine dies, the API servers stay up and
answer 503, /health included, as a single one does.
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import threading
import time

logger = logging.getLogger("loraplex.server")

STOP_TIMEOUT_S = 20.0


def _api_server_main(index: int, sock, handle: dict, engine_args, app_kwargs: dict, uvicorn_kwargs: dict,
                     log_level: int) -> None:
    logging.basicConfig(level=log_level, format=f"%(levelname)s %(name)s[api{index}]: %(message)s")
    import uvicorn

    from loraplex.server.app import create_app
    from loraplex.server.engine_proc import ProcEngineClient
    from loraplex.server.http_protocol import protocol_class

    client = ProcEngineClient.attach(engine_args, handle)
    app = create_app(client, **app_kwargs)
    header_timeout = uvicorn_kwargs.pop("header_timeout")
    config = uvicorn.Config(app, http=protocol_class(header_timeout), **uvicorn_kwargs)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass


def serve_api_servers(num: int, engine_args, lora_modules: list, app_kwargs: dict, uvicorn_kwargs: dict,
                      on_started=None, progress: bool = True) -> int:
    """Run until stopped; ``on_started(port, engine_pid)`` once the first API server answers /health."""
    import urllib.request

    import uvicorn

    from loraplex import envs
    from loraplex.server.engine_proc import EngineCoreProcess

    bind = uvicorn.Config(None, host=uvicorn_kwargs["host"], port=uvicorn_kwargs["port"])
    sock = bind.bind_socket()
    port = sock.getsockname()[1]
    metrics_dir = tempfile.mkdtemp(prefix="loraplex-metrics-")
    os.environ[envs.PROMETHEUS_MULTIPROC_DIR] = metrics_dir  # read by prometheus_client in the API servers
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    core = EngineCoreProcess.start(engine_args, lora_modules, progress=progress, num_clients=num)
    ctx = multiprocessing.get_context("spawn")
    servers = []
    try:
        for i in range(num):
            p = ctx.Process(target=_api_server_main, name=f"loraplex-api-{i}",
                            args=(i, sock, core.handle(i), engine_args, app_kwargs, dict(uvicorn_kwargs),
                                  logging.getLogger().level))
            p.start()
            servers.append(p)
        for end in core.client_lifelines:
            end.close()  # each API server holds its own now
        # Not the core's: when the engine dies the API servers stay up to answer 503 (/health too), as one does.
        sentinels = [p.sentinel for p in servers]
        is_announced = False
        while not stop.is_set():
            if multiprocessing.connection.wait(sentinels, timeout=0.5):
                logger.error("an API server process exited: stopping the others and the engine")
                break
            if not is_announced:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                        is_announced = r.status == 200
                except OSError:
                    pass
                if is_announced and on_started is not None:
                    on_started(port, core.pid)
    finally:
        for p in servers:
            if p.is_alive():
                p.terminate()  # SIGTERM: uvicorn's graceful shutdown
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for p in servers:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
        core.stop()
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
