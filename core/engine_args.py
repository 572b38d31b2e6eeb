"""EngineArgs: every knob of the engine, validated at construction (vLLM's names and defaults)."""
from __future__ import annotations

from dataclasses import dataclass, fields

from loraplex.errors import ConfigError, UnknownArgumentError

_DTYPES = ("auto", "float32", "float16", "bfloat16", "half", "float", "fp32", "fp16", "bf16")
_DEVICES = ("auto", "cpu", "cuda")
_MODALITIES = ("image", "audio", "video")


@dataclass
class EngineArgs:
    model: str = ""
    tokenizer: str | None = None
    served_model_name: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int | None = 0
    max_model_len: int | None = None
    max_num_seqs: int = 256
    # Tokens of one step, decodes and prefill chunks together. None: max_model_len without chunked prefill; with
    # it, max_model_len capped at 8192 on CUDA and 2048 on the CPU, and never below 2048 (CUDA) or 512 (CPU).
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    # Reuse the KV of cached full blocks of a request's prefix, keyed by adapter version (vLLM V1's default).
    enable_prefix_caching: bool = True
    # Prefill a prompt longer than the step's token budget over several steps, beside the running decodes.
    enable_chunked_prefill: bool = True
    gpu_memory_utilization: float = 0.9
    # CPU KV cache budget in GiB (vLLM's VLLM_CPU_KVCACHE_SPACE); the GPU uses gpu_memory_utilization instead.
    cpu_kv_cache_space: float = 1.0
    num_gpu_blocks_override: int | None = None
    enforce_eager: bool = False
    # Launch decode step N+1 from step N's device-side tokens before reading them back, so host work overlaps
    # the GPU. None = on exactly when decode runs as CUDA graphs (on the CPU it would only add wasted rows).
    async_scheduling: bool | None = None
    max_logprobs: int = 20
    trust_remote_code: bool = False
    # "dummy" builds random weights on the device from config.json alone (benchmarks; vLLM's name). "gguf": a .gguf
    # file's Q4_0 / Q4_1 / Q8_0 projections stay in their blocks on any device ("auto" keeps them on CUDA only).
    load_format: str = "auto"
    # "bitsandbytes" / "fp8": quantize a float checkpoint's projections to NF4 / FP8 as it loads (vLLM's in-flight
    # quantization); a quantized checkpoint (bitsandbytes 4-bit, compressed-tensors FP8) is found from its
    # config.json with or without it.
    quantization: str | None = None
    skip_tokenizer_init: bool = False
    download_dir: str | None = None
    # False: log throughput, queue and KV-cache figures every few seconds (vLLM's stats line).
    disable_log_stats: bool = True
    # LoRA
    enable_lora: bool = False
    # Distinct adapters in one batch (vLLM's meaning). The device pool may hold many more (max_gpu_loras).
    max_loras: int = 1
    max_lora_rank: int = 16
    # Adapters kept packed in host memory (pinned on CUDA); default max_loras.
    max_cpu_loras: int | None = None
    # Device pool size, in adapters of max_lora_rank (lower ranks take proportionally less). None: on CUDA,
    # lora_memory_fraction of the memory left after the weights, at least max_loras; on the CPU, max_loras.
    max_gpu_loras: int | None = None
    lora_memory_fraction: float = 0.1
    # Workers that read, validate and pack adapters off the engine thread: "process" (worker processes, whose
    # Python does not compete for the engine's GIL), "thread", or "auto" (processes on CUDA, threads on the CPU).
    lora_loader: str = "auto"
    num_lora_loader_workers: int = 4
    # Aging bound of adapter-aware admission: steps in which later adapter requests may pass a held one.
    max_lora_bypass_steps: int = 16
    # Dtype of the adapter weights in host and device memory; "auto" = the model's. The kernels cast.
    lora_dtype: str = "auto"
    fully_sharded_loras: bool = False  # only False: nothing is sharded on one device
    # Modality ("image", "audio", "video") -> adapter path applied to requests that carry it and name no adapter
    # (vLLM's default_mm_loras). Needs a multi-modal model: a text-only one refuses it at start.
    default_mm_loras: dict | None = None
    # Modality -> most items per prompt (vLLM's limit_mm_per_prompt); like default_mm_loras, multi-modal only.
    limit_mm_per_prompt: dict | None = None
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"EngineArgs.{name} {why}, got {getattr(self, name)!r}", name)

        if not isinstance(self.model, str) or not self.model:
            raise bad("model", "must name a model directory, GGUF file or hub id")
        self.dtype = str(self.dtype).lower().replace("torch.", "")
        if self.dtype not in _DTYPES:
            raise bad("dtype", f"must be one of {_DTYPES}")
        self.device = str(self.device).lower()
        if self.device.split(":")[0] not in _DEVICES:
            raise bad("device", f"must be one of {_DEVICES}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise bad("max_model_len", "must be a positive int")
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise bad("max_num_seqs", "must be a positive int")
        if self.max_num_batched_tokens is not None and (
            not isinstance(self.max_num_batched_tokens, int) or self.max_num_batched_tokens < 1
        ):
            raise bad("max_num_batched_tokens", "must be a positive int")
        for flag in ("enable_prefix_caching", "enable_chunked_prefill"):
            if not isinstance(getattr(self, flag), bool):
                raise bad(flag, "must be a bool")
        if self.max_num_batched_tokens is not None and self.max_model_len is not None and (
            self.max_num_batched_tokens < self.max_model_len
        ) and not self.enable_chunked_prefill:
            raise bad("max_num_batched_tokens", f"must be >= max_model_len ({self.max_model_len}) without "
                      "chunked prefill, since a whole prompt is prefilled in one step")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_num_seqs:
            raise bad("max_num_batched_tokens", f"must be >= max_num_seqs ({self.max_num_seqs}): every running "
                      "sequence's decode token counts against it")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise bad("block_size", "must be one of 8, 16, 32, 64, 128")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise bad("gpu_memory_utilization", "must be in (0, 1]")
        if not self.cpu_kv_cache_space > 0:
            raise bad("cpu_kv_cache_space", "must be > 0 (GiB)")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 2:
            raise bad("num_gpu_blocks_override", "must be >= 2")
        if self.load_format not in ("auto", "safetensors", "dummy", "gguf"):
            raise bad("load_format", "must be 'auto', 'safetensors', 'dummy' or 'gguf'")
        from loraplex.models.quant import QUANTIZATION_METHODS

        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise bad("quantization", f"must be None or one of {QUANTIZATION_METHODS}; other formats are not "
                      "supported yet")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise bad("tensor_parallel_size", "must be a positive int (ranks started torchrun-style above 1)")
        if self.fully_sharded_loras is not False:
            raise bad("fully_sharded_loras", "is not supported: LoRA is not split over tensor-parallel ranks yet")
        for flag in ("enforce_eager", "trust_remote_code", "skip_tokenizer_init", "disable_log_stats", "enable_lora"):
            if not isinstance(getattr(self, flag), bool):
                raise bad(flag, "must be a bool")
        if self.max_logprobs < 0:
            raise bad("max_logprobs", "must be >= 0")
        if self.async_scheduling not in (None, True, False):
            raise bad("async_scheduling", "must be True, False or None (on exactly with CUDA graphs)")
        self._verify_lora()

    def _verify_lora(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"EngineArgs.{name} {why}, got {getattr(self, name)!r}", name)

        if not isinstance(self.max_loras, int) or self.max_loras < 1:
            raise bad("max_loras", "must be an int >= 1")
        if not isinstance(self.max_lora_rank, int) or not 1 <= self.max_lora_rank <= 512:
            raise bad("max_lora_rank", "must be an int in [1, 512]")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        if not isinstance(self.max_cpu_loras, int) or self.max_cpu_loras < self.max_loras:
            raise bad("max_cpu_loras", f"must be an int >= max_loras ({self.max_loras})")
        if self.max_gpu_loras is not None and (not isinstance(self.max_gpu_loras, int) or self.max_gpu_loras < 1):
            raise bad("max_gpu_loras", "must be None or an int >= 1")
        if not isinstance(self.lora_memory_fraction, (int, float)) or not 0.0 <= self.lora_memory_fraction < 1.0:
            raise bad("lora_memory_fraction", "must be in [0, 1)")
        if self.lora_loader not in ("auto", "process", "thread"):
            raise bad("lora_loader", "must be 'auto', 'process' or 'thread'")
        if not isinstance(self.num_lora_loader_workers, int) or self.num_lora_loader_workers < 1:
            raise bad("num_lora_loader_workers", "must be an int >= 1")
        if not isinstance(self.max_lora_bypass_steps, int) or self.max_lora_bypass_steps < 0:
            raise bad("max_lora_bypass_steps", "must be an int >= 0")
        self.lora_dtype = str(self.lora_dtype).lower().replace("torch.", "")
        if self.lora_dtype not in _DTYPES:
            raise bad("lora_dtype", f"must be one of {_DTYPES}")
        for name, kind in (("default_mm_loras", str), ("limit_mm_per_prompt", int)):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, dict) or any(k not in _MODALITIES for k in value) or any(
                    not isinstance(v, kind) or isinstance(v, bool) or (kind is str and not v)
                    or (kind is int and v < 0) for v in value.values()):
                raise bad(name, f"must map modalities {_MODALITIES} to "
                          f"{'adapter paths' if kind is str else 'ints >= 0'}")
        if self.default_mm_loras and not self.enable_lora:
            raise bad("default_mm_loras", "needs enable_lora=True")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineArgs":
        unknown = set(kwargs) - cls.field_names()
        if unknown:
            raise UnknownArgumentError(f"unknown engine argument(s): {', '.join(sorted(unknown))}")
        return cls(model=model, **kwargs)
