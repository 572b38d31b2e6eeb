"""Security tests: reuse the server tests' helpers (a uvicorn server in a thread, the CLI as a subprocess)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "server"))
sys.path.insert(0, str(Path(__file__).parent.parent))

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="session")
def sec_adapters(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """Adapters of one shape (rank 8 on q/v, so either can stand in for the other) and different weights."""
    from helpers import make_peft_adapter

    root = tmp_path_factory.mktemp("sec-adapters")
    return {name: make_peft_adapter(tiny_llama, root / name, rank=8, seed=seed, scale=0.3)
            for name, seed in (("good", 21), ("other", 22), ("evil", 23))}
