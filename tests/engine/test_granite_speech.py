"""Granite Speech (issue #16): audio through the HF processor, the checkpoint's Conformer encoder and Q-Former
projector, and our Granite decoder. Greedy tokens equal HF transformers' ``generate`` request by request, with
adapters on the language model, on the encoder + projector, and on all three (PEFT as the oracle, each request
alone: the Q-Former's shared query rules out PEFT's mixed batches); the checkpoint's own audio LoRA applies by
``default_mm_loras`` exactly where HF's ``generate`` enables it (audio present)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_granite_speech_adapter, make_tiny_granite_speech, random_audio

pytest.importorskip("torchaudio")
transformers = pytest.importorskip("transformers")

MAX_TOKENS = 8
TOP = 5
LM = r".*language_model\.layers\.\d+\.(self_attn\.(q_proj|v_proj)|mlp\.down_proj)"
TOWER = (r".*(encoder\.layers\.\d+\.(attn\.(to_q|to_kv|to_out)|ff1\.up_proj)"
         r"|projector\.qformer\.encoder\.layer\.\d+\.(attention|crossattention)\.attention\.(query|value)"
         r"|projector\.linear)")
ALL = f"{LM}|{TOWER}"
# (prompt, clips as (seed, seconds)): one clip, two clips of different lengths, text only, a short clip.
PROMPTS = [("<|audio|>what is said?", [(1, 1.0)]), ("first <|audio|> then <|audio|>:", [(2, 0.5), (3, 1.2)]),
           ("no audio here", []), ("<|audio|>", [(4, 0.3)])]


@pytest.fixture(scope="module")
def granite(tmp_path_factory):
    return make_tiny_granite_speech(tmp_path_factory.mktemp("granite-speech") / "model")


@pytest.fixture(scope="module")
def adapters(granite, tmp_path_factory):
    root = tmp_path_factory.mktemp("granite-speech-lora")
    return {"lm": make_granite_speech_adapter(granite, root / "lm", LM, seed=5, scale=0.2),
            "tower1": make_granite_speech_adapter(granite, root / "tower1", TOWER, seed=6),
            "tower2": make_granite_speech_adapter(granite, root / "tower2", TOWER, seed=7),
            "all": make_granite_speech_adapter(granite, root / "all", ALL, seed=8, scale=0.2)}


def _clips(spec):
    return [random_audio(seed, seconds) for seed, seconds in spec]


def _prompt(text, spec):
    return {"prompt": text, "multi_modal_data": {"audio": _clips(spec)}} if spec else text


def _hf_run(model, processor, text, spec) -> tuple[list[int], torch.Tensor]:
    """HF's greedy tokens and its first step's logprobs [vocab]."""
    clips = [clip for clip, _ in _clips(spec)]
    inputs = processor(text=text, audio=clips or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), out.scores[0][0].float().log_softmax(-1)


# The tiny random model's greedy tokens hardly depend on what the audio says (its Q-Former's LayerNorms and
# near-uniform attention wash the clip out); its logprobs do: another clip moves the first step's by ~3e-4,
# silence by ~6e-3, a tower adapter by ~1e-1 (test_audio_content_moves_the_logprobs). So parity is checked on the
# first step's top logprobs too, within LOGPROB_TOL.
LOGPROB_TOL = 2e-5


def _assert_equal(out, want, what, tol: float = LOGPROB_TOL):
    """Our output equals HF's: the tokens, and the first step's top logprobs within ``tol``."""
    tokens, logprobs = want
    assert out.outputs[0].token_ids == tokens, what
    for token_id, lp in out.outputs[0].logprobs[0].items():
        assert abs(lp.logprob - logprobs[token_id].item()) < tol, (what, token_id, lp.logprob, logprobs[token_id])


def _params():
    from loraplex import SamplingParams

    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOP)


@pytest.fixture(scope="module")
def llm(granite):
    from loraplex import LLM

    return LLM(str(granite), max_model_len=256, max_num_seqs=8, enable_lora=True, max_lora_rank=8, max_loras=4)


def test_process_loader_carries_tower_weights(llm, granite, adapters):
    """The encoder's and projector's LoRA weights travel back from a loader process as from a loader thread."""
    from loraplex import LLM
    from loraplex.lora.request import LoRARequest

    proc = LLM(str(granite), max_model_len=256, max_num_seqs=8, enable_lora=True, max_lora_rank=8,
               lora_loader="process", num_lora_loader_workers=1)
    lora = LoRARequest("all", 3, str(adapters["all"]))
    prompts = [_prompt(t, s) for t, s in PROMPTS]
    want = llm.generate(prompts, _params(), lora_request=lora)
    got = proc.generate(prompts, _params(), lora_request=lora)
    for a, b in zip(got, want):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs[0] == b.outputs[0].logprobs[0]


def test_audio_and_text_prompts_equal_hf(llm, granite):
    hf = transformers.GraniteSpeechForConditionalGeneration.from_pretrained(granite).eval()
    processor = transformers.AutoProcessor.from_pretrained(granite)
    outs = llm.generate([_prompt(t, s) for t, s in PROMPTS], _params())
    for (text, spec), out in zip(PROMPTS, outs):
        _assert_equal(out, _hf_run(hf, processor, text, spec), text)


@pytest.mark.parametrize("which", ["lm", "tower1", "all"])
def test_adapters_equal_peft(llm, granite, adapters, which):
    """LoRA on the language model only, on the encoder + projector only, and on all three; in one batch with the
    base model's requests."""
    from peft import PeftModel

    from loraplex.lora.request import LoRARequest

    processor = transformers.AutoProcessor.from_pretrained(granite)
    peft_model = PeftModel.from_pretrained(
        transformers.GraniteSpeechForConditionalGeneration.from_pretrained(granite), adapters[which]).eval()
    lora = LoRARequest(which, {"lm": 1, "tower1": 2, "all": 3}[which], str(adapters[which]))
    prompts = [_prompt(t, s) for t, s in PROMPTS]
    outs = llm.generate(prompts + prompts, _params(), lora_request=[lora] * len(prompts) + [None] * len(prompts))
    for (text, spec), out in zip(PROMPTS, outs[:len(prompts)]):
        _assert_equal(out, _hf_run(peft_model, processor, text, spec), (which, text))
    with peft_model.disable_adapter():
        for (text, spec), out in zip(PROMPTS, outs[len(prompts):]):
            _assert_equal(out, _hf_run(peft_model, processor, text, spec), text)


