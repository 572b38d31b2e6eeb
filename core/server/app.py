"""The Starlette app: ``create_app(engine_or_args, ...)`` with an explicit route list.

Handlers get their state from the lifespan (``request.state.server``); every route under /v1 goes
through ``_endpoint``, which checks the API key and turns any exception into its HTTP answer via
``errors.error_response`` (the one mapping).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hmac
import logging
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from loraplex import __version__, envs
from loraplex.server import routes_admin, routes_openai
from loraplex.server.async_engine import AsyncEngine, EngineClient
from loraplex.server.errors import EXCEPTION_HANDLERS, APIError, error_response
from loraplex.server.frontend import Frontend
from loraplex.server.generation_config import check_source, default_sampling_params, load_chat_template
from loraplex.server.limits import RequestLimits
from loraplex.server.media import MediaSpec
from loraplex.server.media_reader import MediaPolicy
from loraplex.server.metrics import ServerMetrics
from loraplex.server.models import ModelRegistry, parse_lora_module
from loraplex.server.protocol import DEFAULT_MAX_BODY_BYTES

logger = logging.getLogger("loraplex.server")


@dataclass
class ServerState:
    aengine: EngineClient
    models: ModelRegistry
    metrics: ServerMetrics
    max_body_bytes: int
    max_logprobs: int
    limits: RequestLimits = RequestLimits()
    frontend: Frontend | None = None  # tokenizes and renders chat templates off the engine thread
    media: MediaSpec = MediaSpec()  # what the served model takes besides text
    # Sampling defaults of --generation-config (OpenAI field names), for what a request leaves out.
    sampling_defaults: dict = dataclasses.field(default_factory=dict)


def _authorize(request, keys: tuple[str, ...], user_keys: tuple[str, ...]) -> None:
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token:
        # Compare against every key, in constant time, so timing says nothing about which one is close.
        matches = [hmac.compare_digest(token.encode(), k.encode()) for k in keys]
        if any(matches):
            return
        if any(hmac.compare_digest(token.encode(), k.encode()) for k in user_keys):
            raise APIError(403, "Adapter management needs the admin API key")
    raise APIError(401, "Unauthorized: a valid API key is required (Authorization: Bearer <key>)")


def _endpoint(handler, keys: tuple[str, ...], user_keys: tuple[str, ...] = (), count: bool = False):
    async def endpoint(request) -> Response:
        try:
            _authorize(request, keys, user_keys)
            response = await handler(request)
        except Exception as exc:
            response = error_response(exc)
        if count:
            request.state.server.metrics.count(getattr(request.state, "model_label", None), response.status_code)
        return response

    endpoint.__name__ = handler.__name__
    return endpoint


async def health(request) -> Response:
    """200 with a small status body while the engine serves; 503 with vLLM's error body otherwise."""
    aengine = request.state.server.aengine
    if not aengine.is_running:
        return error_response(APIError(503, "The engine loop is not running"))
    stuck = aengine.stuck_for()
    if stuck is not None:
        return error_response(APIError(503, f"The engine is stuck: one step has run for {stuck:.0f} s"))
    if not aengine.is_healthy:
        return error_response(APIError(503, "The engine is failing its steps; see the server log"))
    state = aengine.state
    return JSONResponse({"status": "ok", "engine": "running", "num_running": state.get("num_running", 0),
                         "num_waiting": state.get("num_waiting", 0), "num_loras": state.get("num_loras", 0)})


async def metrics(request) -> Response:
    body, content_type = request.state.server.metrics.render()
    return Response(body, media_type=content_type)


async def version(request) -> Response:
    return JSONResponse({"version": __version__})


def _build_engine(engine_or_args, progress: bool, lora_modules: list):
    """The engine client: an engine-core process for EngineArgs, a thread for an in-process LLMEngine."""
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.engine_args import EngineArgs
    from loraplex.server.engine_proc import ProcEngineClient

    if isinstance(engine_or_args, EngineClient):
        if lora_modules and engine_or_args.is_running:
            raise ValueError("lora_modules are preloaded before serving; this engine client is already running")
        return engine_or_args
    if isinstance(engine_or_args, EngineArgs):
        return ProcEngineClient.spawn(engine_or_args, lora_modules=lora_modules, progress=progress)
    if not isinstance(engine_or_args, LLMEngine):
        raise TypeError(f"create_app needs an LLMEngine, EngineArgs or EngineClient, got {type(engine_or_args)}")
    aengine = AsyncEngine(engine_or_args)
    for name, path, base in lora_modules:
        aengine.core.preload(name, path, base)
    aengine.publish(adapters=True)
    return aengine


