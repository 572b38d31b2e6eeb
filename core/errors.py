"""Typed exceptions. The server maps these to HTTP statuses in one place (server/errors.py)."""
from __future__ import annotations


class LoraplexError(Exception):
    """Base of every error loraplex raises on purpose."""


class InvalidRequestError(LoraplexError, ValueError):
    """A request or parameter is invalid (HTTP 400)."""


class UnsupportedArgumentError(InvalidRequestError):
    """An argument loraplex does not implement was given a value that would change the result (HTTP 400).

    ``name`` is the argument, as the caller spelled it. Refused rather than ignored, so the caller learns
    that the output would not be what was asked for.
    """

    def __init__(self, name: str, why: str = ""):
        super().__init__(f"{name!r} is not supported by loraplex" + (f": {why}" if why else ""))
        self.name = name


class ConfigError(LoraplexError, ValueError):
    """An engine argument is invalid or not supported (``EngineArgs``); ``name`` names it."""

    def __init__(self, message: str, name: str | None = None):
        super().__init__(message)
        self.name = name


class UnknownArgumentError(LoraplexError, TypeError):
    """An engine argument that does not exist (a TypeError, as Python's own for a bad keyword)."""


class PromptTooLongError(InvalidRequestError):
    """The prompt plus max_tokens does not fit max_model_len (HTTP 400)."""


class EngineStepError(LoraplexError):
    """The engine step that ran this request failed (HTTP 500); the engine goes on with the others.

    The message names only the exception's type, so one request's error text never reaches another's
    response; the cause is chained (``__cause__``) and logged.
    """


class EngineDeadError(LoraplexError):
    """The engine cannot run any more steps (a rank of a tensor-parallel engine exited); every later step raises
    it too. The server answers 503."""


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
