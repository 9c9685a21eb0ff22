"""Pipelines, fan-out patterns, batches and the job board on real clusters.

Stage functions come from tests/pipe_helpers.py (deterministic sleeps and constants) on an
in-process cluster; the RAG pipeline and cancellation use the real models on the session
cluster. Tiers are forced, so simulated."""
from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest

from conftest import BIN
from cluster.pipeline import PipelineError, StageFailed


def test_parallel_branches_overlap_on_their_tiers_and_feed_the_join(tiers):
    spec = {"name": "diamond", "stages": {
        "a": {"kind": "pipe_helpers:sleepy", "tier": "VRAM12", "args": {"seconds": 1.0, "tag": "a"}},
        "b": {"kind": "pipe_helpers:sleepy", "tier": "VRAM6", "args": {"seconds": 1.0, "tag": "b"}},
        "c": {"kind": "pipe_helpers:join", "tier": "CPU", "args": ["$a", "$b"]},
    }}
    r = tiers.run_pipeline(spec)
    assert r["c"] == "a+b" and r.output == "a+b"
    assert {k: v["worker"] for k, v in r.stages.items()} == {"a": "pc1", "b": "pc2", "c": "cpu"}
    (a0, a1), (b0, b1), (c0, _) = r.spans["a"], r.spans["b"], r.spans["c"]
    assert a0 < b1 and b0 < a1, "the independent stages did not run at the same time"
    assert c0 >= max(a1, b1)
    table = str(r)
    assert "VRAM12" in table and "simulated" in table


@pytest.mark.parametrize("stages, message", [
    ({"a": {"kind": "pipe_helpers:join", "args": ["$b"]}, "b": {"kind": "pipe_helpers:join", "args": ["$a"]}},
     "form a cycle"),
    ({"a": {"kind": "pipe_helpers:join", "args": ["$nothere"]}},
     "stage 'a': refers to 'nothere', which is neither a stage nor a param"),
    ({"a": {"kind": "generate", "model": "gpt-5", "prompt": "hi"}}, "stage 'a': unknown model 'gpt-5'"),
    ({"a": {"kind": "translate"}}, "stage 'a': unknown kind 'translate'"),
    ({"a": {"kind": "embed", "model": "minilm", "texts": "x", "tierr": "CPU"}}, "stage 'a': unknown key(s) tierr"),
    ({"a": {"kind": "generate", "model": "minilm", "prompt": "x"}}, "stage 'a': model 'minilm' (sentence_transformers) cannot generate"),
    ({"a": {"kind": "generate", "model": "gemma-270m", "prompt": "x", "options": {"max_tokens": 0}}},
     "options.max_tokens must be a positive integer"),
    ({"a": {"kind": "no_such_module:fn"}}, "stage 'a': kind 'no_such_module:fn' cannot be imported"),
    ({"a": {"kind": "generate", "model": "gemma-270m", "prompt": "{a"}}, "stage 'a': bad template"),
])
def test_spec_errors_are_raised_before_anything_is_submitted(tiers, stages, message):
    before = len(tiers.jobs())
    with pytest.raises(PipelineError) as e:
        tiers.pipeline({"name": "bad", "stages": stages})
    assert message in str(e.value)
    assert len(tiers.jobs()) == before


def test_a_stage_that_fails_is_named(tiers):
    spec = {"name": "oops", "stages": {"ok": {"kind": "pipe_helpers:sleepy", "args": [0, "x"]},
                                       "bad": {"kind": "pipe_helpers:fail", "args": ["$ok"]}}}
    with pytest.raises(StageFailed, match="pipeline 'oops', stage 'bad' failed: ValueError: this stage always fails"):
        tiers.run_pipeline(spec)
    failed = [j for j in tiers.jobs(state="failed") if j["what"] == "pipeline oops: bad"]
    assert failed and "always fails" in failed[-1]["error"]


def test_params_and_templates(tiers):
    spec = {"name": "tmpl", "params": {"who": "world"},
            "stages": {"greet": {"kind": "pipe_helpers:join", "args": ["hello {who}", "{{literal}}"]}}}
    assert tiers.run_pipeline(spec, who="lab").output == "hello lab+{literal}"
    with pytest.raises(PipelineError, match="param 'whom' is not declared"):
        tiers.pipeline(spec, whom="x")


def test_first_returns_before_the_slow_branch_and_cancels_it(tiers):
    res = tiers.fan_out("x", [
        {"name": "slow", "kind": "pipe_helpers:sleepy", "tier": "VRAM12", "args": [3.0, "slow"]},
        {"name": "fast", "kind": "pipe_helpers:sleepy", "tier": "VRAM6", "args": [0.1, "fast"]},
    ], aggregate="first")
    assert res.value == "fast" and res.winner == "fast" and res.workers["fast"] == "pc2"
    assert res.cancelled == ["slow"]
    time.sleep(0.5)
    slow = [j for j in tiers.jobs() if j["what"] == "fan-out: slow"][-1]
    assert slow["state"] == "cancelled"


