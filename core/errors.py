"""Typed exceptions. The server maps these to HTTP statuses in one place (server/errors.py)."""
from __future__ import annotations


class LoraplexError(Exception):
    """Base of every error loraplex raises on purpose."""


class InvalidRequestError(LoraplexError, ValueError):
    """A request or parameter is invalid (HTTP 400)."""


class PromptTooLongError(InvalidRequestError):
    """The prompt plus max_tokens does not fit max_model_len (HTTP 400)."""


class UnsupportedModelError(LoraplexError, ValueError):
    """The checkpoint's architecture or format is not supported."""


class LoRAError(LoraplexError):
    """Base of adapter errors. ``lora_name`` names the adapter when known."""

    def __init__(self, message: str, lora_name: str | None = None):
        super().__init__(message)
        self.lora_name = lora_name


class LoRANotFoundError(LoRAError, LookupError):
    """No adapter by that name or at that path (HTTP 404)."""


class LoRALoadError(LoRAError, ValueError):
    """The adapter exists but cannot be loaded: bad config, bad shapes, unsupported options (HTTP 400)."""


class LoRARankError(LoRALoadError):
    """The adapter's rank exceeds max_lora_rank (HTTP 400)."""


class LoRAAlreadyLoadedError(LoRAError, ValueError):
    """An adapter of that name is loaded and load_inplace was not asked for (HTTP 400)."""


class LoRADisabledError(LoRAError, ValueError):
    """An adapter was requested from an engine built without enable_lora (HTTP 400)."""
