"""LLaVA (issue #16, first step): images through the HF processor, the checkpoint's vision tower and projector, and
our decoder; greedy tokens equal HF transformers' ``generate`` request by request, in mixed batches of image and
text-only prompts, with and without a LoRA adapter on the language model (PEFT as the oracle)."""
from __future__ import annotations

import pytest
import torch
from helpers import make_llava_adapter, make_tiny_llava, random_image

pytest.importorskip("PIL")
transformers = pytest.importorskip("transformers")

MAX_TOKENS = 8
TOWER = r".*vision_tower.*\.(q_proj|v_proj|out_proj|fc1|fc2)|.*multi_modal_projector\.(linear_1|linear_2)"
LM = r".*language_model.*\.(q_proj|v_proj|down_proj)"
PROMPTS = [("Describe <image> now", [1]), ("Compare <image> with <image>:", [2, 3]), ("No image here", []),
           ("<image> again", [4])]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("llava") / "model")


@pytest.fixture(scope="module")
def lora_dir(llava, tmp_path_factory):
    # The language model's projections only (a regex, so the tower's q_proj/v_proj are left alone).
    return make_llava_adapter(llava, tmp_path_factory.mktemp("llava-lora") / "lm", LM, seed=5, scale=0.2)


def _hf_tokens(model, processor, text, images) -> list[int]:
    inputs = processor(text=text, images=[random_image(i) for i in images] or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def _prompt(text, images):
    if not images:
        return text
    return {"prompt": text, "multi_modal_data": {"image": [random_image(i) for i in images]}}


@pytest.fixture(scope="module", params=["thread", "process"])
def llm(llava, request):
    """Both adapter loaders: the tower's weights travel back from a loader process too."""
    from loraplex import LLM

    return LLM(str(llava), max_model_len=256, max_num_seqs=8, enable_lora=True, max_lora_rank=8, max_loras=2,
               lora_loader=request.param, num_lora_loader_workers=1)


def test_mixed_batch_equals_hf(llm, llava):
    from loraplex import SamplingParams

    hf = transformers.LlavaForConditionalGeneration.from_pretrained(llava).eval()
    processor = transformers.AutoProcessor.from_pretrained(llava)
    outs = llm.generate([_prompt(t, i) for t, i in PROMPTS], SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                                            ignore_eos=True))
    for (text, images), out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == _hf_tokens(hf, processor, text, images), text


def test_language_model_lora_equals_peft(llm, llava, lora_dir):
    from peft import PeftModel

    from loraplex import SamplingParams
    from loraplex.lora.request import LoRARequest

    base = transformers.LlavaForConditionalGeneration.from_pretrained(llava).eval()
    peft_model = PeftModel.from_pretrained(base, lora_dir).eval()
    processor = transformers.AutoProcessor.from_pretrained(llava)
    lora = LoRARequest("lm", 1, str(lora_dir))
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    # A mixed batch: the adapter's rows and base rows, with and without images.
    prompts = [_prompt(t, i) for t, i in PROMPTS]
    outs = llm.generate(prompts + prompts, params, lora_request=[lora] * len(prompts) + [None] * len(prompts))
    with_lora = outs[:len(prompts)]
    for (text, images), out in zip(PROMPTS, with_lora):
        assert out.outputs[0].token_ids == _hf_tokens(peft_model, processor, text, images), text
    with peft_model.disable_adapter():
        for (text, images), out in zip(PROMPTS, outs[len(prompts):]):
            assert out.outputs[0].token_ids == _hf_tokens(peft_model, processor, text, images), text


def test_bad_multimodal_inputs_are_refused(llava, llm, tiny_llama):
    from loraplex import LLM, SamplingParams
    from loraplex.errors import InvalidRequestError, UnsupportedArgumentError

    params = SamplingParams(max_tokens=2)
    with pytest.raises(InvalidRequestError, match="processor refused.*<image> tokens|no image placeholder"):
        llm.generate([{"prompt": "no placeholder", "multi_modal_data": {"image": random_image(0)}}], params)
    with pytest.raises(InvalidRequestError, match="takes image"):
        llm.generate([{"prompt": "<image>", "multi_modal_data": {"audio": (torch.zeros(10), 16000)}}], params)
    with pytest.raises(UnsupportedArgumentError, match="'prompt_token_ids' is not supported"):
        llm.generate([{"prompt_token_ids": [1, 2], "multi_modal_data": {"image": random_image(0)}}], params)
    limited = LLM(str(llava), max_model_len=256, max_num_seqs=2, limit_mm_per_prompt={"image": 1})
    with pytest.raises(InvalidRequestError, match="At most 1 image"):
        limited.generate([_prompt("<image> <image>", [1, 2])], params)
    text_only = LLM(str(tiny_llama), max_model_len=64, max_num_seqs=2)
    with pytest.raises(UnsupportedArgumentError, match="text-only"):
        text_only.generate([{"prompt": "hi", "multi_modal_data": {"image": random_image(0)}}], params)


