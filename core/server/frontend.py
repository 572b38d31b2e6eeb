"""Frontend: tokenizing and chat templating for the server, off the engine thread.

Tokenizing a long prompt or rendering a template in the engine thread froze every tenant's generation
(docs/security.md). Here it runs in a small thread pool whose threads each own a copy of the engine's
tokenizer (HF tokenizers are not safe to share across threads), so prompts are tokenized exactly as
``LLM.generate`` / ``LLM.chat`` tokenize them. A template that a request brings (only with
``trust_request_chat_template``) is code from the request: it renders in a worker process with a time and
memory bound, and is killed past them. A multi-modal request's media are read here too: files and remote URLs
in fetch threads of their own (``MediaReader``, under the operator's ``MediaPolicy``), then decoded and run
through the model's processor in the tokenizing threads.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import multiprocessing
import threading

from loraplex import envs
from loraplex.errors import InvalidRequestError
from loraplex.server.errors import APIError
from loraplex.server.media import MediaRef
from loraplex.server.media_decode import decode_audio, decode_image
from loraplex.server.media_reader import MediaPolicy, MediaReader

logger = logging.getLogger("loraplex.server")

NUM_THREADS = 2
TEMPLATE_MEMORY_BYTES = 1 << 30  # what a request's template may allocate in its worker process
# Media items of one request read from files or URLs: one request must not fan out into many fetches.
MAX_FETCHES_PER_REQUEST = 16


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


class Frontend:
    def __init__(self, tokenizer, limits, processor=None, limit_mm_per_prompt: dict | None = None,
                 media_policy: MediaPolicy | None = None):
        self._tokenizer = tokenizer
        self._processor = processor
        self._limit_mm = dict(limit_mm_per_prompt or {})
        self._local = threading.local()
        self._pool = concurrent.futures.ThreadPoolExecutor(NUM_THREADS, thread_name_prefix="loraplex-frontend")
        self._sandbox = None
        if limits.trust_request_chat_template and tokenizer is not None:
            self._sandbox = _TemplateSandbox(tokenizer, limits.chat_template_timeout_s)
        self._reader = MediaReader(media_policy or MediaPolicy())
        self._fetch_pool = None  # made on the first file or remote media item

    def _own_processor(self):
        proc = getattr(self._local, "processor", None)
        if proc is None and self._processor is not None:
            proc = self._local.processor = copy.deepcopy(self._processor)
        return proc

    def _check_counts(self, refs: list[MediaRef]) -> None:
        for modality in ("image", "audio"):
            num = sum(1 for r in refs if r.modality == modality)
            limit = self._limit_mm.get(modality)
            if limit is not None and num > limit:
                raise APIError(400, f"At most {limit} {modality}(s) may be provided in one prompt, got {num}",
                               param="messages")
        num_outside = sum(1 for r in refs if r.is_read_from_outside)
        if num_outside > MAX_FETCHES_PER_REQUEST:
            raise APIError(400, f"at most {MAX_FETCHES_PER_REQUEST} media items of one request may be files or "
                           f"remote URLs, got {num_outside}", param="messages")

    async def fetch_media(self, refs: list[MediaRef]) -> dict[int, bytes]:
        """The bytes of the file and remote items of ``refs`` (by index), read after the counts are checked, one
        after the other in a fetch thread: a slow URL holds neither the event loop nor a tokenizing thread."""
        self._check_counts(refs)
        outside = [i for i, r in enumerate(refs) if r.is_read_from_outside]
        if not outside:
            return {}
        if self._fetch_pool is None:
            self._fetch_pool = concurrent.futures.ThreadPoolExecutor(envs.media_loading_thread_count(),
                                                                     thread_name_prefix="loraplex-media")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._fetch_pool, lambda: {i: self._reader.read(refs[i]) for i in outside})

    def decode_media(self, refs: list[MediaRef], fetched: dict[int, bytes]) -> tuple[list, list]:
        """(PIL images, (array, rate) audios) of ``refs``, in order; inline items are read (base64) here."""
        images, audios = [], []
        for i, ref in enumerate(refs):
            data = fetched[i] if i in fetched else self._reader.read(ref)
            if ref.modality == "image":
                images.append(decode_image(data, ref.where))
            else:
                audios.append(decode_audio(data, ref.where))
        return images, audios

    def chat_multimodal(self, tok, messages: list, kwargs: dict, images: list, audios: list) -> dict:
        """A chat prompt with media: rendered by the chat template (each media part's placeholder where the part
        was), then through the model's processor (``run_processor``), as ``LLM.generate({"prompt": ...,
        "multi_modal_data": ...})`` would take it; the engine gets the expanded ids and the tower's inputs."""
        from loraplex.engine.multimodal import run_processor

        if "chat_template" in kwargs:
            raise APIError(400, "a request-supplied chat template cannot be used with media", param="chat_template")
        if tok is None:
            raise APIError(400, "This server was started without a tokenizer; chat needs one")
        try:
            text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
        except Exception as e:
            raise APIError(400, f"Cannot apply the chat template: {type(e).__name__}: {e}", param="messages") \
                from None
        try:
            ids, mm = run_processor(self._own_processor(), text, images=images, audios=audios)
        except InvalidRequestError as e:
            raise APIError(400, str(e), param="messages") from None
        return {"prompt": text, "prompt_token_ids": ids, "mm": mm}

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
        if self._fetch_pool is not None:
            self._fetch_pool.shutdown(wait=False, cancel_futures=True)
        self._reader.close()
        if self._sandbox is not None:
            self._sandbox.close()
