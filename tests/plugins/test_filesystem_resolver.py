"""The built-in filesystem resolver, through the real plugin manager (installed entry point)."""
from __future__ import annotations

import json
import os

import pytest
from plugins_testlib import copy_adapter

from loraplex.errors import LoRANotFoundError
from loraplex.lora.resolution import LoRAResolution
from loraplex.resolvers._download import base_model_matches, stable_lora_id


@pytest.fixture(scope="module")
def adapter(make_adapter):
    return make_adapter(seed=5)


@pytest.fixture
def cache(tmp_path, monkeypatch, adapter):
    root = tmp_path / "loras"
    copy_adapter(adapter, root / "plain")
    copy_adapter(adapter, root / "team" / "nested")
    copy_adapter(adapter, root / "tiny-llama" / "per-base")
    copy_adapter(adapter, tmp_path / "outside")  # a valid adapter that must stay unreachable
    monkeypatch.setenv("LORAPLEX_LORA_RESOLVER_CACHE_DIR", str(root))
    return root


def resolve(base, name):
    return LoRAResolution().resolve_sync(base, name)


def test_resolves_plain_nested_and_per_base_layouts(cache, tiny_model):
    base = str(tiny_model)  # what the adapter's config records
    req = resolve(base, "plain")
    assert req.lora_path == str(cache / "plain") and req.lora_name == "plain"
    assert req.lora_int_id == stable_lora_id("plain") > 0 and req.base_model_name == base
    assert resolve(base, "team/nested").lora_path == str(cache / "team" / "nested")
    # <dir>/<last component of the served model>/<adapter>
    assert resolve(base, "per-base").lora_path == str(cache / "tiny-llama" / "per-base")
    assert resolve("org/tiny-llama", "per-base").lora_path == str(cache / "tiny-llama" / "per-base")


def test_vllm_alias_variable_works(cache, tiny_model, monkeypatch):
    monkeypatch.delenv("LORAPLEX_LORA_RESOLVER_CACHE_DIR")
    with pytest.raises(LoRANotFoundError):
        resolve(str(tiny_model), "plain")  # inert without a directory
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(cache))
    assert resolve(str(tiny_model), "plain").lora_path == str(cache / "plain")


@pytest.mark.parametrize("served, ok", [("SAME", True), ("hub-org/tiny-llama", True), ("/models/tiny-llama/", True),
                                        ("other-model", False), ("tiny-llama-2", False), ("", False)])
def test_base_model_rule(cache, tiny_model, served, ok):
    served = str(tiny_model) if served == "SAME" else served
    assert base_model_matches(str(tiny_model), served) is ok
    if ok:
        assert resolve(served, "plain").lora_path == str(cache / "plain")
    elif served:
        with pytest.raises(LoRANotFoundError, match="no resolver plugin knows it"):
            resolve(served, "plain")


def test_non_lora_and_missing_are_not_found(cache, tiny_model):
    cfg = json.loads((cache / "plain" / "adapter_config.json").read_text())
    (cache / "ia3").mkdir()
    (cache / "ia3" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    (cache / "noconfig").mkdir()
    for name in ("ia3", "noconfig", "absent"):
        with pytest.raises(LoRANotFoundError, match=f"'{name}'"):
            resolve(str(tiny_model), name)


@pytest.mark.parametrize("name", ["../outside", "/ABS", "team/../../outside", "", "a//b", "./plain", "x\\..\\y"])
def test_traversal_and_malformed_names_are_refused(cache, tiny_model, tmp_path, name):
    name = name.replace("/ABS", str(tmp_path / "outside"))
    with pytest.raises(LoRANotFoundError) as err:
        resolve(str(tiny_model), name)
    assert "the name" in str(err.value) or "empty" in str(err.value)


def test_symlinks_out_of_the_directory_are_refused(cache, tiny_model, tmp_path):
    os.symlink(tmp_path / "outside", cache / "escape")
    with pytest.raises(LoRANotFoundError, match="leaves the resolver directory"):
        resolve(str(tiny_model), "escape")
    # A weight file linked to something outside would leak that file to the loader.
    leaky = copy_adapter(cache / "plain", cache / "leaky")
    (leaky / "adapter_model.safetensors").unlink()
    os.symlink(tmp_path / "outside" / "adapter_model.safetensors", leaky / "adapter_model.safetensors")
    with pytest.raises(LoRANotFoundError, match="leaves the resolver directory"):
        resolve(str(tiny_model), "leaky")
    # Links that stay inside are fine.
    os.symlink(cache / "plain", cache / "alias")
    assert resolve(str(tiny_model), "alias").lora_path == str(cache / "alias")
