"""kvlab serve, tested as a user would: a real server process on a free loopback port, the official
`openai` client for completions, chat and streaming, raw HTTP (httpx) for bad requests and
disconnects, tokens compared with kvlab.LLM's greedy output, and a bounded soak.

Two servers: the course model (correctness: the tokens a user gets are the engine's), and a
random-weight two-layer Llama with the course tokenizer, saved as a Hugging Face folder (the
mechanics under load: soak, overload, shutdown; fast enough for 500 requests in seconds).
"""
import asyncio
import json
import random
import signal
import time

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from kvlab.serve.launch import launch, read_metrics  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot"]


def _wait_idle(url, timeout=20.0):
    """The metrics once no request runs or waits (aborts land at the next step boundary)."""
    deadline = time.monotonic() + timeout
    while True:
        m = read_metrics(url)
        if (m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0) \
                or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server():
    s = launch(["--max-model-len", "256", "--max-num-seqs", "16", "--threads", "1", "--log-level", "warning",
                "--max-request-body-bytes", "65536"], env={"OMP_NUM_THREADS": "1"})
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(real_model):
    import kvlab

    return kvlab.LLM(real_model, max_model_len=256)


def _greedy(n):
    import kvlab

    return kvlab.SamplingParams(temperature=0, max_tokens=n)


# ---- the course model: what a user gets --------------------------------------------------------
def test_health_models_and_metric_names(server):
    assert httpx.get(server.url + "/health").status_code == 200
    models = httpx.get(server.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL] and models["data"][0]["max_model_len"] == 256
    m = read_metrics(server.url)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 'vllm:request_success_total{finished_reason="abort"}',
                 "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:request_time_per_output_token_seconds_count", "vllm:e2e_request_latency_seconds_count"):
        assert name in m, name


def test_completions_equal_the_engines_greedy_tokens(server, client, reference):
    want = reference.generate(PROMPTS, _greedy(12), use_tqdm=False)
    got = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=0,
                                    extra_body={"return_token_ids": True})
    assert [c.index for c in got.choices] == [0, 1, 2]
    for c, w in zip(got.choices, want):
        assert c.token_ids == w.outputs[0].token_ids
        assert c.text == w.outputs[0].text and c.finish_reason == w.outputs[0].finish_reason
    assert got.usage.prompt_tokens == sum(len(w.prompt_token_ids) for w in want)
    assert got.usage.completion_tokens == sum(len(w.outputs[0].token_ids) for w in want)
    one = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0)
    assert one.choices[0].text == reference.generate(PROMPTS[0], _greedy(5), use_tqdm=False)[0].outputs[0].text


def test_kv_budget_flags_reach_the_engine():
    """`kvlab serve --kv-budget-tokens 64 --kv-eviction streaming --num-sink-tokens 2` builds the
    LLM with that budget; a bad combination is kvlab.LLM's ValueError (tests/test_evict_engine.py)."""
    from kvlab.serve.cli import llm_kwargs, parser

    kw = llm_kwargs(parser().parse_args(["--kv-budget-tokens", "64", "--kv-eviction", "streaming",
                                         "--num-sink-tokens", "2"]))
    assert (kw["kv_budget_tokens"], kw["kv_eviction"], kw["num_sink_tokens"]) == (64, "streaming", 2)
    assert llm_kwargs(parser().parse_args([]))["kv_budget_tokens"] is None


