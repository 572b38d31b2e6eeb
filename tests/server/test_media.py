"""Media inputs over HTTP (issue #16, "Server"): remote image/audio URLs only under --allowed-media-domains, file://
only under --allowed-local-media-path, bounded in bytes and time, redirects checked; input_audio / audio_url decoded
to (float32 mono, rate); every bad input a 400 with vLLM's error body while the server keeps serving.

Remote URLs are served by a real stdlib HTTP server on 127.0.0.1 (a second one on another port for redirects to
another host and port); the model is the tiny LLaVA served by the real server, through the openai client."""
from __future__ import annotations

import base64
import http.server
import io
import os
import threading
import time
import urllib.parse

import httpx
import numpy as np
import pytest
from helpers import make_tiny_llava, random_image
from server_helpers import CLIServer, ServerThread

pytest.importorskip("PIL")
soundfile = pytest.importorskip("soundfile")
openai = pytest.importorskip("openai")

from loraplex.server.errors import APIError  # noqa: E402
from loraplex.server.media import MediaRef  # noqa: E402
from loraplex.server.media_decode import decode_audio  # noqa: E402
from loraplex.server.media_reader import MediaPolicy, MediaReader  # noqa: E402

KWARGS = dict(max_model_len=256, max_num_seqs=8, limit_mm_per_prompt={"image": 2})
MAX_BYTES = 256 * 1024  # the test servers' --max-media-bytes
HUGE = 2 * MAX_BYTES


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _audio_bytes(fmt: str, seconds: float = 0.5, rate: int = 16000, channels: int = 1) -> tuple[bytes, np.ndarray]:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    data = wave if channels == 1 else np.stack([wave, -0.5 * wave], axis=1)
    buf = io.BytesIO()
    soundfile.write(buf, data, rate, format=fmt)
    return buf.getvalue(), data


# ---------------------------------------------------------------------------- a real media server
class _Media(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # a body without Content-Length ends with the connection
    files: dict[str, bytes] = {}

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, length: bool = True) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/redirect":
            return self._send(int(query.get("status", 302)), headers={"Location": query["to"]})
        if url.path == "/chain":  # n redirects, then the image
            n = int(query["n"])
            return self._send(302, headers={"Location": f"/chain?n={n - 1}"}) if n else \
                self._send(200, self.files["/img.png"])
        if url.path == "/slow":
            time.sleep(float(query.get("s", 3)))
            return self._send(200, self.files["/img.png"])
        if url.path == "/trickle":  # each byte in time, the whole too slow
            self.send_response(200)
            self.send_header("Content-Length", "64")
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
            return None
        if url.path == "/huge":
            return self._send(200, b"\0" * HUGE)
        if url.path == "/huge-undeclared":
            return self._send(200, b"\0" * HUGE, length=False)
        if url.path in self.files:
            return self._send(200, self.files[url.path], {"Content-Type": "application/octet-stream"})
        return self._send(404, b"not here")


