"""Helpers for the plugin tests (a module of its own: test files cannot import conftest reliably)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
PROBE = HERE / "_probe.py"
BASE = "base-model"


def copy_adapter(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst)
    return dst


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAPLEX_", "VLLM_", "PYTHONPATH"))}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def probe(plugin_site: Path | None, *, base: str = BASE, names=(), policy: bool = False, timeout: float = 120,
          **env: str) -> dict:
    """Load the plugin manager in a fresh process and report what it loaded and resolved."""
    extra = dict(env)
    if plugin_site is not None:
        extra["PYTHONPATH"] = str(plugin_site)
    args = [sys.executable, str(PROBE), base, *names] + (["--policy"] if policy else [])
    proc = subprocess.run(args, env=clean_env(**extra), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                        region_name="us-east-1")


def upload_dir(client, bucket: str, local: Path, key_prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{key_prefix}/{path.relative_to(local).as_posix()}")


def write_hf_cache(hub_cache: Path, repo_id: str, files: dict[str, Path], sha: str = "0" * 40) -> Path:
    """A Hugging Face hub cache entry laid out as huggingface_hub writes it (blobs + snapshot symlinks)."""
    repo_dir = hub_cache / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(sha)
    snapshot = repo_dir / "snapshots" / sha
    for rel, src in files.items():
        blob = repo_dir / "blobs" / f"{abs(hash((repo_id, rel))):x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def engine_or_skip():
    """The engine's LLM class, or skip while the engine (written elsewhere) is not complete."""
    try:
        from loraplex import LLM, SamplingParams
    except ImportError as e:
        pytest.skip(f"engine not available yet: {e}")
    return LLM, SamplingParams


def fake_dist(site: Path, dist: str, entry_points: dict[str, dict[str, str]], modules: dict[str, str]) -> Path:
    """An installed distribution as importlib.metadata sees one (dist-info + modules), without pip."""
    info = site / f"{dist}-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
    lines = []
    for group, eps in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {value}" for name, value in eps.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for mod, source in modules.items():
        (site / f"{mod}.py").write_text(source)
    return site
