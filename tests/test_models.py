"""Real models on the embedded cluster (three worker processes, simulated tiers):
minilm (sentence-transformers) on VRAM6, gemma-270m (llama.cpp) on VRAM12."""
from __future__ import annotations

import time

import numpy as np
import pytest

from cluster import connect
from cluster.config import ConfigError
from conftest import base_config

pytestmark = pytest.mark.slow


def loads(ai, model):
    """{worker name: times ``model`` was loaded there}."""
    def count(dask_worker, model=model):
        return dask_worker.plugins["aicluster-modelhost"].load_counts.get(model, 0)
    return {ai.client.scheduler_info()["workers"][a]["name"]: n for a, n in ai.client.run(count).items()}


def wait_metrics(ai, pred, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ws = ai.client.scheduler_info(n_workers=-1)["workers"].values()
        rows = {w["name"]: w["metrics"].get("aicluster", {}) for w in ws}
        if pred(rows):
            return rows
        time.sleep(0.2)
    raise AssertionError(f"metrics never matched: {rows}")


def test_generate_runs_on_vram12_and_a_second_call_does_not_reload(ai):
    r1 = ai.generate_now("The capital of France is", max_tokens=8)
    assert r1["worker"] == "pc1" and r1["tier"] == "VRAM12" and r1["simulated"] is True
    assert r1["completion_tokens"] > 0 and r1["text"].strip()
    before = loads(ai, "gemma-270m")
    r2 = ai.generate_now("Water boils at", max_tokens=8)
    assert r2["worker"] == "pc1" and r2["loaded_now"] is False
    # (other tests of the session cluster may have spread it to other tiers: count here)
    assert loads(ai, "gemma-270m") == before and before["pc1"] == 1


def test_greedy_generation_equals_in_process_llama_cpp(ai):
    from llama_cpp import Llama

    from workloads.backends.sources import resolve_source
    from workloads.backends.llamacpp import FLASH_ATTN_DEFAULT

    prompt = "Question: What is a GPU?\nAnswer:"
    got = ai.generate_now(prompt, max_tokens=24, temperature=0)
    llm = Llama(model_path=str(resolve_source(ai.config.models["gemma-270m"].source)), n_ctx=2048,
                n_threads=1, n_gpu_layers=0, flash_attn=FLASH_ATTN_DEFAULT, verbose=False)  # (the cluster's)
    try:
        want = llm.create_completion(prompt, max_tokens=24, temperature=0.0, top_k=1, repeat_penalty=1.0)
    finally:
        llm.close()
    assert got["text"] == want["choices"][0]["text"]
    assert got["completion_tokens"] == want["usage"]["completion_tokens"]


def test_a_list_of_prompts_keeps_order_and_stop_strings_cut(ai):
    futs = ai.generate(["One, two, three,", "Monday, Tuesday,"], max_tokens=12, stop=[","])
    out = ai.client.gather(futs)
    assert len(out) == 2 and all("," not in r["text"] for r in out)
    assert all(r["finish_reason"] in ("stop", "length") for r in out)
    alone = ai.generate_now("Monday, Tuesday,", max_tokens=12, stop=[","])
    assert alone["text"] == out[1]["text"]


def test_streaming_gives_the_same_text_in_pieces(ai):
    s = ai.generate("Once upon a time", max_tokens=20, stream=True)
    pieces = list(s)
    final = s.result()
    assert len(pieces) > 1
    assert "".join(pieces) == final["text"]


def test_embeddings_equal_in_process_and_keep_order_over_several_batches(ai):
    from sentence_transformers import SentenceTransformer

    from workloads.backends.sources import resolve_source

    texts = [f"passage {i}: {'GPUs and ' * (i % 7)}home lab number {i * 37 % 101}" for i in range(1200)]
    res = ai.embed(texts, chunk_size=300, details=True).result()
    emb = res["embeddings"]
    assert emb.shape == (1200, 384)
    assert len(res["batches"]) == 4 and {b["tier"] for b in res["batches"]} == {"VRAM6"}
    assert [b["offset"] for b in res["batches"]] == [0, 300, 600, 900]
    model = SentenceTransformer(str(resolve_source(ai.config.models["minilm"].source)), device="cpu")
    want = model.encode(texts, batch_size=64, convert_to_numpy=True)
    np.testing.assert_allclose(emb, want, rtol=1e-4, atol=1e-5)
    one = ai.embed_now(texts[5])
    np.testing.assert_allclose(one, want[5], rtol=1e-4, atol=1e-5)
    normed = ai.embed_now(texts[:10], normalize=True)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, rtol=1e-5)


def test_metrics_reach_scheduler_info_and_status(ai):
    ai.embed_now(["warm up"])
    rows = wait_metrics(ai, lambda r: "minilm" in r["pc2"].get("models", {}) and "gemma-270m" in r["pc1"].get("models", {}))
    pc1, pc2 = rows["pc1"], rows["pc2"]
    assert pc1["tier"] == "VRAM12" and pc1["simulated"] is True and pc1["memory_kind"] == "ram"
    from cluster.plugin import ram_budget

    assert pc1["budget"] == ram_budget(0.8, 6 * 10**9, 0.8)  # below Dask's pause threshold
    g = pc1["models"]["gemma-270m"]
    assert g["bytes"] > 100e6 and g["load_seconds"] > 0 and g["hits"] >= 1
    assert pc2["models"]["minilm"]["bytes"] > 50e6
    st = ai.status()
    text = str(st)
    assert "gemma-270m" in text and "minilm" in text and "simulated" in text


