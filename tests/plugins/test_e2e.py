"""End to end: one engine, every resolver (built-in, contrib, third-party, vLLM-style) loaded the way
production loads them, each serving its own adapter; greedy output must equal PEFT's on the same weights."""
from __future__ import annotations

import sys
import uuid

import pytest
import torch
from plugins_testlib import copy_adapter, engine_or_skip, s3_client, upload_dir, write_hf_cache

from loraplex.lora.resolution import LoRAResolution
from loraplex.lora.resolver import LoRAResolverRegistry
from loraplex.plugins.manager import loaded_plugin_names, reset_plugin_manager

PROMPT = "Hello, my name is"
MAX_TOKENS = 8
PLUGINS = ["lora_filesystem_resolver", "lora_hf_hub_resolver", "lora_s3_resolver", "lora_fsspec_resolver",
           "example_resolver", "example_vllm_style", "fair_share_scheduler"]
NAMES = ["fs-adapter", "org/repo/adapters/hf", "s3-adapter", "fsspec-adapter", "example-adapter",
         "vllm-style/reg-adapter"]


def peft_greedy(model_dir, adapter_dir) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def _place_adapters(root, adapters, moto_endpoint):
    """Put each adapter where its resolver looks; returns the environment that points them there."""
    import fsspec

    copy_adapter(adapters["fs-adapter"], root / "fs" / "fs-adapter")
    files = {f"adapters/hf/{p.name}": p for p in adapters["org/repo/adapters/hf"].iterdir()}
    write_hf_cache(root / "hub", "org/repo", files)
    bucket = f"e2e-{uuid.uuid4().hex[:10]}"
    client = s3_client(moto_endpoint)
    client.create_bucket(Bucket=bucket)
    upload_dir(client, bucket, adapters["s3-adapter"], "loras/s3-adapter")
    mem_root = f"/e2e-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("memory").put(str(adapters["fsspec-adapter"]) + "/", f"{mem_root}/fsspec-adapter/",
                                    recursive=True)
    copy_adapter(adapters["example-adapter"], root / "example" / "example-adapter")
    copy_adapter(adapters["vllm-style/reg-adapter"], root / "vllm" / "reg-adapter")
    return {
        "LORAPLEX_PLUGINS": ",".join(PLUGINS),
        "LORAPLEX_LORA_DOWNLOAD_DIR": str(root / "dl"),
        "LORAPLEX_LORA_RESOLVER_CACHE_DIR": str(root / "fs"),
        "LORAPLEX_LORA_RESOLVER_HF_REPO_LIST": "org/repo",
        "LORAPLEX_LORA_RESOLVER_S3_URI": f"s3://{bucket}/loras",
        "LORAPLEX_LORA_RESOLVER_S3_ENDPOINT_URL": moto_endpoint,
        "LORAPLEX_LORA_RESOLVER_FSSPEC_URI": f"memory://{mem_root}",
        "EXAMPLE_RESOLVER_DIR": str(root / "example"),
        "VLLM_STYLE_RESOLVER_DIR": str(root / "vllm"),
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model, make_adapter, plugin_site, moto_endpoint):
    LLM, SamplingParams = engine_or_skip()
    import huggingface_hub.constants as hf_constants

    root = tmp_path_factory.mktemp("e2e")
    # A larger scale than the default so every adapter visibly changes greedy output.
    adapters = {name: make_adapter(seed=31 + i, scale=0.3) for i, name in enumerate(NAMES)}
    before = set(sys.modules)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in _place_adapters(root, adapters, moto_endpoint).items():
                mp.setenv(key, value)
            mp.syspath_prepend(str(plugin_site))
            mp.setattr(hf_constants, "HF_HUB_CACHE", str(root / "hub"))
            mp.setattr(hf_constants, "HF_HUB_OFFLINE", True)
            reset_plugin_manager()
            try:
                llm = LLM(model=str(tiny_model), enable_lora=True, max_lora_rank=16, max_loras=2, max_num_seqs=8,
                          max_model_len=128)
                loaded = loaded_plugin_names()
                resolution = LoRAResolution(llm.llm_engine.plugin_manager)
                requests = {name: resolution.resolve_sync(str(tiny_model), name, timeout=120) for name in NAMES}
                resolution.shutdown()
                llm.generate([PROMPT], SamplingParams(max_tokens=1), lora_request=requests[NAMES[0]])
            except ModuleNotFoundError as e:
                if not (e.name or "").startswith("loraplex"):
                    raise
                pytest.skip(f"the engine is not complete yet: {e}")
        yield {"llm": llm, "params": SamplingParams(temperature=0, max_tokens=MAX_TOKENS), "adapters": adapters,
               "requests": requests, "loaded": loaded, "root": root}
    finally:
        LoRAResolverRegistry.unregister_resolver("vllm_style_prefix")
        for mod in set(sys.modules) - before:
            if mod.startswith(("loraplex_example_resolver", "loraplex_misc_plugins")):
                del sys.modules[mod]
        reset_plugin_manager()


