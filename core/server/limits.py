"""RequestLimits: the caps on what one request may ask of a shared server, checked before it reaches the engine.

One API-key holder must not be able to stall or starve the others (docs/security.md). Each cap is a 400 with
vLLM's error body naming the field; the defaults leave every ordinary request untouched.
"""
from __future__ import annotations

from dataclasses import dataclass

from loraplex.errors import ConfigError


@dataclass(frozen=True)
class RequestLimits:
    """Caps per request.

    :param max_n: samples per prompt (``n``; OpenAI's own cap is 128).
    :param max_prompts: prompts in one completions request.
    :param max_stop: stop strings in one request.
    :param max_stop_chars: characters in one stop string.
    :param max_prompt_chars: characters of prompt text (each prompt, or all chat messages together), checked
        before tokenizing. None: 32 characters per token of ``max_model_len`` (at least 64 Ki).
    :param max_request_tokens: tokens one request may generate in all: ``n`` x ``max_tokens`` summed over its
        prompts (max_tokens omitted counts as the room left in the context). None: 32 x ``max_model_len``.
    :param trust_request_chat_template: serve requests that bring their own chat template
        (``chat_template_kwargs.chat_template``), as vLLM's ``--trust-request-chat-template``; off by default.
    :param chat_template_timeout_s: how long a request-supplied template may render (in a worker process).
    :param max_step_seconds: a step running longer than this marks the engine stuck (/health 503).
    """

    max_n: int = 64
    max_prompts: int = 64
    max_stop: int = 16
    max_stop_chars: int = 256
    max_prompt_chars: int | None = None
    max_request_tokens: int | None = None
    trust_request_chat_template: bool = False
    chat_template_timeout_s: float = 2.0
    max_step_seconds: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_n", "max_prompts", "max_stop", "max_stop_chars", "max_prompt_chars", "max_request_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"RequestLimits.{name} must be a positive int, got {value!r}", name)
        for name in ("chat_template_timeout_s", "max_step_seconds"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"RequestLimits.{name} must be > 0, got {getattr(self, name)!r}", name)

    def prompt_chars(self, max_model_len: int) -> int:
        return self.max_prompt_chars or max(64 * 1024, 32 * max_model_len)

    def body_bytes(self, max_model_len: int, ceiling: int) -> int:
        """Default body cap: room for the prompt cap even JSON-escaped (up to 6 bytes a character), between
        1 MiB and ``ceiling``; a body beyond it is refused from its Content-Length, before it is read."""
        return min(ceiling, max(1 << 20, 8 * self.prompt_chars(max_model_len)))

    def request_tokens(self, max_model_len: int) -> int:
        return self.max_request_tokens or 32 * max_model_len