def test_resident_is_a_preference_not_a_pin():
    data = base_config()
    data["local"]["workers"] = [{"name": "a", "tier": "VRAM6", "nthreads": 1, "memory_limit": "3GB"},
                                {"name": "b", "tier": "VRAM6", "nthreads": 1, "memory_limit": "3GB"},
                                {"name": "idle", "tier": "CPU", "nthreads": 1, "memory_limit": "1GB"}]
    data["local"]["processes"] = False
    with connect(data, dashboard_port=0) as ai:
        first = ai.embed(["hello"], details=True).result()["batches"][0]["worker"]
        other = ({"a", "b"} - {first}).pop()
        wait_metrics(ai, lambda r: "minilm" in r[first].get("models", {}))
        # one call at a time goes where the model lives while that worker has a free slot:
        # the other worker of the tier need not load it
        for i in range(4):
            assert ai.embed([f"again {i}"], details=True).result()["batches"][0]["worker"] == first
        assert loads(ai, "minilm") == {first: 1, other: 0, "idle": 0}
        # a burst overflows to the rest of the tier, which loads the model once; the idle CPU
        # worker (no VRAM6 resource) takes none of it
        futs = [ai.embed([f"burst {i} " * 20], details=True) for i in range(12)]
        workers = [b["worker"] for f in futs for b in f.result()["batches"]]
        assert set(workers) == {first, other}, workers
        assert loads(ai, "minilm") == {first: 1, other: 1, "idle": 0}
        affinity = ai.client.run_on_scheduler(lambda dask_scheduler: vars(dask_scheduler.plugins["aicluster-affinity"]))
        assert affinity["pinned"] >= 5 and affinity["overflow"] >= 1


@pytest.mark.slow
def test_a_worker_that_joins_mid_batch_gets_work(tmp_path, env_with_tests):
    """Generations queue on the one VRAM12 worker holding the model; a second VRAM12 PC
    joins (`aicluster worker`) while they run and takes part of the rest, loading the model
    once: residency is a preference, not a pin."""
    import subprocess

    import yaml
    from distributed import as_completed

    from conftest import BIN

    data = base_config()
    data["models"]["gemma-270m"]["options"]["parallel"] = 1  # one at a time: a queue forms
    data["local"]["workers"] = [{"name": "pc1", "tier": "VRAM12", "nthreads": 1, "memory_limit": "3GB"}]
    data["local"]["processes"] = False
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(data))
    with connect(str(cfg), dashboard_port=0) as ai:
        ai.generate_now("warm up", max_tokens=2)
        wait_metrics(ai, lambda r: "gemma-270m" in r["pc1"].get("models", {}))
        queued = [ai.generate(f"Count to {i}: 1, 2,", max_tokens=24) for i in range(30)]  # all queued on pc1
        late = subprocess.Popen([str(BIN / "aicluster"), "worker", ai.scheduler_address, "--tier", "VRAM12", "--name",
                                 "pc9", "--config", str(cfg), "--host", "127.0.0.1"], env=env_with_tests,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            workers = [f.result()["worker"] for f in as_completed(queued)]
            assert workers.count("pc9") >= 3 and "pc1" in workers, workers  # it took part of the queue
            assert loads(ai, "gemma-270m") == {"pc1": 1, "pc9": 1}
            stats = ai.client.run_on_scheduler(lambda dask_scheduler: vars(dask_scheduler.plugins["aicluster-affinity"]))
            assert stats["pinned"] >= 1 and stats["overflow"] >= 20  # only what fit pc1's slot was pinned
        finally:
            late.terminate()
            late.wait(30)


def test_bad_input_is_refused_at_the_caller(ai):
    with pytest.raises(ConfigError, match="unknown model 'gpt-5'; models in .*: minilm, gemma-270m"):
        ai.generate("hi", model="gpt-5")
    with pytest.raises(ValueError, match="the list is empty"):
        ai.embed([])
    with pytest.raises(TypeError, match="text 1 is a int, not a string"):
        ai.embed(["ok", 3])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        ai.generate(["  "])
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        ai.generate("hi", max_tokens=0)
    with pytest.raises(ValueError, match="cannot embed texts; models that can: minilm"):
        ai.embed(["x"], model="gemma-270m")
    with pytest.raises(ValueError, match="cannot generate text; models that can: gemma-270m"):
        ai.generate("x", model="minilm")


def test_prompt_over_the_context_is_a_clear_error(ai):
    from workloads.backends import ContextTooLong

    long = "word " * 2100
    with pytest.raises(ContextTooLong, match=r"is \d+ tokens and asks for 16 more, but model 'gemma-270m' has a context of 2048"):
        ai.generate_now(long, max_tokens=16)
    with pytest.raises(ContextTooLong, match="prompt 1 is"):
        ai.generate_now(["short", long], max_tokens=16)


def test_text_over_the_embedding_window_is_an_error_unless_truncate(ai):
    from workloads.backends import InputError

    long = "token " * 400
    with pytest.raises(InputError, match="text 2 is \\d+ tokens; model 'minilm' reads at most 256"):
        ai.embed_now(["a", "b", long])
    assert ai.embed_now(["a", "b", long], truncate=True).shape == (3, 384)


def test_unload_then_use_reloads(ai):
    ai.embed_now(["x"])
    assert ai.unload("minilm")  # {worker: was_resident}
    rows = wait_metrics(ai, lambda r: "minilm" not in r["pc2"].get("models", {}))
    assert "minilm" not in rows["pc2"]["models"]
    before = loads(ai, "minilm")["pc2"]
    ai.embed_now(["y"])
    assert loads(ai, "minilm")["pc2"] == before + 1


def _malloc_trim(dask_worker=None):
    import os

    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def test_ai_workers_do_not_get_the_nannys_malloc_trim_setting(ai):
    # Dask's default (65536) slows torch inference by ~30% (see cluster.local.ai_worker_environ)
    assert set(ai.client.run(_malloc_trim).values()) == {None}
