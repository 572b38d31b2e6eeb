"""Adapter paths and names against the real server (issue #22, findings 4, 5 and parts of 7).

4. ``--allowed-lora-paths``: a relative ``lora_path`` resolves against the allowed roots only (never the CWD), and a
   path that is not there is a 404, never a Hugging Face Hub download (Hub ids stay allowed without an allowlist).
5. The allowlist is checked again at every reload from storage (after CPU-cache eviction), in loader threads and
   loader processes, on the directory and on every file the loader opens; a reload that fails (refused, folder
   deleted) fails only the requests for that adapter.
7. Glob characters, ``..`` and NUL in names that would reach the Hub download filter are refused; NUL bytes and
   non-string values in ``lora_path`` / ``lora_name`` are a 400 with vLLM's error body, never a 500.

What already held and is tested elsewhere (not repeated here): traversal names, absolute names and symlinks out of
the resolver directory in the filesystem resolver (tests/plugins/test_filesystem_resolver.py
``test_traversal_and_malformed_names_are_refused``, ``test_symlinks_out_of_the_directory_are_refused``); an
absolute ``lora_path`` outside the allowed roots, a symlinked directory leading out and ``..`` at the first load
(tests/server/test_errors.py ``test_allowed_lora_paths``).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading

import httpx
import pytest
from server_helpers import ServerThread, drain, make_engine

PROMPT = "Hello, my name is"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
# One adapter fills the device pool (max_loras * max_lora_rank pages) and the CPU cache: loading and running a
# second one pushes the first out of both, so its next request reads it from storage again.
EVICTING = dict(max_loras=1, max_lora_rank=8, max_cpu_loras=1)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return make_engine(tiny_llama, **EVICTING)


@pytest.fixture
def tree(tmp_path, sec_adapters):
    """tmp/allowed/{good,victim,filler} (the allowlist), tmp/outside/evil, and tmp/good: an evil copy in the CWD."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    shutil.copytree(sec_adapters["good"], allowed / "good")
    shutil.copytree(sec_adapters["good"], allowed / "victim")
    shutil.copytree(sec_adapters["other"], allowed / "filler")
    shutil.copytree(sec_adapters["evil"], outside / "evil")
    shutil.copytree(sec_adapters["evil"], tmp_path / "good")
    return tmp_path


@pytest.fixture
def hub(tmp_path, sec_adapters, monkeypatch):
    """An offline Hub cache holding repo ``allowed/evil`` (the evil adapter) and ``org/allowed`` (sub-folders
    ``one`` and ``two``); returns the list of snapshot_download calls, which still reach the real function."""
    import huggingface_hub
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    for repo, subs in (("allowed/evil", [""]), ("org/allowed", ["one", "two"])):
        snap = cache / ("models--" + repo.replace("/", "--")) / "snapshots" / ("0" * 40)
        for sub in subs:
            shutil.copytree(sec_adapters["evil"], snap / sub, dirs_exist_ok=True)
        (snap.parent.parent / "refs").mkdir(parents=True)
        (snap.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    calls, real = [], huggingface_hub.snapshot_download

    def recording(repo_id, **kw):
        calls.append((repo_id, kw.get("allow_patterns")))
        return real(repo_id, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    return calls


@contextlib.contextmanager
def serve(engine, tiny_llama, **kw):
    from loraplex.server import create_app

    drain(engine)
    app = create_app(engine, served_model_name=str(tiny_llama), allow_runtime_lora_updating=True, api_key="",
                     admin_api_key="", **kw)
    with ServerThread(app) as srv:
        yield srv.url
    drain(engine)


def load(url, name, path, **kw):
    return httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path, **kw}, timeout=120)