def test_audio_content_moves_the_logprobs(llm):
    """Two clips of the same length give first-step logprobs apart by well over the parity tolerance, so the parity
    tests see a request fed another request's audio."""
    a, b = llm.generate([{"prompt": "<|audio|>what is said?", "multi_modal_data": {"audio": random_audio(s)}}
                         for s in (1, 2)], _params())
    first = [{t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()} for o in (a, b)]
    shared = first[0].keys() & first[1].keys()
    assert max(abs(first[0][t] - first[1][t]) for t in shared) > 5 * LOGPROB_TOL


def test_tower_adapters_change_the_output(llm, adapters):
    """The tower adapters are not no-ops (else the parity above would prove little): each moves the first
    step's logprobs well beyond the parity tolerance."""
    from loraplex.lora.request import LoRARequest

    prompt = _prompt(*PROMPTS[0])
    outs = llm.generate([prompt] * 3, _params(), lora_request=[
        None, LoRARequest("tower1", 2, str(adapters["tower1"])), LoRARequest("tower2", 4, str(adapters["tower2"]))])
    first = [{t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()} for o in outs]
    for i, j in ((0, 1), (1, 2), (0, 2)):
        shared = first[i].keys() & first[j].keys()
        assert max(abs(first[i][t] - first[j][t]) for t in shared) > 1e-3, (i, j)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The same base weights, with the checkpoint's own audio LoRA beside them (as IBM ships Granite Speech)."""
    return make_tiny_granite_speech(tmp_path_factory.mktemp("granite-speech-shipped") / "model",
                                    lora_targets=r".*language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)",
                                    lora_seed=11)