class _Quiet(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client that gave up (timeouts, caps): expected here
        pass


class MediaServer:
    def __init__(self, files: dict[str, bytes]):
        handler = type("Handler", (_Media,), {"files": files})
        self.httpd = _Quiet(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "MediaServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


IMAGE = random_image(21)
WAV, WAVE = _audio_bytes("WAV", seconds=1.0)


@pytest.fixture(scope="module")
def media_server():
    with MediaServer({"/img.png": _png(IMAGE), "/audio.wav": WAV}) as srv:
        yield srv


@pytest.fixture(scope="module")
def other_server():
    """Another port, for redirects to another host (as 'localhost') and to another port of the allowed host."""
    with MediaServer({"/img.png": _png(IMAGE)}) as srv:
        yield srv


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("media-root")
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "img.png").write_bytes(_png(IMAGE))
    (allowed / "huge.bin").write_bytes(b"\0" * HUGE)
    (root / "secret.png").write_bytes(_png(IMAGE))
    (allowed / "link.png").symlink_to(root / "secret.png")  # inside by name, outside by real path
    os.mkfifo(allowed / "fifo")
    return allowed


def _policy(media_dir, **kw) -> MediaPolicy:
    return MediaPolicy(**{"allowed_media_domains": ("127.0.0.1",), "allowed_local_media_path": str(media_dir),
                          "max_media_bytes": MAX_BYTES, "image_fetch_timeout_s": 1.0, **kw})


def _read(policy: MediaPolicy, url: str, modality: str = "image") -> bytes:
    reader = MediaReader(policy)
    try:
        return reader.read(MediaRef(modality, "messages[0].content[0]", url=url))
    finally:
        reader.close()


def _refused(policy, url, message, modality="image"):
    with pytest.raises(APIError) as e:
        _read(policy, url, modality)
    assert e.value.status == 400 and message in e.value.message, e.value.message
    assert e.value.param == "messages[0].content[0]"


# ---------------------------------------------------------------------------- MediaReader
def test_fetch_allowed_domain(media_server, media_dir):
    assert _read(_policy(media_dir), media_server.url + "/img.png") == _png(IMAGE)
    assert _read(_policy(media_dir, allowed_media_domains=("*",)), media_server.url + "/audio.wav", "audio") == WAV


def test_remote_off_by_default(media_server):
    _refused(MediaPolicy(), media_server.url + "/img.png", "'http' image URLs are not enabled")
    _refused(MediaPolicy(allowed_media_domains=()), media_server.url + "/img.png", "not enabled")
    _refused(MediaPolicy(), "file:///etc/passwd", "'file' image URLs are not enabled")


def test_disallowed_domain(media_server, media_dir):
    _refused(_policy(media_dir, allowed_media_domains=("example.com",)), media_server.url + "/img.png",
             "allowed domains: ['example.com']. Input URL domain: 127.0.0.1")


@pytest.mark.parametrize("target, message", [
    ("file:///etc/passwd", "redirect to a 'file' URL is not followed"),
    ("data:image/png;base64,AAAA", "is not followed"),
    ("ftp://127.0.0.1/img.png", "redirect to a 'ftp' URL is not followed"),
    ("http://localhost:{other}/img.png", "Input URL domain: localhost"),
])
def test_redirects_refused(media_server, other_server, media_dir, target, message):
    to = urllib.parse.quote(target.format(other=other_server.port), safe="")
    _refused(_policy(media_dir), f"{media_server.url}/redirect?to={to}", message)


def test_redirects_followed_to_allowed_hosts(media_server, other_server, media_dir):
    to = urllib.parse.quote(other_server.url + "/img.png", safe="")
    assert _read(_policy(media_dir), f"{media_server.url}/redirect?to={to}&status=307") == _png(IMAGE)
    assert _read(_policy(media_dir), f"{media_server.url}/redirect?to=/img.png") == _png(IMAGE)  # relative
    _refused(_policy(media_dir, is_redirect_followed=False), f"{media_server.url}/redirect?to={to}",
             "redirects are not followed")
    assert _read(_policy(media_dir), f"{media_server.url}/chain?n=5") == _png(IMAGE)
    _refused(_policy(media_dir), f"{media_server.url}/chain?n=6", "more than 5 redirects")


def test_fetch_bounds(media_server, media_dir):
    _refused(_policy(media_dir), media_server.url + "/huge", f"more than {MAX_BYTES} bytes")
    _refused(_policy(media_dir), media_server.url + "/huge-undeclared", f"more than {MAX_BYTES} bytes")
    started = time.monotonic()
    _refused(_policy(media_dir), media_server.url + "/slow?s=3", "took more than 1 s")
    _refused(_policy(media_dir), media_server.url + "/trickle", "took more than 1 s")
    assert time.monotonic() - started < 4.5  # each bounded by its timeout, the trickle too (6.4 s in all)
    _refused(_policy(media_dir, audio_fetch_timeout_s=0.5), media_server.url + "/slow?s=2", "took more than 0.5 s",
             "audio")
    _refused(_policy(media_dir), media_server.url + "/missing.png", "answered HTTP 404")
    _refused(_policy(media_dir), "http://127.0.0.1:1/img.png", "cannot fetch the URL")


def test_file_urls(media_dir):
    policy = _policy(media_dir)
    assert _read(policy, f"file://{media_dir}/img.png") == _png(IMAGE)
    assert _read(policy, f"file://localhost{media_dir}/img.png") == _png(IMAGE)
    assert _read(policy, f"file://{media_dir}/./img.png") == _png(IMAGE)
    _refused(policy, f"file://{media_dir}/../secret.png", "must be a subpath of --allowed-local-media-path")
    _refused(policy, f"file://{media_dir}/%2E%2E/secret.png", "must be a subpath")  # percent-encoded ..
    _refused(policy, f"file://{media_dir}/link.png", "must be a subpath")  # a symlink that leads out
    _refused(policy, "file:///etc/passwd", "must be a subpath")
    _refused(policy, f"file://{media_dir}/huge.bin", f"more than {MAX_BYTES} bytes")
    _refused(policy, f"file://{media_dir}/fifo", "not a regular file")
    _refused(policy, f"file://{media_dir}/missing.png", "cannot open")
    _refused(policy, f"file://otherhost{media_dir}/img.png", "names no host")
    # A directory beside the allowed one whose name starts the same is outside it.
    sibling = media_dir.parent / (media_dir.name + "-evil")
    sibling.mkdir(exist_ok=True)
    (sibling / "img.png").write_bytes(b"x")
    _refused(policy, f"file://{sibling}/img.png", "must be a subpath")


def test_one_request_reads_at_most_16_files_or_urls(media_dir):
    import asyncio

    from loraplex.server.frontend import Frontend
    from loraplex.server.limits import RequestLimits

    frontend = Frontend(None, RequestLimits(), None, {"image": 32}, _policy(media_dir))
    try:
        refs = [MediaRef("image", f"messages[0].content[{j}]", url=f"file://{media_dir}/img.png") for j in range(17)]
        with pytest.raises(APIError, match="at most 16 media items of one request may be files or remote URLs"):
            asyncio.run(frontend.fetch_media(refs))
        assert asyncio.run(frontend.fetch_media(refs[:16])) == {j: _png(IMAGE) for j in range(16)}
        inline = MediaRef("image", "m", url="data:image/png;base64," + base64.b64encode(_png(IMAGE)).decode())
        assert asyncio.run(frontend.fetch_media([inline] * 17)) == {}  # inline items are read from the body
    finally:
        frontend.close()


@pytest.mark.parametrize("part, kind, message", [
    ({"input_audio": {"data": "AAAA", "format": "ogg"}}, "input_audio", "'ogg' is not supported"),
    ({"input_audio": {"data": "AAAA"}}, "input_audio", "string 'data' (base64) and 'format'"),
    ({"input_audio": "AAAA"}, "input_audio", "string 'data' (base64) and 'format'"),
    ({"audio_url": {"url": "data:image/png;base64,AAAA"}}, "audio_url", "data:audio/<format>;base64"),
    ({"audio_url": {"url": 3}}, "audio_url", "'w.audio_url.url' must be a string"),
    ({"image_url": {"url": "javascript:alert(1)"}}, "image_url", "must be either a HTTP, data or file URL"),
    ({"image_url": {"url": "/etc/passwd"}}, "image_url", "must be either a HTTP, data or file URL"),
])
def test_media_part_shapes(part, kind, message):
    from loraplex.server.media import media_ref

    with pytest.raises(APIError) as e:
        media_ref(part, kind, "w")
    assert e.value.status == 400 and message in e.value.message and e.value.param == "w"
    assert media_ref({"input_audio": {"data": "AAAA", "format": "MP3"}}, "input_audio", "w").format == "mp3"
    assert media_ref({"audio_url": {"url": "HTTPS://x/a.wav"}}, "audio_url", "w").is_read_from_outside


def test_policy_from_env_and_checks(monkeypatch, tmp_path):
    from loraplex.errors import ConfigError

    monkeypatch.setenv("VLLM_IMAGE_FETCH_TIMEOUT", "2")
    monkeypatch.setenv("VLLM_AUDIO_FETCH_TIMEOUT", "3")
    monkeypatch.setenv("VLLM_MEDIA_URL_ALLOW_REDIRECTS", "0")
    monkeypatch.setenv("LORAPLEX_MAX_MEDIA_BYTES", "1234")
    policy = MediaPolicy.from_env(["Example.COM"], str(tmp_path))
    assert (policy.image_fetch_timeout_s, policy.audio_fetch_timeout_s, policy.is_redirect_followed,
            policy.max_media_bytes, policy.allowed_media_domains) == (2.0, 3.0, False, 1234, ("example.com",))
    assert MediaPolicy.from_env(None, None, 99).max_media_bytes == 99  # the flag wins
    assert not MediaPolicy.from_env().is_remote_enabled
    with pytest.raises(ConfigError, match="not an existing directory"):
        MediaPolicy(allowed_local_media_path=str(tmp_path / "nope"))
    with pytest.raises(ConfigError):
        MediaPolicy(max_media_bytes=0)


# ---------------------------------------------------------------------------- audio decoding
@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "MP3"])
def test_decode_audio(fmt):
    data, wave = _audio_bytes(fmt, rate=22050)
    array, rate = decode_audio(data, "x")
    assert rate == 22050 and array.dtype == np.float32 and array.ndim == 1
    if fmt == "MP3":  # lossy, and the decoder may pad or trim a frame
        assert abs(len(array) - len(wave)) < 2048 and np.abs(array).max() > 0.3
    else:
        assert len(array) == len(wave)
        np.testing.assert_allclose(array, wave, atol=1e-3 if fmt == "WAV" else 1e-4)


