"""The demo adapters, trained on first use and cached under ``<cache root>/adapters/``.

``ensure_demo_adapters()`` returns ``{"sql-lora": dir, "pirate-lora": dir}``. Each directory is
named after the adapter, so pointing ``LORAPLEX_LORA_RESOLVER_CACHE_DIR`` at
``<cache root>/adapters`` lets the filesystem resolver serve them by name. A ``loraplex_demo.json``
in each holds the recipe version; a different version (changed recipe, data or base model)
means the adapter is trained again.

    python -m loraplex.demo.adapters      # trains what is missing, prints name -> path
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from loraplex import envs

# Bump RECIPE_REVISION when training code changes in a way the recipe dicts do not show.
RECIPE_REVISION = "1"

DEMO_ADAPTERS = {
    "sql-lora": "sql",
    "pirate-lora": "pirate",
}


def adapters_dir() -> Path:
    return envs.cache_root() / "adapters"


def recipe_version(task: str) -> str:
    from loraplex.demo.datasets import DATASET_VERSION
    from loraplex.demo.default_model import DEFAULT_MODEL_NAME
    from loraplex.demo.train_adapter import TASK_DEFAULTS

    blob = json.dumps({"task": task, "recipe": TASK_DEFAULTS[task], "data": DATASET_VERSION,
                       "base": DEFAULT_MODEL_NAME, "rev": RECIPE_REVISION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _cached_version(path: Path) -> str | None:
    try:
        meta = json.loads((path / "loraplex_demo.json").read_text())
    except (OSError, ValueError):
        return None
    complete = (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
    return meta.get("version") if complete else None


def _install(tmp: Path, target: Path) -> None:
    """Rename the finished adapter into place. An outdated one is first renamed aside, so the
    target name only ever points at a complete adapter (or, for an instant, at nothing)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        if _cached_version(target) is None:  # not another process's finished adapter
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def ensure_demo_adapter(name: str, progress: bool = True) -> Path:
    """Path of one demo adapter (``sql-lora`` or ``pirate-lora``), training it if needed."""
    from loraplex.demo.default_model import ensure_default_model
    from loraplex.demo.train_adapter import TASK_DEFAULTS, TrainConfig, task_examples, train

    task = DEMO_ADAPTERS[name]
    version = recipe_version(task)
    target = adapters_dir() / name
    if _cached_version(target) == version:
        return target
    base = ensure_default_model(progress=progress)
    recipe = TASK_DEFAULTS[task]
    if progress:
        print(f"[loraplex.demo] training demo adapter {name} (one-time, about a minute on 2 CPU cores)",
              file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        cfg = TrainConfig(steps=recipe["steps"], lr=recipe["lr"], rank=recipe["rank"], fmt=recipe["fmt"])
        stats = train(base, task_examples(task, recipe["n_train"]), tmp, cfg, base_model_name=str(base),
                      progress=progress, extra_meta={"task": task})
        (tmp / "loraplex_demo.json").write_text(json.dumps(
            {"name": name, "task": task, "version": version, "format": recipe["fmt"],
             "train_seconds": stats["train_seconds"], "final_loss": stats["final_loss"]}, indent=2))
        for path in [tmp, *tmp.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)  # mkdtemp's 0700 would lock out other users
        _install(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"[loraplex.demo] {name} ready in {stats['train_seconds']:.0f}s (final loss "
              f"{stats['final_loss']:.3f}): {target}", file=sys.stderr, flush=True)
    return target


def ensure_demo_adapters(progress: bool = True) -> dict[str, Path]:
    """{"sql-lora": dir, "pirate-lora": dir}, training each adapter that is missing or outdated."""
    return {name: ensure_demo_adapter(name, progress) for name in DEMO_ADAPTERS}


def main() -> int:
    for name, path in ensure_demo_adapters().items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