def complete(url, model, max_tokens=8):
    return httpx.post(url + "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                                                     "temperature": 0}, timeout=120)


def text_of(r) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    return err


def evict(url, allowed, engine=None) -> None:
    """Load and run the filler: the adapters loaded before it leave the CPU cache and the device pool."""
    assert load(url, "filler", str(allowed / "filler")).status_code == 200
    text_of(complete(url, "filler"))
    if engine is not None:  # the thread-loader server runs in this process: check it took
        mgr = engine.lora_manager
        assert [n for n, m in mgr.adapters.items() if m.is_materialized] == ["filler"]
    else:
        gauges = dict(re.findall(r"^(loraplex_lora_adapters_\w+) (\S+)$", httpx.get(url + "/metrics").text, re.M))
        assert float(gauges["loraplex_lora_adapters_cpu"]) == 1 and float(gauges["loraplex_lora_adapters_gpu"]) == 1


def swap(victim, evil, what: str) -> None:
    """Point the victim adapter (already loaded and evicted) at the evil one outside the allowed roots."""
    if what == "dir":
        shutil.rmtree(victim)
        os.symlink(evil, victim)
    else:
        name = {"weights": "adapter_model.safetensors", "config": "adapter_config.json"}[what]
        os.remove(victim / name)
        os.symlink(evil / name, victim / name)


# ---------------------------------------------------------------------------- finding 4
def test_relative_paths_resolve_against_the_allowed_roots_only(engine, tiny_llama, tree, hub, monkeypatch):
    allowed = tree / "allowed"
    # The server's CWD holds the allowed root and an evil "good"; neither may decide what a relative path means.
    monkeypatch.chdir(tree)
    with serve(engine, tiny_llama, allowed_lora_paths=[str(allowed)]) as url:
        # Once: `allowed/evil` passed the check (CWD/allowed/evil is inside the root), did not exist, and was
        # downloaded as the Hub repo `allowed/evil`.
        err = error_of(load(url, "evil", "allowed/evil"), 404)
        assert "allowed/evil" in err["message"]
        error_of(complete(url, "evil"), 404)
        error_of(load(url, "missing", "org/missing"), 404)
        error_of(load(url, "missing", str(allowed / "org" / "missing")), 404)
        assert hub == []  # the Hub was never asked
        # `good` is the allowed root's, not the CWD's evil copy.
        assert load(url, "rel", "good").status_code == 200
        assert load(url, "abs", str(allowed / "good")).status_code == 200
        assert text_of(complete(url, "rel")) == text_of(complete(url, "abs"))
        roots = {m["id"]: m["root"] for m in httpx.get(url + "/v1/models").json()["data"]}
        assert roots["rel"] == str(allowed / "good")
        # Relative paths that climb out of the root are still refused.
        assert "--allowed-lora-paths" in error_of(load(url, "up", "../outside/evil"), 403)["message"]
        error_of(load(url, "up", "good/../../outside/evil"), 403)


def test_without_an_allowlist_hub_ids_still_load(engine, tiny_llama, tree, hub):
    """Documented behaviour kept: with no --allowed-lora-paths a path that is not a local directory and looks like
    ``org/name`` is a Hub repo id (HF_HUB_OFFLINE and the Hub cache apply)."""
    with serve(engine, tiny_llama, allowed_lora_paths=[]) as url:
        assert load(url, "hub", "allowed/evil").status_code == 200
        assert hub == [("allowed/evil", list(ADAPTER_FILES))]  # the adapter's files, not the whole repo
        text_of(complete(url, "hub"))
        # Glob characters and `..` never reach the download filter (once: `*/*`, every folder of the repo).
        for i, path in enumerate(("org/allowed/*", "org/allowed/[ot]*", "org/allowed/{one,two}", "org/allowed/o?e",
                                  "org/allowed/one/../two")):
            error_of(load(url, f"glob{i}", path), 404)
        assert len(hub) == 1
        # A sub-folder downloads that folder's adapter files only.
        assert load(url, "sub", "org/allowed/one").status_code == 200
        assert hub[-1] == ("org/allowed", ["one/adapter_config.json", "one/adapter_model.safetensors",
                                           "one/adapter_model.bin"])


# ---------------------------------------------------------------------------- finding 5
@pytest.mark.parametrize("what", ["weights", "config", "dir"])
def test_reload_after_eviction_is_checked_in_loader_threads(engine, tiny_llama, tree, what):
    allowed = tree / "allowed"
    with serve(engine, tiny_llama, allowed_lora_paths=[str(allowed)]) as url:
        assert load(url, "victim", str(allowed / "victim")).status_code == 200
        before = text_of(complete(url, "victim"))
        evict(url, allowed, engine)
        swap(allowed / "victim", tree / "outside" / "evil", what)
        err = error_of(complete(url, "victim"), 400)
        assert "--allowed-lora-paths" in err["message"], err
        assert text_of(complete(url, "filler"))  # the others go on
        # Put back, it loads again: the refusal is not remembered.
        if what == "dir":
            os.remove(allowed / "victim")
        shutil.rmtree(allowed / "victim", ignore_errors=True)
        shutil.copytree(allowed / "good", allowed / "victim")
        assert text_of(complete(url, "victim")) == before


def test_deleted_adapter_fails_only_its_own_requests(engine, tiny_llama, tree):
    allowed = tree / "allowed"
    with serve(engine, tiny_llama, allowed_lora_paths=[str(allowed)]) as url:
        assert load(url, "victim", str(allowed / "victim")).status_code == 200
        text_of(complete(url, "victim"))
        evict(url, allowed, engine)
        shutil.rmtree(allowed / "victim")
        got: dict = {}
        started = threading.Event()

        def stream():  # a long generation in flight while the reload fails
            body = {"model": "filler", "prompt": PROMPT, "max_tokens": 100, "temperature": 0, "stream": True,
                    "ignore_eos": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                got["status"] = r.status_code
                lines = []
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        started.set()
                got["lines"] = lines
            started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(60)
        error_of(complete(url, "victim"), 404)
        t.join(120)
        assert got["status"] == 200 and got["lines"][-1] == "data: [DONE]", got
        chunks = [json.loads(line[len("data: "):]) for line in got["lines"][:-1]]
        assert all("error" not in c for c in chunks)
        assert sum(1 for c in chunks if c["choices"][0]["text"] or c["choices"][0]["finish_reason"]) >= 1
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert text_of(complete(url, "filler")) and text_of(complete(url, str(tiny_llama)))


def test_loader_processes_check_every_reload(tiny_llama, tree, sec_adapters, tmp_path, monkeypatch):
    """The CLI with loader processes: the symlink swap after eviction, a deleted folder, and the Hub bypass."""
    from test_cli import Served

    allowed = tree / "allowed"
    shutil.copytree(sec_adapters["good"], allowed / "gone")
    hub_cache = tmp_path / "hub-cache"
    snap = hub_cache / "models--allowed--evil" / "snapshots" / ("0" * 40)
    shutil.copytree(sec_adapters["evil"], snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0" * 40)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAPLEX_", "VLLM_"))}
    env.update(VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", LORAPLEX_PLUGINS="", HF_HUB_OFFLINE="1",
               HF_HUB_CACHE=str(hub_cache))
    monkeypatch.chdir(tree)  # the server's CWD holds allowed/
    served = Served(["serve", str(tiny_llama), "--host", "127.0.0.1", "--port", "0", "--enable-lora",
                     "--max-model-len", "128", "--max-loras", "1", "--max-lora-rank", "8", "--max-cpu-loras", "1",
                     "--lora-loader", "process", "--num-lora-loader-workers", "1", "--allowed-lora-paths",
                     str(allowed), "--uvicorn-log-level", "warning"], env)
    try:
        url = served.url
        error_of(load(url, "evil", "allowed/evil"), 404)  # not the Hub repo `allowed/evil`
        for name in ("victim", "gone"):
            assert load(url, name, str(allowed / name)).status_code == 200
        before = text_of(complete(url, "victim"))
        evict(url, allowed)
        swap(allowed / "victim", tree / "outside" / "evil", "weights")
        shutil.rmtree(allowed / "gone")
        assert "--allowed-lora-paths" in error_of(complete(url, "victim"), 400)["message"]
        error_of(complete(url, "gone"), 404)
        text_of(complete(url, "filler"))
        os.remove(allowed / "victim" / "adapter_model.safetensors")
        shutil.copy(allowed / "good" / "adapter_model.safetensors", allowed / "victim")
        assert text_of(complete(url, "victim")) == before
    finally:
        served.stop()


