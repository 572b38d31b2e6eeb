"""The S3 resolver against a real S3 API (moto's server), through the real plugin manager."""
from __future__ import annotations

import filecmp
import threading
import time
import uuid

import pytest
from plugins_testlib import free_port, s3_client, upload_dir

from loraplex.errors import LoRANotFoundError
from loraplex.lora.resolution import LoRAResolution


@pytest.fixture(scope="module")
def adapter(make_adapter):
    return make_adapter(seed=7)


@pytest.fixture
def s3(moto_endpoint, aws_env, monkeypatch, tmp_path, adapter):
    """A fresh bucket holding ``adapters/my-adapter`` and ``adapters/tiny-llama/per-base``."""
    bucket = f"loras-{uuid.uuid4().hex[:12]}"
    client = s3_client(moto_endpoint)
    client.create_bucket(Bucket=bucket)
    upload_dir(client, bucket, adapter, "adapters/my-adapter")
    upload_dir(client, bucket, adapter, "adapters/tiny-llama/per-base")
    monkeypatch.setenv("LORAPLEX_PLUGINS", "lora_s3_resolver")
    monkeypatch.setenv("LORAPLEX_LORA_RESOLVER_S3_URI", f"s3://{bucket}/adapters")
    monkeypatch.setenv("LORAPLEX_LORA_RESOLVER_S3_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("LORAPLEX_LORA_DOWNLOAD_DIR", str(tmp_path / "dl"))
    return {"bucket": bucket, "client": client, "dl": tmp_path / "dl" / "s3" / bucket / "adapters"}


def resolve(base, name):
    return LoRAResolution().resolve_sync(base, name)


def _same_files(a, b):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def test_downloads_into_place_and_reuses_the_copy(s3, tiny_model, adapter):
    req = resolve(str(tiny_model), "my-adapter")
    target = s3["dl"] / "my-adapter"
    assert req.lora_path == str(target) and req.lora_name == "my-adapter"
    _same_files(adapter, target)
    assert [p.name for p in target.parent.iterdir()] == ["my-adapter"]  # no staging directory left behind
    # Gone from the bucket, still served: a complete local copy is reused without asking S3.
    for key in ("adapter_config.json", "adapter_model.safetensors"):
        s3["client"].delete_object(Bucket=s3["bucket"], Key=f"adapters/my-adapter/{key}")
    assert resolve(str(tiny_model), "my-adapter").lora_path == str(target)


def test_per_base_model_layout(s3, tiny_model):
    req = resolve(str(tiny_model), "per-base")
    assert req.lora_path == str(s3["dl"] / "tiny-llama" / "per-base")


def test_incomplete_adapter_never_lands(s3, tiny_model, adapter):
    s3["client"].upload_file(str(adapter / "adapter_config.json"), s3["bucket"], "adapters/half/adapter_config.json")
    with pytest.raises(LoRANotFoundError, match="'half'.*incomplete"):
        resolve(str(tiny_model), "half")
    assert not (s3["dl"] / "half").exists()
    assert not [p for p in s3["dl"].iterdir() if p.name.startswith(".half")]


def test_concurrent_downloads_by_independent_services_converge(s3, tiny_model, adapter):
    results, errors = [], []

    def worker():
        try:
            results.append(LoRAResolution().resolve_sync(str(tiny_model), "my-adapter").lora_path)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and set(results) == {str(s3["dl"] / "my-adapter")}
    _same_files(adapter, s3["dl"] / "my-adapter")
    assert [p.name for p in s3["dl"].iterdir()] == ["my-adapter"]


def test_missing_adapter_and_bad_names(s3, tiny_model):
    with pytest.raises(LoRANotFoundError, match="no resolver plugin knows it"):
        resolve(str(tiny_model), "absent")
    for name in ("../my-adapter", "/adapters/my-adapter", "a/../../b"):
        with pytest.raises(LoRANotFoundError, match="the name"):
            resolve(str(tiny_model), name)


def test_wrong_bucket(s3, tiny_model, monkeypatch):
    monkeypatch.setenv("LORAPLEX_LORA_RESOLVER_S3_URI", "s3://no-such-bucket-here/adapters")
    with pytest.raises(LoRANotFoundError, match="'my-adapter'.*bucket 'no-such-bucket-here' does not exist"):
        resolve(str(tiny_model), "my-adapter")


def test_unreachable_endpoint_fails_fast_with_a_clear_error(s3, tiny_model, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"  # bound then closed: nothing listens there
    monkeypatch.setenv("LORAPLEX_LORA_RESOLVER_S3_ENDPOINT_URL", dead)
    monkeypatch.setenv("LORAPLEX_LORA_RESOLVER_S3_CONNECT_TIMEOUT", "2")
    start = time.monotonic()
    with pytest.raises(LoRANotFoundError, match=f"'my-adapter'.*cannot reach the S3 endpoint {dead}"):
        resolve(str(tiny_model), "my-adapter")
    assert time.monotonic() - start < 20


def test_botocore_endpoint_variable_is_honoured(s3, tiny_model, monkeypatch, moto_endpoint):
    monkeypatch.delenv("LORAPLEX_LORA_RESOLVER_S3_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    assert resolve(str(tiny_model), "my-adapter").lora_path == str(s3["dl"] / "my-adapter")
