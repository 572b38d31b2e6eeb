"""Does each demo adapter do its job? Base model vs adapter on held-out prompts.

    python benchmarks/eval_demo_adapters.py --json results.json
    python benchmarks/eval_demo_adapters.py --sql-lora DIR --style-lora DIR --n-sql 50 --n-style 30

* SQL: exact match of the generated query against the reference on held-out questions (phrasing
  templates, tables and literal values never seen in training), after normalising case, whitespace
  and a trailing semicolon; per question kind too; and the README's own question (Lilongwe airport).
* Style: the share of answers that start with "Arr" on held-out prompts, half of them of kinds
  the training data never had.

Generation is greedy and goes through a ``Generate`` callable, ``(prompts, adapter_dir or None,
max_new_tokens) -> completions``, where prompts are fully rendered text (chat template already
applied where the adapter was trained on chat). ``hf_generator`` is the HF transformers + PEFT
reference, ``loraplex_generator`` (``--engine loraplex``) runs loraplex's own engine; to measure
anything else, pass a different callable to ``evaluate``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional

Generate = Callable[[list, Optional[str], int], list]


def hf_generator(base_dir: str | Path, batch_size: int = 16) -> Generate:
    """Greedy generation with HF transformers; adapters are loaded into one PeftModel once each."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    state = {"peft": None, "loaded": {}}

    def generate(prompts: list, adapter: Optional[str], max_new_tokens: int) -> list:
        from peft import PeftModel

        if adapter is not None and str(adapter) not in state["loaded"]:
            name = f"a{len(state['loaded'])}"
            if state["peft"] is None:
                state["peft"] = PeftModel.from_pretrained(model, str(adapter), adapter_name=name)
            else:
                state["peft"].load_adapter(str(adapter), adapter_name=name)
            state["loaded"][str(adapter)] = name
        runner = model if state["peft"] is None else state["peft"]
        if adapter is not None:
            runner.set_adapter(state["loaded"][str(adapter)])
        out = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i: i + batch_size]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                if adapter is None and state["peft"] is not None:
                    with state["peft"].disable_adapter():
                        ids = state["peft"].generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
                else:
                    ids = runner.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            out += tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return out

    return generate


def loraplex_generator(base_dir: str | Path) -> Generate:
    """Greedy generation with loraplex's own engine (all prompts of a call batched together)."""
    from loraplex.entrypoints.llm import LLM
    from loraplex.lora.request import LoRARequest
    from loraplex.sampling_params import SamplingParams

    llm = LLM(str(base_dir), enable_lora=True, max_loras=2, max_lora_rank=16, dtype="float32")
    ids: dict = {}

    def generate(prompts: list, adapter: Optional[str], max_new_tokens: int) -> list:
        request = None
        if adapter is not None:
            ids.setdefault(str(adapter), len(ids) + 1)
            request = LoRARequest(Path(adapter).name, ids[str(adapter)], str(adapter))
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        return [o.outputs[0].text for o in llm.generate(prompts, params, lora_request=request)]

    return generate


GENERATORS = {"hf": hf_generator, "loraplex": loraplex_generator}


def chat_render(base_dir: str | Path) -> Callable[[str], str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    return lambda text: tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)


