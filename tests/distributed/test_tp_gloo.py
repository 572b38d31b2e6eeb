"""Tensor parallelism on the CPU (issue #20): two ranks over gloo, started torchrun-style, each running the same
engine on the same requests; greedy tokens equal TP=1's (fp32), Llama (GQA) and Qwen2 (q/k/v bias), and with a
mixed batch of base rows and adapters of different ranks and targets (each rank packs its share of them)."""
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


def _generate(model: str, adapters: dict | None, **engine):
    from loraplex.lora.request import LoRARequest

    kwargs = dict(enable_lora=True, max_loras=2, max_lora_rank=8) if adapters else {}
    llm = LLM(model, max_model_len=128, device="cpu", **kwargs, **engine)
    loras = None
    if adapters:
        names = [None, "a4", "a8", "a4", None, "a8"]
        ids = {n: i + 1 for i, n in enumerate(adapters)}
        loras = [LoRARequest(n, ids[n], adapters[n]) if n else None for n in names]
    outs = llm.generate(PROMPTS, SamplingParams(**PARAMS), lora_request=loras)
    return llm, [list(o.outputs[0].token_ids) for o in outs]


def _rank(rank: int, world: int, port: int, model: str, adapters, out) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        llm, tokens = _generate(model, adapters, tensor_parallel_size=world)
        out.put((rank, tuple(llm.llm_engine.model.layers[0].self_attn.qkv_proj.weight.shape), tokens))
    except BaseException as e:  # the parent reports it
        out.put((rank, None, repr(e)))


def _run_tp(model, world: int = 2, adapters=None):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, str(model), adapters, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict((r, (shapes, toks)) for r, shapes, toks in (out.get(timeout=300) for _ in procs))
    for p in procs:
        p.join(60)
    return results


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tp2_equals_tp1(arch, tiny_model_factory):
    path = tiny_model_factory(arch)
    _, expected = _generate(str(path), None)
    results = _run_tp(path)
    for rank, (shapes, tokens) in results.items():
        assert shapes is not None, tokens  # the rank's error
        assert tokens == expected, rank
    full = LLM(str(path), max_model_len=128).llm_engine.model.layers[0].self_attn.qkv_proj.weight.shape
    assert results[0][0] == (full[0] // 2, full[1])  # each rank holds half of q/k/v


def test_tp2_with_adapters_equals_tp1(tiny_llama, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from helpers import make_peft_adapter

    adapters = {"a4": str(make_peft_adapter(tiny_llama, tmp_path / "a4", rank=4, seed=4, scale=0.2,
                                            targets=["q_proj", "v_proj", "o_proj", "down_proj"])),
                "a8": str(make_peft_adapter(tiny_llama, tmp_path / "a8", rank=8, seed=8, scale=0.2,
                                            targets="all-linear"))}
    _, expected = _generate(str(tiny_llama), adapters)
    _, base = _generate(str(tiny_llama), None)
    assert expected[1] != base[1] and expected[2] != base[2]  # the adapters change the outputs
    for rank, (shapes, tokens) in _run_tp(tiny_llama, adapters=adapters).items():
        assert shapes is not None, tokens
        assert tokens == expected, rank


def test_engine_started_ranks_with_adapters_and_a_rank_that_dies(tiny_llama, tmp_path):
    """No torchrun: the engine starts rank 1 itself and sends it its calls. Outputs equal TP=1's, adapters
    included; when rank 1 dies, the next step raises EngineDeadError at once, and so does every later one."""
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from helpers import make_peft_adapter

    from loraplex.errors import EngineDeadError

    adapters = {"a4": str(make_peft_adapter(tiny_llama, tmp_path / "a4", rank=4, seed=4, scale=0.2)),
                "a8": str(make_peft_adapter(tiny_llama, tmp_path / "a8", rank=8, seed=8, scale=0.2,
                                            targets="all-linear"))}
    _, expected = _generate(str(tiny_llama), adapters)
    llm, tokens = _generate(str(tiny_llama), adapters, tensor_parallel_size=2)
    assert tokens == expected
    model = llm.llm_engine.model
    assert model.layers[0].mlp.down_proj.weight.shape[1] == 56  # half of intermediate 112
    assert model.embed_tokens.weight.shape[0] == 130 and model.lm_head_weight.shape[0] == 130  # 259 rows, padded
    proc = llm.llm_engine._ranks.procs[0]
    proc.kill()
    proc.join(10)
    start = time.monotonic()
    for _ in range(2):
        with pytest.raises(EngineDeadError, match="rank 1 exited"):
            llm.generate(PROMPTS[:1], SamplingParams(**PARAMS))
    assert time.monotonic() - start < 10


def test_tp_size_must_match_torchrun(tiny_llama, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="WORLD_SIZE is 4"):
        LLM(str(tiny_llama), tensor_parallel_size=2)


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [True, False])
def test_tp2_cuda_nccl(tiny_llama, tmp_path, enforce_eager):
    """Two GPUs of one host, NCCL, bf16, with and without CUDA graphs (which capture the all-reduce): TP=2 against
    TP=1 up to near-ties, a mixed adapter batch included."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from helpers import make_peft_adapter

    from loraplex.lora.request import LoRARequest

    adapters = {"a4": str(make_peft_adapter(tiny_llama, tmp_path / "a4", rank=4, seed=4, scale=0.2)),
                "a8": str(make_peft_adapter(tiny_llama, tmp_path / "a8", rank=8, seed=8, scale=0.2,
                                            targets="all-linear"))}
    names = [None, "a4", "a8", "a4", None, "a8"]
    loras = [LoRARequest(n, i + 1, adapters[n]) if n else None for i, n in enumerate(names)]
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=2)
    runs = {}
    for tp in (1, 2):
        llm = LLM(str(tiny_llama), max_model_len=128, dtype="bfloat16", device="cuda", enable_lora=True,
                  max_loras=2, max_lora_rank=8, tensor_parallel_size=tp, enforce_eager=enforce_eager)
        runs[tp] = llm.generate(PROMPTS, params, lora_request=loras)
        del llm
    for one, two in zip(runs[1], runs[2]):
        a, b = one.outputs[0], two.outputs[0]
        first = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
        if first is not None:  # bf16 sums in another order: only a near-tie may flip
            top = sorted(a.logprobs[first].values(), key=lambda lp: -lp.logprob)
            assert top[0].logprob - top[1].logprob < 0.25, (a.token_ids, b.token_ids)
