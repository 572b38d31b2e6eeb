"""vLLM's documented custom resolver (an s3fs ``S3LoRAResolver``) against a real S3 API (moto's server).

s3fs/aiobotocore keep their HTTP session on the event loop of the first call, so this only works if
every ``resolve_lora`` coroutine runs on one long-lived loop, as in vLLM. Resolution goes through the
real path: ``LoRAResolution`` -> plugin manager -> ``ResolverRegistryBridge`` -> the registry.
"""
from __future__ import annotations

import asyncio
import filecmp
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from plugins_testlib import free_port, s3_client, upload_dir

from loraplex.errors import LoRANotFoundError
from loraplex.lora.request import LoRARequest
from loraplex.lora.resolution import LoRAResolution
from loraplex.lora.resolver import (LoRAResolver, LoRAResolverRegistry, ResolverRegistryBridge,
                                    _LoRAResolverRegistry, resolver_loop, run_coroutine_sync)

s3fs = pytest.importorskip("s3fs")

BASE = "tiny-llama"
BUCKET = "my-bucket"


class MotoServer:
    """moto's standalone S3 server on one fixed port, so it can be stopped and started again there."""

    def __init__(self, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()  # the child holds its own descriptor
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto did not start on port {self.port}; log:\n"
                                       + self.log_path.read_text(errors="replace")[-2000:]) from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def moto(tmp_path, aws_env):
    server = MotoServer(tmp_path / "moto.log")
    server.start()
    yield server
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def adapter(make_adapter):
    return make_adapter(seed=11)


@pytest.fixture
def registered():
    """Register resolvers for one test; every one registered here is gone afterwards."""
    names = []

    def register(name, resolver):
        LoRAResolverRegistry.register_resolver(name, resolver)
        names.append(name)
        return resolver

    yield register
    for name in names:
        LoRAResolverRegistry.unregister_resolver(name)


def make_s3_resolver_class(endpoint_url: str, download_root: Path):
    """The resolver from vLLM's LoRA docs, as written there but for the endpoint and the two paths."""

    class S3LoRAResolver(LoRAResolver):
        def __init__(self):
            self.s3 = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint_url})

        async def resolve_lora(self, base_model_name, lora_name):
            # Download from S3
            s3_path = f"s3://{BUCKET}/loras/{base_model_name}/{lora_name}"
            local_path = f"{download_root}/{lora_name}"
            await self.s3._get(s3_path, local_path, recursive=True)
            return LoRARequest(
                lora_name=lora_name,
                lora_path=local_path,
                lora_int_id=abs(hash(lora_name)),
            )

    return S3LoRAResolver


def upload(endpoint: str, adapter: Path, names) -> None:
    client = s3_client(endpoint)
    if not any(b["Name"] == BUCKET for b in client.list_buckets()["Buckets"]):
        client.create_bucket(Bucket=BUCKET)
    for name in names:
        upload_dir(client, BUCKET, adapter, f"loras/{BASE}/{name}")


def assert_same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names and names == sorted(p.name for p in b.iterdir())
    assert all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def test_documented_s3_resolver_keeps_working_across_calls_and_a_server_restart(moto, adapter, tmp_path,
                                                                                 registered):
    dl = tmp_path / "loras"
    registered("s3_resolver", make_s3_resolver_class(moto.url, dl)())
    first, second = [f"adapter-{i}" for i in range(10)], [f"adapter-{i}" for i in range(10, 20)]
    upload(moto.url, adapter, first)
    for name in first:  # the old code resolved the first one and failed on every later one
        req = LoRAResolution().resolve_sync(BASE, name)
        assert (req.lora_name, req.lora_path) == (name, str(dl / name))
        assert_same_files(adapter, Path(req.lora_path))

    # moto keeps everything in memory: a restarted server has no bucket until it is uploaded again.
    moto.stop()
    moto.start()
    upload(moto.url, adapter, second)
    for name in second:  # same resolver object, same s3fs session, a fresh server on the same port
        req = LoRAResolution().resolve_sync(BASE, name)
        assert req.lora_path == str(dl / name)
        assert_same_files(adapter, Path(req.lora_path))


