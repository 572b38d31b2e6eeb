"""The demo adapters: shipped with the package, copied into ``<cache root>/adapters/`` on first use.

``ensure_demo_adapters()`` returns ``{"sql-lora": dir, "pirate-lora": dir}``. Each directory is
named after the adapter, so pointing ``LORAPLEX_LORA_RESOLVER_CACHE_DIR`` at
``<cache root>/adapters`` lets the filesystem resolver serve them by name. A ``loraplex_demo.json``
in each holds the recipe version. The package ships both adapters (``shipped-adapters/``); one whose
version is not today's recipe's (changed recipe, data or base model) is not used, and the adapter
is trained instead, as it is when nothing is shipped.

    python -m loraplex.demo.adapters            # ensures both (copies or trains), prints name -> path
    python -m loraplex.demo.adapters --train    # retrains both into the package's shipped-adapters/
    python -m loraplex.demo.adapters --train sql-lora --out /tmp/demo   # one of them, elsewhere
"""
from __future__ import annotations

import argparse
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
RECIPE_REVISION = "2"
SHIPPED_DIR = Path(__file__).parent / "shipped-adapters"

DEMO_ADAPTERS = {
    "sql-lora": "sql",
    "pirate-lora": "pirate",
}


def adapters_dir() -> Path:
    return envs.cache_root() / "adapters"


def recipe_version(task: str) -> str:
    from loraplex.demo.datasets import DATASET_VERSION, SQL_DATASET_VERSION
    from loraplex.demo.default_model import DEFAULT_MODEL_NAME
    from loraplex.demo.train_adapter import TASK_DEFAULTS

    data = SQL_DATASET_VERSION if task == "sql" else DATASET_VERSION
    blob = json.dumps({"task": task, "recipe": TASK_DEFAULTS[task], "data": data,
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


def _private_copy(source: Path, parent: Path, name: str) -> Path:
    """A temporary directory beside the target holding a copy of ``source``, readable by all."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=parent))
    try:
        for path in source.iterdir():
            if path.is_file():
                shutil.copyfile(path, tmp / path.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk must not leave a half copy beside the cache
        raise
    return tmp


def _publish(tmp: Path, target: Path) -> None:
    for path in [tmp, *tmp.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # mkdtemp's 0700 would lock out other users
    _install(tmp, target)


def _copy_shipped(name: str, version: str, target: Path, progress: bool) -> Path | None:
    """Copy the shipped adapter into the cache when it is today's recipe; None when it is not.
    An unwritable cache serves the package's own directory instead."""
    shipped = SHIPPED_DIR / name
    if _cached_version(shipped) != version:
        return None
    try:
        tmp = _private_copy(shipped, target.parent, name)
        try:
            _publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        if progress:
            print(f"[loraplex.demo] cannot copy {name} into {target.parent} ({e}); serving it from the package",
                  file=sys.stderr, flush=True)
        return shipped
    if progress:
        print(f"[loraplex.demo] {name}: the shipped adapter, nothing trained: {target}", file=sys.stderr, flush=True)
    return target


def train_demo_adapter(name: str, target: Path, progress: bool = True) -> Path:
    """Train one demo adapter with today's recipe into ``target`` (replaced atomically)."""
    from loraplex.demo.default_model import DEFAULT_MODEL_NAME, ensure_default_model
    from loraplex.demo.train_adapter import TASK_DEFAULTS, TrainConfig, task_examples, train

    task = DEMO_ADAPTERS[name]
    base = ensure_default_model(progress=progress)
    recipe = TASK_DEFAULTS[task]
    if progress:
        print(f"[loraplex.demo] training demo adapter {name} ({recipe['steps']} steps; minutes on 2 CPU cores)",
              file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        cfg = TrainConfig(steps=recipe["steps"], lr=recipe["lr"], rank=recipe["rank"], fmt=recipe["fmt"],
                          save_dtype=recipe["save_dtype"])
        # The served name, not this machine's path: the filesystem resolver matches it, and shipped copies
        # must not carry the path of the machine that trained them.
        stats = train(base, task_examples(task, recipe["n_train"]), tmp, cfg, base_model_name=DEFAULT_MODEL_NAME,
                      progress=progress, extra_meta={"task": task})
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's blank model card; docs/demo.md describes them
        (tmp / "loraplex_demo.json").write_text(json.dumps(
            {"name": name, "task": task, "version": recipe_version(task), "format": recipe["fmt"],
             "train_seconds": stats["train_seconds"], "final_loss": stats["final_loss"]}, indent=2))
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"[loraplex.demo] {name} ready in {stats['train_seconds']:.0f}s (final loss "
              f"{stats['final_loss']:.3f}): {target}", file=sys.stderr, flush=True)
    return target


def ensure_demo_adapter(name: str, progress: bool = True) -> Path:
    """Path of one demo adapter (``sql-lora`` or ``pirate-lora``): the cached one, else the shipped one,
    else one trained now."""
    if name not in DEMO_ADAPTERS:
        raise ValueError(f"unknown demo adapter {name!r}: one of {sorted(DEMO_ADAPTERS)}")
    version = recipe_version(DEMO_ADAPTERS[name])
    target = adapters_dir() / name
    if _cached_version(target) == version:
        return target
    return _copy_shipped(name, version, target, progress) or train_demo_adapter(name, target, progress)


def ensure_demo_adapters(progress: bool = True) -> dict[str, Path]:
    """{"sql-lora": dir, "pirate-lora": dir}, training each adapter that is missing or outdated."""
    return {name: ensure_demo_adapter(name, progress) for name in DEMO_ADAPTERS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loraplex.demo.adapters", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", nargs="*", choices=sorted(DEMO_ADAPTERS), metavar="NAME", default=None,
                   help="retrain these adapters (none named: both) with today's recipe (minutes)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"with --train: where the adapter directories go (default: {SHIPPED_DIR})")
    args = p.parse_args(argv)
    if args.out is not None and args.train is None:
        p.error("--out needs --train")
    if args.train is not None:
        out = args.out or SHIPPED_DIR
        paths = {name: train_demo_adapter(name, out / name) for name in args.train or DEMO_ADAPTERS}
    else:
        paths = ensure_demo_adapters()
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