# ---------------------------------------------------------------------------- finding 7
def test_hub_resolver_refuses_glob_names(engine, tiny_llama, tree, hub, monkeypatch):
    from loraplex.lora.resolution import LoRAResolution
    from loraplex.plugins.manager import new_plugin_manager
    from loraplex.resolvers import hf_hub

    monkeypatch.setenv("LORAPLEX_LORA_RESOLVER_HF_REPO_LIST", "org/allowed")
    pm = new_plugin_manager()
    pm.register(hf_hub, name="lora_hf_hub_resolver")
    resolution = LoRAResolution(plugin_manager=pm)
    try:
        with serve(engine, tiny_llama, lora_resolution=resolution) as url:
            for name in ("org/allowed/*", "org/allowed/**", "org/allowed/o?e", "org/allowed/[ot]*",
                         "org/allowed/{one,two}", "org/allowed/one/../two", "org/allowed/one\x00",
                         "org/allowed/one\\..\\two"):
                error_of(complete(url, name), 404)
            assert hub == []  # none reached snapshot_download
            text_of(complete(url, "org/allowed/one"))
            assert hub == [("org/allowed", ["one/adapter_config.json", "one/adapter_model.safetensors",
                                            "one/adapter_model.bin"])]
    finally:
        resolution.shutdown()


