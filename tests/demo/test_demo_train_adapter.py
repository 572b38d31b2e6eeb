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
