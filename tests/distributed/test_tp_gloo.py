"""Tensor parallelism on the CPU (issue #20): two ranks over gloo, started torchrun-style, each running the same
engine on the same requests; greedy tokens equal TP=1's (fp32), Llama (GQA) and Qwen2 (q/k/v bias)."""
from __future__ import annotations

import multiprocessing
import os
import socket

import pytest

from loraplex import LLM, SamplingParams
from loraplex.errors import ConfigError

PROMPTS = ["Hello, my name is", "The capital of France", "abc", "1 2 3 4", "once upon a time", "zq"]
PARAMS = dict(temperature=0, max_tokens=12)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, model: str, out) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        llm = LLM(model, tensor_parallel_size=world, max_model_len=128, device="cpu")
        shapes = tuple(llm.llm_engine.model.layers[0].self_attn.qkv_proj.weight.shape)
        outs = llm.generate(PROMPTS, SamplingParams(**PARAMS))
        out.put((rank, shapes, [list(o.outputs[0].token_ids) for o in outs]))
    except BaseException as e:  # the parent reports it
        out.put((rank, None, repr(e)))


def _run_tp(model, world: int = 2):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, str(model), out)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict((r, (shapes, toks)) for r, shapes, toks in (out.get(timeout=300) for _ in procs))
    for p in procs:
        p.join(60)
    return results


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tp2_equals_tp1(arch, tiny_model_factory):
    path = tiny_model_factory(arch)
    expected = [list(o.outputs[0].token_ids) for o in
                LLM(str(path), max_model_len=128).generate(PROMPTS, SamplingParams(**PARAMS))]
    results = _run_tp(path)
    for rank, (shapes, tokens) in results.items():
        assert shapes is not None, tokens  # the rank's error
        assert tokens == expected, rank
    full = LLM(str(path), max_model_len=128).llm_engine.model.layers[0].self_attn.qkv_proj.weight.shape
    assert results[0][0] == (full[0] // 2, full[1])  # each rank holds half of q/k/v


def test_tp_needs_its_ranks(tiny_llama, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="torchrun-style"):
        LLM(str(tiny_llama), tensor_parallel_size=2)