def test_decode_audio_stereo_is_averaged():
    data, stereo = _audio_bytes("WAV", channels=2)
    array, _ = decode_audio(data, "x")
    np.testing.assert_allclose(array, stereo.mean(axis=1), atol=1e-3)


@pytest.mark.parametrize("data, message", [
    (b"", "the audio is empty"),
    (b"RIFF\0\0\0\0WAVEjunk", "could not be decoded"),
    (b"\xff" * 100, "could not be decoded"),
    (_audio_bytes("OGG")[0], "audio in OGG is not supported"),
    (_audio_bytes("WAV", seconds=0)[0], "no samples"),
])
def test_decode_audio_refuses(data, message):
    with pytest.raises(APIError) as e:
        decode_audio(data, "messages[0].content[1]")
    assert e.value.status == 400 and message in e.value.message and e.value.param == "messages[0].content[1]"


def test_decode_audio_sample_cap(monkeypatch):
    import loraplex.server.media_decode as media_decode

    monkeypatch.setattr(media_decode, "MAX_AUDIO_SAMPLES", 1000)
    with pytest.raises(APIError, match="at most 1000 samples"):
        decode_audio(_audio_bytes("FLAC")[0], "x")


# ---------------------------------------------------------------------------- through the server
@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("media-llava") / "model")