@pytest.mark.parametrize("allowlist", [True, False])
def test_nul_bytes_and_odd_values_are_400(engine, tiny_llama, tree, allowlist):
    allowed = tree / "allowed"
    with serve(engine, tiny_llama, allowed_lora_paths=[str(allowed)] if allowlist else []) as url:
        for name, path, param in (("x", "a\x00b", "lora_path"), ("x", str(allowed / "good") + "\x00", "lora_path"),
                                  ("x", "good\x00/../evil", "lora_path"), ("x\x00y", str(allowed / "good"),
                                                                          "lora_name")):
            err = error_of(load(url, name, path), 400)
            assert err["param"] == param and "NUL" in err["message"], err
        for body in ({"lora_name": "x", "lora_path": 5}, {"lora_name": "x", "lora_path": ["a"]},
                     {"lora_name": "x", "lora_path": {"a": 1}}, {"lora_name": "x", "lora_path": True},
                     {"lora_name": 5, "lora_path": str(allowed / "good")}, {"lora_name": "x", "lora_path": None}):
            error_of(httpx.post(url + "/v1/load_lora_adapter", json=body, timeout=60), 400)
        lone_surrogate = b'{"lora_name": "x", "lora_path": "good\\ud800"}'  # valid JSON, no valid file name
        assert error_of(httpx.post(url + "/v1/load_lora_adapter", content=lone_surrogate), 400)["param"] == "lora_path"
        # Odd but well-formed paths are "not found", never a 500.
        for path in ("x" * 5000, str(allowed / ("x" * 300)), "/" + "a/" * 3000, "good/" + "x" * 300 + "/y"):
            assert load(url, "odd", path).status_code in (403, 404)
        error_of(complete(url, "a\x00b"), 404)
        assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "a\x00b"}).status_code in (400, 404)
        text_of(complete(url, str(tiny_llama)))
