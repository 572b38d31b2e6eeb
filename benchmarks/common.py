"""Shared pieces of the benchmarks: the model shape, device ceilings, random adapters, timing."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

# Llama-3.2-3B's shape (config.json of meta-llama/Llama-3.2-3B-Instruct), random weights: no download.
LLAMA_3_2_3B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 3072, "intermediate_size": 8192,
    "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128009,
    "torch_dtype": "bfloat16",
}
# Llama-3.1-8B's shape (config.json of meta-llama/Llama-3.1-8B-Instruct), random weights.
LLAMA_3_1_8B = {
    **LLAMA_3_2_3B, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_config(directory: Path, config: dict = LLAMA_3_2_3B) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def module_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
            "up_proj": (h, i), "down_proj": (i, h)}


def random_adapter(cfg: dict, rank: int, seed: int, dtype=torch.bfloat16):
    """(PEFT adapter_config, PEFT-named state dict) with small random A and B on all seven projections."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module, (fan_in, fan_out) in module_shapes(cfg).items():
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen) * 0.01).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen) * 0.01).to(dtype)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": LORA_MODULES,
              "bias": "none"}
    return config, tensors


def adapter_bytes(cfg: dict, rank: int, elem: int = 2) -> int:
    return cfg["num_hidden_layers"] * sum(rank * (i + o) * elem for i, o in module_shapes(cfg).values())


def weight_bytes(cfg: dict, elem: int = 2) -> int:
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    per_layer = sum(i * o for i, o in module_shapes(cfg).values()) + 2 * h
    embed = cfg["vocab_size"] * h * (1 if cfg["tie_word_embeddings"] else 2)
    return (layers * per_layer + embed + h) * elem


def quant_weight_bytes(cfg: dict, base: str) -> int:
    """Bytes of a base's weights: "bf16"; "nf4" (the projections as 4-bit codes plus one fp32 absmax per 64
    weights) or "fp8" (one byte a weight plus an fp32 scale per output channel), the rest bf16."""
    if base == "bf16":
        return weight_bytes(cfg)
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    proj = sum(i * o for i, o in module_shapes(cfg).values())
    channels = sum(o for _, o in module_shapes(cfg).values())
    proj_bytes = proj * (0.5 + 4 / 64) if base == "nf4" else proj + 4 * channels
    embed = cfg["vocab_size"] * h * (1 if cfg["tie_word_embeddings"] else 2)
    return int(layers * (proj_bytes + 2 * h * 2) + (embed + h) * 2)


def kv_bytes_per_token(cfg: dict, elem: int = 2) -> int:
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * elem


def cuda_time(fn, iters: int = 10, warmup: int = 3) -> float:
    """Mean seconds per call, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def measure_hbm_bandwidth() -> float:
    """Bytes/s of a device-to-device copy of 4 GiB, counting bytes read and written."""
    n = 2**31
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    seconds = cuda_time(lambda: dst.copy_(src), iters=10)
    del src, dst
    return 2 * n * 2 / seconds


def measure_matmul_peak() -> float:
    """bf16 FLOP/s of an 8192^3 product on random data."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    seconds = cuda_time(lambda: a @ b, iters=10)
    return 2 * 8192**3 / seconds


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timer:
    def __enter__(self):
        synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize()
        self.seconds = time.perf_counter() - self.start


def write_tokenizer(directory: Path, vocab_size: int = 32000, seed: int = 0) -> int:
    """A byte-level BPE tokenizer trained here on synthetic text (no download), saved as an HF fast tokenizer
    with a chat template; returns its vocabulary size, which the benchmark model's config then takes, so every
    token a random model samples decodes to text (the server's per-token text work is real)."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"] + list("aeiou")
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(60000)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))).capitalize() + "."
             for _ in range(120000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    return len(fast)