def test_fast_flag_serves_the_fast_twin_with_its_tokens(real_model):
    """`kvlab serve --fast`: FastLlama (prepacked weights) on the cpu attention backend, the same
    greedy tokens as kvlab.LLM on the reference model; the flags resolve as documented."""
    import kvlab
    from kvlab.serve.cli import attention_backend, parser

    assert attention_backend(parser().parse_args(["--fast"])) == "cpu"
    assert attention_backend(parser().parse_args([])) == "torch"
    assert attention_backend(parser().parse_args(["--fast", "--attention-backend", "torch"])) == "torch"
    want = kvlab.LLM(real_model, max_model_len=256).generate(PROMPTS, _greedy(12), use_tqdm=False)
    s = launch(["--fast", "--max-model-len", "256", "--threads", "1", "--log-level", "warning"],
               env={"OMP_NUM_THREADS": "1"})
    try:
        got = httpx.post(s.url + "/v1/completions", timeout=120,
                         json={"model": MODEL, "prompt": PROMPTS, "max_tokens": 12, "temperature": 0,
                               "return_token_ids": True}).json()
        assert [c["token_ids"] for c in got["choices"]] == [w.outputs[0].token_ids for w in want]
    finally:
        assert s.stop() == 0, s.log()


def test_chat_uses_the_models_chat_template(server, client, reference):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    want = reference.chat(messages, _greedy(10), use_tqdm=False)[0]
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                         extra_body={"return_token_ids": True})
    assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
    assert got.choices[0].token_ids == want.outputs[0].token_ids
    assert got.choices[0].message.content == want.outputs[0].text
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)


def test_streaming_gives_the_same_text_in_chunks(server, client):
    full = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text and len(chunks) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10

    messages = [{"role": "user", "content": "Say hello."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_stream_is_server_sent_events_ending_in_done(server):
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"} and chunks[-1]["choices"][0]["finish_reason"]


def test_stop_strings_end_the_text_before_them(server, client):
    full = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
    stop = full.strip().split()[1]   # a word the greedy answer contains
    cut = full[:full.index(stop)]
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop])
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop],
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == cut


BAD = [   # (body or raw bytes, the parameter the error must name or None)
    ({"prompt": "hi", "max_tokens": 2}, "model"),                                  # missing field
    ({"model": MODEL, "max_tokens": 2}, "prompt"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": "many"}, "max_tokens"),        # wrong type
    ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 10_000}, "max_tokens"),        # over the model length
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "temperature": -0.5}, "temperature"),
    ({"model": MODEL, "prompt": "hi", "top_p": 0}, "top_p"),
    ({"model": MODEL, "prompt": "hi", "n": 3}, "n"),
    ({"model": MODEL, "prompt": "hi", "logprobs": 2}, "logprobs"),
    ({"model": "gpt-4o", "prompt": "hi"}, "model"),                                # unknown model
    ({"model": MODEL, "prompt": "word " * 300}, "prompt"),                         # prompt too long
    ({"model": MODEL, "prompt": ""}, "prompt"),
    ({"model": MODEL, "prompt": [1, 2, 10**9]}, "prompt"),                        # token id out of vocabulary
    (b'{"model": "' + MODEL.encode() + b'", "prompt": ', None),                    # malformed JSON
    (json.dumps({"model": MODEL, "prompt": "x" * 70_000}).encode(), "body"),      # over the body limit
]


@pytest.mark.parametrize("body,param", BAD, ids=range(len(BAD)))
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(server, body, param):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(server.url + "/v1/completions", timeout=60, **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["code"] == 400
    assert err["type"] == "invalid_request_error" and err["param"] == param
    ok = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1}, timeout=60)
    assert ok.status_code == 200


def test_bad_chat_requests(server):
    for body in ({"model": MODEL, "messages": []}, {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
                 {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                 {"model": MODEL, "messages": "hello"}):
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert httpx.get(server.url + "/v1/nothing").status_code == 404


def test_a_client_that_leaves_mid_stream_aborts_and_frees_its_blocks(server):
    before = _wait_idle(server.url)
    body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        held = read_metrics(server.url)
        assert held["vllm:num_requests_running"] == 1 and held["vllm:kv_cache_usage_perc"] > 0
    after = _wait_idle(server.url, timeout=10)   # the client left: its request ends at the next step
    assert after["vllm:num_requests_running"] == 0 and after["vllm:kv_cache_usage_perc"] == 0
    key = 'vllm:request_success_total{finished_reason="abort"}'
    assert after[key] == before[key] + 1
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] < 200

    with pytest.raises(httpx.TimeoutException):   # a non-streaming client that gives up
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=1.5)
    again = _wait_idle(server.url, timeout=10)
    assert again[key] == before[key] + 2 and again["vllm:kv_cache_usage_perc"] == 0


