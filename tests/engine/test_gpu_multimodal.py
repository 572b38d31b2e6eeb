"""GPU suite, multi-modal (issue #16): LLaVA and Granite Speech in bf16 on CUDA, with CUDA graphs for the decoder's
decode and without, base and tower / connector / decoder adapters in one batch, matching HF / PEFT in bf16 on CUDA
up to near-ties (tests/helpers.py::agree_up_to_near_ties). The fp32 exact-parity GPU cases sit beside the CPU
tests (tests/engine/test_llava.py, test_granite_speech.py)."""
from __future__ import annotations

import pytest
import torch
from helpers import (agree_up_to_near_ties, make_granite_speech_adapter, make_llava_adapter, make_tiny_granite_speech,
                     make_tiny_llava, random_audio, random_image)

pytestmark = pytest.mark.gpu
transformers = pytest.importorskip("transformers")

MAX_TOKENS = 16


def _hf_runs(model, processor, jobs, media_kwarg):
    """[(tokens, top-2 logit margins per step)] of HF's greedy generate, one request at a time."""
    outs = []
    for text, media in jobs:
        inputs = processor(text=text, return_tensors="pt", **({media_kwarg: media} if media else {}))
        inputs = {k: (v.to("cuda", torch.bfloat16) if v.is_floating_point() else v.cuda()) for k, v in inputs.items()}
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        top2 = [s[0].float().topk(2).values for s in gen.scores]
        outs.append((gen.sequences[0, inputs["input_ids"].shape[1]:].tolist(), [float(t[0] - t[1]) for t in top2]))
    return outs


def _ours(llm, prompts, loras):
    from loraplex import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                        lora_request=loras)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_bf16_llava_matches_hf(tmp_path, enforce_eager):
    from peft import PeftModel

    from loraplex import LLM
    from loraplex.lora.request import LoRARequest

    llava = make_tiny_llava(tmp_path / "llava")
    tower = r".*vision_tower.*\.(q_proj|v_proj|out_proj|fc1|fc2)|.*multi_modal_projector\.(linear_1|linear_2)"
    adapter = make_llava_adapter(llava, tmp_path / "tower", tower + r"|.*language_model.*\.(q_proj|v_proj)", seed=3)
    jobs = [("Describe <image> now", [random_image(1)]), ("No image here", None),
            ("Compare <image> with <image>:", [random_image(2), random_image(3)])]
    processor = transformers.AutoProcessor.from_pretrained(llava)
    cls = transformers.LlavaForConditionalGeneration
    base = _hf_runs(cls.from_pretrained(llava, dtype=torch.bfloat16).cuda().eval(), processor, jobs, "images")
    peft = _hf_runs(PeftModel.from_pretrained(cls.from_pretrained(llava, dtype=torch.bfloat16), adapter).cuda().eval(),
                    processor, jobs, "images")
    llm = LLM(str(llava), dtype="bfloat16", device="cuda", max_model_len=256, max_num_seqs=8, enable_lora=True,
              max_lora_rank=8, enforce_eager=enforce_eager)
    prompts = [{"prompt": t, "multi_modal_data": {"image": m}} if m else t for t, m in jobs]
    lora = LoRARequest("tower", 1, str(adapter))
    ours = _ours(llm, prompts + prompts, [None] * len(jobs) + [lora] * len(jobs))
    ref = base + peft
    assert agree_up_to_near_ties(ours, ref) == len(ref), list(zip(ours, ref))


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_bf16_granite_speech_matches_hf(tmp_path, enforce_eager):
    from peft import PeftModel

    from loraplex import LLM
    from loraplex.lora.request import LoRARequest

    granite = make_tiny_granite_speech(tmp_path / "granite")
    every = (r".*(language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)|encoder\.layers\.\d+\.attn\.(to_q|to_kv)"
             r"|projector\.qformer\.encoder\.layer\.\d+\.crossattention\.attention\.(query|value)|projector\.linear)")
    adapter = make_granite_speech_adapter(granite, tmp_path / "all", every, seed=4, scale=0.2)
    clips = [random_audio(1, 1.0), random_audio(2, 0.6)]
    jobs = [("<|audio|>what is said?", [clips[0][0]]), ("no audio here", None),
            ("first <|audio|> then <|audio|>", [clips[0][0], clips[1][0]])]
    processor = transformers.AutoProcessor.from_pretrained(granite)
    cls = transformers.GraniteSpeechForConditionalGeneration
    base = _hf_runs(cls.from_pretrained(granite, dtype=torch.bfloat16).cuda().eval(), processor, jobs, "audio")
    peft = _hf_runs(PeftModel.from_pretrained(cls.from_pretrained(granite, dtype=torch.bfloat16), adapter).cuda().eval(),
                    processor, jobs, "audio")
    llm = LLM(str(granite), dtype="bfloat16", device="cuda", max_model_len=256, max_num_seqs=8, enable_lora=True,
              max_lora_rank=8, enforce_eager=enforce_eager)
    rates = {id(c): r for c, r in clips}
    prompts = [{"prompt": t, "multi_modal_data": {"audio": [(c, rates[id(c)]) for c in m]}} if m else t
               for t, m in jobs]
    lora = LoRARequest("all", 1, str(adapter))
    ours = _ours(llm, prompts + prompts, [None] * len(jobs) + [lora] * len(jobs))
    ref = base + peft
    assert agree_up_to_near_ties(ours, ref) == len(ref), list(zip(ours, ref))