def test_mixed_batch_with_default_audio_lora_equals_solo_runs(shipped, adapters):
    """One batch: a text-only base request, audio requests with two different tower adapters, and audio requests
    that name no adapter and pick up the default audio LoRA; each equals its solo run."""
    from loraplex import LLM
    from loraplex.lora.request import LoRARequest

    llm = LLM(str(shipped), max_model_len=256, max_num_seqs=8, enable_lora=True, max_lora_rank=8, max_loras=4,
              default_mm_loras={"audio": str(shipped)})
    t1, t2 = (LoRARequest(n, i, str(adapters[n])) for n, i in (("tower1", 2), ("tower2", 4)))
    jobs = [(PROMPTS[2], None), (PROMPTS[0], t1), (PROMPTS[1], t2), (PROMPTS[0], None), (PROMPTS[3], None),
            (PROMPTS[3], t1)]
    batch = llm.generate([_prompt(*p) for p, _ in jobs], _params(), lora_request=[lo for _, lo in jobs])
    for (p, lo), out in zip(jobs, batch):
        solo = llm.generate([_prompt(*p)], _params(), lora_request=lo)[0]
        assert out.outputs[0].token_ids == solo.outputs[0].token_ids, (p, lo)
    assert batch[0].lora_request is None
    assert batch[3].lora_request.lora_name == "audio" and batch[4].lora_request.lora_name == "audio"
    assert batch[1].lora_request.lora_name == "tower1"


def test_default_audio_lora_applies_where_hf_enables_it(shipped, granite):
    """HF's generate enables the checkpoint's adapter when audio is given and disables it otherwise; our
    default_mm_loras does the same, per request."""
    from loraplex import LLM

    with_adapter = transformers.GraniteSpeechForConditionalGeneration.from_pretrained(shipped).eval()
    assert with_adapter._hf_peft_config_loaded  # transformers loaded the shipped adapter, active
    # HF's own switch (enable_adapters / disable_adapters) wants a newer peft than the GPU image has: audio runs
    # through GenerationMixin.generate on the model with its adapter, text on the same base weights without one.
    with_adapter.generate = transformers.GenerationMixin.generate.__get__(with_adapter)
    without = transformers.GraniteSpeechForConditionalGeneration.from_pretrained(granite).eval()
    processor = transformers.AutoProcessor.from_pretrained(shipped)
    llm = LLM(str(shipped), max_model_len=256, max_num_seqs=8, enable_lora=True, max_lora_rank=8,
              default_mm_loras={"audio": str(shipped)})
    outs = llm.generate([_prompt(t, s) for t, s in PROMPTS], _params())
    for (text, spec), out in zip(PROMPTS, outs):
        _assert_equal(out, _hf_run(with_adapter if spec else without, processor, text, spec), text)
        assert (out.lora_request is not None) == bool(spec)
    plain = LLM(str(shipped), max_model_len=256, max_num_seqs=8)  # the shipped adapter is no base weight
    got = plain.generate([_prompt(*PROMPTS[0])], _params())[0]
    _assert_equal(got, _hf_run(without, processor, *PROMPTS[0]), "no default LoRA")


