"""Find a checkpoint (local dir, GGUF file or hub id), build our model and load its weights."""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path

import torch

from loraplex.errors import ConfigError, UnsupportedModelError
from loraplex.layers.linear import Linear
from loraplex.models.config import ModelConfig
from loraplex.models.gemma import GemmaForCausalLM
from loraplex.models.llama import LlamaForCausalLM
from loraplex.models.granite_speech import GraniteSpeechForConditionalGeneration
from loraplex.models.llava import LlavaForConditionalGeneration
from loraplex.models.moe import MoeForCausalLM
from loraplex.models.phi3 import Phi3ForCausalLM
from loraplex.models.quant import QUANT_SUFFIXES, QuantSpec, quant_spec

logger = logging.getLogger("loraplex.models")

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]
# Multi-modal architectures: a tower and connector (transformers' modules) in front of our decoder.
_MM_CLASSES = {"LlavaForConditionalGeneration": LlavaForConditionalGeneration,
               "GraniteSpeechForConditionalGeneration": GraniteSpeechForConditionalGeneration}
# Text decoders with blocks of their own; the others are LlamaForCausalLM.
_TEXT_CLASSES = {"Gemma2ForCausalLM": GemmaForCausalLM, "Gemma3ForCausalLM": GemmaForCausalLM,
                 "Phi3ForCausalLM": Phi3ForCausalLM, "MixtralForCausalLM": MoeForCausalLM,
                 "Qwen2MoeForCausalLM": MoeForCausalLM, "Qwen3MoeForCausalLM": MoeForCausalLM}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp|block_sparse_moe|input_layernorm"
                    r"|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm)\.?(.*)$")


def resolve_model_path(model: str, revision: str | None = None, download_dir: str | None = None) -> Path:
    """A local directory or .gguf file as is; otherwise a hub id through huggingface_hub's cache."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    if model.startswith(("/", "./", "../")) or model.count("/") > 1:
        raise FileNotFoundError(f"model path {model!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, revision=revision, cache_dir=download_dir, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated...: one clear message
        raise FileNotFoundError(f"model {model!r} is neither a local path nor reachable on the hub: {e}") from e


def load_hf_config(path: Path):
    from transformers import AutoConfig

    if path.is_file() and path.suffix == ".gguf":
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {path}")
    return AutoConfig.from_pretrained(path)


# GGUF tensor names (llama.cpp's) of the architectures whose projections stay in their block format -> HF's.
_GGUF_KEPT_ARCHS = ("llama", "qwen2", "qwen3")
_GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
_GGUF_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj",
               "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_GGUF_LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def gguf_mode(path: Path, hf_config, device: torch.device, load_format: str) -> str | None:
    """How a .gguf file of an architecture mapped here loads: "keep" (projections stay in their blocks: on CUDA
    with "auto", anywhere with load_format "gguf") or "dequantize" (the CPU with "auto": expanding every weight
    for every product costs seconds a step there, and host memory is not what a 4-bit file saves). None: not
    such a file (another architecture's GGUF loads through transformers)."""
    is_gguf = path.is_file() and path.suffix == ".gguf"
    if load_format == "gguf" and not is_gguf:
        raise ConfigError(f"load_format='gguf' needs a .gguf file, got {str(path)!r}", "load_format")
    if not is_gguf or load_format == "dummy" or hf_config.model_type not in _GGUF_KEPT_ARCHS:
        return None
    return "keep" if load_format == "gguf" or device.type == "cuda" else "dequantize"


def _iter_gguf(path: Path, hf_config, keep: bool):
    """(HF name, tensor) of a GGUF file read with gguf-py: float tensors as they are; with ``keep`` the
    projections' quantized blocks as uint8 [out, row bytes] with their type beside them ("<module>.gguf_type");
    any other quantized tensor dequantized (by gguf-py, as transformers does). llama.cpp permutes the rows of a
    Llama's q / k for its rotary layout: undone here, on whole rows."""
    import gguf

    reader = gguf.GGUFReader(path)
    is_llama = hf_config.model_type == "llama"
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    for t in reader.tensors:
        shape = tuple(reversed([int(n) for n in t.shape]))  # GGUF lists ne0 (the input dim) first
        if t.name in _GGUF_TOP:
            name, kind = _GGUF_TOP[t.name], None
        else:
            parts = t.name.split(".")
            if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _GGUF_LAYER:
                raise UnsupportedModelError(f"unexpected GGUF tensor {t.name!r}")
            name, kind = f"model.layers.{parts[1]}.{_GGUF_LAYER[parts[2]]}.{parts[3]}", parts[2]
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        is_float = qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                             gguf.GGMLQuantizationType.BF16)
        if is_float:
            tensor = torch.from_numpy(t.data.copy()).reshape(shape)
        elif keep and kind in _GGUF_LINEAR and name.endswith(".weight"):
            tensor = torch.from_numpy(t.data.copy()).reshape(shape[0], -1)  # [out, row bytes]
        else:
            tensor = torch.from_numpy(gguf.quants.dequantize(t.data, qtype)).reshape(shape)
        if is_llama and kind in ("attn_q", "attn_k"):
            n = heads if kind == "attn_q" else kv_heads
            tensor = tensor.reshape(n, tensor.shape[0] // n // 2, 2, *tensor.shape[1:]).transpose(1, 2).reshape(
                tensor.shape)
        yield name, tensor
        if keep and not is_float and kind in _GGUF_LINEAR and name.endswith(".weight"):
            yield name.removesuffix(".weight") + ".gguf_type", torch.tensor(int(qtype))


