"""The seed's offline examples run as scripts (real subprocesses), with only imports and paths changed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).parents[2] / "docs" / "examples"


def _run(script, *args):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, str(DOCS / script), *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_multilora_engine_example(tiny_model_factory, tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from helpers import make_peft_adapter

    model = tiny_model_factory("llama")
    sql = make_peft_adapter(model, tmp_path / "sql", rank=8)
    math = make_peft_adapter(model, tmp_path / "math", rank=16, targets="all-linear", seed=3)
    out = _run("multilora_engine.py", model, sql, math)
    assert sorted(line.split(":")[0] for line in out.splitlines()) == [f"Request {i}" for i in range(4)]


def test_offline_lora_example(tiny_model_factory, tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from helpers import make_peft_adapter

    model = tiny_model_factory("llama")
    sql = make_peft_adapter(model, tmp_path / "sql", rank=8)
    out = _run("offline_lora.py", model, sql)
    assert out.startswith("Generated SQL:")