def test_docs_example_runs(shipped):
    """The documentation's Granite Speech example with only the import and the paths changed."""
    script = Path(__file__).parents[2] / "docs" / "examples" / "granite_speech_default_mm_loras.py"
    proc = subprocess.run([sys.executable, str(script), str(shipped)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Adapter: audio" in proc.stdout and "Generated:" in proc.stdout


def test_bad_audio_inputs_are_refused(llm, granite):
    from loraplex import LLM
    from loraplex.errors import InvalidRequestError

    params = _params()
    clip = random_audio(0)
    with pytest.raises(InvalidRequestError, match="this model takes audio"):
        llm.generate([{"prompt": "<|audio|>", "multi_modal_data": {"image": clip}}], params)
    with pytest.raises(InvalidRequestError, match="audio item is \\(array, sample_rate\\)"):
        llm.generate([{"prompt": "<|audio|>", "multi_modal_data": {"audio": "not audio"}}], params)
    with pytest.raises(InvalidRequestError, match="NaN"):
        llm.generate([{"prompt": "<|audio|>", "multi_modal_data": {"audio": (clip[0] * float("nan"), 16000)}}],
                     params)
    with pytest.raises(InvalidRequestError, match="placeholder|processor refused"):
        llm.generate([{"prompt": "no placeholder", "multi_modal_data": {"audio": clip}}], params)
    limited = LLM(str(granite), max_model_len=256, limit_mm_per_prompt={"audio": 1})
    with pytest.raises(InvalidRequestError, match="At most 1 audio"):
        limited.generate([_prompt(*PROMPTS[1])], params)
    # After the refusals the engine serves as before.
    assert llm.generate([_prompt(*PROMPTS[0])], params)[0].outputs[0].token_ids


def test_resampled_audio_equals_processor_rate(llm):
    """A clip at 8 kHz is resampled to the processor's 16 kHz (torchaudio), as vLLM resamples."""
    import torchaudio

    clip, _ = random_audio(9, 1.0, 8000)
    at_16k = torchaudio.functional.resample(torch.from_numpy(clip), 8000, 16000).numpy()
    a, b = llm.generate([{"prompt": "<|audio|>", "multi_modal_data": {"audio": (clip, 8000)}},
                         {"prompt": "<|audio|>", "multi_modal_data": {"audio": (at_16k, 16000)}}], _params())
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_cuda_granite_speech_equals_hf(granite, adapters, enforce_eager):
    """On CUDA (fp32; CUDA graphs for the decoder's decode steps unless eager): base and tower-adapter requests,
    audio and text, in one batch, equal HF / PEFT on the CPU."""
    from peft import PeftModel

    from loraplex import LLM
    from loraplex.lora.request import LoRARequest

    llm = LLM(str(granite), max_model_len=256, max_num_seqs=8, enable_lora=True, max_lora_rank=8, device="cuda",
              dtype="float32", enforce_eager=enforce_eager)
    processor = transformers.AutoProcessor.from_pretrained(granite)
    lora = LoRARequest("all", 3, str(adapters["all"]))
    jobs = [(n, t, s) for n in (None, "all") for t, s in PROMPTS]
    outs = llm.generate([_prompt(t, s) for _, t, s in jobs], _params(),
                        lora_request=[lora if n else None for n, _, _ in jobs])
    hf = transformers.GraniteSpeechForConditionalGeneration.from_pretrained(granite).eval()
    peft_model = PeftModel.from_pretrained(transformers.GraniteSpeechForConditionalGeneration.from_pretrained(granite),
                                           adapters["all"]).eval()
    for (n, text, spec), out in zip(jobs, outs):
        # fp32 on CUDA against HF on the CPU: Triton's dots round through TF32, so logprobs agree to ~1e-3 only
        # (an adapter moves them by ~1e-1, silence for audio by ~6e-3).
        _assert_equal(out, _hf_run(peft_model if n else hf, processor, text, spec), (n, text), tol=2e-3)


def _first_logprobs(out):
    return {t: round(lp.logprob, 4) for t, lp in out.outputs[0].logprobs[0].items()}


def test_inplace_reload_of_a_tower_adapter(granite, adapters):
    """An in-place reload with an audio request in flight: that request finishes on the old version's encoder and
    projector weights, a new one with the same audio and prompt (the same prefix: the prefix cache must not serve
    the old version's blocks) runs on the new version's, each equal to a cold run."""
    from loraplex import EngineArgs, LLMEngine, LLM
    from loraplex.lora.request import LoRARequest

    v1, v2 = str(adapters["tower1"]), str(adapters["tower2"])
    prompt = _prompt(*PROMPTS[0])
    cold = LLM(str(granite), max_model_len=256, enable_lora=True, max_lora_rank=8)
    want_v1, want_v2 = (cold.generate([prompt], _params(), lora_request=LoRARequest(n, i, p))[0]
                        for n, i, p in (("x", 1, v1), ("y", 2, v2)))
    assert _first_logprobs(want_v1) != _first_logprobs(want_v2)
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(granite), max_model_len=256, enable_lora=True,
                                                   max_lora_rank=8))
    engine.add_request("old", prompt, _params(), lora_request=LoRARequest("a", 1, v1))
    for _ in range(3):
        engine.step()
    engine.add_lora(LoRARequest("a", 1, v2, load_inplace=True))
    engine.add_request("new", prompt, _params(), lora_request=LoRARequest("a", 1, v2))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    for rid, want in (("old", want_v1), ("new", want_v2)):
        assert done[rid].outputs[0].token_ids == want.outputs[0].token_ids, rid
        assert _first_logprobs(done[rid]) == _first_logprobs(want), rid


