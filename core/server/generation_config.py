"""vLLM's ``--generation-config`` and ``--chat-template``: where a request's default sampling values and the chat
template come from.

``--generation-config auto`` (vLLM's default) takes the sampling values a model's ``generation_config.json`` sets
apart from transformers' defaults (the model creator's recommendation), ``vllm`` takes none, a folder takes its
``generation_config.json``; ``--override-generation-config`` JSON goes on top. A request's own value always wins,
except ``max_tokens``: vLLM caps it at the config's ``max_new_tokens``.
"""
from __future__ import annotations

import codecs
import logging
import os

logger = logging.getLogger("loraplex.server")

# What vLLM takes from a generation config (vllm/config/model.py, get_diff_sampling_param).
SAMPLING_KEYS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")


def check_source(source: str) -> None:
    if source not in ("auto", "vllm") and not os.path.isdir(source):
        raise ValueError(f"--generation-config: {source!r} is neither 'auto', 'vllm' nor an existing folder")


def default_sampling_params(source: str, model_path: str | None, overrides: dict | None = None) -> dict:
    """Request fields (OpenAI names: ``max_tokens`` for HF's ``max_new_tokens``) -> default value."""
    check_source(source)
    config = {} if source == "vllm" else _diff_dict(model_path if source == "auto" else source)
    config.update(overrides or {})
    defaults = {k: config[k] for k in SAMPLING_KEYS if config.get(k) is not None}
    if "max_new_tokens" in defaults:
        defaults["max_tokens"] = defaults.pop("max_new_tokens")
    if defaults:
        logger.warning("Default sampling parameters have been overridden by the model's generation config (%s). "
                       "If this is not intended, relaunch with --generation-config vllm.",
                       ", ".join(f"{k}={v}" for k, v in sorted(defaults.items())))
    return defaults


def _diff_dict(folder: str | None) -> dict:
    """The generation config's values that differ from transformers' defaults ({} when there is none)."""
    if folder is None or not os.path.isfile(os.path.join(folder, "generation_config.json")):
        return {}
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    # transformers flags sampling values of a config whose do_sample is false ("may be ignored"); vLLM uses them.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return GenerationConfig.from_pretrained(folder).to_diff_dict()
    except (OSError, ValueError) as e:
        logger.warning("cannot read the generation config in %s (%s): vLLM's defaults apply", folder, e)
        return {}
    finally:
        hf_logging.set_verbosity(verbosity)


def apply_defaults(body: dict, defaults: dict) -> dict:
    """``body`` with the defaults for the sampling fields it leaves out (None counts as left out)."""
    filled = {k: v for k, v in defaults.items() if k != "max_tokens" and body.get(k) is None}
    return {**body, **filled} if filled else body


def cap_max_tokens(params, defaults: dict) -> None:
    """vLLM: a request generates at most the generation config's max_new_tokens, whatever it asks."""
    cap = defaults.get("max_tokens")
    if cap is not None and (params.max_tokens is None or params.max_tokens > cap):
        params.max_tokens = cap


def load_chat_template(value: str | None) -> str | None:
    """vLLM's rule: a path to a file whose text is the template, else (when it holds ``{``, ``}`` or a newline)
    the template itself, escapes such as ``\\n`` decoded; anything else is a path that does not exist."""
    if value is None:
        return None
    try:
        with open(value, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        if not any(c in value for c in "{}\n"):
            raise ValueError(f"--chat-template: the supplied chat template ({value}) looks like a file path, but "
                             f"it failed to be opened: {e.strerror or e}") from None
    return codecs.decode(value, "unicode_escape")
