"""Fixtures for the plugin tests: a tiny model, real PEFT adapters, installed test plugin packages,
a real S3 (moto) server."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))  # tests/helpers.py

from helpers import make_peft_adapter, make_tiny_model  # noqa: E402
from plugins_testlib import free_port  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_loraplex_env(monkeypatch):
    """No test sees the developer's resolver settings, and each starts with a fresh plugin manager."""
    for key in list(os.environ):
        if key.startswith(("LORAPLEX_", "VLLM_")):
            monkeypatch.delenv(key)
    from loraplex.plugins.manager import reset_plugin_manager

    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def make_adapter(tiny_model, tmp_path_factory):
    """``make_adapter(seed, **config)`` -> a fresh PEFT LoRA directory for the tiny model."""
    root = tmp_path_factory.mktemp("adapters")
    counter = iter(range(10**6))

    def make(seed: int = 1, rank: int = 4, **overrides) -> Path:
        return make_peft_adapter(tiny_model, root / f"a{next(counter)}", rank=rank, seed=seed, **overrides)

    return make


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """The test plugin packages pip-installed into a private directory (never into the venv)."""
    work = tmp_path_factory.mktemp("plugin_src")
    target = tmp_path_factory.mktemp("plugin_site")
    srcs = []
    for pkg in ("example_resolver_pkg", "misc_plugins_pkg"):
        # Built from a copy: an in-tree build would leave build/ and egg-info in the repository.
        srcs.append(str(shutil.copytree(HERE / pkg, work / pkg)))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), *srcs], check=True, capture_output=True, timeout=300)
    return target


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory):
    """A real S3 API (moto's standalone server) on a free local port."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start (exit {proc.poll()})") from None
            time.sleep(0.2)
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def aws_env(monkeypatch):
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
