"""The soak can fail: a half-minute soak with a fault injected on purpose (worker pc1 drops
the reply of one generation: the scheduler never hears it finished) must report it, and
report nothing else (no kill, no restart: every other request is answered right)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_a_half_minute_soak_reports_a_dropped_reply(env_with_tests):
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "0.5", "--kill-every", "0",
                        "--no-restarts", "--deadline", "30", "--inject", "drop-reply"],
                       capture_output=True, text=True, timeout=600, env=env_with_tests)
    out = p.stdout
    assert p.returncode == 0, out[-3000:] + p.stderr[-3000:]
    m = re.search(r"RESULT soak lost=(\d+) target=0", out)
    assert m, out[-3000:]
    lost = int(m.group(1))
    assert lost >= 1, out  # the dropped reply is seen
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if len(cells) == 7 and cells[1].isdigit():
            rows[cells[0]] = dict(zip(("sent", "done", "lost", "late", "wrong", "duplicated"), map(int, cells[1:])))
    assert rows, out
    late = sum(r["late"] for r in rows.values())
    assert late >= 1 and late == lost, out  # ... as a request past its deadline, and nothing else failed
    assert all(r["lost"] == r["wrong"] == r["duplicated"] == 0 for r in rows.values()), out
    assert sum(r["done"] for r in rows.values()) > 10, out


def test_the_soak_lists_near_greedy_texts_and_nothing_else():
    """The soak's judges of a greedy answer, in-process. ``greedy_texts`` (the listing): with
    no margin it is llama-cpp-python's own greedy completion; with the soak's margin it holds
    more texts (the near-ties), each the length it must be, and not the repeated or cut text
    a fault gives. ``near_greedy`` (the decision): it takes the greedy text and every listed
    one, and refuses a repeated, cut or neighbour's text, and one run past a stop string."""
    sys.path.insert(0, str(ROOT / "bench"))
    from llama_cpp import Llama
    from soak import JUDGE_MARGIN, MARGIN, PROMPTS, greedy_texts, near_greedy

    from cluster.config import load_config
    from workloads.backends.sources import resolve_source

    llm = Llama(model_path=str(resolve_source(load_config().models["gemma-270m"].source)), n_ctx=512,
                n_threads=1, n_threads_batch=1, n_gpu_layers=0, verbose=False)
    try:
        want = llm.create_completion(PROMPTS[7], max_tokens=16, temperature=0.0, top_k=1, repeat_penalty=1.0)
        assert greedy_texts(llm, PROMPTS[7], 16, margin=0) == {want["choices"][0]["text"]}
        wide = set().union(*(greedy_texts(llm, p, 16, margin=MARGIN) for p in PROMPTS))
        assert want["choices"][0]["text"] in wide and len(wide) > len(PROMPTS)  # near-ties do occur
        assert all(len(llm.tokenize(t.encode(), add_bos=False)) <= 17 for t in wide)  # 16 tokens, give or take a merge
        text = want["choices"][0]["text"]
        assert text + text not in wide and text[: len(text) // 2] not in wide
        stopped = greedy_texts(llm, PROMPTS[7], 16, stop=["GPU"], margin=MARGIN)
        assert stopped and all("GPU" not in t for t in stopped)

        assert near_greedy(llm, PROMPTS[7], text, 16, margin=0)
        for p in PROMPTS[5:]:  # (each text costs an in-process run: three prompts' lists)
            for t in greedy_texts(llm, p, 16, margin=MARGIN):
                assert near_greedy(llm, p, t, 16, margin=JUDGE_MARGIN), (p, t)
        assert not near_greedy(llm, PROMPTS[7], text + text, 16, margin=JUDGE_MARGIN)
        assert not near_greedy(llm, PROMPTS[7], text[: len(text) // 2], 16, margin=JUDGE_MARGIN)
        other = next(iter(greedy_texts(llm, PROMPTS[0], 16, margin=0)))  # another prompt's answer
        assert other != text and not near_greedy(llm, PROMPTS[7], other, 16, margin=JUDGE_MARGIN)
        assert all(near_greedy(llm, PROMPTS[7], t, 16, stop=["GPU"], margin=JUDGE_MARGIN) for t in stopped)
        assert not near_greedy(llm, PROMPTS[7], text, 16, stop=["GPU"], margin=JUDGE_MARGIN) or "GPU" not in text
    finally:
        llm.close()