# ---- a random-weight tiny model: the mechanics under load --------------------------------------
TINY_HF_CONFIG = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                  "max_position_embeddings": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                  "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A two-layer random Llama with the course tokenizer, as a Hugging Face folder."""
    from safetensors.torch import save_file

    from kvlab.model.hf_loader import config_from_hf
    from kvlab.model.llama import Llama
    from kvlab.model.load import default_model_path
    from kvlab.model.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    (folder / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    cfg = config_from_hf(str(folder))
    torch.manual_seed(0)
    model = Llama(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else torch.nn.init.ones_(p)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"))
    load_tokenizer(default_model_path()).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_server(tiny_folder):
    s = launch([tiny_folder, "--served-model-name", "tiny", "--max-model-len", "512", "--max-num-seqs", "8",
                "--max-queue-len", "64", "--threads", "1", "--log-level", "warning"], env={"OMP_NUM_THREADS": "1"})
    yield s
    s.stop()


def _job(rng: random.Random, i: int) -> dict:
    system = rng.choice(["You are a pirate.", "You answer in French.", None])
    words = " ".join(rng.choice(["cache", "block", "token", "prefix", "page", "batch", "queue"])
                     for _ in range(rng.randint(1, 30)))
    kind = rng.choices(["completion", "chat", "abort", "bad"], weights=[40, 40, 12, 8])[0]
    body = {"model": "tiny", "max_tokens": rng.randint(1, 8), "temperature": rng.choice([0, 0.8]), "seed": i,
            "stream": rng.random() < 0.5}
    if kind == "abort":
        body |= {"stream": True, "max_tokens": 400, "ignore_eos": True}
    if kind == "bad":
        body["max_tokens"] = 10_000
    if kind == "chat" or (kind != "completion" and rng.random() < 0.5):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": words}]
        return {"kind": kind, "path": "/v1/chat/completions", "body": body | {"messages": msgs}}
    return {"kind": kind, "path": "/v1/completions", "body": body | {"prompt": (system or "") + words}}


async def _run(client, job: dict, rng: random.Random) -> dict:
    res = {"job": job, "status": None, "completion_tokens": 0, "aborted": False}
    body = job["body"]
    if not body["stream"]:
        r = await client.post(job["path"], json=body)
        res["status"] = r.status_code
        if r.status_code == 200:
            res["completion_tokens"] = r.json()["usage"]["completion_tokens"]
        return res
    body = body | {"stream_options": {"include_usage": True}}
    async with client.stream("POST", job["path"], json=body) as r:
        res["status"] = r.status_code
        if r.status_code != 200:
            await r.aread()
            return res
        keep = rng.randint(1, 3) if job["kind"] == "abort" else None
        n = 0
        async for line in r.aiter_lines():
            if not line:
                continue
            n += 1
            if keep is not None and n >= keep:
                res["aborted"] = True
                break   # leave mid-stream: the connection closes
            if line != "data: [DONE]" and (usage := json.loads(line[6:]).get("usage")):
                res["completion_tokens"] = usage["completion_tokens"]
    return res


def test_soak_500_mixed_requests_16_at_a_time(tiny_server, tiny_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_folder))
    rng = random.Random(0)
    jobs = [_job(rng, i) for i in range(500)]
    before = _wait_idle(tiny_server.url)

    async def soak():
        sem = asyncio.Semaphore(16)
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=tiny_server.url, timeout=120, limits=limits) as client:
            async def one(i, job):
                async with sem:
                    return await _run(client, job, random.Random(i))
            return await asyncio.gather(*(one(i, j) for i, j in enumerate(jobs)))

    t0 = time.monotonic()
    results = asyncio.run(soak())
    elapsed = time.monotonic() - t0
    after = _wait_idle(tiny_server.url)

    def d(name):
        return after[name] - before[name]

    statuses = [r["status"] for r in results]
    assert set(statuses) <= {200, 400}, sorted(set(statuses))
    assert all((r["status"] == 400) == (r["job"]["kind"] == "bad") for r in results)
    accepted = [r for r in results if r["status"] == 200]
    aborted = [r for r in accepted if r["aborted"]]
    completed = [r for r in accepted if not r["aborted"]]
    assert len(aborted) >= 20 and len(completed) >= 300

    def prompt_len(job):
        b = job["body"]
        if "prompt" in b:
            return len(tok.encode(b["prompt"]))
        ids = tok.apply_chat_template(b["messages"], add_generation_prompt=True, tokenize=True)
        return len(ids if isinstance(ids, list) else ids["input_ids"])

    # nothing leaks, nothing is left running
    assert after["vllm:kv_cache_usage_perc"] == 0 and after["vllm:num_requests_running"] == 0
    # the counters add up
    ok = sum(d(f'vllm:request_success_total{{finished_reason="{r}"}}') for r in ("stop", "length"))
    assert d('vllm:request_success_total{finished_reason="abort"}') == len(aborted)
    assert ok == len(completed) == d("vllm:e2e_request_latency_seconds_count")
    assert d("vllm:prompt_tokens_total") == sum(prompt_len(r["job"]) for r in accepted)
    generated = sum(r["completion_tokens"] for r in completed)
    assert d("vllm:request_generation_tokens_sum") == generated
    assert generated < d("vllm:generation_tokens_total") <= generated + 400 * len(aborted)
    assert len(completed) <= d("vllm:time_to_first_token_seconds_count") <= len(accepted)
    assert d("vllm:prefix_cache_hits_total") > 0   # shared system prompts
    print(f"soak: 500 requests in {elapsed:.1f} s")


