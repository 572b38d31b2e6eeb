"""What a vLLM deployment relies on besides the API: vLLM's metric names, labels and values in /metrics (scraped
with prometheus_client's parser after a known workload, both transports), /health, and `vllm serve` flags (the CLI
as a subprocess: accepted, refused by name, described in --help)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
from server_helpers import CLIServer, ServerThread, drain, make_engine

prometheus_parser = pytest.importorskip("prometheus_client.parser")

BASE = "tiny"
PROMPT_IDS = [5, 17, 42, 99, 7]  # 5 prompt tokens
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def engine(tiny_llama, engine_transport):
    """Room for a long generation (a request that is still running while /metrics is scraped)."""
    return make_engine(tiny_llama, max_model_len=512)


@pytest.fixture(scope="module")
def server(engine, adapters):
    from loraplex.server import create_app

    drain(engine)
    app = create_app(engine, served_model_name=[BASE, "tiny-alias"], api_key="", allow_runtime_lora_updating=False,
                     lora_modules=[f"a1={adapters['a1']}", f"a2={adapters['a2']}"])
    with ServerThread(app) as srv:
        yield srv


def scrape(url: str) -> dict:
    """{(sample name, frozenset of labels): value} of one /metrics answer, through prometheus_client's parser."""
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200
    samples = {}
    for family in prometheus_parser.text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name} {labels} not in /metrics: " + ", ".join(
        sorted(f"{n}{dict(l)}" for n, l in samples if n == name))
    return samples[key]


def series(samples: dict, name: str) -> list[dict]:
    return [dict(labels) for n, labels in samples if n == name]


