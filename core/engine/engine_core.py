"""Build an engine's parts from EngineArgs: device and dtype, tokenizer, model, KV cache, LoRA, scheduler."""
from __future__ import annotations

import logging
import time

import torch

from loraplex.distributed import init_tensor_parallel
from loraplex.engine.block_manager import NUM_RESERVED_BLOCKS, BlockManager
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.policy import FCFSPolicy
from loraplex.engine.scheduler import Scheduler
from loraplex.engine_args import EngineArgs
from loraplex.errors import ConfigError
from loraplex.models.config import ModelConfig
from loraplex.models.loader import build_model, default_tokenizer_path, load_hf_config, resolve_model_path

logger = logging.getLogger("loraplex.engine")

_DTYPE_NAMES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                "half": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available")
    return torch.device(name)


def pick_dtype(name: str, hf_config, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPE_NAMES[name]
    if device.type == "cpu":
        return torch.float32  # CPU matmuls in half precision are slow and lossy
    declared = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    declared = _DTYPE_NAMES.get(str(declared).replace("torch.", ""), torch.bfloat16)
    return torch.bfloat16 if declared == torch.float32 else declared


def load_tokenizer(args: EngineArgs, path):
    from transformers import AutoTokenizer

    if args.tokenizer:
        return AutoTokenizer.from_pretrained(args.tokenizer)
    tok_path, kwargs = default_tokenizer_path(path)
    return AutoTokenizer.from_pretrained(tok_path, **kwargs)


def eos_ids(tokenizer, hf_config, path) -> tuple[int, ...]:
    ids = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    ids.update(ModelConfig.from_hf(hf_config).eos_token_ids)
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(path)
        eos = gen.eos_token_id
        ids.update(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
    except Exception:  # no generation_config.json is fine
        pass
    return tuple(sorted(ids))


def device_memory_budget(args: EngineArgs, model, device) -> int | None:
    """Bytes the KV cache (and the adapter pool) may still take on CUDA: gpu_memory_utilization of the device,
    less what is allocated now and the activation peak of the largest step; None on the CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    cfg = model.cfg
    # Activation peak of the largest prefill step, generously: residual stream, qkv, MLP and fp32 logits.
    act = args.max_num_batched_tokens * (6 * cfg.hidden_size + 2 * cfg.intermediate_size + cfg.q_size
                                         + 2 * cfg.kv_size) * 4 + 512 * 2**20
    return int(total * args.gpu_memory_utilization) - used - act


def num_kv_blocks(args: EngineArgs, model, device, dtype, max_model_len: int) -> int:
    per_block = ModelRunner.kv_bytes_per_block(model.cfg, args.block_size, dtype)
    if args.num_gpu_blocks_override is not None:
        return args.num_gpu_blocks_override
    budget = device_memory_budget(args, model, device)
    if budget is None:
        budget = int(args.cpu_kv_cache_space * 2**30)
    # Never more than every sequence at full length could use: saves memory on small CPU test engines.
    useful = args.max_num_seqs * -(-max_model_len // args.block_size) + NUM_RESERVED_BLOCKS
    blocks = min(budget // per_block, useful)
    if blocks < 2:
        raise ValueError(f"no memory left for the KV cache (budget {budget / 2**30:.2f} GiB); raise "
                         "gpu_memory_utilization / cpu_kv_cache_space or lower max_num_batched_tokens")
    return int(blocks)


def build_engine_parts(args: EngineArgs, progress: bool = False, spawned_rank=None) -> dict:
    start = time.perf_counter()
    path = resolve_model_path(args.model, args.revision, args.download_dir)
    hf_config = load_hf_config(path)
    device = pick_device(args.device)
    tp, local_rank, control_group = init_tensor_parallel(args.tensor_parallel_size, device.type, spawned_rank)
    if tp.is_parallel:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
    model_config = ModelConfig.from_hf(hf_config).shard(tp.rank, tp.world_size)
    dtype = pick_dtype(args.dtype, hf_config, device)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    limit = model_config.max_served_len
    if args.max_model_len is None and limit < model_config.max_position_embeddings:
        logger.info("max_model_len defaults to %d: LongRoPE's pre-training length (longer sequences would need the "
                    "long factors)", limit)
    max_model_len = args.max_model_len or limit
    if max_model_len > model_config.max_position_embeddings:
        raise ConfigError(f"EngineArgs.max_model_len must be <= the model's max_position_embeddings "
                          f"({model_config.max_position_embeddings}), got {max_model_len}", "max_model_len")
    if max_model_len > limit:
        raise ConfigError(f"EngineArgs.max_model_len must be <= {limit} for this model: past its LongRoPE "
                          f"original_max_position_embeddings the long rope factors apply, which loraplex does not "
                          f"implement, got {max_model_len}", "max_model_len")
    is_cuda = device.type == "cuda"
    if args.max_num_batched_tokens is None:
        # Chunked prefill bounds a step by the budget, not by the longest prompt.
        cap = (8192 if is_cuda else 2048) if args.enable_chunked_prefill else max_model_len
        args.max_num_batched_tokens = max(min(max_model_len, cap), 2048 if is_cuda else 512, args.max_num_seqs)
    if args.max_num_batched_tokens < max_model_len and not args.enable_chunked_prefill:
        raise ConfigError(f"EngineArgs.max_num_batched_tokens must be >= max_model_len ({max_model_len}) without "
                          f"chunked prefill, since a whole prompt is prefilled in one step, got "
                          f"{args.max_num_batched_tokens}", "max_num_batched_tokens")
    for name in ("default_mm_loras", "limit_mm_per_prompt"):
        value = getattr(args, name) or {}
        if value and not model_config.is_multimodal and any(value.values()):
            raise ConfigError(f"EngineArgs.{name} needs a multi-modal model; {model_config.architecture} is "
                              f"text-only, got {value!r}", name)
        unknown = [m for m in value if m not in model_config.modalities]
        if model_config.is_multimodal and unknown:
            raise ConfigError(f"EngineArgs.{name}: {model_config.architecture} takes "
                              f"{', '.join(model_config.modalities)}, got {unknown}", name)
    if args.default_mm_loras and not args.enable_lora:
        raise ConfigError("EngineArgs.default_mm_loras needs enable_lora=True", "default_mm_loras")
    for modality, lora_path in (args.default_mm_loras or {}).items():
        if not isinstance(lora_path, str) or not lora_path:
            raise ConfigError(f"EngineArgs.default_mm_loras[{modality!r}] must be an adapter path, got {lora_path!r}",
                              "default_mm_loras")
    tokenizer = None if args.skip_tokenizer_init else load_tokenizer(args, path)
    processor = None
    if model_config.is_multimodal and not args.skip_tokenizer_init:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(path))  # expands placeholders, makes the tower's inputs
    model = build_model(path, hf_config, dtype, device, load_format=args.load_format, progress=progress,
                        quantization=args.quantization, tp=tp)
    plugin_manager = _plugin_manager()
    lora_manager = None
    if args.enable_lora:
        from loraplex.lora.layout import PageLayout
        from loraplex.lora.manager import LoRAManager, pool_pages

        lora_dtype = dtype if args.lora_dtype == "auto" else _DTYPE_NAMES[args.lora_dtype]
        layout = PageLayout(model)
        # The pool comes out of the memory left after the weights, before the KV cache takes the rest.
        pages = pool_pages(layout, args, device, lora_dtype, device_memory_budget(args, model, device))
        lora_manager = LoRAManager(model, args, device, lora_dtype, pages, args.max_num_batched_tokens,
                                   plugin_manager, layout=layout)
    # Every rank must see the same cache: the same blocks make the same scheduling decisions.
    blocks = tp.min_int(num_kv_blocks(args, model, device, dtype, max_model_len))
    capacity = (blocks - NUM_RESERVED_BLOCKS) * args.block_size
    if capacity < max_model_len:
        raise ValueError(f"the KV cache holds {capacity} tokens, fewer than max_model_len={max_model_len}; give it "
                         "more memory or lower max_model_len")
    policy = None
    if plugin_manager is not None:
        policy = plugin_manager.hook.loraplex_scheduling_policy(max_num_seqs=args.max_num_seqs,
                                                                max_loras=args.max_loras)
    scheduler = Scheduler(BlockManager(blocks, args.block_size, args.enable_prefix_caching), args.max_num_seqs,
                          args.max_num_batched_tokens, policy or FCFSPolicy(), lora_manager,
                          args.max_lora_bypass_steps, args.enable_chunked_prefill)
    eos = eos_ids(tokenizer, hf_config, path)
    runner = ModelRunner(model, device, dtype, args.block_size, blocks, max_model_len, args.max_num_seqs, eos,
                         lora_manager, args.seed, enforce_eager=args.enforce_eager)
    logger.info("engine ready in %.1fs: %s on %s (%s), %d KV blocks of %d tokens%s", time.perf_counter() - start,
                model_config.architecture, device, dtype, blocks, args.block_size,
                f", rank {tp.rank} of {tp.world_size}" if tp.is_parallel else "")
    return dict(tokenizer=tokenizer, processor=processor, model=model, model_config=model_config, hf_config=hf_config, device=device,
                dtype=dtype, runner=runner, scheduler=scheduler, lora_manager=lora_manager,
                plugin_manager=plugin_manager, max_model_len=max_model_len, eos_token_ids=eos, model_path=path,
                num_kv_blocks=blocks, tp=tp, tp_control_group=control_group)


def _plugin_manager():
    try:
        from loraplex.plugins.manager import get_plugin_manager
    except ImportError:
        return None
    return get_plugin_manager()