@pytest.fixture(scope="module")
def expected(served, tiny_model):
    base = peft_greedy(tiny_model, None)
    per_adapter = {name: peft_greedy(tiny_model, served["adapters"][name]) for name in NAMES}
    return base, per_adapter


def test_plugins_and_policy_loaded_as_configured(served):
    assert set(served["loaded"]) == set(PLUGINS)
    assert served["llm"].llm_engine.scheduler.policy.name == "fair_share"
    reqs = served["requests"]
    assert reqs["s3-adapter"].lora_path.startswith(str(served["root"] / "dl" / "s3"))
    assert reqs["fsspec-adapter"].lora_path.startswith(str(served["root"] / "dl" / "fsspec" / "memory"))
    assert reqs["org/repo/adapters/hf"].lora_path.startswith(str(served["root"] / "hub"))


@pytest.mark.parametrize("name", NAMES)
def test_each_resolver_serves_what_peft_computes(served, expected, name):
    base, per_adapter = expected
    assert per_adapter[name] != base, "adapter too weak to test anything"
    out = served["llm"].generate([PROMPT], served["params"], lora_request=served["requests"][name])
    assert out[0].outputs[0].token_ids == per_adapter[name]


def test_all_resolved_adapters_in_one_batch(served, expected):
    base, per_adapter = expected
    reqs = [served["requests"][n] for n in NAMES] + [None]
    outs = served["llm"].generate([PROMPT] * len(reqs), served["params"], lora_request=reqs)
    assert [o.outputs[0].token_ids for o in outs] == [per_adapter[n] for n in NAMES] + [base]


def test_lifecycle_hooks_reach_plugins(served, make_adapter):
    from loraplex.lora.request import LoRARequest
    from loraplex.plugins import hookimpl

    class Recorder:
        def __init__(self):
            self.events = []

        @hookimpl
        def loraplex_adapter_loaded(self, lora_name, tier):
            self.events.append(("loaded", lora_name, tier))

        @hookimpl
        def loraplex_adapter_evicted(self, lora_name, tier):
            self.events.append(("evicted", lora_name, tier))

    pm, rec = served["llm"].llm_engine.plugin_manager, Recorder()
    pm.register(rec, name="recorder")
    try:
        req = LoRARequest("recorded", 99, str(make_adapter(seed=99, rank=16)))
        served["llm"].generate([PROMPT] * len(NAMES), served["params"],
                               lora_request=[req] + [served["requests"][n] for n in NAMES[1:]])
    finally:
        pm.unregister(name="recorder")
    assert ("loaded", "recorded", "cpu") in rec.events
    # Ranks 16 + 5 x 4 through a device pool of 32 rank rows (two adapters of max_lora_rank).
    assert any(e[0] == "evicted" and e[2] == "gpu" for e in rec.events)
