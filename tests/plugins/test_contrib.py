"""Contrib plugins in-process: the generic fsspec resolver and the fair-share scheduling policy."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import fsspec
import pytest
from plugins_testlib import s3_client, upload_dir

from loraplex.contrib import fair_share, fsspec_resolver
from loraplex.engine.policy import FCFSPolicy, SchedulingPolicy
from loraplex.errors import LoRANotFoundError
from loraplex.lora.resolution import LoRAResolution
from loraplex.plugins.manager import new_plugin_manager


@pytest.fixture(scope="module")
def adapter(make_adapter):
    return make_adapter(seed=21)


@pytest.fixture
def service(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPLEX_LORA_DOWNLOAD_DIR", str(tmp_path / "dl"))
    pm = new_plugin_manager()
    pm.register(fsspec_resolver)
    return LoRAResolution(pm)


def test_memory_filesystem(service, adapter, tiny_model, monkeypatch, tmp_path):
    root = f"/loras-{uuid.uuid4().hex[:8]}"
    mem = fsspec.filesystem("memory")
    mem.put(str(adapter) + "/", f"{root}/tiny-llama/by-base/", recursive=True)
    mem.put(str(adapter) + "/", f"{root}/flat/", recursive=True)
    mem.pipe(f"{root}/flat/checkpoint-1/optimizer.pt", b"not part of the adapter")
    monkeypatch.setenv("LORAPLEX_LORA_RESOLVER_FSSPEC_URI", f"memory://{root}")
    req = service.resolve_sync(str(tiny_model), "flat")
    assert req.lora_path == str(tmp_path / "dl" / "fsspec" / "memory" / root.strip("/") / "flat")
    assert json.loads(open(f"{req.lora_path}/adapter_config.json").read())["peft_type"] == "LORA"
    assert not (tmp_path / "dl" / "fsspec" / "memory" / root.strip("/") / "flat" / "checkpoint-1").exists()
    by_base = service.resolve_sync(str(tiny_model), "by-base")
    assert by_base.lora_path.endswith("/tiny-llama/by-base")
    with pytest.raises(LoRANotFoundError, match="no resolver plugin knows it"):
        service.resolve_sync(str(tiny_model), "absent")
    mem.put(str(adapter) + "/", f"{root}/absent/", recursive=True)  # uploaded after the miss
    assert service.resolve_sync(str(tiny_model), "absent").lora_path.endswith("/absent")
    with pytest.raises(LoRANotFoundError, match="the name"):
        service.resolve_sync(str(tiny_model), "../flat")


def test_s3_through_fsspec_options(service, adapter, tiny_model, monkeypatch, moto_endpoint, aws_env):
    bucket = f"fsspec-{uuid.uuid4().hex[:10]}"
    client = s3_client(moto_endpoint)
    client.create_bucket(Bucket=bucket)
    upload_dir(client, bucket, adapter, "pre/remote")
    monkeypatch.setenv("LORAPLEX_LORA_RESOLVER_FSSPEC_URI", f"s3://{bucket}/pre")
    monkeypatch.setenv("LORAPLEX_LORA_RESOLVER_FSSPEC_OPTIONS",
                       json.dumps({"endpoint_url": moto_endpoint, "skip_instance_cache": True}))
    req = service.resolve_sync(str(tiny_model), "remote")
    assert req.lora_path.endswith(f"/fsspec/s3/{bucket}/pre/remote")


def test_unknown_protocol_is_a_clear_error(service, tiny_model, monkeypatch):
    monkeypatch.setenv("LORAPLEX_LORA_RESOLVER_FSSPEC_URI", "nosuchproto://x/y")
    with pytest.raises(LoRANotFoundError, match="'a'.*nosuchproto://x/y"):
        service.resolve_sync(str(tiny_model), "a")


@dataclass
class Req:
    request_id: str
    arrival_time: float
    lora_name: str | None
    priority: int = 0
    num_prompt_tokens: int = 4


def test_fair_share_interleaves_adapters_by_arrival():
    hot = [Req(f"hot{i}", float(i), "hot") for i in range(5)]
    late = [Req("cold0", 10.0, "cold"), Req("base0", 11.0, None), Req("cold1", 12.0, "cold")]
    policy = fair_share.loraplex_scheduling_policy(max_num_seqs=8, max_loras=2)
    assert isinstance(policy, SchedulingPolicy) and policy.name == "fair_share"
    order = [r.request_id for r in policy.order(late + hot)]
    assert order == ["hot0", "cold0", "base0", "hot1", "cold1", "hot2", "hot3", "hot4"]
    assert [r.request_id for r in FCFSPolicy().order(late + hot)][:2] == ["hot0", "hot1"]


def test_fair_share_keeps_priority_first():
    reqs = [Req("a0", 0.0, "a"), Req("a1", 1.0, "a"), Req("b0", 2.0, "b", priority=-1), Req("a2", 3.0, "a", -1)]
    assert [r.request_id for r in fair_share.FairSharePolicy().order(reqs)] == ["b0", "a2", "a0", "a1"]


def test_fair_share_through_the_hook():
    pm = new_plugin_manager()
    assert pm.hook.loraplex_scheduling_policy(max_num_seqs=4, max_loras=1) is None
    pm.register(fair_share)
    assert isinstance(pm.hook.loraplex_scheduling_policy(max_num_seqs=4, max_loras=1), fair_share.FairSharePolicy)
