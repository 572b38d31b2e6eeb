"""Training a LoRA end to end on a tiny random model, and the JSONL input formats."""
from __future__ import annotations

import json

import pytest
import torch

from loraplex.demo import train_adapter
from loraplex.demo.train_adapter import TrainConfig, encode, read_jsonl, train

peft = pytest.importorskip("peft")


def _tiny_cfg(**kw):
    return TrainConfig(**{"steps": 4, "batch_size": 2, "lr": 5e-3, "rank": 4, "max_len": 128, "bf16": "off", **kw})


def test_train_saves_a_loadable_peft_adapter(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    examples = [{"prompt": f"Q{i}: add {i} and 1.", "completion": f" {i + 1}"} for i in range(6)]
    out = tmp_path / "lora"
    stats = train(tiny_llama, examples, out, _tiny_cfg(), base_model_name="tiny-base", progress=False)
    assert stats["steps"] == 4 and stats["examples"] == 6 and stats["final_loss"] > 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"] == "tiny-base"
    assert set(config["target_modules"]) == set(train_adapter.ALL_TARGETS)
    assert (out / "adapter_model.safetensors").is_file()

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(out))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: training moved it
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        adapted = model(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
    assert not torch.allclose(adapted, plain)


def test_loss_covers_only_the_answer(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids, start = encode(tok, {"prompt": "abc", "completion": " xy"}, "raw", 64)
    assert ids[-1] == tok.eos_token_id and tok.decode(ids[start:-1]) == " xy" and tok.decode(ids[:start]) == "abc"
    ids, start = encode(tok, {"messages": [{"role": "user", "content": "hi"}], "completion": "yo"}, "auto", 64)
    assert tok.decode(ids[:start]).endswith("<|im_start|>assistant\n") and tok.decode(ids[start:-1]) == "yo"
    ids, start = encode(tok, {"prompt": "p" * 100, "completion": "answer"}, "raw", 16)
    assert len(ids) == 16 and tok.decode(ids[start:-1]) == "answer"


def test_read_jsonl_formats(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "2+2=", "completion": " 4"}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Arr!"}]}),
    ]))
    rows = read_jsonl(path)
    assert rows[0] == {"prompt": "2+2=", "completion": " 4"}
    assert rows[1] == {"messages": [{"role": "user", "content": "hi"}], "completion": "Arr!"}
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    with pytest.raises(ValueError, match="assistant"):
        read_jsonl(path)


def test_cli_with_own_data(tiny_llama, tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                                       {"role": "assistant", "content": f"Arr! {w}"}]})
                              for w in ("ahoy", "aye", "matey")))
    out = tmp_path / "mine-lora"
    rc = train_adapter.main(["--data", str(data), "--base", str(tiny_llama), "--out", str(out), "--steps", "2",
                             "--batch-size", "2", "--rank", "4", "--bf16", "off", "--quiet"])
    assert rc == 0 and (out / "adapter_model.safetensors").is_file()
    meta = json.loads((out / "loraplex_train.json").read_text())
    assert meta["task"] == "custom" and meta["steps"] == 2
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_llama)
    assert train_adapter.main(["--out", str(out)]) == 2  # neither --task nor --data


def test_fp16_save_halves_the_file_and_loads_in_loraplex(tiny_llama, tmp_path):
    """save_dtype float16: the same adapter in half the bytes, which loraplex's loader upcasts and serves."""
    from safetensors import safe_open

    from loraplex import LLM, SamplingParams
    from loraplex.lora.request import LoRARequest

    examples = [{"prompt": f"Q{i}:", "completion": f" {i}"} for i in range(4)]
    full, half = tmp_path / "fp32", tmp_path / "fp16"
    train(tiny_llama, examples, full, _tiny_cfg(), progress=False)
    train(tiny_llama, examples, half, _tiny_cfg(save_dtype="float16"), progress=False)
    with safe_open(str(full / "adapter_model.safetensors"), "pt") as a, \
            safe_open(str(half / "adapter_model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            assert b.get_tensor(k).dtype == torch.float16
            torch.testing.assert_close(b.get_tensor(k).float(), a.get_tensor(k), rtol=1e-3, atol=1e-5)
    size = lambda d: (d / "adapter_model.safetensors").stat().st_size  # noqa: E731
    assert size(half) < 0.6 * size(full)
    llm = LLM(str(tiny_llama), enable_lora=True, max_lora_rank=8, dtype="float32")
    out = llm.generate(["Q1:"], SamplingParams(temperature=0, max_tokens=3),
                       lora_request=LoRARequest("half", 1, str(half)))
    assert len(out[0].outputs[0].token_ids) >= 1


def test_bad_save_dtype_is_refused_before_training(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="save_dtype"):
        train(tiny_llama, [{"prompt": "a", "completion": " b"}], tmp_path / "x", _tiny_cfg(save_dtype="int8"),
              progress=False)
    assert not (tmp_path / "x").exists()