@pytest.fixture(scope="module")
def tower_adapters(llava, tmp_path_factory):
    root = tmp_path_factory.mktemp("llava-tower")
    return {"tower1": make_llava_adapter(llava, root / "tower1", TOWER, 11),
            "tower2": make_llava_adapter(llava, root / "tower2", TOWER, 12),
            "all": make_llava_adapter(llava, root / "all", f"{TOWER}|{LM}", 13)}


def test_tower_and_projector_lora_equal_peft(llm, llava, tower_adapters):
    """Adapters on the tower + projector (two of them) and on all three parts, in one batch with base and
    text-only requests: each request's tower and projector run with its own adapter, as PEFT runs it alone."""
    from peft import PeftModel

    from loraplex import SamplingParams
    from loraplex.lora.request import LoRARequest

    processor = transformers.AutoProcessor.from_pretrained(llava)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    jobs = [(name, text, images) for name in ("tower1", "tower2", "all", None) for text, images in PROMPTS]
    ids = {"tower1": 21, "tower2": 22, "all": 23}
    loras = [LoRARequest(n, ids[n], str(tower_adapters[n])) if n else None for n, _, _ in jobs]
    outs = llm.generate([_prompt(t, i) for _, t, i in jobs], params, lora_request=loras)
    for name in ("tower1", "tower2", "all"):
        base = transformers.LlavaForConditionalGeneration.from_pretrained(llava).eval()
        peft_model = PeftModel.from_pretrained(base, tower_adapters[name]).eval()
        for (n, text, images), out in zip(jobs, outs):
            if n == name:
                assert out.outputs[0].token_ids == _hf_tokens(peft_model, processor, text, images), (name, text)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(llava).eval()
    for (n, text, images), out in zip(jobs, outs):
        if n is None:
            assert out.outputs[0].token_ids == _hf_tokens(hf, processor, text, images), text
    # The tower adapters change image answers, not text-only ones (their LM part is empty).
    by = {(n, t): o.outputs[0].token_ids for (n, t, _), o in zip(jobs, outs)}
    assert by[("tower1", PROMPTS[0][0])] != by[(None, PROMPTS[0][0])]
    assert by[("tower1", "No image here")] == by[(None, "No image here")]


def test_tower_lora_on_a_text_model_is_refused_by_name(tiny_llama, llava, tower_adapters):
    from loraplex import LLM, SamplingParams
    from loraplex.errors import LoRALoadError
    from loraplex.lora.request import LoRARequest

    text_only = LLM(str(tiny_llama), max_model_len=64, max_num_seqs=2, enable_lora=True, max_lora_rank=8)
    with pytest.raises(LoRALoadError, match="has no tower or connector"):
        text_only.llm_engine.add_lora(LoRARequest("tower", 9, str(tower_adapters["tower1"])))


def test_default_mm_loras(llava, tower_adapters, lora_dir):
    """vLLM's default_mm_loras example with only the paths changed: image requests that name no adapter get the
    image adapter; text-only requests stay on the base; a request naming its own adapter keeps it."""
    from loraplex import LLM, SamplingParams
    from loraplex.lora.request import LoRARequest

    llm = LLM(str(llava), max_model_len=256, max_num_seqs=8, enable_lora=True, max_lora_rank=8,
              default_mm_loras={"image": str(tower_adapters["tower1"])})
    ref = LLM(str(llava), max_model_len=256, max_num_seqs=8, enable_lora=True, max_lora_rank=8)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    image, text = _prompt(*PROMPTS[0]), "No image here"
    own = LoRARequest("lm", 1, str(lora_dir))
    got = llm.generate([image, text, image], params, lora_request=[None, None, own])
    want_default = ref.generate([image], params, lora_request=LoRARequest("t1", 5, str(tower_adapters["tower1"])))
    want_base = ref.generate([text], params)
    want_own = ref.generate([image], params, lora_request=own)
    assert got[0].outputs[0].token_ids == want_default[0].outputs[0].token_ids
    assert got[0].lora_request is not None and got[0].lora_request.lora_name == "image"
    assert got[1].outputs[0].token_ids == want_base[0].outputs[0].token_ids and got[1].lora_request is None
    assert got[2].outputs[0].token_ids == want_own[0].outputs[0].token_ids


