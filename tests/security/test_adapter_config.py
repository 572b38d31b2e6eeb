"""Issue #22 findings 6 (alpha_pattern regex) and 7 (adapter configs with odd types): a 400, fast, never a 500."""
from __future__ import annotations

import json
import shutil
import time

import httpx
import pytest
from server_helpers import ServerThread, make_engine


@pytest.fixture(scope="module")
def server(tiny_llama):
    from loraplex.server import create_app

    app = create_app(make_engine(tiny_llama, max_loras=2, max_lora_rank=8), api_key="",
                     allow_runtime_lora_updating=True)
    with ServerThread(app) as srv:
        yield srv


def _with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return dst


@pytest.mark.parametrize("changes, words", [
    # Each ran for longer than 5 s per module name under `re` (the finding: 12.5 s for one adapter).
    ({"alpha_pattern": {"(.*.*)*x": 4, "q_proj": 8}}, None),
    ({"alpha_pattern": {"(.|\\w)*(.|\\w)*x": 4}}, None),
    ({"alpha_pattern": {"[unclosed": 4}}, "not a valid regex"),
    ({"alpha_pattern": {"q_proj": "eight"}}, "must be a finite number"),
    ({"alpha_pattern": ["q_proj"]}, "alpha_pattern must be an object"),
    ({"rank_pattern": {"q_proj": 2.5}}, "must be a finite number"),
    ({"r": "8"}, "r must be a positive int"),
    ({"r": True}, "r must be a positive int"),
    ({"lora_alpha": None}, "lora_alpha must be a finite number"),
    ({"target_modules": [1, 2]}, "target_modules must be strings"),
    ({"target_modules": {"q_proj": 1}}, "target_modules must be a string or a list"),
    ({"use_rslora": "yes"}, "use_rslora must be a bool"),
])
def test_odd_adapter_configs_are_400(server, sec_adapters, tmp_path, changes, words):
    path = _with_config(sec_adapters["good"], tmp_path / "odd", **changes)
    start = time.monotonic()
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "odd", "lora_path": str(path)},
                   timeout=60)
    elapsed = time.monotonic() - start
    if words is None:  # a pathological but valid pattern: matched quickly, and the adapter loads
        assert r.status_code == 200, r.text
        assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "odd"}).status_code == 200
    else:
        assert r.status_code == 400, r.text
        assert words in r.json()["error"]["message"]
    assert elapsed < 5
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
