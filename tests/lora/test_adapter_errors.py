"""Every bad adapter gives a typed error naming the adapter (and module), and the engine keeps serving."""
from __future__ import annotations

import json
import shutil

import pytest

from loraplex import LLM, SamplingParams
from loraplex.errors import (LoRAAlreadyLoadedError, LoRADisabledError, LoRALoadError, LoRANotFoundError,
                             LoRARankError)
from loraplex.lora.request import LoRARequest

GREEDY = SamplingParams(temperature=0, max_tokens=6)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(model=str(tiny_llama), enable_lora=True, max_loras=2, max_lora_rank=16, max_model_len=128)


def _copy(src, tmp_path, name="bad"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _assert_still_serves(llm):
    assert llm.generate("abc", GREEDY)[0].outputs[0].finish_reason in ("stop", "length")


def test_rank_above_max(llm, adapter_factory):
    with pytest.raises(LoRARankError, match=r"adapter 'big'.*rank 32 exceeds max_lora_rank 16"):
        llm.generate("abc", GREEDY, lora_request=LoRARequest("big", 1, str(adapter_factory("llama", 32))))
    _assert_still_serves(llm)


def test_missing_path(llm, tmp_path):
    with pytest.raises(LoRANotFoundError, match="ghost"):
        llm.add_lora(LoRARequest("ghost", 1, str(tmp_path / "nope")))
    with pytest.raises(LoRANotFoundError, match="adapter_config.json"):
        llm.add_lora(LoRARequest("empty", 1, str(tmp_path)))
    _assert_still_serves(llm)


@pytest.mark.parametrize("changes, message", [
    ({"peft_type": "PREFIX_TUNING"}, "peft_type"),
    ({"bias": "all"}, "bias"),
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"target_modules": ["c_attn"]}, "target module 'c_attn'"),
])
def test_unsupported_config(llm, adapter_factory, tmp_path, changes, message):
    bad = _copy(adapter_factory("llama", 4), tmp_path)
    _edit_config(bad, **changes)
    with pytest.raises(LoRALoadError, match=message):
        llm.add_lora(LoRARequest("bad", 1, str(bad)))
    assert "bad" not in {r.lora_name for r in llm.list_loras()}
    _assert_still_serves(llm)


def test_corrupt_weights(llm, adapter_factory, tmp_path):
    bad = _copy(adapter_factory("llama", 4), tmp_path)
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoRALoadError, match="cannot read weights"):
        llm.add_lora(LoRARequest("bad", 1, str(bad)))
    (bad / "adapter_model.safetensors").unlink()
    with pytest.raises(LoRALoadError, match="no adapter_model"):
        llm.add_lora(LoRARequest("bad", 1, str(bad)))
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoRALoadError, match="not valid JSON"):
        llm.add_lora(LoRARequest("bad", 1, str(bad)))
    _assert_still_serves(llm)


def test_adapter_for_another_model(llm, tmp_path, tiny_model_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from helpers import make_peft_adapter, make_tiny_model

    other = make_tiny_model(tmp_path / "wide", "llama", hidden_size=96, intermediate_size=128)
    adapter = make_peft_adapter(other, tmp_path / "wide-lora", rank=4)
    with pytest.raises(LoRALoadError, match=r"adapter 'wide'.*layer 0 q_proj.*do not fit the base model"):
        llm.add_lora(LoRARequest("wide", 1, str(adapter)))
    deep = make_tiny_model(tmp_path / "deep", "llama", num_hidden_layers=3)
    adapter = make_peft_adapter(deep, tmp_path / "deep-lora", rank=4)
    with pytest.raises(LoRALoadError, match="layer 2"):
        llm.add_lora(LoRARequest("deep", 1, str(adapter)))
    _assert_still_serves(llm)


def test_duplicate_name_needs_load_inplace(llm, adapter_factory):
    llm.add_lora(LoRARequest("dup", 1, str(adapter_factory("llama", 4))))
    with pytest.raises(LoRAAlreadyLoadedError, match="load_inplace"):
        llm.add_lora(LoRARequest("dup", 1, str(adapter_factory("llama", 8))))
    assert llm.add_lora(LoRARequest("dup", 1, str(adapter_factory("llama", 8)), load_inplace=True))


def test_lora_request_validation():
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("x", 0, "/p")
    with pytest.raises(ValueError, match="lora_name"):
        LoRARequest("", 1, "/p")


def test_lora_disabled(tiny_llama, adapter_factory):
    llm = LLM(model=str(tiny_llama), max_model_len=64)
    with pytest.raises(LoRADisabledError, match="enable_lora"):
        llm.generate("abc", GREEDY, lora_request=LoRARequest("a", 1, str(adapter_factory("llama", 4))))