@pytest.fixture(scope="module")
def server(llava, media_dir):
    from loraplex import EngineArgs, LLMEngine
    from loraplex.server import create_app

    engine = LLMEngine.from_engine_args(EngineArgs(model=str(llava), **KWARGS))
    app = create_app(engine, served_model_name="llava", api_key="", media_policy=_policy(media_dir))
    with ServerThread(app) as srv:
        yield srv


def _chat(srv, parts: list, **kw):
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    content = [{"type": "text", "text": "What is here?"}] + parts
    return client.chat.completions.create(model="llava", messages=[{"role": "user", "content": content}],
                                          max_tokens=8, temperature=0, extra_body={"ignore_eos": True}, **kw)


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_fetched_image_equals_data_url(server, media_server, other_server, media_dir):
    """The same image fetched (directly, through a redirect to another port) or read from a file answers as the
    data: URL does, in text and in each token's logprob; another image moves the logprobs (so they tell)."""
    data_url = "data:image/png;base64," + base64.b64encode(_png(IMAGE)).decode()
    want = _chat(server, [_image(data_url)], logprobs=True).choices[0]
    redirect = f"{media_server.url}/redirect?to=" + urllib.parse.quote(other_server.url + "/img.png", safe="")
    for url in (media_server.url + "/img.png", redirect, f"file://{media_dir}/img.png"):
        got = _chat(server, [_image(url)], logprobs=True).choices[0]
        assert got.message.content == want.message.content, url
        np.testing.assert_allclose(_token_logprobs(got), _token_logprobs(want), atol=1e-5, err_msg=url)
    other_url = "data:image/png;base64," + base64.b64encode(_png(random_image(22))).decode()
    other = _chat(server, [_image(other_url)], logprobs=True).choices[0]
    assert abs(_token_logprobs(other)[0] - _token_logprobs(want)[0]) > 5e-5
    stream = _chat(server, [_image(media_server.url + "/img.png"), _image(data_url)], stream=True)
    two = _chat(server, [_image(data_url), _image(data_url)]).choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == two