def _iter_checkpoint(path: Path, hf_config=None, gguf: str | None = None):
    """Yield (name, tensor) from safetensors shards, .bin shards, or a GGUF file (read by gguf-py for the
    architectures mapped here, kept in blocks or dequantized as gguf_mode says; else dequantised by
    transformers)."""
    if gguf is not None:
        yield from _iter_gguf(path, hf_config, keep=gguf == "keep")
        return
    if path.is_file() and path.suffix == ".gguf":
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        yield from hf_model.state_dict().items()
        return
    # A checkpoint may ship a PEFT adapter beside its weights (Granite Speech's audio LoRA): not base weights.
    files = sorted(f for f in path.glob("*.safetensors") if not f.name.startswith("adapter_model"))
    if files:
        from safetensors import safe_open

        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        return
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {path}")
    for file in bins:
        yield from torch.load(file, map_location="cpu", weights_only=True).items()


def _quant_part(rest: str, tensor: torch.Tensor) -> tuple[str, str] | None:
    """(module path, part) of a quantized Linear's tensor: "q_proj.weight" as 4-bit codes (uint8) or FP8, or
    what is saved beside it ("q_proj.weight.absmax", "q_proj.weight_scale", ...); None for a float tensor."""
    for suffix in QUANT_SUFFIXES:
        if rest.endswith("." + suffix):
            return rest[: -len(suffix) - 1], suffix
    if rest.endswith(".weight") and tensor.dtype in (torch.uint8, torch.float8_e4m3fn):
        return rest.removesuffix(".weight"), "weight"
    return None


def _vocab_rows(model, tensor: torch.Tensor) -> torch.Tensor:
    """This rank's rows of an embedding or LM head (all of them without tensor parallelism)."""
    tp = getattr(model, "tp", None)
    if tp is None or not tp.is_parallel:
        return tensor
    start, rows = tp.vocab_shard(tensor.shape[0])
    part = tensor[start: start + rows]
    if part.shape[0] < rows:  # the last rank's share runs past the vocabulary: zero rows, cut from the logits
        part = torch.cat([part, part.new_zeros(rows - part.shape[0], *part.shape[1:])])
    return part


def load_weights(model: LlamaForCausalLM, path: Path, progress: bool = False, spec: QuantSpec | None = None,
                 hf_config=None, gguf: str | None = None) -> None:
    loaded: set[str] = set()
    quant_parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}  # (layer, module path) -> quantized parts
    params = dict(model.named_parameters())
    items = _iter_checkpoint(path, hf_config, gguf)
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="Loading weights", unit=" tensors", leave=False)
    parts = getattr(model, "tower_parts", None)
    towers = {part: m.state_dict() for part, m in parts().items()} if parts is not None else {}
    for name, tensor in items:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if towers:
            part, name = model.checkpoint_name(name)
            if part != "lm":
                if part == "vision":
                    # Older checkpoints name CLIP's inner "vision_model." level, which transformers 5 flattened.
                    spellings = [n.removeprefix("vision_tower.") for n in model.tower_aliases("vision_tower." + name)]
                    name = next((n for n in spellings if n in towers[part]), name)
                target = towers[part].get(name)
                if target is None:
                    raise UnsupportedModelError(f"unexpected checkpoint tensor {name!r} in the {part} part")
                target.copy_(tensor)
                loaded.add(f"{part}:{name}")
                continue
        if name == "lm_head.weight":
            if model.cfg.tie_word_embeddings:
                continue
            model.lm_head_weight.data.copy_(_vocab_rows(model, tensor))
        elif name == "model.embed_tokens.weight":
            model.embed_tokens.weight.data.copy_(_vocab_rows(model, tensor))
        elif name == "model.norm.weight":
            model.norm.weight.data.copy_(tensor)
        else:
            m = _LAYER.match(name)
            if m is None:
                raise UnsupportedModelError(f"unexpected checkpoint tensor {name!r}")
            layer = model.layers[int(m.group(1))]
            rest = f"{m.group(2)}.{m.group(3)}" if m.group(3) else m.group(2)
            quant = _quant_part(rest, tensor) if spec is not None and spec.is_prequantized else None
            if quant is not None:
                quant_parts.setdefault((int(m.group(1)), quant[0]), {})[quant[1]] = tensor
                loaded.add(name)
                continue
            module, _, kind = rest.rpartition(".")
            hf_module = module.split(".")[-1]
            own = getattr(model, "load_layer_tensor", None)  # names of the model's own, e.g. MoE experts
            if own is not None and own(int(m.group(1)), rest, tensor):
                pass
            elif hf_module in model.LORA_MODULES:
                model.lora_layer(int(m.group(1)), hf_module).load_weight(hf_module, tensor, kind)
            else:
                target = params.get(f"layers.{m.group(1)}.{rest}")
                if target is None:
                    raise UnsupportedModelError(f"unexpected checkpoint tensor {name!r}")
                target.data.copy_(tensor)
        loaded.add(name)
    for (layer, module), parts in quant_parts.items():
        hf_module = module.split(".")[-1]
        if hf_module not in model.LORA_MODULES:
            raise UnsupportedModelError(f"4-bit tensor of model.layers.{layer}.{module}: only the attention and "
                                        "MLP projections may be quantized")
        model.lora_layer(layer, hf_module).load_quantized(hf_module, parts, spec)
    for part, state in towers.items():
        missing = [k for k in state if f"{part}:{k}" not in loaded and not k.endswith("position_ids")]
        if missing:
            raise UnsupportedModelError(f"checkpoint at {path} has no {part} weights {missing[:3]}")
    if "model.embed_tokens.weight" not in loaded:
        raise UnsupportedModelError(f"checkpoint at {path} has no model.embed_tokens.weight")
    if not model.cfg.tie_word_embeddings and "lm_head.weight" not in loaded:
        # Some checkpoints tie without saying so.
        model.lm_head_weight.data.copy_(model.embed_tokens.weight.data)


