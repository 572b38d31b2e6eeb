from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
from helpers import make_peft_adapter  # noqa: E402

# rank -> (targets, extra PEFT config): different ranks and different target sets, as the issue asks.
ADAPTER_SPECS = {
    4: (["q_proj", "v_proj"], {}),
    8: (["k_proj", "o_proj", "gate_proj"], {"use_rslora": True}),
    16: ("all-linear", {"rank_pattern": {"down_proj": 12}, "alpha_pattern": {"q_proj": 5}}),
    32: (["up_proj", "down_proj", "q_proj"], {}),
}


@pytest.fixture(scope="session")
def adapter_factory(tmp_path_factory, tiny_model_factory):
    """adapter_factory(arch, rank, seed=1) -> PEFT adapter dir for that tiny model (cached per session)."""
    cache: dict = {}

    def get(arch: str, rank: int, seed: int = 1):
        key = (arch, rank, seed)
        if key not in cache:
            targets, extra = ADAPTER_SPECS[rank]
            out = tmp_path_factory.mktemp(f"lora-{arch}-r{rank}-s{seed}")
            cache[key] = make_peft_adapter(tiny_model_factory(arch), out, rank=rank, targets=targets, seed=seed,
                                           **extra)
        return cache[key]

    return get
