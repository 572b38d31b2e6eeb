"""``loraplex serve [MODEL] ...``: vLLM's ``vllm serve`` flags, uvicorn underneath.

Without MODEL it serves the embedded demo: SmolLM2-135M-Instruct plus the demo adapters.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from loraplex import __version__, envs
from loraplex.server.limits import RequestLimits

SWITCH_INTERVAL_S = 0.0005

logger = logging.getLogger("loraplex.server")

DEFAULT_MAX_LORA_RANK = 16


class _HelpFormatter(argparse.HelpFormatter):
    """Shows a flag's default, unless its help already speaks of one or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default == argparse.SUPPRESS \
                or not action.option_strings:
            return text
        return f"{text} (default: {default})".lstrip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="Serve many LoRA adapters on one base LLM "
                                     "with vLLM's OpenAI-compatible API.")
    parser.add_argument("--version", action="version", version=f"loraplex {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("serve", help="start the OpenAI-compatible server",
                       formatter_class=_HelpFormatter,
                       description="Start the OpenAI-compatible server. Without MODEL: the embedded demo model "
                       "and its demo adapters.")
    s.add_argument("model", nargs="?", default=None, help="model directory, GGUF file or hub id")
    s.add_argument("--model", dest="model_flag", default=None, help="same as the positional MODEL")
    s.add_argument("--host", default="0.0.0.0", help="interface to bind (0.0.0.0: all interfaces, as vLLM)")
    s.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")
    s.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"], help="uvicorn's log level")
    s.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) the base model answers to (default: MODEL)")
    s.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id (default: the model's)")
    s.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of the model (default: "
                   "the latest)")
    s.add_argument("--download-dir", default=None, help="where hub models are downloaded (default: the Hugging "
                   "Face cache)")
    s.add_argument("--chat-template", default=None, help="chat template replacing the tokenizer's: a file, or the "
                   "template itself (vLLM's rule: text with {, } or a newline is a template)")
    s.add_argument("--chat-template-content-format", choices=["auto", "string"], default="auto",
                   help="how message content reaches the template: auto or string (a string of the text parts)")
    s.add_argument("--generation-config", default="auto",
                   help="default sampling values of requests: auto (the model's generation_config.json, as vLLM), "
                        "vllm (none), or a folder holding a generation_config.json (default: auto)")
    s.add_argument("--override-generation-config", type=_json_object, default=None, metavar="JSON",
                   help='sampling defaults on top of --generation-config, e.g. \'{"temperature": 0.5}\'')
    s.add_argument("--dtype", default="auto", help="auto (float32 on CPU; the checkpoint's half type, or bfloat16, "
                   "on GPU), float32, float16, bfloat16")
    s.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    s.add_argument("--seed", type=int, default=0, help="seed of the sampler (requests may bring their own)")
    s.add_argument("--max-model-len", type=int, default=None,
                   help="context length: prompt + generated tokens (default: the model's max_position_embeddings)")
    s.add_argument("--max-num-seqs", type=int, default=256, help="sequences in one batch")
    s.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens in one step, decodes and prefill chunks (default: max_model_len, capped at 8192 on "
                   "GPU / 2048 on CPU with chunked prefill; at least 2048 on GPU / 512 on CPU and max_num_seqs)")
    s.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV of cached prompt prefixes, keyed by adapter version (default: on)")
    s.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                   help="prefill long prompts over several steps beside running decodes (default: on)")
    s.add_argument("--max-logprobs", type=int, default=20, help="largest logprobs / top_logprobs a request may ask")
    s.add_argument("--block-size", type=int, default=16, help="KV cache block size: 8, 16, 32, 64 or 128")
    s.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of GPU memory the engine may use (the KV cache is sized from it)")
    s.add_argument("--cpu-kv-cache-space", type=float, default=1.0, help="CPU KV cache in GiB")
    s.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    s.add_argument("--load-format", choices=["auto", "safetensors", "dummy", "gguf"], default="auto",
                   help="dummy: random weights of the checkpoint's shape (benchmarks), nothing read from disk; gguf: "
                   "a .gguf file's Q4_0 / Q4_1 / Q8_0 projections stay quantized on any device (auto: on CUDA)")
    s.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="overlap host work with the GPU step (default: on with CUDA graphs)")
    s.add_argument("--trust-remote-code", action="store_true", help="passed to transformers")
    lora = s.add_argument_group("LoRA")
    lora.add_argument("--enable-lora", action="store_true",
                      help="serve adapters (on with --lora-modules or the demo)")
    lora.add_argument("--lora-modules", nargs="+", action="extend", default=[], metavar="MODULE",
                      help='adapters to preload: name=path or \'{"name": ..., "path": ..., "base_model_name": ...}\' '
                      "(default: none)")
    lora.add_argument("--max-loras", type=int, default=1, help="distinct adapters in one batch")
    lora.add_argument("--max-lora-rank", type=int, default=None,
                      help=f"largest adapter rank (default {DEFAULT_MAX_LORA_RANK}; the demo raises it to fit)")
    lora.add_argument("--max-cpu-loras", type=int, default=None, help="adapters cached in CPU memory "
                      "(default: --max-loras)")
    lora.add_argument("--max-gpu-loras", type=int, default=None,
                      help="device pool size in adapters of --max-lora-rank (default: sized from "
                      "--lora-memory-fraction on CUDA, --max-loras on the CPU)")
    lora.add_argument("--lora-memory-fraction", type=float, default=0.1,
                      help="share of the GPU memory left after the weights that the adapter pool takes")
    lora.add_argument("--lora-loader", choices=["auto", "process", "thread"], default="auto",
                      help="where adapters are read and packed: worker processes (auto on CUDA) or threads "
                      "(auto on the CPU)")
    lora.add_argument("--num-lora-loader-workers", type=int, default=4,
                      help="loader processes or threads that read and pack adapters off the engine thread")
    lora.add_argument("--max-lora-bypass-steps", type=int, default=16,
                      help="steps in which later adapter requests may pass one whose adapter is loaded")
    lora.add_argument("--lora-dtype", default="auto",
                      help="adapter weight dtype: auto (the model's), float16, bfloat16, float32")
    sec = s.add_argument_group("security and limits")
    sec.add_argument("--api-key", default=None, help="Bearer key for every /v1 route (env LORAPLEX_API_KEY)")
    sec.add_argument("--admin-api-key", default=None,
                     help="Bearer key for adapter management routes (env LORAPLEX_ADMIN_API_KEY)")
    sec.add_argument("--allowed-lora-paths", nargs="+", default=None, metavar="DIR",
                     help="runtime-loaded adapters must live under these directories")
    sec.add_argument("--max-request-body-bytes", type=int, default=None,
                     help="larger bodies get 413 (default 10 MiB)")
    sec.add_argument("--trust-request-chat-template", action="store_true",
                     help="serve requests that bring their own chat template (rendered in a bounded worker process)")
    sec.add_argument("--max-n", type=int, default=RequestLimits.max_n, help="largest n (samples per prompt)")
    sec.add_argument("--max-prompt-chars", type=int, default=None,
                     help="characters of prompt text per request, checked before tokenizing "
                          "(default 32 per token of max_model_len, at least 65536)")
    sec.add_argument("--max-request-tokens", type=int, default=None,
                     help="tokens one request may generate: prompts x n x max_tokens (default 32 x max_model_len)")
    sec.add_argument("--header-timeout", type=float, default=10.0,
                     help="seconds a connection may take to send a request's headers (slow clients are closed)")
    sec.add_argument("--max-step-seconds", type=float, default=RequestLimits.max_step_seconds,
                     help="a step running longer marks the engine stuck: /health answers 503")
    s.add_argument("--disable-log-stats", action="store_true", help="no periodic throughput/queue/KV-cache log line")
    s.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="ranks of one engine (the Llama family): the engine starts them on this host")
    s.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="only 1: pipeline parallelism is not supported yet")
    s.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="only 1: run one server per device behind a load balancer instead")
    s.add_argument("--quantization", "-q", default=None, help="bitsandbytes / fp8: quantize the projections to "
                   "4-bit NF4 / FP8 as they load (a quantized checkpoint needs no flag); other formats are refused")
    s.add_argument("--kv-cache-dtype", default="auto", help="only auto: the KV cache in the model's dtype")
    s.add_argument("--tokenizer-mode", default="auto", help="only auto: the checkpoint's (fast) tokenizer")
    s.add_argument("--speculative-config", type=_json_object, default=None, metavar="JSON",
                   help="refused: speculative decoding is not supported yet")
    s.add_argument("--enable-sleep-mode", action="store_true", help="refused: sleep mode is not supported yet")
    s.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="refused: tool calls are not parsed from the output yet")
    s.add_argument("--tool-call-parser", default=None, help="refused: tool calls are not parsed from the output yet")
    s.add_argument("--reasoning-parser", default=None, help="refused: reasoning output is not parsed yet")
    lora.add_argument("--default-mm-loras", type=_json_object, default=None, metavar="JSON",
                      help='modality -> adapter applied when a request carries it and names none, e.g. '
                           '\'{"audio": "/path/to/lora"}\' (multi-modal models)')
    s.add_argument("--limit-mm-per-prompt", type=_json_object, default=None, metavar="JSON",
                   help='modality -> most items per prompt, e.g. \'{"image": 2}\' (multi-modal models)')
    media = s.add_argument_group("multi-modal media (docs/multimodal.md)")
    media.add_argument("--allowed-media-domains", nargs="+", default=None, metavar="DOMAIN",
                       help="fetch http(s) image_url / audio_url parts from these hosts only ('*': any host); "
                            "without it no URL is fetched (vLLM fetches any)")
    media.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                       help="read file:// media parts whose real path lies under this directory; without it none")
    media.add_argument("--max-media-bytes", type=int, default=None,
                       help="most bytes read for one fetched or local media item (default 20 MiB; env "
                            "LORAPLEX_MAX_MEDIA_BYTES)")
    lora.add_argument("--fully-sharded-loras", action="store_true",
                      help="refused: it shards LoRA over tensor-parallel ranks (vLLM's flag)")
    s.add_argument("--api-server-count", type=int, default=1,
                   help="API server processes sharing the port over one engine process (tokenizing, detokenizing "
                        "and SSE on several cores)")
    s.add_argument("--disable-frontend-multiprocessing", action="store_true",
                   help="run the engine in a thread of the API server's process, not in an engine process of its own")
    s.add_argument("--disable-log-requests", action="store_true",
                   help="accepted for vLLM command lines: loraplex logs no requests anyway")
    s.add_argument("--enable-log-requests", action="store_true",
                   help="refused: loraplex does not log requests yet (vLLM's default is off too)")
    s.add_argument("--disable-uvicorn-access-log", action="store_true", help="no uvicorn access log line per request")
    s.add_argument("--root-path", default=None, help="ASGI root_path, when a proxy serves the API under a path prefix")
    return parser


