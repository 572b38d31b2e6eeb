"""Frontend: tokenizing and chat templating for the server, off the engine thread.

Tokenizing a long prompt or rendering a template in the engine thread froze every tenant's generation
(docs/security.md). Here it runs in a small thread pool whose threads each own a copy of the engine's
tokenizer (HF tokenizers are not safe to share across threads), so prompts are tokenized exactly as
``LLM.generate`` / ``LLM.chat`` tokenize them. A template that a request brings (only with
``trust_request_chat_template``) is code from the request: it renders in a worker process with a time and
memory bound, and is killed past them.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import multiprocessing
import threading

from loraplex.server.errors import APIError

logger = logging.getLogger("loraplex.server")

NUM_THREADS = 2
TEMPLATE_MEMORY_BYTES = 1 << 30  # what a request's template may allocate in its worker process


def _as_ids(ids) -> list[int]:
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def _template_worker(conn, tokenizer) -> None:
    """Worker process: render request templates one by one; answer ("ok", ids) or ("error", text)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * resource.getpagesize()
        limit = used + TEMPLATE_MEMORY_BYTES
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    except (ImportError, OSError, ValueError):
        pass  # no memory bound where the platform has none; the time bound still holds
    while True:
        try:
            messages, kwargs = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", _as_ids(tokenizer.apply_chat_template(messages, tokenize=True, **kwargs))))
        except MemoryError:
            conn.send(("error", "the chat template needed more than its memory bound"))
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))


class _TemplateSandbox:
    """One worker process for request-supplied templates; restarted after a timeout kills it."""

    def __init__(self, tokenizer, timeout_s: float):
        self._tokenizer = tokenizer
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding CUDA and threads
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_template_worker, args=(child, self._tokenizer), daemon=True,
                                 name="loraplex-template")
        self._proc.start()
        child.close()
        self._conn = parent

    def render(self, messages: list, kwargs: dict) -> list[int]:
        with self._lock:  # one render at a time: the worker is one process
            if self._proc is None or not self._proc.is_alive():
                self._start()
                # The first render also waits for the worker to import transformers.
                deadline = max(self._timeout_s, 60.0)
            else:
                deadline = self._timeout_s
            self._conn.send((messages, kwargs))
            if not self._conn.poll(deadline):
                self._kill()
                raise APIError(400, f"The chat template did not render within {self._timeout_s:g} s",
                               param="chat_template")
            try:
                status, value = self._conn.recv()
            except EOFError:
                self._kill()
                raise APIError(400, "The chat template's worker died while rendering", param="chat_template") \
                    from None
        if status != "ok":
            raise APIError(400, f"Cannot apply the chat template: {value}", param="chat_template")
        return value

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(5)
        self._proc = None

    def close(self) -> None:
        with self._lock:
            self._kill()


# Decoded images may have at most this many pixels (a small PNG can claim a huge canvas).
MAX_IMAGE_PIXELS = 64 * 2**20


class Frontend:
    def __init__(self, tokenizer, limits, processor=None, limit_mm_per_prompt: dict | None = None):
        self._tokenizer = tokenizer
        self._processor = processor
        self._limit_mm = dict(limit_mm_per_prompt or {})
        self._local = threading.local()
        self._pool = concurrent.futures.ThreadPoolExecutor(NUM_THREADS, thread_name_prefix="loraplex-frontend")
        self._sandbox = None
        if limits.trust_request_chat_template and tokenizer is not None:
            self._sandbox = _TemplateSandbox(tokenizer, limits.chat_template_timeout_s)

    def _own_processor(self):
        proc = getattr(self._local, "processor", None)
        if proc is None and self._processor is not None:
            proc = self._local.processor = copy.deepcopy(self._processor)
        return proc

    def chat_multimodal(self, tok, messages: list, kwargs: dict, images: list[bytes]) -> dict:
        """A chat prompt with images: rendered by the chat template (each image part's placeholder where the part
        was), then through the model's processor, as ``LLM.generate({"prompt": ..., "multi_modal_data": ...})``
        would take it; the engine gets the expanded ids and pixel values."""
        import io

        from PIL import Image, UnidentifiedImageError

        limit = self._limit_mm.get("image")
        if limit is not None and len(images) > limit:
            raise APIError(400, f"At most {limit} image(s) may be provided in one prompt, got {len(images)}",
                           param="messages")
        if "chat_template" in kwargs:
            raise APIError(400, "a request-supplied chat template cannot be used with images", param="chat_template")
        decoded = []
        for i, data in enumerate(images):
            try:
                img = Image.open(io.BytesIO(data))
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise APIError(400, f"image {i} has {img.width}x{img.height} pixels; at most "
                                   f"{MAX_IMAGE_PIXELS} are accepted", param="messages")
                img.load()
                decoded.append(img.convert("RGB"))
            except APIError:
                raise
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
                raise APIError(400, f"image {i} could not be decoded: {type(e).__name__}: {e}",
                               param="messages") from None
        if tok is None:
            raise APIError(400, "This server was started without a tokenizer; chat needs one")
        try:
            text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
        except Exception as e:
            raise APIError(400, f"Cannot apply the chat template: {type(e).__name__}: {e}", param="messages") \
                from None
        try:
            out = self._own_processor()(text=text, images=decoded, return_tensors="pt")
        except Exception as e:
            raise APIError(400, f"the model's processor refused the prompt: {type(e).__name__}: {e}",
                           param="messages") from None
        return {"prompt": text, "prompt_token_ids": out["input_ids"][0].tolist(),
                "mm": {"pixel_values": out["pixel_values"], "modalities": ("image",)}}

    def _own_tokenizer(self):
        tok = getattr(self._local, "tokenizer", None)
        if tok is None and self._tokenizer is not None:
            tok = self._local.tokenizer = copy.deepcopy(self._tokenizer)
        return tok

    async def run(self, fn, *args):
        """``fn(tokenizer, *args)`` in a frontend thread, with that thread's own tokenizer copy."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(self._own_tokenizer(), *args))

    def chat_ids(self, tok, messages: list, kwargs: dict) -> list[int]:
        if tok is None:
            raise APIError(400, "This server was started without a tokenizer; chat needs one")
        if "chat_template" in kwargs:
            if self._sandbox is None:  # protocol refuses it before; this is the second lock on the door
                raise APIError(400, "Request-supplied chat templates are not trusted", param="chat_template")
            return self._sandbox.render(messages, kwargs)
        try:
            return _as_ids(tok.apply_chat_template(messages, tokenize=True, **kwargs))
        except Exception as e:  # jinja errors, a tokenizer without a chat template, bad template kwargs
            raise APIError(400, f"Cannot apply the chat template: {type(e).__name__}: {e}", param="messages") \
                from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._sandbox is not None:
            self._sandbox.close()
