"""Image (LLaVA) and audio (Granite Speech) requests per second, with and without LoRA on the tower (issue #16).

CLIP ViT-L/14 at 336 px (576 image tokens per image) + projector + Llama-3.2-3B's decoder shape, random (dummy)
weights in bf16 on the GPU, the model's own processor (PIL image processor) on random 336x336 images; one image per
request, a short text prompt, --gen-len new tokens (ignore_eos), batch (max_num_seqs) 32. Rows: base; every request
on one tower + projector adapter (rank 16 on q/k/v/out_proj, fc1, fc2 of every tower layer and both projector
Linears); requests spread over 4 such adapters. Prints a table and writes JSON.

``--family granite-speech``: the Granite Speech 3.3-2B shape as its public config gives it (16-layer Conformer
encoder, hidden 1024; 2-layer Q-Former; Granite 3.3-2B decoder), one 10 s clip per request (102 audio tokens),
adapters on every encoder attention / feed-forward Linear and the projector's query/value and output Linear.

    python benchmarks/bench_multimodal.py --json out.json
    python benchmarks/bench_multimodal.py --family granite-speech --json out.json
    python benchmarks/bench_multimodal.py --tiny --device cpu --requests 8      (CPU smoke run; either family)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import LLAMA_3_2_3B, write_tokenizer  # noqa: E402

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)
CLIP_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                 patch_size=14, projection_dim=64)
TEXT_TINY = {**LLAMA_3_2_3B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rope_scaling": None}


def prepare(root: Path, tiny: bool) -> tuple[Path, dict]:
    import transformers
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaProcessor

    model = root / "model"
    write_tokenizer(model, 32000)
    tok = AutoTokenizer.from_pretrained(model)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text = {k: v for k, v in (TEXT_TINY if tiny else LLAMA_3_2_3B).items() if k != "architectures"}
    text.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = CLIP_TINY if tiny else CLIP_L_336
    cfg = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**vision),
                                   text_config=transformers.LlamaConfig(**text),
                                   image_token_id=tok.convert_tokens_to_ids("<image>"))
    cfg.save_pretrained(model)
    size = vision["image_size"]
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": size},
                                                                     crop_size={"height": size, "width": size}),
                               tokenizer=tok, patch_size=vision["patch_size"], vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    processor.save_pretrained(model)
    return model, vision


GRANITE_3_3_2B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 40, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                  "rope_theta": 10000000.0, "embedding_multiplier": 12.0, "attention_multiplier": 0.015625,
                  "residual_multiplier": 0.22, "logits_scaling": 8.0, "tie_word_embeddings": True}
GRANITE_TINY = {**GRANITE_3_3_2B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2}
SPEECH_ENCODER = dict(input_dim=160, num_layers=16, hidden_dim=1024, feedforward_mult=4, num_heads=8, dim_head=128,
                      output_dim=348, context_size=200, max_pos_emb=512, conv_kernel_size=15, conv_expansion_factor=2)
SPEECH_ENCODER_TINY = {**SPEECH_ENCODER, "num_layers": 2, "hidden_dim": 64, "num_heads": 4, "dim_head": 16}
QFORMER = dict(hidden_size=1024, num_hidden_layers=2, num_attention_heads=16, intermediate_size=4096,
               encoder_hidden_size=1024, cross_attention_frequency=1, max_position_embeddings=2048)
QFORMER_TINY = {**QFORMER, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128,
                "encoder_hidden_size": 64}


def prepare_speech(root: Path, tiny: bool) -> tuple[Path, dict]:
    import transformers
    from transformers import AutoTokenizer, GraniteSpeechFeatureExtractor, GraniteSpeechProcessor

    model = root / "model"
    write_tokenizer(model, 32000)
    tok = AutoTokenizer.from_pretrained(model)
    tok.add_special_tokens({"additional_special_tokens": ["<|audio|>"]})
    text = dict(GRANITE_TINY if tiny else GRANITE_3_3_2B, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    encoder = SPEECH_ENCODER_TINY if tiny else SPEECH_ENCODER
    qformer = QFORMER_TINY if tiny else QFORMER
    cfg = transformers.GraniteSpeechConfig(
        text_config=transformers.GraniteConfig(**text).to_dict(),
        encoder_config=transformers.GraniteSpeechEncoderConfig(**encoder).to_dict(),
        projector_config=transformers.Blip2QFormerConfig(**qformer).to_dict(),
        audio_token_index=tok.convert_tokens_to_ids("<|audio|>"), has_lora_adapter=False, window_size=15,
        downsample_rate=5)
    cfg.architectures = ["GraniteSpeechForConditionalGeneration"]
    cfg.save_pretrained(model)
    GraniteSpeechProcessor(audio_processor=GraniteSpeechFeatureExtractor(), tokenizer=tok).save_pretrained(model)
    return model, {"encoder": encoder, "qformer": qformer, "text_hidden": text["hidden_size"]}


def speech_adapter(out: Path, shape: dict, rank: int, seed: int) -> Path:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    e, q = shape["encoder"], shape["qformer"]
    inner, h, ff = e["dim_head"] * e["num_heads"], e["hidden_dim"], e["hidden_dim"] * e["feedforward_mult"]
    tensors = {}

    def add(path, fan_in, fan_out):
        for ab, dims in (("A", (rank, fan_in)), ("B", (fan_out, rank))):
            tensors[f"base_model.model.model.{path}.lora_{ab}.weight"] = (
                torch.randn(*dims, generator=gen) * 0.01).to(torch.bfloat16)

    for layer in range(e["num_layers"]):
        base = f"encoder.layers.{layer}"
        add(f"{base}.attn.to_q", h, inner)
        add(f"{base}.attn.to_kv", h, 2 * inner)
        add(f"{base}.attn.to_out", inner, h)
        for ffn in ("ff1", "ff2"):
            add(f"{base}.{ffn}.up_proj", h, ff)
            add(f"{base}.{ffn}.down_proj", ff, h)
    for layer in range(q["num_hidden_layers"]):
        for part in ("attention", "crossattention"):
            fan_in = q["encoder_hidden_size"] if part == "crossattention" else q["hidden_size"]
            add(f"projector.qformer.encoder.layer.{layer}.{part}.attention.query", q["hidden_size"], q["hidden_size"])
            add(f"projector.qformer.encoder.layer.{layer}.{part}.attention.value", fan_in, q["hidden_size"])
    add("projector.linear", q["hidden_size"], shape["text_hidden"])
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
        "target_modules": r".*(encoder\.layers\.\d+\.(attn\.(to_q|to_kv|to_out)|ff[12]\.(up_proj|down_proj))"
                          r"|projector\.qformer.*\.(query|value)|projector\.linear)"}))
    return out


def tower_adapter(out: Path, vision: dict, text_hidden: int, rank: int, seed: int) -> Path:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    h, i = vision["hidden_size"], vision["intermediate_size"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
              "self_attn.out_proj": (h, h), "mlp.fc1": (h, i), "mlp.fc2": (i, h)}
    tensors = {}

    def add(path, fan_in, fan_out):
        tensors[f"base_model.model.{path}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen) * 0.01
                                                            ).to(torch.bfloat16)
        tensors[f"base_model.model.{path}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen) * 0.01
                                                            ).to(torch.bfloat16)

    for layer in range(vision["num_hidden_layers"]):
        for name, (fi, fo) in shapes.items():
            add(f"vision_tower.vision_model.encoder.layers.{layer}.{name}", fi, fo)
    add("multi_modal_projector.linear_1", h, text_hidden)
    add("multi_modal_projector.linear_2", text_hidden, text_hidden)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
        "target_modules": r".*vision_tower.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)|.*multi_modal_projector.*"}))
    return out


def run(llm, prompts: list, loras: list, gen_len: int, warm: list) -> dict:
    from loraplex import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True)
    # Warm-up on other media (the prefix cache keys blocks by media content, so these leave nothing to reuse):
    # graphs captured, adapters resident.
    llm.generate(warm, params, lora_request=loras[:len(warm)], use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    wall = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"requests_s": len(prompts) / wall, "tok_s": tokens / wall, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=["llava", "granite-speech"], default="llava")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import numpy as np
    from PIL import Image

    from loraplex import LLM
    from loraplex.lora.request import LoRARequest

    root = Path(tempfile.mkdtemp(prefix="bench-mm-"))
    rng = np.random.default_rng(0)
    if args.family == "llava":
        model, vision = prepare(root, args.tiny)
        text_hidden = (TEXT_TINY if args.tiny else LLAMA_3_2_3B)["hidden_size"]
        adapters = [LoRARequest(f"t{k}", k + 1, str(tower_adapter(root / f"t{k}", vision, text_hidden, args.rank, k)))
                    for k in range(4)]
        max_model_len = vision["image_size"] ** 2 // vision["patch_size"] ** 2 + 64 + args.gen_len
        size = vision["image_size"]

        def make_prompt():
            image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            return {"prompt": "USER: <image>\nDescribe the picture. ASSISTANT:", "multi_modal_data": {"image": image}}
    else:
        model, shape = prepare_speech(root, args.tiny)
        adapters = [LoRARequest(f"t{k}", k + 1, str(speech_adapter(root / f"t{k}", shape, args.rank, k)))
                    for k in range(4)]
        max_model_len = 256 + args.gen_len
        seconds = 1.0 if args.tiny else 10.0

        def make_prompt():
            clip = (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32)
            return {"prompt": "USER: <|audio|>\nTranscribe the audio. ASSISTANT:",
                    "multi_modal_data": {"audio": (clip, 16000)}}
    llm = LLM(str(model), load_format="dummy", device=args.device, dtype="bfloat16" if args.device == "cuda"
              else "float32", max_model_len=max_model_len, max_num_seqs=args.batch, enable_lora=True,
              max_lora_rank=args.rank, max_loras=4, disable_log_stats=True)
    prompts = [make_prompt() for _ in range(args.requests)]
    warm = [make_prompt() for _ in range(2 * args.batch)]  # every batch shape the timed run meets
    # The processor's share: it runs in add_request, before any GPU work (vLLM runs it in its front end).
    from loraplex.engine.multimodal import run_processor

    t0 = time.perf_counter()
    for p in prompts[:32]:
        data = p["multi_modal_data"]
        run_processor(llm.llm_engine.processor, p["prompt"], data.get("image"), data.get("audio"))
    processor_ms = (time.perf_counter() - t0) / min(32, len(prompts)) * 1e3
    rows = {"base": run(llm, prompts, [None] * len(prompts), args.gen_len, warm),
            "1 tower adapter": run(llm, prompts, [adapters[0]] * len(prompts), args.gen_len, warm),
            "4 tower adapters": run(llm, prompts, [adapters[i % 4] for i in range(len(prompts))], args.gen_len, warm)}
    print(f"\n{args.family}: processor {processor_ms:.1f} ms per request (CPU)")
    print(f"{'rows':<18} {'requests/s':>10} {'tok/s':>8} {'vs base':>8}")
    for name, r in rows.items():
        print(f"{name:<18} {r['requests_s']:>10.1f} {r['tok_s']:>8.0f} {r['requests_s'] / rows['base']['requests_s']:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"processor_ms": processor_ms, "rows": rows, "args": vars(args)},
                                              indent=1))


if __name__ == "__main__":
    main()
