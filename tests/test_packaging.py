"""The built wheel holds every package folder under the one import package `loraplex`."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_wheel_contains_every_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next(tmp_path.glob("loraplex-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for package in ["loraplex", "loraplex/plugins", "loraplex/resolvers", "loraplex/kernels", "loraplex/contrib",
                    "loraplex/engine", "loraplex/lora", "loraplex/models", "loraplex/layers",
                    "loraplex/entrypoints"]:
        assert f"{package}/__init__.py" in names, package
    assert not any(n.startswith(("core/", "plugins/", "kernels/")) for n in names)
    # Every module in each source folder made it in.
    for src, pkg in [("core", "loraplex"), ("plugins", "loraplex/plugins"), ("resolvers", "loraplex/resolvers"),
                     ("kernels", "loraplex/kernels"), ("contrib", "loraplex/contrib")]:
        for py in (ROOT / src).rglob("*.py"):
            rel = py.relative_to(ROOT / src)
            if src == "core" and rel.parts[0] in ("plugins", "resolvers", "kernels", "contrib"):
                continue
            assert f"{pkg}/{rel.as_posix()}" in names, rel
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[loraplex.plugins]" in entry_points and "loraplex = loraplex.server.cli:main" in entry_points


def test_import_never_bare_core():
    offenders = [str(p) for folder in ("core", "plugins", "resolvers", "kernels", "contrib")
                 for p in (ROOT / folder).rglob("*.py")
                 if any(line.strip().startswith(("import core", "from core")) for line in p.read_text().splitlines())]
    assert not offenders
