"""Entry-point discovery and selection, each case in a fresh process (the manager loads once per process).

The third-party packages in example_resolver_pkg/ and misc_plugins_pkg/ are pip-installed into a private
directory that only the child processes see.
"""
from __future__ import annotations

import json

import pytest
from plugins_testlib import probe

BUILTIN = ["lora_filesystem_resolver", "lora_hf_hub_resolver", "lora_s3_resolver"]


def _adapter(path, base="base-model"):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base}))
    (path / "adapter_model.safetensors").write_bytes(b"not read by resolvers")
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("discovery")
    _adapter(root / "example" / "ex-adapter")
    _adapter(root / "vllm" / "v1")
    _adapter(root / "fs" / "fs-adapter")
    _adapter(root / "remote" / "remote-adapter")
    return root


def _env(dirs, **extra):
    return {"EXAMPLE_RESOLVER_DIR": dirs / "example", "VLLM_STYLE_RESOLVER_DIR": dirs / "vllm",
            "LORAPLEX_LORA_RESOLVER_CACHE_DIR": dirs / "fs", **extra}


NAMES = ("ex-adapter", "fs-adapter", "vllm-style/v1", "nope")


def _ok(out, name):
    return "path" in out["resolved"][name]


def test_default_selection_loads_default_on_plugins_and_skips_broken(plugin_site, dirs):
    out = probe(plugin_site, names=NAMES, **_env(dirs))
    assert set(out["loaded"]) == {"lora_filesystem_resolver", "example_resolver", "example_vllm_style"}
    assert out["resolved"]["ex-adapter"]["path"] == str(dirs / "example" / "ex-adapter")
    assert out["resolved"]["fs-adapter"]["path"] == str(dirs / "fs" / "fs-adapter")
    assert out["resolved"]["vllm-style/v1"]["path"] == str(dirs / "vllm" / "v1")
    assert out["registry"] == ["vllm_style_prefix"]
    err = out["resolved"]["nope"]["error"]
    assert err.startswith("LoRANotFoundError") and "'nope'" in err
    broken = [r for r in out["logs"] if "example_broken" in r["message"]]
    assert broken and broken[0]["level"] == "ERROR" and "failed to import" in broken[0]["message"]
    assert "exploded on import" in broken[0]["exc"]
    # Built-ins are registered before entry points so that plugins win firstresult hooks.
    assert out["registered"][:2] == ["loraplex.builtin.peft_loader", "loraplex.builtin.resolver_registry"]
    assert out["resolve_order"][-1] == "loraplex.builtin.resolver_registry"


def test_selected_by_name(plugin_site, dirs):
    out = probe(plugin_site, names=NAMES, LORAPLEX_PLUGINS="example_resolver", **_env(dirs))
    assert out["loaded"] == ["example_resolver"]
    assert _ok(out, "ex-adapter") and not _ok(out, "fs-adapter") and not _ok(out, "vllm-style/v1")
    assert out["registry"] == []


def test_deselected_when_another_is_named(plugin_site, dirs):
    out = probe(plugin_site, names=NAMES, LORAPLEX_PLUGINS="lora_filesystem_resolver", **_env(dirs))
    assert out["loaded"] == ["lora_filesystem_resolver"]
    assert _ok(out, "fs-adapter") and not _ok(out, "ex-adapter")


def test_vllm_plugins_alias_and_precedence(plugin_site, dirs):
    out = probe(plugin_site, names=NAMES, VLLM_PLUGINS="example_resolver", **_env(dirs))
    assert out["loaded"] == ["example_resolver"] and _ok(out, "ex-adapter")
    out = probe(plugin_site, names=NAMES, VLLM_PLUGINS="example_resolver",
                LORAPLEX_PLUGINS="lora_filesystem_resolver", **_env(dirs))
    assert out["loaded"] == ["lora_filesystem_resolver"]


def test_empty_selection_loads_nothing(plugin_site, dirs):
    out = probe(plugin_site, names=NAMES, LORAPLEX_PLUGINS="", **_env(dirs))
    assert out["loaded"] == []
    assert out["registered"] == ["loraplex.builtin.peft_loader", "loraplex.builtin.resolver_registry"]
    assert not any(_ok(out, n) for n in NAMES)


def test_unknown_name_warns_and_explicit_broken_is_skipped(plugin_site, dirs):
    out = probe(plugin_site, names=NAMES, LORAPLEX_PLUGINS="example_broken,example_resolver,does_not_exist",
                **_env(dirs))
    assert out["loaded"] == ["example_resolver"] and _ok(out, "ex-adapter")
    warn = [r for r in out["logs"] if "does_not_exist" in r["message"]]
    assert warn and warn[0]["level"] == "WARNING" and "not installed" in warn[0]["message"]
    assert any("example_broken" in r["message"] and r["level"] == "ERROR" for r in out["logs"])


def test_vllm_style_callable_registers_a_resolver(plugin_site, dirs):
    out = probe(plugin_site, names=NAMES, LORAPLEX_PLUGINS="example_vllm_style", **_env(dirs))
    assert out["loaded"] == ["example_vllm_style"]
    assert out["registry"] == ["vllm_style_prefix"]
    assert out["resolved"]["vllm-style/v1"] == {"path": str(dirs / "vllm" / "v1"), "id": 7}
    assert not _ok(out, "ex-adapter")


def test_builtin_entry_points_without_third_party_packages(dirs, tmp_path):
    out = probe(None, names=("fs-adapter",), policy=True, **_env(dirs))
    assert out["loaded"] == ["lora_filesystem_resolver"] and _ok(out, "fs-adapter")
    assert out["policy"] is None
    out = probe(None, names=("fs-adapter",), LORAPLEX_PLUGINS=",".join(BUILTIN), **_env(dirs))
    assert sorted(out["loaded"]) == BUILTIN


def test_contrib_plugins_load_only_when_named(plugin_site, dirs, tmp_path):
    env = _env(dirs, LORAPLEX_LORA_RESOLVER_FSSPEC_URI=f"file://{dirs / 'remote'}",
               LORAPLEX_LORA_DOWNLOAD_DIR=tmp_path / "dl")
    out = probe(plugin_site, names=("remote-adapter",), policy=True, **env)
    assert "lora_fsspec_resolver" not in out["loaded"] and "fair_share_scheduler" not in out["loaded"]
    assert out["policy"] is None and not _ok(out, "remote-adapter")
    out = probe(plugin_site, names=("remote-adapter",), policy=True,
                LORAPLEX_PLUGINS="lora_fsspec_resolver,fair_share_scheduler", **env)
    assert set(out["loaded"]) == {"lora_fsspec_resolver", "fair_share_scheduler"}
    assert out["policy"] == "FairSharePolicy"
    copied = tmp_path / "dl" / "fsspec" / "file" / str(dirs / "remote").strip("/") / "remote-adapter"
    assert out["resolved"]["remote-adapter"]["path"] == str(copied)
    assert (copied / "adapter_config.json").is_file()