def wait_for(url: str, check, timeout: float = 15.0) -> dict:
    """Scrape until ``check(samples)`` holds: the engine process publishes its state every 250 ms at most."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def test_vllm_metrics_after_a_known_workload(server):
    c = httpx.Client(base_url=server.url, timeout=120)
    before = wait_for(server.url, lambda s: value(s, "vllm:num_requests_running", model_name=BASE) == 0)
    num = 3
    for model in ("a1", "a1", "tiny-alias"):
        r = c.post("/v1/completions", json={"model": model, "prompt": PROMPT_IDS, "max_tokens": MAX_TOKENS,
                                            "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == MAX_TOKENS
    with c.stream("POST", "/v1/completions", json={"model": "a2", "prompt": PROMPT_IDS, "max_tokens": 1,
                                                   "stream": True, "ignore_eos": True}) as r:
        assert list(r.iter_lines())[-2] == "data: [DONE]"
    num += 1
    prompt, generated = num * len(PROMPT_IDS), (num - 1) * MAX_TOKENS + 1

    def delta(samples, name, **labels):
        return value(samples, name, **labels) - before.get((name, frozenset(labels.items())), 0.0)

    after = wait_for(server.url, lambda s: delta(s, "vllm:generation_tokens_total", model_name=BASE) >= generated)
    # Token counters and per-request metrics carry the base model's served name, whichever adapter ran (vLLM's).
    assert delta(after, "vllm:prompt_tokens_total", model_name=BASE) == prompt
    assert delta(after, "vllm:generation_tokens_total", model_name=BASE) == generated
    assert delta(after, "vllm:request_success_total", model_name=BASE, finished_reason="length") == num
    for reason in ("stop", "abort"):
        assert delta(after, "vllm:request_success_total", model_name=BASE, finished_reason=reason) == 0
    assert delta(after, "vllm:time_to_first_token_seconds_count", model_name=BASE) == num
    assert delta(after, "vllm:e2e_request_latency_seconds_count", model_name=BASE) == num
    # One interval per generated token after a sequence's first.
    assert delta(after, "vllm:inter_token_latency_seconds_count", model_name=BASE) == (num - 1) * (MAX_TOKENS - 1)
    assert 0 < delta(after, "vllm:inter_token_latency_seconds_sum", model_name=BASE) \
        <= delta(after, "vllm:e2e_request_latency_seconds_sum", model_name=BASE)
    # vLLM's buckets, cumulative, the last one +Inf equal to the count.
    assert value(after, "vllm:time_to_first_token_seconds_bucket", model_name=BASE, le="0.001") >= 0
    assert value(after, "vllm:e2e_request_latency_seconds_bucket", model_name=BASE, le="7680.0") == value(
        after, "vllm:e2e_request_latency_seconds_count", model_name=BASE)
    assert value(after, "vllm:inter_token_latency_seconds_bucket", model_name=BASE, le="+Inf") == value(
        after, "vllm:inter_token_latency_seconds_count", model_name=BASE)
    assert value(after, "vllm:num_requests_running", model_name=BASE) == 0
    assert value(after, "vllm:num_requests_waiting", model_name=BASE) == 0
    assert 0.0 <= value(after, "vllm:kv_cache_usage_perc", model_name=BASE) < 1.0
    # Idle: the LoRA gauge names no adapter; its value is the time of the snapshot.
    (info,) = series(after, "vllm:lora_requests_info")
    assert info == {"max_lora": "2", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert abs(value(after, "vllm:lora_requests_info", **info) - time.time()) < 60
    # Ours stay beside vLLM's, by the model each request named.
    assert delta(after, "loraplex_generation_tokens_total", model="a1") == 2 * MAX_TOKENS
    assert delta(after, "loraplex_requests_total", model="a1", status="200") == 2
    # Prefix cache counters of the other metrics set are there too.
    assert value(after, "vllm:prefix_cache_queries_total", model_name=BASE) >= 0


def test_running_adapter_and_abort_are_seen(server):
    """While an adapter request runs, vllm:lora_requests_info names it running, the queue gauges count its
    sequences and the KV cache is in use; a client that leaves counts its sequences as aborted."""
    before = scrape(server.url)
    started, release = threading.Event(), threading.Event()

    def stream():
        body = {"model": "a1", "prompt": PROMPT_IDS, "max_tokens": 500, "n": 2, "temperature": 1.0,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
            for _ in r.iter_lines():
                started.set()
                if release.is_set():
                    break  # leaving mid-stream aborts the request

    t = threading.Thread(target=stream)
    t.start()
    try:
        assert started.wait(60)
        during = wait_for(server.url, lambda s: any(
            i["running_lora_adapters"] == "a1" for i in series(s, "vllm:lora_requests_info")))
    finally:
        release.set()
        t.join(60)
    (info,) = series(during, "vllm:lora_requests_info")
    assert info == {"max_lora": "2", "running_lora_adapters": "a1", "waiting_lora_adapters": ""}
    assert value(during, "vllm:num_requests_running", model_name=BASE) == 2
    assert value(during, "vllm:kv_cache_usage_perc", model_name=BASE) > 0
    after = wait_for(server.url, lambda s: value(s, "vllm:num_requests_running", model_name=BASE) == 0)
    aborted = value(after, "vllm:request_success_total", model_name=BASE, finished_reason="abort") - before[
        ("vllm:request_success_total", frozenset({"model_name": BASE, "finished_reason": "abort"}.items()))]
    assert aborted == 2
    assert series(after, "vllm:lora_requests_info")[0]["running_lora_adapters"] == ""


def test_a_400_on_a_known_model_counts_under_its_name(server):
    c = httpx.Client(base_url=server.url, timeout=60)
    before = scrape(server.url)
    for model in ("a1", "tiny-alias", None):
        body = {"prompt": "x", "n": 0} | ({"model": model} if model else {})
        assert c.post("/v1/completions", json=body).status_code == 400
    assert c.post("/v1/completions", json={"model": "nobody", "prompt": "x", "n": 0}).status_code == 400
    after = scrape(server.url)

    def delta(model):
        key = ("loraplex_requests_total", frozenset({"model": model, "status": "400"}.items()))
        return after.get(key, 0) - before.get(key, 0)

    assert (delta("a1"), delta("tiny-alias"), delta(BASE), delta("<unknown>")) == (1, 1, 1, 1)
    assert not any(dict(labels).get("model") == "nobody" for _, labels in after)


def test_served_model_names_first_reported_all_accepted(server):
    c = httpx.Client(base_url=server.url, timeout=60)
    ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert ids[:2] == [BASE, "tiny-alias"]
    for name in (BASE, "tiny-alias"):
        r = c.post("/v1/completions", json={"model": name, "prompt": PROMPT_IDS, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == name


def test_health_is_json(server):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json()["status"] == "ok"


# ---------------------------------------------------------------------------------------------------- flags

def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LORAPLEX_", "VLLM_"))}
    return subprocess.run([sys.executable, "-m", "loraplex.server.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**clean, **(env or {})})


def test_unsupported_vllm_flags_are_refused_by_name(tiny_llama):
    """The CLI as a process, once; the other refusals below take the same path in this process."""
    out = run_cli("serve", str(tiny_llama), "--port", "0", "--pipeline-parallel-size", "2")
    message = "--pipeline-parallel-size 2: pipeline parallelism"
    assert out.returncode == 1 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("flags, message", [
    (["--quantization", "awq"], "--quantization awq: only bitsandbytes (4-bit), fp8 and compressed-tensors (FP8 "
     "checkpoints) are supported yet"),
    (["-pp", "3"], "--pipeline-parallel-size 3: pipeline parallelism"),
    (["--data-parallel-size", "2"], "--data-parallel-size 2: data parallelism"),
    (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8:"),
    (["--tokenizer-mode", "mistral"], "--tokenizer-mode mistral:"),
    (["--speculative-config", '{"method": "ngram"}'], "--speculative-config"),
    (["--enable-sleep-mode"], "--enable-sleep-mode: sleep mode"),
    (["--enable-auto-tool-choice"], "--enable-auto-tool-choice: tool calls"),
    (["--tool-call-parser", "hermes"], "--tool-call-parser hermes: tool calls"),
    (["--reasoning-parser", "deepseek_r1"], "--reasoning-parser deepseek_r1:"),
    (["--enable-log-requests"], "--enable-log-requests:"),
    (["--chat-template", "no/such/template.jinja"], "--chat-template: the supplied chat template"),
    (["--generation-config", "no/such/folder"], "--generation-config: 'no/such/folder'"),
])
def test_more_refusals_exit_before_loading(capsys, flags, message):
    from loraplex.server.cli import main

    assert main(["serve", "/no/model/needed", *flags]) == 1
    err = capsys.readouterr().err
    assert message in err and "loading" not in err, err


def test_vllm_flags_parse():
    """Flags a vLLM LoRA deployment passes parse with vLLM's meaning (those that start a server are run below)."""
    from loraplex.server.cli import build_parser

    args = build_parser().parse_args([
        "serve", "m", "-tp", "1", "--enable-prefix-caching", "--default-mm-loras", '{"image": "/l"}',
        "--enable-lora", "--max-loras", "4", "--max-lora-rank", "64", "--max-cpu-loras", "8",
        "--lora-modules", "a=/p", '{"name": "b", "path": "/q", "base_model_name": "m"}', "--lora-dtype", "bfloat16",
        "--gpu-memory-utilization", "0.8", "--max-model-len", "4096", "--dtype", "bfloat16", "--seed", "1",
        "--trust-remote-code", "--download-dir", "/d", "--tokenizer", "t", "--revision", "main",
        "--served-model-name", "x", "y", "--generation-config", "vllm", "--disable-log-requests",
        "--uvicorn-log-level", "warning", "--api-key", "k", "--no-enable-chunked-prefill"])
    assert (args.tensor_parallel_size, args.enable_prefix_caching, args.default_mm_loras) == (1, True, {"image": "/l"})
    assert args.lora_modules == ["a=/p", '{"name": "b", "path": "/q", "base_model_name": "m"}']
    assert args.served_model_name == ["x", "y"] and args.revision == "main" and args.download_dir == "/d"
    assert build_parser().parse_args(["serve", "m", "--no-enable-prefix-caching"]).enable_prefix_caching is False


