"""Images over HTTP (issue #16): OpenAI chat `image_url` parts with data: URLs against a LLaVA server, through the
official openai client, streamed and whole, with and without a tower adapter; answers equal the offline engine's
on the same rendered prompt; every bad input is a 400 with vLLM's error body and the server keeps serving."""
from __future__ import annotations

import base64
import io

import httpx
import pytest
from helpers import make_llava_adapter, make_tiny_llava, random_image
from server_helpers import ServerThread

pytest.importorskip("PIL")
openai = pytest.importorskip("openai")
peft = pytest.importorskip("peft")

KWARGS = dict(max_model_len=256, max_num_seqs=8, enable_lora=True, max_lora_rank=8, max_loras=2,
              limit_mm_per_prompt={"image": 2})


def _data_url(img, fmt="PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("srv-llava") / "model")


@pytest.fixture(scope="module")
def tower(llava, tmp_path_factory):
    return make_llava_adapter(llava, tmp_path_factory.mktemp("srv-tower") / "tower",
                              r".*vision_tower.*\.(q_proj|fc1)|.*multi_modal_projector\.linear_1", seed=3)


@pytest.fixture(scope="module")
def offline(llava):
    from loraplex import LLM

    return LLM(str(llava), **KWARGS)


@pytest.fixture(scope="module", params=["process", "thread"])
def server(request, llava, tower):
    from loraplex import EngineArgs, LLMEngine
    from loraplex.server import create_app

    args = EngineArgs(model=str(llava), **KWARGS)
    engine = args if request.param == "process" else LLMEngine.from_engine_args(args)
    app = create_app(engine, served_model_name="llava", api_key="", lora_modules=[f"tower={tower}"])
    with ServerThread(app) as srv:
        yield srv


def _messages(text, images):
    return [{"role": "user", "content": [{"type": "text", "text": text}] +
             [{"type": "image_url", "image_url": {"url": _data_url(img)}} for img in images]}]


def _offline_tokens(offline, llava, text, images, lora=None, max_tokens=8):
    """The same chat rendered as the server renders it (each image part's placeholder where the part was)."""
    from transformers import AutoTokenizer

    from loraplex import SamplingParams

    tok = AutoTokenizer.from_pretrained(llava)
    content = "\n".join([text] + ["<image>"] * len(images))
    prompt = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                     add_generation_prompt=True)
    out = offline.generate([{"prompt": prompt, "multi_modal_data": {"image": images}}],
                           SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), lora_request=lora)
    return out[0].outputs[0]