def test_majority_weighted_average_and_ensemble(tiers):
    votes = [{"name": n, "kind": "pipe_helpers:constant", "args": ["$input", v]}
             for n, v in (("m1", "cat"), ("m2", "dog"), ("m3", " cat "))]
    res = tiers.fan_out("photo.jpg", votes, aggregate="majority")
    assert res.value == "cat" and res.winner == "m1" and res.votes == {"cat": 2, "dog": 1}

    nums = [{"name": n, "kind": "pipe_helpers:constant", "args": ["$input", v]} for n, v in (("lo", 1.0), ("hi", 3.0))]
    assert tiers.fan_out(0, nums, aggregate="weighted_average").value == 2.0
    assert tiers.fan_out(0, nums, aggregate="weighted_average", weights=[1, 3]).value == 2.5
    arrs = [{"name": n, "kind": "pipe_helpers:constant", "args": ["$input", v]} for n, v in (("a", [0.0, 2.0]), ("b", [2.0, 4.0]))]
    np.testing.assert_allclose(tiers.fan_out(0, arrs, aggregate="weighted_average").value, [1.0, 3.0])
    with pytest.raises(TypeError, match="branch 'm1' returned str"):
        tiers.fan_out(0, votes, aggregate="weighted_average")

    res = tiers.fan_out("x", votes, aggregate="ensemble", combine=lambda outs: sorted(o.strip() for o in outs))
    assert res.value == ["cat", "cat", "dog"]
    assert tiers.fan_out("x", votes, aggregate="all").value == {"m1": "cat", "m2": "dog", "m3": " cat "}
    with pytest.raises(ValueError, match="aggregate 'mean' is not one of first, all, majority"):
        tiers.fan_out("x", votes, aggregate="mean")


def test_batch_keeps_order_and_bounds_work_in_flight(tiers):
    import pipe_helpers

    tiers.client.run(pipe_helpers.reset_counter)
    out = tiers.batch("pipe_helpers:counted", list(range(10)), in_flight=2, progress=False)
    assert out == [i * 2 for i in range(10)]
    # in-process workers share the module, so its counter sees every worker at once
    assert pipe_helpers.read_counter()["max"] == 2
    res = tiers.batch({"kind": "pipe_helpers:fail"}, [1, 2], progress=False, errors="return")
    assert all(isinstance(r, ValueError) for r in res)


def test_job_board_lists_states_tiers_and_workers(tiers):
    f = tiers.submit(pipe_helpers_sleep, 0.1, tier="VRAM6")
    f.result()
    row = tiers.job(f)
    assert row["state"] == "done" and row["tier"] == "VRAM6" and row["worker"] == "pc2"
    with pytest.raises(ValueError, match="state 'finished' is not one of"):
        tiers.jobs(state="finished")
    assert "pc2" in str(tiers.jobs(state="done"))


def pipe_helpers_sleep(s):
    time.sleep(s)
    return s


@pytest.mark.slow
def test_rag_pipeline_puts_the_retrieved_passages_in_the_prompt(ai):
    r = ai.run_pipeline("rag", question="How much memory does the RTX 3060 have?", k=2)
    passages = r["retrieve"]
    assert len(passages) == 2 and "RTX 3060" in passages[0]
    prompt = r["answer"]["prompt"]
    assert all(p in prompt for p in passages)
    assert prompt.endswith("Question: How much memory does the RTX 3060 have?\nAnswer:")
    where = {k: (v["worker"], v["tier"]) for k, v in r.stages.items()}
    assert where["passage_vectors"] == ("pc2", "VRAM6") and where["question_vector"] == ("pc2", "VRAM6")
    assert where["retrieve"] == ("cpu", "CPU") and where["answer"] == ("pc1", "VRAM12")
    assert r["passage_vectors"].shape == (30, 384)


@pytest.mark.slow
def test_cancelling_a_running_generation_stops_it_within_a_few_tokens(ai):
    f = ai.generate("1, 2, 3, 4, 5, 6, 7, 8,", max_tokens=1500)
    deadline = time.monotonic() + 60
    while ai.job(f)["state"] != "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # some tokens in
    ai.cancel(f)
    events = []
    while not events and time.monotonic() < deadline + 60:
        events = [e for _, e in ai.client.get_events("aicluster-cancelled") if e["key"] == f.key]
        time.sleep(0.1)
    assert events, "the generation never reported being cancelled"
    assert 0 < events[0]["completion_tokens"] < 1500
    assert ai.job(f.key)["state"] == "cancelled"
    # and the worker is free again at once
    assert ai.generate_now("Hello", max_tokens=2)["worker"] == "pc1"


@pytest.mark.slow
def test_pipeline_and_jobs_commands(ai, env_with_tests):
    r = subprocess.run([str(BIN / "aicluster"), "pipeline", "rag", "--set", "question=Which file format does llama.cpp use?",
                        "--address", ai.scheduler_address, "--json"], env=env_with_tests, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["output_stage"] == "answer"
    assert "Which file format does llama.cpp use?" in out["stages"]["answer"]["output"]["prompt"]
    assert out["stages"]["retrieve"]["worker"] == "cpu"
    jobs = subprocess.run([str(BIN / "aicluster"), "jobs", ai.scheduler_address, "--state", "done"],
                          env=env_with_tests, capture_output=True, text=True, timeout=120)
    assert jobs.returncode == 0, jobs.stderr
    assert "pipeline rag: answer" in jobs.stdout and "pc1" in jobs.stdout
    bad = subprocess.run([str(BIN / "aicluster"), "pipeline", "rag", "--set", "questoin=x"], env=env_with_tests,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "param 'questoin' is not declared" in bad.stderr