# vLLM flags loraplex takes only at their neutral value: (dest, flag, accepted values, why others are refused).
NOT_YET = (
    ("pipeline_parallel_size", "--pipeline-parallel-size", (1,), "pipeline parallelism is not supported yet; use 1"),
    ("data_parallel_size", "--data-parallel-size", (1,), "data parallelism is not supported yet: run one server "
     "per device behind a load balancer"),
    ("quantization", "--quantization", (None, "bitsandbytes", "fp8", "compressed-tensors"), "only bitsandbytes "
     "(4-bit), fp8 and compressed-tensors (FP8 checkpoints) are supported yet"),
    ("kv_cache_dtype", "--kv-cache-dtype", ("auto",), "a KV cache in another dtype than the model's is not "
     "supported yet"),
    ("tokenizer_mode", "--tokenizer-mode", ("auto",), "only the checkpoint's own tokenizer (auto) is supported"),
    ("speculative_config", "--speculative-config", (None,), "speculative decoding is not supported yet"),
    ("enable_sleep_mode", "--enable-sleep-mode", (False,), "sleep mode is not supported yet"),
    ("enable_auto_tool_choice", "--enable-auto-tool-choice", (False,), "tool calls are not parsed from the output "
     "yet (requests with tools are refused with 400)"),
    ("tool_call_parser", "--tool-call-parser", (None,), "tool calls are not parsed from the output yet"),
    ("reasoning_parser", "--reasoning-parser", (None,), "reasoning output is not parsed yet"),
    ("enable_log_requests", "--enable-log-requests", (False,), "loraplex does not log requests yet"),
)