def test_overload_gets_503_and_shutdown_is_clean(tiny_folder):
    s = launch([tiny_folder, "--served-model-name", "tiny", "--max-model-len", "512", "--max-num-seqs", "2",
                "--max-queue-len", "2", "--threads", "1", "--log-level", "warning",
                "--timeout-graceful-shutdown", "2"], env={"OMP_NUM_THREADS": "1"})
    try:
        body = {"model": "tiny", "prompt": "cache block", "max_tokens": 30, "ignore_eos": True}

        async def burst():
            async with httpx.AsyncClient(base_url=s.url, timeout=120) as client:
                return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(24)))

        rs = asyncio.run(burst())
        codes = [r.status_code for r in rs]
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}, codes
        err = next(r for r in rs if r.status_code == 503)
        assert err.json()["error"]["type"] == "server_overloaded" and err.headers["retry-after"]
        m = _wait_idle(s.url)
        assert m["vllm:kv_cache_usage_perc"] == 0
        assert m['vllm:request_success_total{finished_reason="length"}'] == codes.count(200)

        # SIGTERM with a stream in flight: the stream ends, the process exits with status 0
        long = body | {"max_tokens": 500, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=long, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            t0 = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            try:   # ends when the stream finishes, or the server cancels it after the grace period
                rest = [line for line in lines if line]
            except httpx.RemoteProtocolError:
                rest = []
        assert s.proc.wait(30) == 0, s.log()
        assert time.monotonic() - t0 < 20
        assert rest == [] or rest[-1].startswith("data: ")
    finally:
        s.stop()


# ---- pieces without a server -------------------------------------------------------------------
def test_stream_text_never_takes_back_what_it_sent():
    from kvlab.serve.protocol import StreamText

    rng = random.Random(1)
    for _ in range(500):
        stop = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 2))]
        full = "".join(rng.choice("ab \ufffd") for _ in range(rng.randint(0, 15)))
        hold = max((len(s) for s in stop), default=1) - 1
        st, sent = StreamText(stop), ""
        for i in range(len(full)):
            before = len(sent)
            sent += st.next(full[:i], False)
            # no partial character at the end, and the stop-string margin held back
            assert len(sent) <= max(before, len(full[:i].rstrip("\ufffd")) - hold)
            assert full.startswith(sent)
        cut = full[:rng.randint(len(sent), len(full))]   # the engine's final text: cut by a stop string
        sent += st.next(cut, True)
        assert sent == cut