def create_app(engine_or_args, *, served_model_name: str | list[str] | None = None, api_key: str | None = None,
               admin_api_key: str | None = None, allowed_lora_paths: list[str] | None = None,
               lora_modules: list | None = None, allow_runtime_lora_updating: bool | None = None,
               max_request_body_bytes: int | None = None, lora_resolution=None, progress: bool = False,
               limits: RequestLimits | None = None, media_policy: MediaPolicy | None = None,
               chat_template: str | None = None, generation_config: str = "auto",
               override_generation_config: dict | None = None) -> Starlette:
    """A vLLM-compatible OpenAI server over one engine.

    ``engine_or_args``: ``EngineArgs`` start an engine-core process of its own (the API server and the engine
    then share no GIL; ``loraplex serve`` does this); an ``LLMEngine`` runs in a thread of this process; an
    ``EngineClient`` (``ProcEngineClient.spawn(...)``, ``AsyncEngine(engine)``) is used as it is.
    ``None`` for ``api_key``, ``admin_api_key``, ``allowed_lora_paths``, ``allow_runtime_lora_updating``
    and ``max_request_body_bytes`` means: take it from the environment (``loraplex.envs``); an empty
    key or list means "none", whatever the environment says.
    ``lora_modules`` entries are ``name=path`` strings, JSON strings, dicts or LoRARequests, loaded
    before the server accepts requests. ``media_policy``: what a multi-modal request's media may be read from
    (files, remote URLs); None: ``MediaPolicy.from_env()``, which reads no files and fetches no URL.
    ``chat_template`` (a file or the template itself, vLLM's ``--chat-template``) replaces the tokenizer's;
    ``generation_config`` (``auto``: the model's generation_config.json, ``vllm``: none, or a folder) and
    ``override_generation_config`` give the sampling defaults of requests, as in vLLM.
    """
    info = engine_or_args.info if isinstance(engine_or_args, EngineClient) else None
    if isinstance(served_model_name, str):
        served_model_name = [served_model_name]
    names = list(served_model_name or [])
    if not names:
        if info is None:
            args = engine_or_args if not hasattr(engine_or_args, "args") else engine_or_args.args
            names = [getattr(args, "served_model_name", None) or getattr(args, "model", None)]
        else:
            names = [info["served_model_name"] or info["model"]]
    model_root = info["model"] if info is not None else getattr(getattr(engine_or_args, "args", engine_or_args),
                                                                "model", names[0])
    aliases = set(names) | {model_root}
    modules = []
    for spec in lora_modules or []:
        name, path, base = parse_lora_module(spec)
        if name in aliases:
            raise ValueError(f"--lora-modules: the adapter name '{name}' conflicts with a served base model")
        modules.append((name, path, base))
    template = load_chat_template(chat_template)  # before the engine starts: a bad value fails at once
    check_source(generation_config)
    aengine = _build_engine(engine_or_args, progress, modules)
    sampling_defaults = default_sampling_params(generation_config, aengine.info.get("model_path"),
                                                override_generation_config)
    tokenizer = aengine.tokenizer
    if template is not None and tokenizer is not None:
        tokenizer = copy.deepcopy(tokenizer)  # the engine's own (LLM.chat in this process) keeps its template
        tokenizer.chat_template = template
    runtime = envs.allow_runtime_lora_updating() if allow_runtime_lora_updating is None else allow_runtime_lora_updating
    api_key = api_key if api_key is not None else envs.api_key()
    admin_api_key = admin_api_key if admin_api_key is not None else envs.admin_api_key()
    models = ModelRegistry(aengine, names, model_root, allow_runtime_updates=runtime,
                           allowed_lora_paths=allowed_lora_paths if allowed_lora_paths is not None
                           else envs.allowed_lora_paths(), lora_resolution=lora_resolution)
    limits = limits or RequestLimits()
    aengine.max_step_seconds = limits.max_step_seconds
    state = ServerState(aengine, models, ServerMetrics(aengine, names[0]),
                        max_request_body_bytes or envs.max_request_body_bytes()
                        or limits.body_bytes(aengine.max_model_len, DEFAULT_MAX_BODY_BYTES),
                        aengine.info["max_logprobs"], limits,
                        Frontend(tokenizer, limits, aengine.processor, aengine.info.get("limit_mm_per_prompt"),
                                 media_policy or MediaPolicy.from_env()),
                        MediaSpec(tuple(aengine.info.get("modalities") or ()), aengine.info.get("image_placeholder"),
                                  aengine.info.get("audio_placeholder")),
                        sampling_defaults)

    user_keys = tuple(k for k in (api_key, admin_api_key) if k) if api_key else ()
    admin_keys = (admin_api_key,) if admin_api_key else user_keys
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/v1/models", _endpoint(routes_openai.list_models, user_keys), methods=["GET"]),
        Route("/v1/completions", _endpoint(routes_openai.completions, user_keys, count=True), methods=["POST"]),
        Route("/v1/chat/completions", _endpoint(routes_openai.chat_completions, user_keys, count=True),
              methods=["POST"]),
    ]
    if runtime:
        routes += [
            Route("/v1/load_lora_adapter", _endpoint(routes_admin.load_lora_adapter, admin_keys, user_keys),
                  methods=["POST"]),
            Route("/v1/unload_lora_adapter", _endpoint(routes_admin.unload_lora_adapter, admin_keys, user_keys),
                  methods=["POST"]),
        ]
        logger.warning("runtime LoRA updating is enabled: /v1/load_lora_adapter and /v1/unload_lora_adapter "
                       "are served%s", "" if admin_keys else " WITHOUT authentication")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await aengine.astart()
        try:
            yield {"server": state}
        finally:
            aengine.stop()
            state.frontend.close()

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS)
    app.state.server = state
    return app