def test_tower_adapters_through_one_slot_and_the_cpu_cache(granite, adapters, llm):
    """Three adapters (two of the tower, one of all three parts) through max_loras=1 and a CPU cache of 2: they
    take turns in the slot and are evicted and reloaded; each request equals its run on the roomy engine."""
    from loraplex import LLM
    from loraplex.lora.request import LoRARequest

    tight = LLM(str(granite), max_model_len=256, max_num_seqs=8, enable_lora=True, max_lora_rank=8, max_loras=1,
                max_cpu_loras=2)
    loras = [LoRARequest(n, i, str(adapters[n])) for n, i in (("tower1", 2), ("tower2", 4), ("all", 3))]
    jobs = [(PROMPTS[i % 2 * 3], loras[i % 3]) for i in range(6)]
    got = tight.generate([_prompt(*p) for p, _ in jobs], _params(), lora_request=[lo for _, lo in jobs])
    want = llm.generate([_prompt(*p) for p, _ in jobs], _params(), lora_request=[lo for _, lo in jobs])
    for (p, lo), a, b in zip(jobs, got, want):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids, (p, lo.lora_name)
        assert _first_logprobs(a) == _first_logprobs(b), (p, lo.lora_name)


@pytest.mark.parametrize("layout", ["model.language_model.model.", "model.language_model."])
def test_checkpoint_layouts(granite, tmp_path, layout):
    """The checkpoint's decoder under each transformers version's names (IBM's ``language_model.model.*``, 5.17's
    ``model.language_model.model.*``, later 5.x's ``model.language_model.*``) loads to the same model."""
    import shutil

    from safetensors.torch import load_file, save_file

    from loraplex import LLM

    copy = tmp_path / "model"
    shutil.copytree(granite, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    renamed = {}
    for name, t in tensors.items():
        if name.startswith("language_model.model."):
            name = layout + name[len("language_model.model."):]
        elif name.startswith("language_model.lm_head."):
            name = "lm_head." + name[len("language_model.lm_head."):]
        else:
            name = "model." + name
        renamed[name] = t
    save_file(renamed, str(copy / "model.safetensors"), metadata={"format": "pt"})
    prompts = [_prompt(t, s) for t, s in PROMPTS[:2]]
    want = LLM(str(granite), max_model_len=256).generate(prompts, _params())
    got = LLM(str(copy), max_model_len=256).generate(prompts, _params())
    for a, b in zip(got, want):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert _first_logprobs(a) == _first_logprobs(b)
