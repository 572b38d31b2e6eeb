"""The HF Hub resolver through huggingface_hub's real snapshot_download, offline, on a pre-filled cache.

huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when imported, so the resolution runs in a fresh process.
"""
from __future__ import annotations

import pytest
from plugins_testlib import probe, write_hf_cache

from loraplex.errors import LoRANotFoundError
from loraplex.resolvers.hf_hub import split_name

FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, make_adapter):
    home = tmp_path_factory.mktemp("hf_home")
    one, two = make_adapter(seed=11), make_adapter(seed=12)
    files = {f"adapters/one/{f}": one / f for f in FILES}
    files.update({f"adapters/two/{f}": two / f for f in FILES})
    files.update({f: one / f for f in FILES})  # an adapter at the repo root too
    files["adapters/empty/notes.txt"] = one / "adapter_config.json"  # a folder without adapter_config.json
    write_hf_cache(home / "hub", "org/repo", files)
    return home


def test_offline_cache_resolution(hf_home, tiny_model):
    env = {"HF_HOME": hf_home, "HF_HUB_OFFLINE": "1", "LORAPLEX_PLUGINS": "lora_hf_hub_resolver",
           "LORAPLEX_LORA_RESOLVER_HF_REPO_LIST": "org/repo, org/uncached"}
    names = ("org/repo/adapters/one", "org/repo/adapters/two", "org/repo", "org/repo/adapters/empty",
             "org/repo/adapters/absent", "org/uncached/x", "elsewhere/repo/x", "org/repo/../x")
    out = probe(None, base=str(tiny_model), names=names, **env)
    assert out["loaded"] == ["lora_hf_hub_resolver"]
    snap = hf_home / "hub" / "models--org--repo" / "snapshots" / ("0" * 40)
    got = out["resolved"]
    assert got["org/repo/adapters/one"]["path"] == str(snap / "adapters" / "one")
    assert got["org/repo/adapters/two"]["path"] == str(snap / "adapters" / "two")
    assert got["org/repo"]["path"] == str(snap)
    assert "has no adapter_config.json in 'adapters/empty'" in got["org/repo/adapters/empty"]["error"]
    assert "has no adapter_config.json" in got["org/repo/adapters/absent"]["error"]
    # Listed but never downloaded, and offline: huggingface_hub's own error, wrapped.
    err = got["org/uncached/x"]["error"]
    assert err.startswith("LoRANotFoundError") and "'org/uncached/x'" in err and "org/uncached" in err
    assert "no resolver plugin knows it" in got["elsewhere/repo/x"]["error"]  # not in the repo list
    assert "'..'" in got["org/repo/../x"]["error"]


def test_base_model_mismatch_is_not_served(hf_home):
    out = probe(None, base="some-other-model", names=("org/repo/adapters/one",), HF_HOME=hf_home,
                HF_HUB_OFFLINE="1", LORAPLEX_PLUGINS="lora_hf_hub_resolver",
                LORAPLEX_LORA_RESOLVER_HF_REPO_LIST="org/repo")
    assert "no resolver plugin knows it" in out["resolved"]["org/repo/adapters/one"]["error"]


def test_split_name():
    repos = ["org/repo"]
    assert split_name("org/repo", repos) == ("org/repo", "")
    assert split_name("org/repo/a/b", repos) == ("org/repo", "a/b")
    assert split_name("org/other/a", repos) is None and split_name("single", repos) is None
    with pytest.raises(LoRANotFoundError):
        split_name("org/repo/../../etc", repos)