def test_default_mm_loras_needs_lora_and_known_modalities(llava):
    from loraplex import LLM
    from loraplex.errors import ConfigError

    with pytest.raises(ConfigError, match="needs enable_lora"):
        LLM(str(llava), max_model_len=64, default_mm_loras={"image": "/x"})
    with pytest.raises(ConfigError, match="takes image, got \\['audio'\\]"):
        LLM(str(llava), max_model_len=64, enable_lora=True, default_mm_loras={"audio": "/x"})


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_cuda_llava_equals_hf(llava, tower_adapters, enforce_eager):
    """On CUDA (fp32; CUDA graphs for the decoder's decode steps unless eager): the mixed batch of image and
    text-only prompts, with a tower adapter on some, equals HF / PEFT on the CPU."""
    from peft import PeftModel

    from loraplex import LLM, SamplingParams
    from loraplex.lora.request import LoRARequest

    llm = LLM(str(llava), max_model_len=256, max_num_seqs=8, enable_lora=True, max_lora_rank=8, device="cuda",
              dtype="float32", enforce_eager=enforce_eager)
    processor = transformers.AutoProcessor.from_pretrained(llava)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    lora = LoRARequest("tower1", 21, str(tower_adapters["tower1"]))
    jobs = [(n, t, i) for n in (None, "tower1") for t, i in PROMPTS]
    outs = llm.generate([_prompt(t, i) for _, t, i in jobs], params,
                        lora_request=[lora if n else None for n, _, _ in jobs])
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(llava).eval()
    peft_model = PeftModel.from_pretrained(transformers.LlavaForConditionalGeneration.from_pretrained(llava),
                                           tower_adapters["tower1"]).eval()
    for (n, text, images), out in zip(jobs, outs):
        model = peft_model if n else hf
        assert out.outputs[0].token_ids == _hf_tokens(model, processor, text, images), (n, text)


def _rewrite(src, dst, rename):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    name = "model.safetensors" if (src / "model.safetensors").exists() else "adapter_model.safetensors"
    tensors = load_file(str(src / name))
    save_file({rename(k): v for k, v in tensors.items()}, str(dst / name))
    return dst


def _old_tower(k: str) -> str:
    return k.replace("vision_tower.", "vision_tower.vision_model.", 1) if "vision_tower.vision_model." not in k else k


def _new_layout(k: str) -> str:
    k = _old_tower(k).replace("vision_tower.vision_model.", "vision_tower.")
    for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")):
        if k.startswith(old):
            return new + k[len(old):]
    return k


def test_checkpoint_and_adapter_layouts(llava, tower_adapters, tmp_path):
    """Both checkpoint layouts (llava-hf's `language_model.model.*` / `vision_tower.vision_model.*`, and
    transformers 5's `model.language_model.*` / `model.vision_tower.*`) and both tower path spellings in adapters
    give the same tokens."""
    from loraplex import LLM, SamplingParams
    from loraplex.lora.request import LoRARequest

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompts = [_prompt(t, i) for t, i in PROMPTS]
    old_adapter = _rewrite(tower_adapters["tower1"], tmp_path / "old-adapter", _old_tower)
    results = []
    for variant in (llava, _rewrite(llava, tmp_path / "old", _old_tower), _rewrite(llava, tmp_path / "new", _new_layout)):
        llm = LLM(str(variant), max_model_len=256, max_num_seqs=8, enable_lora=True, max_lora_rank=8)
        base = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        with_lora = [[o.outputs[0].token_ids for o in llm.generate(prompts, params, lora_request=LoRARequest(
            n, k + 1, str(path)))] for k, (n, path) in enumerate([("a", tower_adapters["tower1"]), ("b", old_adapter)])]
        results.append((base, with_lora))
    assert all(r == results[0] for r in results[1:])
    assert results[0][1][0] == results[0][1][1]  # both adapter spellings are the same adapter