def refuse_unsupported(args) -> None:
    for dest, flag, accepted, why in NOT_YET:
        value = getattr(args, dest)
        if value not in accepted:
            shown = "" if isinstance(value, bool) else f" {value}"
            raise SystemExit(f"loraplex: {flag}{shown}: {why}")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _demo(args) -> tuple[str, list[str], str]:
    """Model dir, demo adapters as lora modules, served name; exits with a clear message if unavailable."""
    try:
        from loraplex.demo.adapters import ensure_demo_adapters
        from loraplex.demo.default_model import DEFAULT_MODEL_NAME, ensure_default_model
    except ImportError as e:
        raise SystemExit(f"loraplex: no MODEL given and the embedded demo is not available ({e}).\n"
                         "Pass a model: loraplex serve /path/to/model [--enable-lora --lora-modules name=path]")
    try:
        model_dir = ensure_default_model(progress=True)
        adapters = ensure_demo_adapters(progress=True)
    except Exception as e:  # e.g. DefaultModelUnavailable, whose message says what to install
        raise SystemExit(f"loraplex: cannot prepare the embedded demo model: {e}")
    return str(model_dir), [f"{name}={path}" for name, path in adapters.items()], DEFAULT_MODEL_NAME


def _max_rank(modules: list[str]) -> int:
    from pathlib import Path

    from loraplex.server.models import parse_lora_module

    ranks = []
    for spec in modules:
        try:
            config = json.loads((Path(parse_lora_module(spec)[1]) / "adapter_config.json").read_text())
            ranks += [config.get("r", 0)] + list((config.get("rank_pattern") or {}).values())
        except (OSError, ValueError):
            continue
    return max(ranks, default=0)


