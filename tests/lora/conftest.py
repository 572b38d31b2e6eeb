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

# Phi-3's checkpoints fuse q/k/v and gate/up, so PEFT targets the fused modules.
_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
          "up_proj": "gate_up_proj"}


def _fused(targets, extra: dict):
    if not isinstance(targets, str):
        targets = list(dict.fromkeys(_FUSED.get(t, t) for t in targets))
    extra = {k: {_FUSED.get(m, m): v for m, v in p.items()} if isinstance(p, dict) else p for k, p in extra.items()}
    return targets, extra


_MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _attention_only(targets, extra: dict):
    """Mixtral and Qwen3-MoE have no MLP Linears (their experts are parameters; tests/lora/test_moe_expert_lora.py):
    the same specs cut to attention."""
    targets = list(_ATTENTION) if isinstance(targets, str) else [t for t in targets if t in _ATTENTION]
    extra = {k: {m: v for m, v in p.items() if m in _ATTENTION} if isinstance(p, dict) else p
             for k, p in extra.items()}
    return targets, extra


@pytest.fixture(scope="session")
def adapter_factory(tmp_path_factory, tiny_model_factory):
    """adapter_factory(arch, rank, seed=1) -> PEFT adapter dir for that tiny model (cached per session)."""
    cache: dict = {}

    def get(arch: str, rank: int, seed: int = 1):
        key = (arch, rank, seed)
        if key not in cache:
            targets, extra = ADAPTER_SPECS[rank]
            if arch.startswith("phi"):
                targets, extra = _fused(targets, extra)
            elif arch == "qwen2_moe" and isinstance(targets, str):
                # Its MLP Linears are the dense first layer's and the shared experts' ("all-linear" would also
                # take the shared expert's 1-wide gate, which is not a projection LoRA serves).
                targets = list(_ATTENTION) + ["gate_proj", "up_proj", "down_proj"]
            elif arch in _MOE and arch != "qwen2_moe":
                targets, extra = _attention_only(targets, extra)
            out = tmp_path_factory.mktemp(f"lora-{arch}-r{rank}-s{seed}")
            cache[key] = make_peft_adapter(tiny_model_factory(arch), out, rank=rank, targets=targets, seed=seed,
                                           **extra)
        return cache[key]

    return get