def test_load_trace_is_seeded_and_shares_system_prompts():
    from kvlab.serve.loadgen import build_trace, summarize

    a, b = build_trace(40, 2.0, seed=3), build_trace(40, 2.0, seed=3)
    assert a == b and a != build_trace(40, 2.0, seed=4)
    assert all(x.arrival < y.arrival for x, y in zip(a, a[1:]))
    heads = [tuple(j.prompt[:64]) for j in a if len(j.prompt) > 64]
    assert 1 < len(set(heads)) < len(heads)   # some requests share one of a few system prompts
    assert all(len(j.prompt) + j.max_tokens <= 512 for j in a)
    results = [{"ok": True, "error": None, "tokens": 3, "ttft": t, "tpot": 0.1, "itl": [0.1, 0.1], "e2e": t + 0.2,
                "end": 10.0} for t in (0.5, 1.5, 5.0)] + [{"ok": False, "error": "HTTP 503", "tokens": 0,
                                                          "ttft": None, "tpot": None, "itl": [], "e2e": 1, "end": 9}]
    jobs = [a[0]] * 4
    s = summarize(results, jobs, ttft_slo=2.0, tpot_slo=0.2)
    assert s["completed"] == 3 and s["failed"] == 1 and s["errors"] == ["HTTP 503"]
    assert s["goodput"] == 2 / (10.0 - a[0].arrival) and s["slo_attainment"] == 0.5


def test_kvlab_serve_command_line():
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(sys.executable), "kvlab")   # the console script of pyproject.toml
    cmd = [script] if os.path.exists(script) else [sys.executable, "-m", "kvlab.cli"]
    out = subprocess.run([*cmd, "serve", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--max-model-len", "--kv-cache-dtype", "--enable-prefix-caching", "--no-enable-prefix-caching",
                 "--block-size", "--max-num-seqs", "--max-num-batched-tokens", "--attention-backend", "--host",
                 "--port", "--max-queue-len", "--fast"):
        assert flag in out.stdout, flag
    bad = subprocess.run([*cmd, "serve", "--kv-cache-dtype", "int3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "int3" in bad.stderr
    assert subprocess.run([*cmd, "launch"], capture_output=True, text=True, timeout=60).returncode == 2


def test_the_server_builds_and_steps_its_model_on_one_thread(monkeypatch):
    """`kvlab serve` loads the model on the thread that later steps it (kvlab.serve.engine_loop.
    engine_thread): a second thread running torch ops would keep a second OpenMP team, which on a
    2-core machine slowed every decode step from 18 to 25-27 ms. Checked without a socket: the
    model build and the app's executor are recorded, uvicorn is not started."""
    import threading

    import kvlab.engine.llm
    import kvlab.serve.app
    import kvlab.serve.cli as cli

    built, served = [], []

    class FakeLLM:
        def __init__(self, *a, **k):
            built.append((threading.current_thread(), torch.get_num_threads()))

    monkeypatch.setattr(cli, "load", lambda args: None)
    monkeypatch.setattr(kvlab.engine.llm, "LLM", FakeLLM)
    monkeypatch.setattr(kvlab.serve.app, "build_app", lambda llm, *a: served.append(a[-1]) or object())
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: None)
    before = torch.get_num_threads()
    try:
        cli.main(["--threads", "1"])
    finally:
        torch.set_num_threads(before)
    (thread, threads), = built
    assert thread is not threading.main_thread() and threads == 1
    assert served[0].submit(threading.current_thread).result() is thread   # the same thread steps it
    served[0].shutdown()