def _banner(url: str, model: str, adapters: list[str], api_key: bool, key_from_env: bool = True,
            key_env: str = "LORAPLEX_API_KEY") -> str:
    # Name where the key lives: the environment variable that holds it, or the --api-key the operator typed.
    key = f"${key_env}" if key_from_env else "<--api-key>"
    auth = f' -H "Authorization: Bearer {key}"' if api_key else ""
    body = json.dumps({"model": adapters[0] if adapters else model, "prompt": "Hello, my name is",
                       "max_tokens": 32, "temperature": 0})
    return (f"loraplex: serving {model} on {url}" + (f" with adapters {', '.join(adapters)}" if adapters else "")
            + f"\n  try:\n    curl{auth} {url}/v1/models\n"
            f"    curl{auth} {url}/v1/completions -H 'Content-Type: application/json' -d '{body}'\n")


def serve(args) -> int:
    import uvicorn


    from loraplex import EngineArgs, LLMEngine
    from loraplex.server.app import create_app
    from loraplex.server.engine_proc import EngineStartError
    from loraplex.server.media_reader import MediaPolicy
    from loraplex.server.models import parse_lora_module

    refuse_unsupported(args)
    # Bars redraw in place: on a terminal only. Elsewhere (a log file) each phase is one plain line.
    progress = sys.stderr.isatty()
    modules = list(args.lora_modules)
    model, served = args.model or args.model_flag, args.served_model_name
    demo = model is None
    if demo:
        model, demo_modules, name = _demo(args)
        known = {parse_lora_module(m)[0] for m in modules}
        modules += [m for m in demo_modules if parse_lora_module(m)[0] not in known]
        served = served or [name]
        args.enable_lora = True
    try:
        names = [parse_lora_module(m)[0] for m in modules]
    except ValueError as e:
        raise SystemExit(f"loraplex: {e}")
    if modules and not args.enable_lora:
        logger.info("--lora-modules given: enabling LoRA")
        args.enable_lora = True
    max_rank = args.max_lora_rank or max(DEFAULT_MAX_LORA_RANK, _max_rank(modules) if demo else 0)
    try:
        engine_args = EngineArgs(
            model=model, tokenizer=args.tokenizer, served_model_name=served[0] if served else None, dtype=args.dtype,
            revision=args.revision, download_dir=args.download_dir,
            device=args.device, seed=args.seed, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
            enable_prefix_caching=args.enable_prefix_caching, enable_chunked_prefill=args.enable_chunked_prefill,
            gpu_memory_utilization=args.gpu_memory_utilization, cpu_kv_cache_space=args.cpu_kv_cache_space,
            enforce_eager=args.enforce_eager, load_format=args.load_format, quantization=args.quantization,
            async_scheduling=args.async_scheduling,
            max_logprobs=args.max_logprobs, trust_remote_code=args.trust_remote_code,
            enable_lora=args.enable_lora, max_loras=args.max_loras, max_lora_rank=max_rank,
            max_cpu_loras=args.max_cpu_loras, max_gpu_loras=args.max_gpu_loras,
            lora_memory_fraction=args.lora_memory_fraction, lora_loader=args.lora_loader,
            num_lora_loader_workers=args.num_lora_loader_workers,
            max_lora_bypass_steps=args.max_lora_bypass_steps, lora_dtype=args.lora_dtype,
            fully_sharded_loras=args.fully_sharded_loras, tensor_parallel_size=args.tensor_parallel_size,
            disable_log_stats=args.disable_log_stats, default_mm_loras=args.default_mm_loras,
            limit_mm_per_prompt=args.limit_mm_per_prompt)
        limits = RequestLimits(max_n=args.max_n, max_prompt_chars=args.max_prompt_chars,
                               max_request_tokens=args.max_request_tokens,
                               trust_request_chat_template=args.trust_request_chat_template,
                               max_step_seconds=args.max_step_seconds)
        media_policy = MediaPolicy.from_env(args.allowed_media_domains, args.allowed_local_media_path,
                                            args.max_media_bytes)
        from loraplex.server.generation_config import check_source, load_chat_template

        template = load_chat_template(args.chat_template)
        check_source(args.generation_config)
    except ValueError as e:
        raise SystemExit(f"loraplex: {e}")
    print(f"loraplex: loading {model} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    api_key = args.api_key or envs.api_key()
    if args.host in ("0.0.0.0", "::", "") and not api_key:
        logger.warning("listening on all interfaces without --api-key: anyone who can reach this port can use it")
    display = "127.0.0.1" if args.host in ("0.0.0.0", "") else ("[::1]" if args.host == "::" else args.host)
    base_name = (served or [model])[0]
    if args.api_server_count < 1:
        raise SystemExit(f"loraplex: --api-server-count must be >= 1, got {args.api_server_count}")
    if args.api_server_count > 1:
        if args.disable_frontend_multiprocessing:
            raise SystemExit("loraplex: --api-server-count > 1 needs the engine in a process of its own; "
                             "drop --disable-frontend-multiprocessing")
        return _serve_api_servers(args, engine_args, modules, served, api_key, limits, model, started, display,
                                  base_name, names, media_policy, template, progress)
    if args.disable_frontend_multiprocessing:  # vLLM's flag: the engine runs in the API server's process
        # The engine thread shares the GIL with the event loop. At CPython's default 5 ms switch interval, a busy
        # event loop (a flood of requests, even refused ones) makes every GIL hand-back in a step wait up to 5 ms;
        # 0.5 ms keeps the engine's pace under load at a small cost in switching.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        try:
            engine = LLMEngine.from_engine_args(engine_args, progress=progress)
        except Exception as e:  # a missing or unsupported model: one clear line, not a traceback
            raise SystemExit(f"loraplex: cannot load model {model}: {type(e).__name__}: {e}")
    else:
        engine = engine_args  # create_app starts the engine-core process
    try:
        app = create_app(engine, served_model_name=served, api_key=api_key, admin_api_key=args.admin_api_key,
                         allowed_lora_paths=args.allowed_lora_paths, lora_modules=modules,
                         max_request_body_bytes=args.max_request_body_bytes, progress=progress, limits=limits,
                         media_policy=media_policy, chat_template=template, generation_config=args.generation_config,
                         override_generation_config=args.override_generation_config)
    except EngineStartError as e:
        if e.stage == "model":
            raise SystemExit(f"loraplex: cannot load model {model}: {e}")
        raise SystemExit(f"loraplex: cannot preload --lora-modules: {e}")
    except Exception as e:
        raise SystemExit(f"loraplex: cannot preload --lora-modules: {type(e).__name__}: {e}")
    aengine = app.state.server.aengine
    where = "in this process" if args.disable_frontend_multiprocessing else f"in process {aengine.proc.pid}"
    print(f"loraplex: model loaded in {time.monotonic() - started:.1f}s (max_model_len={aengine.max_model_len}, "
          f"device={aengine.info['device']}, engine {where})", file=sys.stderr, flush=True)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.should_exit:
                return
            port = self.servers[0].sockets[0].getsockname()[1] if self.servers else args.port
            print(_banner(f"http://{display}:{port}", base_name, names, bool(api_key), not args.api_key,
                          envs.name_of("API_KEY")), flush=True)

    from loraplex.server.http_protocol import protocol_class

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                            timeout_graceful_shutdown=10, http=protocol_class(args.header_timeout),
                            access_log=not args.disable_uvicorn_access_log, root_path=args.root_path or "")
    try:
        Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        pass
    return 0


