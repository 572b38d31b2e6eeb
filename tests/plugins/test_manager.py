"""The plugin manager in-process: hook specs, built-ins, override order, once-per-process loading, and
how odd entry points are handled (installed as real dist-info directories on sys.path)."""
from __future__ import annotations

import inspect
import itertools
import logging
import threading

import pytest
from plugins_testlib import fake_dist

from loraplex.lora.request import LoRARequest
from loraplex.plugins import hookimpl, hookspecs
from loraplex.plugins.manager import get_plugin_manager, loaded_plugin_names, new_plugin_manager, reset_plugin_manager

SPECS = {"loraplex_resolve_lora": True, "loraplex_load_adapter": True, "loraplex_scheduling_policy": True,
         "loraplex_engine_started": False, "loraplex_adapter_loaded": False, "loraplex_adapter_evicted": False}
_unique = itertools.count()


def test_hook_specs_are_typed_documented_and_flagged():
    pm = new_plugin_manager()
    found = {n for n in dir(hookspecs) if n.startswith("loraplex_")}
    assert found == set(SPECS)
    for name, first in SPECS.items():
        caller = getattr(pm.hook, name)
        assert caller.spec is not None and bool(caller.spec.opts.get("firstresult")) is first, name
        fn = getattr(hookspecs, name)
        assert fn.__doc__ and fn.__doc__.strip(), name
        sig = inspect.signature(fn)
        assert sig.return_annotation is not inspect.Signature.empty
        assert all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values()), name


def test_builtin_loader_reads_peft_and_a_later_plugin_overrides_it(make_adapter):
    pm = new_plugin_manager()
    req = LoRARequest("a", 1, str(make_adapter(seed=3)))
    config, tensors = pm.hook.loraplex_load_adapter(lora_request=req)
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert any("lora_A" in k for k in tensors) and all(t.dim() == 2 for t in tensors.values())

    class Override:
        @hookimpl
        def loraplex_load_adapter(self, lora_request):
            return {"r": 1}, {}

    pm.register(Override(), name="override")
    assert pm.hook.loraplex_load_adapter(lora_request=req) == ({"r": 1}, {})


def test_default_hooks_have_neutral_answers():
    pm = new_plugin_manager()
    assert pm.hook.loraplex_scheduling_policy(max_num_seqs=4, max_loras=2) is None
    assert pm.hook.loraplex_resolve_lora(base_model_name="b", lora_name="x") is None
    assert pm.hook.loraplex_adapter_loaded(lora_name="x", lora_path="/p", tier="gpu", load_time_s=0.1) == []
    assert pm.hook.loraplex_adapter_evicted(lora_name="x", tier="cpu") == []
    assert pm.hook.loraplex_engine_started(engine=object()) == []


def test_manager_is_built_once_per_process_even_under_contention():
    reset_plugin_manager()
    barrier = threading.Barrier(8)
    got = []

    def worker():
        barrier.wait()
        got.append(get_plugin_manager())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(pm) for pm in got}) == 1
    names = loaded_plugin_names()
    assert len(names) == len(set(names)) and "lora_filesystem_resolver" in names
    reset_plugin_manager()
    assert get_plugin_manager() is not got[0]


@pytest.fixture
def site(tmp_path, monkeypatch):
    """``install(entry_points, modules)`` -> module-name suffix; modules are forgotten afterwards."""
    import sys

    made = []

    def install(entry_points, modules):
        n = next(_unique)
        root = tmp_path / f"site{n}"
        mods = {f"{m}_{n}": src for m, src in modules.items()}
        eps = {g: {k: v.replace("MOD", f"_{n}") for k, v in d.items()} for g, d in entry_points.items()}
        fake_dist(root, f"fake-dist-{n}", eps, mods)
        monkeypatch.syspath_prepend(str(root))
        made.extend(mods)
        return n

    yield install
    for m in made:
        sys.modules.pop(m, None)


HOOKED = "from loraplex.plugins import hookimpl\n"


def _names(pm):
    return {name for name, p in pm.list_name_plugin() if p is not None}


def test_odd_entry_points_are_logged_and_skipped(site, caplog):
    # "MOD" in a value becomes the per-test module suffix.
    site({"loraplex.plugins": {
        "bad_sig": "badsigMOD", "unknown_hook": "unknownhookMOD", "factory": "factoryMOD:make",
        "not_a_plugin": "inertMOD:VALUE", "raising_callable": "raiserMOD:go", "shy": "shyMOD",
        "reentrant": "reentrantMOD:go"}},
        {"badsig": HOOKED + "@hookimpl\ndef loraplex_resolve_lora(base_model_name, lora_name, extra):\n    pass\n",
         "unknownhook": HOOKED + "@hookimpl\ndef loraplex_no_such_hook():\n    pass\n",
         "factory": HOOKED + "class P:\n    @hookimpl\n    def loraplex_scheduling_policy(self):\n"
                             "        return 'from-factory'\n\ndef make():\n    return P()\n",
         "inert": "VALUE = 3\n",
         "raiser": "def go():\n    raise ValueError('callable went wrong')\n",
         "reentrant": HOOKED + "from loraplex.plugins.manager import get_plugin_manager\n"
                              "class P:\n    @hookimpl\n    def loraplex_engine_started(self):\n"
                              "        return 'by-hand'\n\ndef go():\n"
                              "    get_plugin_manager().register(P(), name='by-hand')\n",
         "shy": HOOKED + "LORAPLEX_DEFAULT_ON = False\n@hookimpl\ndef loraplex_engine_started(engine):\n"
                         "    return None\n"})
    with caplog.at_level(logging.DEBUG, logger="loraplex.plugins"):
        pm = get_plugin_manager()
    text = caplog.text
    names = loaded_plugin_names()
    assert "factory" in names and pm.hook.loraplex_scheduling_policy(max_num_seqs=1, max_loras=1) == "from-factory"
    assert "bad_sig" not in names and "bad_sig" not in _names(pm) and "raised while loading" in text
    assert "not_a_plugin" not in names and "not callable" in text
    assert "raising_callable" not in names and "callable went wrong" in text
    assert "shy" not in names and "not default-on" in text
    assert "unknown_hook" in names and "does not define" in text
    # A loader that registers by hand gets the manager being built, not a deadlock or a second one.
    assert "reentrant" in names and pm.hook.loraplex_engine_started(engine=None) == ["by-hand"]


def test_named_plugin_loads_even_if_not_default_on_and_duplicates_keep_the_first(site, monkeypatch, caplog):
    n = site({"loraplex.plugins": {"shy": "shyMOD", "twice": "firstMOD"},
              "vllm.general_plugins": {"twice": "secondMOD:go"}},
             {"shy": HOOKED + "LORAPLEX_DEFAULT_ON = False\n@hookimpl\ndef loraplex_scheduling_policy():\n"
                              "    return 'shy'\n",
              "first": HOOKED + "@hookimpl\ndef loraplex_engine_started(engine):\n    return 'first'\n",
              "second": "def go():\n    raise AssertionError('must not run')\n"})
    monkeypatch.setenv("LORAPLEX_PLUGINS", "shy, twice")
    with caplog.at_level(logging.WARNING, logger="loraplex.plugins"):
        pm = get_plugin_manager()
    assert loaded_plugin_names() == ["shy", "twice"]
    assert pm.hook.loraplex_scheduling_policy(max_num_seqs=1, max_loras=1) == "shy"
    assert pm.hook.loraplex_engine_started(engine=None) == ["first"]
    assert f"second_{n}:go" in caplog.text and "declared twice" in caplog.text