def test_help_has_a_line_for_every_flag_and_defaults_once():
    out = run_cli("serve", "--help")
    assert out.returncode == 0
    for flag in ("--chat-template", "--generation-config", "--tensor-parallel-size", "--revision", "--download-dir",
                 "--disable-log-requests", "--quantization"):
        assert flag in out.stdout
    assert "(default: None)" not in out.stdout and "(default: [])" not in out.stdout
    from loraplex.server.cli import build_parser

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    assert [a.option_strings for a in serve._actions if a.option_strings and not a.help] == []


def test_banner_names_the_variable_that_holds_the_key():
    from loraplex.server.cli import _banner

    assert "Bearer $VLLM_API_KEY" in _banner("http://h", "m", [], True, True, "VLLM_API_KEY")
    assert "Bearer <--api-key>" in _banner("http://h", "m", [], True, False, "LORAPLEX_API_KEY")


def test_envs_name_of(monkeypatch):
    from loraplex import envs

    monkeypatch.delenv("LORAPLEX_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "k")
    assert envs.name_of("API_KEY") == "VLLM_API_KEY"
    monkeypatch.setenv("LORAPLEX_API_KEY", "k")
    assert envs.name_of("API_KEY") == "LORAPLEX_API_KEY"


TEMPLATE = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"


@pytest.fixture(scope="module")
def cli_server(tiny_llama, adapters, tmp_path_factory):
    """`loraplex serve` as vLLM deployments start it: two API servers, several served names, an inline chat
    template, a generation config folder, adapters in both --lora-modules forms, the key from $VLLM_API_KEY."""
    folder = tmp_path_factory.mktemp("generation-config")
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 3}))
    module = json.dumps({"name": "a2", "path": str(adapters["a2"])})
    log = tmp_path_factory.mktemp("cli-log") / "serve.log"
    with CLIServer(str(tiny_llama), "-tp", "1", "--served-model-name", BASE, "tiny-alias", "--max-model-len", "128",
                   "--enable-lora", "--max-loras", "2", "--max-lora-rank", "16", "--lora-modules",
                   f"a1={adapters['a1']}", module, "--chat-template", TEMPLATE, "--generation-config", str(folder),
                   "--enable-prefix-caching", "--disable-log-requests", "--disable-uvicorn-access-log",
                   "--api-server-count", "2", log=log, env={"VLLM_API_KEY": "sk-v"}, start_timeout=180) as srv:
        srv.client = httpx.Client(base_url=srv.url, headers={"Authorization": "Bearer sk-v"}, timeout=60)
        yield srv