def _token_logprobs(choice) -> list[float]:
    return [t.logprob for t in choice.logprobs.content]


def _post(srv, body: dict, route: str = "/v1/chat/completions"):
    return httpx.post(srv.url + route, json=body, timeout=30)


def _assert_400(r, message: str, param: str | None = None):
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == 400 and err["type"] == "BadRequestError"
    assert message in err["message"], err
    if param is not None:
        assert err["param"] == param, err


def _bad_parts(media_server, media_dir):
    b64 = base64.b64encode
    return [
        ([_image(media_server.url + "/huge")], f"more than {MAX_BYTES} bytes"),
        ([_image(media_server.url + "/slow?s=3")], "took more than 1 s"),
        ([_image("http://localhost:1/img.png")], "Input URL domain: localhost"),
        ([_image(f"{media_server.url}/redirect?to=" + urllib.parse.quote("file:///etc/passwd", safe=""))],
         "redirect to a 'file' URL is not followed"),
        ([_image(f"file://{media_dir}/../secret.png")], "must be a subpath"),
        ([_image(f"file://{media_dir}/link.png")], "must be a subpath"),
        ([_image("ftp://127.0.0.1/img.png")], "must be either a HTTP, data or file URL"),
        ([_image(media_server.url + "/audio.wav")], "the image could not be decoded"),
        ([_image("data:image/png;base64," + b64(b"junk").decode())], "the image could not be decoded"),
        ([_image(media_server.url + "/img.png")] * 3, "At most 2 image(s) may be provided in one prompt"),
        ([{"type": "input_audio", "input_audio": {"data": b64(WAV).decode(), "format": "wav"}}], "takes image only"),
        ([{"type": "audio_url", "audio_url": {"url": media_server.url + "/audio.wav"}}], "takes image only"),
        ([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}], "takes image only"),
        ([{"type": "image", "image": "x"}], "'image' parts are not supported"),
    ]


def test_bad_media_are_400_and_the_server_keeps_serving(server, media_server, media_dir):
    for parts, message in _bad_parts(media_server, media_dir):
        body = {"model": "llava", "messages": [{"role": "user", "content": parts}], "max_tokens": 2}
        _assert_400(_post(server, body), message)
    ok = _chat(server, [_image(media_server.url + "/img.png")])
    assert ok.choices[0].finish_reason == "length"