class LoopRecorder(LoRAResolver):
    """Records the loop each call runs on; every call waits until ``expect`` calls are in flight at once."""

    def __init__(self, expect: int):
        self.expect, self.started, self.loops = expect, 0, {}

    async def resolve_lora(self, base_model_name, lora_name):
        self.loops[lora_name] = asyncio.get_running_loop()
        self.started += 1  # no lock needed: every call runs on the one loop thread
        deadline = time.monotonic() + 10
        while self.started < self.expect:
            assert time.monotonic() < deadline, "the calls did not run concurrently"
            await asyncio.sleep(0.01)
        return LoRARequest(lora_name, 1, f"/{base_model_name}/{lora_name}")


def test_concurrent_resolutions_of_different_names_share_one_loop(registered):
    recorder = registered("recorder", LoopRecorder(expect=2))
    res = LoRAResolution()

    async def main():  # as the server does: awaited from its event loop, which stays free meanwhile
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.ensure_future(tick())
        reqs = await asyncio.gather(res.resolve(BASE, "a"), res.resolve(BASE, "b"))
        ticker.cancel()
        return reqs, asyncio.get_running_loop(), ticks

    (a, b), caller_loop, ticks = asyncio.run(main())
    assert (a.lora_path, b.lora_path) == (f"/{BASE}/a", f"/{BASE}/b")
    loop_a, loop_b = recorder.loops["a"], recorder.loops["b"]
    assert loop_a is loop_b is resolver_loop()
    assert loop_a is not caller_loop and loop_a.is_running()
    assert ticks > 0  # the caller's loop was not blocked while the resolvers ran


class Broken(LoRAResolver):
    async def resolve_lora(self, base_model_name, lora_name):
        await asyncio.sleep(0)
        raise ConnectionError("s3 is down")


def test_a_raising_resolver_gives_lora_not_found_and_the_loop_survives(registered):
    registered("broken", Broken())
    for _ in range(2):
        with pytest.raises(LoRANotFoundError, match=r"'x' cannot be found: a resolver failed.*s3 is down"):
            LoRAResolution().resolve_sync(BASE, "x")
    assert resolver_loop().is_running()
    recorder = registered("recorder", LoopRecorder(expect=1))
    assert LoRAResolution().resolve_sync(BASE, "x").lora_path == f"/{BASE}/x"  # the next resolver answers
    assert recorder.loops["x"] is resolver_loop()


def test_a_resolver_past_its_timeout_is_cancelled():
    cancelled = threading.Event()

    class Hangs(LoRAResolver):
        async def resolve_lora(self, base_model_name, lora_name):
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise

    registry = _LoRAResolverRegistry()
    registry.register_resolver("hangs", Hangs())
    bridge = ResolverRegistryBridge(registry, timeout=0.2)
    with pytest.raises(TimeoutError):
        bridge.loraplex_resolve_lora(base_model_name=BASE, lora_name="x")
    assert cancelled.wait(5)


def test_run_coroutine_sync_refuses_to_deadlock_on_its_own_loop():
    async def nested():
        return run_coroutine_sync(asyncio.sleep(0, "never"))

    with pytest.raises(RuntimeError, match="resolver loop"):
        run_coroutine_sync(nested())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_a_loop_of_its_own():
    parent_loop = resolver_loop()
    pid = os.fork()
    if pid == 0:  # child: the parent's loop thread did not survive the fork
        try:
            ok = resolver_loop() is not parent_loop and run_coroutine_sync(asyncio.sleep(0, 42), timeout=10) == 42
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 20
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("forked child hung on the resolver loop")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert resolver_loop() is parent_loop
