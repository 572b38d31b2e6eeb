"""Fixtures for the server tests: a tiny model, its adapters, and real uvicorn servers on ephemeral ports."""
from __future__ import annotations

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


@pytest.fixture(scope="module")
def engine(tiny_llama):
    """One engine per test module, reused by the apps that module starts (one at a time)."""
    return make_engine(tiny_llama)