def evaluate(generate: Generate, render_chat: Callable[[str], str], sql_lora: str, style_lora: str,
             n_sql: int = 100, n_style: int = 30, seed: int = 0, log=print) -> dict:
    from loraplex.demo import datasets, sql_data

    sql_items = datasets.sql_examples("heldout", n_sql, seed)
    sql_items.append({"prompt": sql_data.README_QUESTION, "sql": sql_data.README_ANSWER, "kind": "readme"})
    sql_prompts = [e["prompt"] for e in sql_items]
    style_prompts = [render_chat(p) for p in datasets.style_eval_prompts(n_style, seed)]
    results: dict = {"n_sql": n_sql, "n_style": len(style_prompts)}
    samples: dict = {}
    for label, adapter in (("base", None), ("sql-lora", sql_lora)):
        t = time.monotonic()
        outs = generate(sql_prompts, adapter, 48)
        hits = [datasets.normalize_sql(o) == datasets.normalize_sql(e["sql"]) for o, e in zip(outs, sql_items)]
        readme_out, readme_hit, outs, hits = outs[-1], hits[-1], outs[:-1], hits[:-1]
        results[f"sql_exact_match/{label}"] = sum(hits) / len(hits)
        results[f"sql_readme/{label}"] = {"out": readme_out, "ok": readme_hit}
        for kind in sql_data.KINDS:
            mine = [h for h, e in zip(hits, sql_items) if e["kind"] == kind]
            results[f"sql_by_kind/{label}/{kind}"] = [sum(mine), len(mine)]
        rows = [{"q": e["prompt"].split("question: ")[-1], "ref": e["sql"], "out": o, "ok": h}
                for e, o, h in zip(sql_items, outs, hits)]
        samples[f"sql/{label}"] = rows[:3] + [r for r in rows[3:] if not r["ok"]][:8]  # the misses tell most
        log(f"sql {label}: {sum(hits)}/{len(hits)} exact, README question {'right' if readme_hit else 'wrong'}: "
            f"{readme_out.strip()!r} ({time.monotonic() - t:.0f}s)")
    for label, adapter in (("base", None), ("style-lora", style_lora)):
        t = time.monotonic()
        outs = generate(style_prompts, adapter, 40)
        marks = [datasets.has_pirate_marker(o) for o in outs]
        results[f"style_marker/{label}"] = sum(marks) / len(marks)
        samples[f"style/{label}"] = [{"out": o, "ok": m} for o, m in list(zip(outs, marks))[:5]]
        log(f"style {label}: {sum(marks)}/{len(marks)} start with Arr ({time.monotonic() - t:.0f}s)")
    results["samples"] = samples
    return results


def table(results: dict) -> str:
    rows = [("SQL exact match (held-out)", "sql_exact_match/base", "sql_exact_match/sql-lora"),
            ("style marker 'Arr' (held-out)", "style_marker/base", "style_marker/style-lora")]
    lines = [f"{'metric':32s} {'base':>8s} {'adapter':>8s}", "-" * 50]
    for name, b, a in rows:
        lines.append(f"{name:32s} {results[b]:8.1%} {results[a]:8.1%}")
    for kind in sorted({k.rsplit("/", 1)[1] for k in results if k.startswith("sql_by_kind/")}):
        b, a = results[f"sql_by_kind/base/{kind}"], results[f"sql_by_kind/sql-lora/{kind}"]
        lines.append(f"{'  SQL ' + kind:32s} {f'{b[0]}/{b[1]}':>8s} {f'{a[0]}/{a[1]}':>8s}")
    lines.append(f"{'README question right':32s} {str(results['sql_readme/base']['ok']):>8s} "
                 f"{str(results['sql_readme/sql-lora']['ok']):>8s}")
    return "\n".join(lines)


def main(argv: list | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="base model dir (default: the converted default model)")
    p.add_argument("--sql-lora", help="SQL adapter dir (default: the cached demo adapter, trained if missing)")
    p.add_argument("--style-lora", help="style adapter dir (default: the cached demo adapter)")
    p.add_argument("--n-sql", type=int, default=100)
    p.add_argument("--n-style", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=sorted(GENERATORS), default="hf", help="what generates the answers")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    from loraplex.demo.adapters import ensure_demo_adapters
    from loraplex.demo.default_model import ensure_default_model

    base = args.base or str(ensure_default_model())
    if not (args.sql_lora and args.style_lora):
        demo = ensure_demo_adapters()
        args.sql_lora = args.sql_lora or str(demo["sql-lora"])
        args.style_lora = args.style_lora or str(demo["pirate-lora"])
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    results = evaluate(GENERATORS[args.engine](base), chat_render(base), args.sql_lora, args.style_lora,
                       args.n_sql, args.n_style, args.seed, log=log)
    for name in ("sql_lora", "style_lora"):
        meta = Path(getattr(args, name)) / "loraplex_train.json"
        if meta.is_file():
            results[f"{name}_train"] = {k: v for k, v in json.loads(meta.read_text()).items() if k != "config"}
    results.update(base=base, sql_lora=args.sql_lora, style_lora=args.style_lora, engine=args.engine)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