def build_model(path: Path, hf_config, dtype: torch.dtype, device: torch.device, attn_backend: str = "auto",
                load_format: str = "auto", progress: bool = False,
                quantization: str | None = None, tp=None) -> LlamaForCausalLM:
    from loraplex import envs

    cfg = ModelConfig.from_hf(hf_config)
    if tp is not None and tp.is_parallel:
        cfg = cfg.shard(tp.rank, tp.world_size)
    cfg.fused_ops = envs.fused_ops()
    spec = quant_spec(hf_config, quantization)
    gguf = gguf_mode(path, hf_config, device, load_format)
    if cfg.tp_size > 1 and (spec is not None or gguf is not None):
        raise UnsupportedModelError("tensor_parallel_size > 1 with a quantized base: its weights are not split "
                                    "over the ranks yet")
    if gguf is not None and spec is not None:
        raise ConfigError(f"quantization={quantization!r} on a GGUF file: its projections are quantized already",
                          "quantization")
    if gguf == "keep":
        spec = QuantSpec(method="gguf", is_prequantized=True)
    if spec is not None and (cfg.architecture in _MM_CLASSES or cfg.num_experts):
        raise UnsupportedModelError(f"a {spec.method} base of {cfg.architecture} is not supported: quantized "
                                    "bases are dense text decoders (Llama family, Gemma, Phi-3)")
    if load_format == "dummy":
        model = build_dummy_model(cfg, dtype, device, attn_backend, hf_config)
        if spec is not None:
            quantize_model(model, dataclasses.replace(spec, is_prequantized=False))
        return model
    with torch.device("cpu"):
        model = _new_model(cfg, hf_config, attn_backend, dtype, "cpu")
    load_weights(model, path, progress, spec, hf_config, gguf)
    model = model.to(device).eval()
    if spec is not None and not spec.is_prequantized:
        quantize_model(model, spec)  # on the device: bitsandbytes quantizes there far faster
    return model


@torch.no_grad()
def quantize_model(model: LlamaForCausalLM, spec: QuantSpec) -> None:
    """Every projection of every decoder layer to the spec's format, in place; embeddings, norms and the LM head
    stay float, as transformers' bitsandbytes integration and llm-compressor keep them."""
    for layer in model.layers:
        for module in layer.modules():
            if isinstance(module, Linear) and module.quant is None:
                module.quantize_(spec)
    if model.lm_head_weight.is_cuda:
        torch.cuda.empty_cache()


def _new_model(cfg: ModelConfig, hf_config, attn_backend: str, dtype, device) -> LlamaForCausalLM:
    cls = _MM_CLASSES.get(cfg.architecture)
    if cls is not None:
        return cls(cfg, hf_config, attn_backend=attn_backend, dtype=dtype, device=device)
    cls = _TEXT_CLASSES.get(cfg.architecture, LlamaForCausalLM)
    return cls(cfg, attn_backend=attn_backend, dtype=dtype, device=device)


def default_tokenizer_path(path: Path) -> tuple[str, dict]:
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    return str(path), {}


def is_local(model: str) -> bool:
    return os.path.exists(os.path.expanduser(model))


@torch.no_grad()
def build_dummy_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                      attn_backend: str = "auto", hf_config=None) -> LlamaForCausalLM:
    """Random weights straight on the device: for benchmarks of real-size shapes with no checkpoint."""
    model = _new_model(cfg, hf_config, attn_backend, dtype, device)
    gen = torch.Generator(device=device).manual_seed(0)
    unit = 0.0 if cfg.architecture.startswith("Gemma") else 1.0  # Gemma's norms scale by (1 + w)
    for name, p in model.named_parameters():
        if p.dim() == 1 and "norm" in name.lower().rsplit(".", 2)[-2] and name.endswith("weight"):
            p.fill_(unit)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=gen)
    return model.to(device).eval()  # rotary tables are built on the CPU
