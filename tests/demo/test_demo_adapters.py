"""Demo adapter caching without shipped adapters: train once, reuse, retrain when the recipe version changes."""
from __future__ import annotations

import json

import pytest

from loraplex.demo import adapters, default_model, train_adapter


@pytest.fixture
def fake_training(tmp_path, monkeypatch):
    """ensure_demo_adapters with a stub trainer, so only the caching logic runs."""
    monkeypatch.setenv("LORAPLEX_CACHE_ROOT", str(tmp_path / "cache"))
    monkeypatch.setattr(adapters, "SHIPPED_DIR", tmp_path / "nothing-shipped")
    monkeypatch.setattr(default_model, "ensure_default_model", lambda progress=True: tmp_path / "base")
    calls = []

    def fake_train(base, examples, out_dir, cfg, base_model_name=None, progress=True, extra_meta=None):
        calls.append((extra_meta["task"], cfg.steps, len(examples)))
        (out_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path":
                                                                 base_model_name}))
        (out_dir / "adapter_model.safetensors").write_bytes(b"weights")
        return {"train_seconds": 0.0, "final_loss": 0.1}

    monkeypatch.setattr(train_adapter, "train", fake_train)
    return calls


def test_trains_once_then_reuses(fake_training, tmp_path):
    paths = adapters.ensure_demo_adapters(progress=False)
    assert set(paths) == {"sql-lora", "pirate-lora"}
    root = tmp_path / "cache" / "adapters"
    assert paths["sql-lora"] == root / "sql-lora" and paths["pirate-lora"] == root / "pirate-lora"
    assert sorted(t for t, _, _ in fake_training) == ["pirate", "sql"]
    meta = json.loads((paths["sql-lora"] / "loraplex_demo.json").read_text())
    assert meta["version"] == adapters.recipe_version("sql") and meta["name"] == "sql-lora"
    config = json.loads((paths["sql-lora"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == default_model.DEFAULT_MODEL_NAME  # the served name, not a path
    assert adapters.ensure_demo_adapters(progress=False) == paths
    assert len(fake_training) == 2  # cached: no retraining
    assert [p.name for p in root.iterdir()] == [p.name for p in root.iterdir() if not p.name.startswith(".")]


def test_changed_recipe_or_broken_dir_retrains(fake_training, monkeypatch):
    path = adapters.ensure_demo_adapter("sql-lora", progress=False)
    monkeypatch.setitem(train_adapter.TASK_DEFAULTS, "sql", {**train_adapter.TASK_DEFAULTS["sql"], "steps": 7})
    assert adapters.ensure_demo_adapter("sql-lora", progress=False) == path
    assert fake_training[-1] == ("sql", 7, train_adapter.TASK_DEFAULTS["sql"]["n_train"])
    (path / "adapter_model.safetensors").unlink()  # a damaged cache entry is not trusted
    adapters.ensure_demo_adapter("sql-lora", progress=False)
    assert len(fake_training) == 3 and (path / "adapter_model.safetensors").is_file()
    assert len(list(path.parent.iterdir())) == 1


def test_failed_training_leaves_no_adapter(fake_training, monkeypatch, tmp_path):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_adapter, "train", boom)
    with pytest.raises(KeyboardInterrupt):
        adapters.ensure_demo_adapter("pirate-lora", progress=False)
    root = tmp_path / "cache" / "adapters"
    assert list(root.iterdir()) == []
