"""Offline API semantics: sampling, seeds, stops, detokenization, n, logprobs, abort, validation."""
from __future__ import annotations

import pytest

from loraplex import LLM, EngineArgs, LLMEngine, SamplingParams
from loraplex.errors import InvalidRequestError, PromptTooLongError


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(model=str(tiny_llama), max_model_len=128, seed=0)


def test_seeded_sampling_is_reproducible(llm):
    p = lambda seed: SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=20, seed=seed)  # noqa: E731
    a = llm.generate(["Hello", "abc"], [p(1), p(2)])
    b = llm.generate(["abc", "xyz", "Hello"], [p(2), p(3), p(1)])  # other batch, other order
    assert a[0].outputs[0].token_ids == b[2].outputs[0].token_ids
    assert a[1].outputs[0].token_ids == b[0].outputs[0].token_ids
    c = llm.generate("Hello", p(99))
    assert c[0].outputs[0].token_ids != a[0].outputs[0].token_ids


def test_n_samples_differ_and_are_indexed(llm):
    out = llm.generate("Hello", SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=5))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1


def test_stop_strings_not_in_text(llm):
    base = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0]
    # Random weights emit random bytes: take the first pair of whole characters past the start (U+FFFD marks bytes
    # that are no character).
    stop = next(base.text[i:i + 2] for i in range(2, len(base.text) - 2) if "\ufffd" not in base.text[i:i + 2])
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=40, stop=[stop], ignore_eos=True))[0]
    o = out.outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == stop
    assert o.text == base.text[: base.text.find(stop)]
    assert stop not in o.text


def test_stop_token_ids_and_length(llm):
    base = llm.generate("abc", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 10
    tok = base.token_ids[3]
    out = llm.generate("abc", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                             stop_token_ids=[tok]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == tok
    assert out.token_ids == base.token_ids[: base.token_ids.index(tok) + 1]


def test_incremental_detokenization_matches_full_decode(llm):
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=1.0, max_tokens=40, seed=3, ignore_eos=True, skip_special_tokens=True)
    for out in llm.generate(["héllo 日本語", "ü", "plain"], params):
        o = out.outputs[0]
        assert o.text == tok.decode(o.token_ids, skip_special_tokens=True).rstrip("\ufffd")


def test_multibyte_characters_stream_whole(tiny_llama):
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_llama), max_model_len=128))
    tok = engine.get_tokenizer()
    target = tok.encode("日本語ü")  # byte-level: several tokens per character
    engine.add_request("r", {"prompt_token_ids": tok.encode("x")},
                       SamplingParams(temperature=0, max_tokens=len(target), ignore_eos=True))
    seq = engine.requests["r"][0]
    texts = []
    for t in target:  # feed the tokens one by one through the detokenizer
        seq.detokenizer.add_token(t)
        texts.append(seq.detokenizer.text)
    assert all("\ufffd" not in t for t in texts)
    assert texts[-1] == "日本語ü"
    engine.abort_request("r")


def test_logprobs(llm):
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=5, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and entry[token].rank == 1  # greedy picks the top token
        assert len(entry) == 3
        assert all(lp.logprob <= 0 for lp in entry.values())
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_token_prompts_and_order(llm):
    tok = llm.get_tokenizer()
    outs = llm.generate([{"prompt_token_ids": tok.encode("abc")}, "abc", "longer prompt here"],
                        SamplingParams(temperature=0, max_tokens=8))
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert outs[1].prompt == "abc" and outs[0].prompt_token_ids == tok.encode("abc")
    assert outs[2].prompt == "longer prompt here"


def test_chat(llm):
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=5))
    assert out[0].finished and len(out[0].outputs[0].token_ids) <= 5


def test_abort(tiny_llama):
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_llama), max_model_len=128))
    engine.add_request("a", "Hello", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", "Hello", SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()
    engine.abort_request("a")
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out.outputs[0].finish_reason
    assert finals == {"a": "abort", "b": "length"}
    assert engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_usable_blocks


def test_prompt_too_long_is_rejected(llm):
    with pytest.raises(PromptTooLongError, match="maximum model length"):
        llm.generate({"prompt_token_ids": [1] * 500})


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -5}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"), ({"n": 0}, "n"), ({"min_p": 2}, "min_p"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logprobs": -1}, "logprobs"), ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
])
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    ({"dtype": "int8"}, "dtype"), ({"max_loras": 0}, "max_loras"), ({"max_lora_rank": 0}, "max_lora_rank"),
    ({"max_loras": 4, "max_cpu_loras": 2}, "max_cpu_loras"), ({"gpu_memory_utilization": 1.5},
                                                               "gpu_memory_utilization"),
    ({"block_size": 7}, "block_size"), ({"max_num_seqs": 0}, "max_num_seqs"), ({"device": "tpu"}, "device"),
    ({"max_model_len": 512, "max_num_batched_tokens": 256, "enable_chunked_prefill": False},
     "max_num_batched_tokens"),
    ({"async_scheduling": "yes"}, "async_scheduling"), ({"enable_prefix_caching": 1}, "enable_prefix_caching"),
    ({"enable_chunked_prefill": None}, "enable_chunked_prefill"),
])
def test_engine_args_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EngineArgs(model="m", **kwargs)


def test_unsupported_architecture(tmp_path):
    import json

    from loraplex.errors import UnsupportedModelError

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        LLM(model=str(tmp_path))


def test_penalties_and_min_tokens(llm):
    plain = llm.generate("abc", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    pen = llm.generate("abc", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                             repetition_penalty=1.8, frequency_penalty=1.5))[0].outputs[0]
    assert plain.token_ids != pen.token_ids
    assert len(set(pen.token_ids)) >= len(set(plain.token_ids))
    eos = llm.llm_engine.eos_token_ids
    out = llm.generate("abc", SamplingParams(temperature=0, max_tokens=12, min_tokens=12))[0].outputs[0]
    assert len(out.token_ids) == 12 and not set(out.token_ids) & set(eos)


def test_invalid_request_types(llm):
    with pytest.raises(InvalidRequestError):
        llm.generate([3.5])
    with pytest.raises(InvalidRequestError):
        llm.generate(["a", "b"], [SamplingParams()] * 3)