def test_multi_modal_data_on_completions_is_refused_by_name(server):
    r = _post(server, {"model": "llava", "prompt": "<image> hi", "max_tokens": 2,
                       "multi_modal_data": {"image": "data:image/png;base64,AAAA"}}, "/v1/completions")
    _assert_400(r, "'multi_modal_data' is not supported by loraplex (media are sent as /v1/chat/completions content "
                "parts", param="multi_modal_data")


def test_media_for_a_text_only_model(tiny_llama):
    from loraplex.server import create_app
    from server_helpers import make_engine

    app = create_app(make_engine(tiny_llama), api_key="")
    with ServerThread(app) as srv:
        for part in (_image("data:image/png;base64,AAAA"),
                     {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}):
            r = _post(srv, {"messages": [{"role": "user", "content": [part]}], "max_tokens": 2})
            _assert_400(r, "but the served model is text-only", param="messages[0].content[0]")
        assert _post(srv, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).status_code == 200


# ---------------------------------------------------------------------------- the serve command's flags
def test_cli_flags(llava, media_server, media_dir, tmp_path):
    args = [str(llava), "--served-model-name", "llava", "--max-model-len", "256", "--allowed-media-domains",
            "127.0.0.1", "--allowed-local-media-path", str(media_dir), "--max-media-bytes", str(MAX_BYTES)]
    with CLIServer(*args, log=tmp_path / "serve.log", env={"VLLM_IMAGE_FETCH_TIMEOUT": "1"}) as srv:
        for url in (media_server.url + "/img.png", f"file://{media_dir}/img.png"):
            r = _post(srv, {"model": "llava", "max_tokens": 2,
                            "messages": [{"role": "user", "content": [_image(url)]}]})
            assert r.status_code == 200, r.text
        for url, message in ((media_server.url + "/huge", f"more than {MAX_BYTES} bytes"),
                             (media_server.url + "/slow?s=3", "took more than 1 s")):
            _assert_400(_post(srv, {"model": "llava", "messages": [{"role": "user", "content": [_image(url)]}]}),
                        message)


