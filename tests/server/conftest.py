"""Fixtures for the server tests: a tiny model, its adapters, and real uvicorn servers on ephemeral ports."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from helpers import make_peft_adapter  # noqa: E402
from server_helpers import ENGINE_KWARGS, make_engine  # noqa: E402

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="session")
def adapters(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """Five adapters of the tiny model: different seeds, ranks and target sets."""
    specs = {"a1": (8, ("q_proj", "v_proj"), 1), "a2": (4, ("k_proj", "o_proj"), 2),
             "a3": (16, ("gate_proj", "up_proj", "down_proj"), 3), "a4": (8, ("q_proj", "o_proj", "up_proj"), 4),
             "a5": (8, ("v_proj", "down_proj"), 5)}
    root = tmp_path_factory.mktemp("server-adapters")
    return {name: make_peft_adapter(tiny_llama, root / name, rank=r, targets=t, seed=s, scale=0.2)
            for name, (r, t, s) in specs.items()}


@pytest.fixture(scope="session")
def big_rank_adapter(tiny_llama, tmp_path_factory) -> Path:
    return make_peft_adapter(tiny_llama, tmp_path_factory.mktemp("big-rank") / "big", rank=32, seed=9)


@pytest.fixture(scope="session")
def reference(tiny_llama):
    """The offline engine the server's answers are compared with."""
    from loraplex import LLM

    return LLM(str(tiny_llama), **ENGINE_KWARGS)


@pytest.fixture(scope="module", params=["process", "thread"])
def engine_transport(request):
    """Every module whose apps are built on the ``engine`` fixture runs twice: with the engine in an engine-core
    process of its own (what ``loraplex serve`` runs; ``create_app`` is then given the engine's EngineArgs), and
    in a thread of the server's process (``create_app(engine)``). The test bodies are the same."""
    if request.param == "thread":
        yield "thread"
        return
    import loraplex.server.app as app_module
    from loraplex import LLMEngine

    real = app_module.create_app

    def create_app(engine_or_args, **kwargs):
        if isinstance(engine_or_args, LLMEngine):
            engine_or_args = dataclasses.replace(engine_or_args.args)
        return real(engine_or_args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(app_module, "create_app", create_app)
        yield "process"


@pytest.fixture(autouse=True)
def _engine_inside(request):
    if request.node.get_closest_marker("in_process_engine") is not None:
        callspec = getattr(request.node, "callspec", None)
        if callspec is not None and callspec.params.get("engine_transport") == "process":
            pytest.skip("looks inside the engine: runs with the engine in a thread only")


@pytest.fixture(scope="module")
def engine(tiny_llama, engine_transport):
    """One engine per test module, reused by the apps that module starts (one at a time); with the process
    transport it is the offline twin of the engine process the apps start."""
    return make_engine(tiny_llama)