def test_cli_served_names_template_and_generation_config(cli_server, tiny_llama):
    from transformers import AutoTokenizer

    c = cli_server.client
    ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert ids[:2] == [BASE, "tiny-alias"] and {"a1", "a2"} <= set(ids)
    messages = [{"role": "user", "content": "hi there"}]
    want = AutoTokenizer.from_pretrained(str(tiny_llama)).apply_chat_template(messages, chat_template=TEMPLATE,
                                                                              tokenize=True)
    want = want if isinstance(want, list) else want["input_ids"]
    answers = []
    for model in ("tiny-alias", "a1", "a2"):
        r = c.post("/v1/chat/completions", json={"model": model, "messages": messages})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == model and body["usage"]["prompt_tokens"] == len(want)
        # The generation config's max_new_tokens caps the answer and its temperature 0 makes it greedy.
        assert body["usage"]["completion_tokens"] == 3
        answers.append(body["choices"][0]["message"]["content"])
    again = c.post("/v1/chat/completions", json={"model": "tiny-alias", "messages": messages}).json()
    assert again["choices"][0]["message"]["content"] == answers[0]
    r = c.post("/v1/completions", json={"model": BASE, "prompt": PROMPT_IDS, "max_tokens": 10})
    assert r.json()["usage"]["completion_tokens"] == 3  # vLLM caps an explicit max_tokens too


def test_cli_metrics_add_up_over_api_servers(cli_server):
    c = cli_server.client
    before = scrape(cli_server.url)
    num = 6  # spread over the two API servers by the kernel (new connections)
    for _ in range(num):
        with httpx.Client(base_url=cli_server.url, headers=c.headers, timeout=60) as fresh:
            r = fresh.post("/v1/completions", json={"model": "a1", "prompt": PROMPT_IDS, "ignore_eos": True})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3

    def delta(s, name, **labels):
        key = (name, frozenset(labels.items()))
        return s.get(key, 0) - before.get(key, 0)

    after = wait_for(cli_server.url, lambda s: delta(s, "vllm:generation_tokens_total", model_name=BASE) >= 3 * num)
    assert delta(after, "vllm:request_success_total", model_name=BASE, finished_reason="length") == num
    assert delta(after, "vllm:e2e_request_latency_seconds_count", model_name=BASE) == num
    assert delta(after, "vllm:prompt_tokens_total", model_name=BASE) == num * len(PROMPT_IDS)
    assert delta(after, "vllm:generation_tokens_total", model_name=BASE) == 3 * num
    assert delta(after, "vllm:inter_token_latency_seconds_count", model_name=BASE) == 2 * num
    assert delta(after, "loraplex_requests_total", model="a1", status="200") == num
    (info,) = series(after, "vllm:lora_requests_info")
    assert info["max_lora"] == "2"


def test_cli_log_is_quiet(cli_server):
    """Each line once, no progress bar redraws in a file, the key's hint names the variable that holds it."""
    deadline = time.monotonic() + 30
    while "curl" not in cli_server.output() and time.monotonic() < deadline:
        time.sleep(0.1)  # the banner follows the first healthy answer
    out = cli_server.output()
    assert "\r" not in out and "it/s]" not in out
    assert "Bearer $VLLM_API_KEY" in out
    lines = [line for line in out.splitlines() if line.strip() and "[api" not in line and "uvicorn" not in line]
    repeated = {line for line in lines if lines.count(line) > 1 and not line.startswith(("INFO:", "  "))}
    assert not repeated, repeated