def test_cli_refuses_a_missing_media_dir(llava, tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "loraplex.server.cli", "serve", str(llava),
                          "--allowed-local-media-path", str(tmp_path / "nope")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1 and "is not an existing directory" in out.stderr, out.stderr


# ---------------------------------------------------------------------------- audio end to end: Granite Speech
@pytest.fixture(scope="module")
def granite(tmp_path_factory):
    pytest.importorskip("torchaudio")
    from helpers import make_tiny_granite_speech

    return make_tiny_granite_speech(tmp_path_factory.mktemp("media-granite") / "model")


GRANITE_KWARGS = dict(max_model_len=256, max_num_seqs=8, limit_mm_per_prompt={"audio": 1})


@pytest.fixture(scope="module", params=["process", "thread"])
def granite_server(request, granite, media_dir):
    """Both transports: the speech encoder's input features cross the wire to an engine process too."""
    from loraplex import EngineArgs, LLMEngine
    from loraplex.server import create_app

    args = EngineArgs(model=str(granite), **GRANITE_KWARGS)
    engine = args if request.param == "process" else LLMEngine.from_engine_args(args)
    app = create_app(engine, served_model_name="granite", api_key="", media_policy=_policy(media_dir))
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def granite_offline(granite):
    from loraplex import LLM

    return LLM(str(granite), **GRANITE_KWARGS)


def _input_audio(data: bytes, fmt: str) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def _granite_chat(srv, parts, **kw):
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    return client.chat.completions.create(
        model="granite", messages=[{"role": "user", "content": [{"type": "text", "text": "what is said?"}] + parts}],
        max_tokens=8, temperature=0, extra_body={"ignore_eos": True}, **kw)


def test_audio_parts_match_offline(granite_server, granite_offline, granite, media_server):
    """input_audio (WAV) through the openai client, whole and streamed, equals the offline engine on the same
    rendered prompt and the same decoded samples, in tokens and in each token's logprob up to float noise (prefix
    caching may reuse the text's KV blocks; the tiny model's tokens barely depend on the audio, its logprobs do,
    by more than that noise, as the half-loud clip shows); the same clip as FLAC, as a data:
    audio_url and fetched from a URL answers the same (16-bit WAV and FLAC decode to the same samples)."""
    from transformers import AutoTokenizer

    from loraplex import SamplingParams

    srv, wav = granite_server, WAV
    flac, _ = _audio_bytes("FLAC", seconds=1.0)
    tok = AutoTokenizer.from_pretrained(granite)
    prompt = tok.apply_chat_template([{"role": "user", "content": "what is said?\n<|audio|>"}], tokenize=False,
                                     add_generation_prompt=True)
    want = granite_offline.generate([{"prompt": prompt, "multi_modal_data": {"audio": decode_audio(wav, "x")}}],
                                    SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0))[0]
    want = want.outputs[0]
    want_logprobs = [lp[t].logprob for lp, t in zip(want.logprobs, want.token_ids)]
    got = _granite_chat(srv, [_input_audio(wav, "wav")], logprobs=True).choices[0]
    assert got.message.content == want.text and len(got.logprobs.content) == len(want.token_ids)
    np.testing.assert_allclose(_token_logprobs(got), want_logprobs, atol=1e-5)
    stream = _granite_chat(srv, [_input_audio(wav, "wav")], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.text
    flac_url = "data:audio/flac;base64," + base64.b64encode(flac).decode()
    for part in (_input_audio(flac, "flac"), {"type": "audio_url", "audio_url": {"url": flac_url}},
                 {"type": "audio_url", "audio_url": {"url": media_server.url + "/audio.wav"}}):
        other = _granite_chat(srv, [part], logprobs=True).choices[0]
        assert other.message.content == want.text, part
        np.testing.assert_allclose(_token_logprobs(other), want_logprobs, atol=1e-5, err_msg=str(part)[:80])
    quiet = io.BytesIO()
    soundfile.write(quiet, WAVE * 0.5, 16000, format="WAV")
    softer = _granite_chat(srv, [_input_audio(quiet.getvalue(), "wav")], logprobs=True).choices[0]
    assert abs(_token_logprobs(softer)[0] - want_logprobs[0]) > 5e-5  # the audio reaches the logits
    mp3, _ = _audio_bytes("MP3", seconds=1.0)
    assert _granite_chat(srv, [_input_audio(mp3, "mp3")]).choices[0].finish_reason == "length"


def test_bad_audio_is_400(granite_server, media_server):
    srv, wav = granite_server, WAV
    for parts, message in [
        ([_input_audio(wav, "wav")] * 2, "At most 1 audio(s) may be provided in one prompt"),
        ([_input_audio(b"not audio at all", "wav")], "the audio could not be decoded"),
        ([_input_audio(b"", "wav")], "the audio is empty"),
        ([_input_audio(_audio_bytes("OGG")[0], "wav")], "audio in OGG is not supported"),
        ([_input_audio(wav, "aac")], "'aac' is not supported"),
        ([{"type": "audio_url", "audio_url": {"url": media_server.url + "/img.png"}}], "could not be decoded"),
        ([{"type": "audio_url", "audio_url": {"url": "http://localhost:1/a.wav"}}], "Input URL domain: localhost"),
        ([_image("data:image/png;base64,AAAA")], "takes audio only"),
    ]:
        r = _post(srv, {"model": "granite", "messages": [{"role": "user", "content": parts}], "max_tokens": 2})
        _assert_400(r, message)
    assert _granite_chat(srv, [_input_audio(wav, "wav")]).choices[0].finish_reason == "length"