@pytest.mark.parametrize("model", ["llava", "tower"])
@pytest.mark.parametrize("num_images", [1, 2])
def test_chat_with_images_matches_offline(server, offline, llava, tower, model, num_images):
    from loraplex.lora.request import LoRARequest

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    images = [random_image(10 + k) for k in range(num_images)]
    lora = LoRARequest("tower", 1, str(tower)) if model == "tower" else None
    want = _offline_tokens(offline, llava, "What is here?", images, lora)
    got = client.chat.completions.create(model=model, messages=_messages("What is here?", images), max_tokens=8,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert got.choices[0].message.content == want.text
    assert got.usage.completion_tokens == len(want.token_ids)
    stream = client.chat.completions.create(model=model, messages=_messages("What is here?", images), max_tokens=8,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.text


def _huge_png() -> str:
    """A 9000x8000 PNG of 70 KB: more pixels than the server decodes (a small body that claims a huge canvas)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (9000, 8000)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("content, message", [
    ([{"type": "image_url", "image_url": {"url": _huge_png()}}], "pixels; at most"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!notbase64"}}], "not valid base64"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"junk").decode()}}],
     "could not be decoded"),
    ([{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}], "'https' image URLs are not enabled"),
    ([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}], "'file' image URLs are not enabled"),
    ([{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}], "data:image/<format>;base64"),
    ([{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}], "takes image only"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}] * 3, "At most 2 image(s)"),
])
def test_bad_images_are_400(server, content, message):
    body = {"model": "llava", "messages": [{"role": "user", "content": content}], "max_tokens": 2}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and message in err["message"], err
    ok = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": "llava", "messages": _messages("hi", [random_image(1)]), "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_documented_granite_speech_serve_command(tmp_path_factory, tmp_path):
    """The documentation's command, ``serve <granite speech> --enable-lora --default-mm-loras '{"audio": <model>}'
    --max-lora-rank 64``, as a real process: an input_audio request through the openai client runs with the
    checkpoint's audio LoRA (its output equals the offline engine with default_mm_loras), a text-only one on the
    base model. With the filesystem resolver on, a request naming an encoder + projector adapter by its directory
    name gets it loaded at runtime and runs with it."""
    import json
    import shutil

    import openai
    import soundfile
    from helpers import make_granite_speech_adapter, make_tiny_granite_speech, random_audio
    from server_helpers import CLIServer

    from loraplex import LLM, SamplingParams
    from loraplex.lora.request import LoRARequest

    root = tmp_path_factory.mktemp("serve-granite")
    model = make_tiny_granite_speech(root / "model",
                                     lora_targets=r".*language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)")
    plain = make_tiny_granite_speech(root / "plain")  # the same base weights, no adapter inside
    tower = make_granite_speech_adapter(plain, root / "adapters" / "tower", r".*(encoder\.layers\.\d+\.attn\.to_q"
                                        r"|projector\.linear)", seed=6)
    config = json.loads((tower / "adapter_config.json").read_text())
    (tower / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(model)}))
    clip, rate = random_audio(3)
    wav = io.BytesIO()
    soundfile.write(wav, clip, rate, format="WAV", subtype="FLOAT")
    audio_part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav.getvalue()).decode(),
                                                         "format": "wav"}}
    offline = LLM(str(model), enable_lora=True, max_lora_rank=64, default_mm_loras={"audio": str(model)},
                  max_model_len=256)
    tok = offline.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "LORAPLEX_PLUGINS": "lora_filesystem_resolver",
           "VLLM_LORA_RESOLVER_CACHE_DIR": str(root / "adapters")}
    with CLIServer(str(model), "--enable-lora", "--default-mm-loras", json.dumps({"audio": str(model)}),
                   "--max-lora-rank", "64", "--max-model-len", "256", log=tmp_path / "serve.log", env=env) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        resolved = client.chat.completions.create(
            model="tower", messages=[{"role": "user", "content": [{"type": "text", "text": "what is said?"},
                                                                  audio_part]}],
            max_tokens=6, temperature=0, logprobs=True, extra_body={"ignore_eos": True}).choices[0]
        prompt = tok.apply_chat_template([{"role": "user", "content": "what is said?\n<|audio|>"}], tokenize=False,
                                         add_generation_prompt=True)
        want = offline.generate([{"prompt": prompt, "multi_modal_data": {"audio": (clip, rate)}}], params,
                                lora_request=LoRARequest("tower", 7, str(tower)))[0]
        assert resolved.message.content == want.outputs[0].text
        for lp, d in zip(resolved.logprobs.content, want.outputs[0].logprobs):
            assert abs(lp.logprob - next(iter(d.values())).logprob) < 1e-4
        for parts, audio in (([{"type": "text", "text": "what is said?"}, audio_part], True),
                             ([{"type": "text", "text": "no audio"}], False)):
            got = client.chat.completions.create(model=str(model), messages=[{"role": "user", "content": parts}],
                                                 max_tokens=6, temperature=0, logprobs=True,
                                                 extra_body={"ignore_eos": True}).choices[0]
            text = "\n".join(("<|audio|>" if p["type"] == "input_audio" else p["text"]) for p in parts)
            prompt = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
            want = offline.generate([{"prompt": prompt, "multi_modal_data": {"audio": (clip, rate)}} if audio
                                     else prompt], params)[0]
            assert (want.lora_request is not None) == audio
            assert got.message.content == want.outputs[0].text, audio
            for lp, (_, ref) in zip(got.logprobs.content, [next(iter(d.items())) for d in want.outputs[0].logprobs]):
                assert abs(lp.logprob - ref.logprob) < 1e-4, audio