def _serve_api_servers(args, engine_args, modules, served, api_key, limits, model, started, display, base_name,
                       names, media_policy, template, progress) -> int:
    from loraplex.server.engine_proc import EngineStartError
    from loraplex.server.launcher import serve_api_servers
    from loraplex.server.models import parse_lora_module

    try:
        lora_modules = [parse_lora_module(m) for m in modules]
    except ValueError as e:
        raise SystemExit(f"loraplex: {e}")
    if any(name in set(served or [model]) | {model} for name, _, _ in lora_modules):
        raise SystemExit("loraplex: --lora-modules: an adapter name conflicts with a served base model")
    app_kwargs = dict(served_model_name=served, api_key=api_key, admin_api_key=args.admin_api_key,
                      allowed_lora_paths=args.allowed_lora_paths, max_request_body_bytes=args.max_request_body_bytes,
                      limits=limits, media_policy=media_policy, chat_template=template,
                      generation_config=args.generation_config,
                      override_generation_config=args.override_generation_config)
    uvicorn_kwargs = dict(host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                          timeout_graceful_shutdown=10, header_timeout=args.header_timeout,
                          access_log=not args.disable_uvicorn_access_log, root_path=args.root_path or "")

    def on_started(port: int, engine_pid: int) -> None:
        print(f"loraplex: model loaded in {time.monotonic() - started:.1f}s (engine in process {engine_pid}, "
              f"{args.api_server_count} API server processes)", file=sys.stderr, flush=True)
        print(_banner(f"http://{display}:{port}", base_name, names, bool(api_key), not args.api_key,
                      envs.name_of("API_KEY")), flush=True)

    try:
        return serve_api_servers(args.api_server_count, engine_args, lora_modules, app_kwargs, uvicorn_kwargs,
                                 on_started, progress=progress)
    except EngineStartError as e:
        if e.stage == "model":
            raise SystemExit(f"loraplex: cannot load model {model}: {e}")
        raise SystemExit(f"loraplex: cannot preload --lora-modules: {e}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return serve(args)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
