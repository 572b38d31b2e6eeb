"""Train a PEFT LoRA adapter on the CPU in about a minute, with plain torch.

    python -m loraplex.demo.train_adapter --task sql --out ./sql-lora
    python -m loraplex.demo.train_adapter --task pirate --out ./pirate-lora --steps 40
    python -m loraplex.demo.train_adapter --data my.jsonl --out ./my-lora --base /path/to/model

``--data`` is a JSONL file with one example a line, either ``{"prompt": ..., "completion": ...}``
(trained as raw text, the way /v1/completions sends it) or ``{"messages": [...]}`` whose last
message is the assistant's answer (trained through the model's chat template, the way
/v1/chat/completions sends it). The loss covers only the answer tokens and the end-of-turn token
after them, so the adapter learns when to stop. The output is a standard PEFT directory
(adapter_config.json + adapter_model.safetensors) that loraplex, vLLM and PEFT all load.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    steps: int = 60
    batch_size: int = 8
    lr: float = 1e-3
    rank: int = 8
    alpha: int | None = None  # None: 2 * rank
    targets: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    warmup: int = 5
    seed: int = 0
    max_len: int = 256
    bf16: str = "auto"  # auto: bf16 autocast where the CPU has native bf16 matmuls (or on CUDA)
    fmt: str = "auto"  # raw | chat | auto (chat when an example has messages)
    save_dtype: str = "float32"  # float16 / bfloat16 halve the file; the loaders upcast


# Recipes for the built-in tasks, tuned with benchmarks/eval_demo_adapters.py.
TASK_DEFAULTS = {
    "sql": dict(fmt="raw", steps=120, lr=2e-3, rank=8, n_train=1600, save_dtype="float16"),
    "pirate": dict(fmt="chat", steps=30, lr=1e-3, rank=8, n_train=240, save_dtype="float16"),
}


def task_examples(task: str, n: int, seed: int = 0) -> list[dict]:
    from loraplex.demo import datasets

    if task == "sql":
        return datasets.sql_examples("train", n, seed)
    if task == "pirate":
        return datasets.pirate_examples("train", n, seed)
    raise ValueError(f"unknown task {task!r}: use sql or pirate, or --data")


def read_jsonl(path: str | Path) -> list[dict]:
    out = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "messages" in row:
            msgs = row["messages"]
            if not msgs or msgs[-1].get("role") != "assistant":
                raise ValueError(f"{path}:{lineno}: the last message must be the assistant's answer")
            out.append({"messages": msgs[:-1], "completion": msgs[-1]["content"]})
        elif "prompt" in row and "completion" in row:
            out.append({"prompt": row["prompt"], "completion": row["completion"]})
        else:
            raise ValueError(f"{path}:{lineno}: need 'prompt' and 'completion', or 'messages'")
    if not out:
        raise ValueError(f"{path} holds no examples")
    return out


def render_prompt(tokenizer, example: dict, fmt: str) -> str:
    """The text the server will have seen before the answer: raw prompt or chat-templated turns."""
    if fmt == "raw" and "prompt" in example:
        return example["prompt"]
    messages = example.get("messages") or [{"role": "user", "content": example["prompt"]}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(tokenizer, example: dict, fmt: str, max_len: int) -> tuple[list[int], int]:
    """(token ids, index of the first answer token). The answer ends with EOS so it learns to stop."""
    fmt = fmt if fmt != "auto" else ("chat" if "messages" in example else "raw")
    prompt_ids = tokenizer(render_prompt(tokenizer, example, fmt), add_special_tokens=False)["input_ids"]
    answer = example["completion"].lstrip() if fmt == "chat" else example["completion"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + answer_ids)[-max_len:]
    return ids, max(1, len(ids) - len(answer_ids))


def _use_bf16(mode: str, device) -> bool:
    import torch

    if mode in ("on", "true", "1"):
        return True
    if mode != "auto":
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # Without native bf16 (AVX512-BF16 / AMX) autocast is slower than fp32 on the CPU.
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


def _loss(model, ids, starts, pad_id):
    """Cross-entropy on answer tokens only; the vocab projection runs only on those positions,
    which saves a third of the step on a small model with a large vocabulary."""
    import torch
    import torch.nn.functional as F

    lengths = torch.tensor([len(x) for x in ids])
    width = int(lengths.max())
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
    positions = torch.arange(width)
    attention = (positions[None, :] < lengths[:, None]).long()
    # Logits at position t predict token t + 1: answer tokens start..len-1 are predicted at start-1..len-2.
    pred = (positions[None, :] >= torch.tensor(starts)[:, None] - 1) & (positions[None, :] < lengths[:, None] - 1)
    device = next(model.parameters()).device
    input_ids, attention, pred = input_ids.to(device), attention.to(device), pred.to(device)
    base = model.get_base_model()
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    targets = input_ids[:, 1:][pred[:, :-1]]
    if decoder is not None and head is not None and not getattr(base.config, "final_logit_softcapping", None):
        hidden = decoder(input_ids=input_ids, attention_mask=attention).last_hidden_state
        logits = head(hidden[pred])
    else:
        logits = model(input_ids=input_ids, attention_mask=attention).logits[pred]
    return F.cross_entropy(logits.float(), targets)


SAVE_DTYPES = ("float32", "float16", "bfloat16")


def _cast_weights(path: Path, dtype: str) -> None:
    """Rewrite a saved safetensors file in a smaller float type (trained in float32, served upcast)."""
    import torch
    from safetensors.torch import load_file, save_file

    if dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype must be one of {SAVE_DTYPES}, not {dtype!r}")
    tensors = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def train(base_dir: str | Path, examples: list[dict], out_dir: str | Path, cfg: TrainConfig,
          base_model_name: str | None = None, progress: bool = True, extra_meta: dict | None = None) -> dict:
    """Train a LoRA on ``examples`` and save it as a PEFT directory in ``out_dir``; returns stats."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.save_dtype not in SAVE_DTYPES:  # checked before, not after, minutes of training
        raise ValueError(f"save_dtype must be one of {SAVE_DTYPES}, not {cfg.save_dtype!r}")
    started = time.monotonic()
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or 2 * cfg.rank, target_modules=list(cfg.targets),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    encoded = [encode(tokenizer, ex, cfg.fmt, cfg.max_len) for ex in examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    # Linear warm-up, then cosine decay to zero: short runs need the full lr early and a calm end.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / max(1, cfg.warmup), 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / max(1, cfg.steps))))))
    bf16 = _use_bf16(cfg.bf16, device)
    order, losses = [], []
    rng = random.Random(cfg.seed)
    # The bar only on a terminal: redrawn into a log file it is noise; the plain lines below say the same.
    bar = tqdm(range(cfg.steps), desc="training LoRA", unit="step", disable=not progress or not sys.stderr.isatty(),
               mininterval=2)
    for step in bar:
        batch = []
        while len(batch) < cfg.batch_size:
            if not order:
                order = list(range(len(encoded)))
                rng.shuffle(order)
            batch.append(encoded[order.pop()])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = _loss(model, [b[0] for b in batch], [b[1] for b in batch], pad_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if progress and ((step + 1) % 10 == 0 or step + 1 == cfg.steps):
            # Plain lines too: a progress bar alone leaves nothing readable in a CI log.
            bar.write(f"step {step + 1}/{cfg.steps} loss {sum(losses[-10:]) / len(losses[-10:]):.4f} "
                      f"({time.monotonic() - started:.0f}s)", file=sys.stderr)
    bar.close()
    train_s = time.monotonic() - started

    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    if cfg.save_dtype != "float32":
        _cast_weights(out_dir / "adapter_model.safetensors", cfg.save_dtype)
    # Written after saving: PEFT reads the base config from this field while saving, and a bare
    # served-model name would not be a readable path.
    config_path = out_dir / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = base_model_name or str(base_dir)
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    stats = {"train_seconds": round(train_s, 1), "steps": cfg.steps, "examples": len(examples),
             "first_loss": round(losses[0], 4), "final_loss": round(sum(losses[-5:]) / len(losses[-5:]), 4),
             "bf16_autocast": bf16, "device": device.type, "config": asdict(cfg), **(extra_meta or {})}
    (out_dir / "loraplex_train.json").write_text(json.dumps(stats, indent=2))
    return stats


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loraplex.demo.train_adapter",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASK_DEFAULTS), help="built-in synthetic task (or use --data)")
    p.add_argument("--data", help="JSONL of {prompt, completion} or {messages} examples")
    p.add_argument("--out", required=True, help="output directory for the PEFT adapter")
    p.add_argument("--base", help="base model directory (default: the converted SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: task recipe, or 60)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, help="LoRA rank (default: task recipe, or 8)")
    p.add_argument("--alpha", type=int, help="LoRA alpha (default 2 * rank)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default: task recipe, or 1e-3)")
    p.add_argument("--targets", default=",".join(ALL_TARGETS), help="comma-separated module names to adapt")
    p.add_argument("--format", dest="fmt", choices=["auto", "raw", "chat"],
                   help="raw prompt text, or wrap prompts in the chat template (default: task recipe / auto)")
    p.add_argument("--examples", type=int, help="number of synthetic training examples for --task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=256, help="truncate examples to this many tokens (from the left)")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto", help="bf16 autocast")
    p.add_argument("--save-dtype", choices=SAVE_DTYPES, help="float type of the saved weights (default: task "
                   "recipe, or float32)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if bool(args.task) == bool(args.data):
        print("give exactly one of --task and --data", file=sys.stderr)
        return 2
    recipe = dict(TASK_DEFAULTS.get(args.task, {}))
    cfg = TrainConfig(steps=args.steps or recipe.get("steps", 60), batch_size=args.batch_size,
                      lr=args.lr or recipe.get("lr", 1e-3), rank=args.rank or recipe.get("rank", 8), alpha=args.alpha,
                      targets=[t.strip() for t in args.targets.split(",") if t.strip()], seed=args.seed,
                      max_len=args.max_len, bf16=args.bf16, fmt=args.fmt or recipe.get("fmt", "auto"),
                      save_dtype=args.save_dtype or recipe.get("save_dtype", "float32"))
    if args.data:
        examples = read_jsonl(args.data)
    else:
        examples = task_examples(args.task, args.examples or recipe["n_train"], args.seed)
    base_name = None
    if args.base:
        base = Path(args.base)
    else:
        from loraplex.demo.default_model import ensure_default_model

        base = ensure_default_model(progress=not args.quiet)
        base_name = str(base)
    stats = train(base, examples, args.out, cfg, base_model_name=base_name, progress=not args.quiet,
                  extra_meta={"task": args.task or "custom"})
    print(json.dumps({k: v for k, v in stats.items() if k != "config"}))
    print(f"saved PEFT adapter to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
