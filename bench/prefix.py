"""Prompt-prefix reuse: the prefill of a chat's 5th turn with and without the cached prefix.

Two cases, each twice in the same run: to the model as configured (a finished request
leaves its KV cells in its slot, and the next turn is placed there and prefills only what
is new), and to the same model with ``prefix_cache: false`` (every turn prefilled from
scratch):

1. one 5-turn chat (a long system prompt, then question and answer turns; each turn's
   prompt is the whole conversation so far);
2. four users' chats taking turns, A B C D A B C D ... (``parallel: 8``): each user's turn
   5 must still find its own conversation cached after the other three ran.

Ends with ``RESULT prefix_reuse ratio=<x> target=2.0`` (case 1) and ``RESULT
prefix_reuse_4users ratio=<x> target=2.0`` (case 2, the worst of the four users), where
ratio = turn-5 prefill seconds without reuse / with reuse (higher is better).

    python bench/prefix.py [--turns 5] [--repeats 3]
"""
from __future__ import annotations

import argparse
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET = 2.0
SYSTEM = ("You are the assistant of a small home lab: a PC with a 12 GB RTX 3060, one with a 6 GB GTX 1660 and "
          "two machines without a GPU, joined into one Dask cluster. Answer in one or two sentences. ") * 8


def chat(ai, model: str, turns: int) -> list[dict]:
    prompt, out = SYSTEM, []
    for t in range(turns):
        prompt += f"\nUser: Question {t + 1}: which machine should run job number {t + 1}?\nAssistant:"
        r = ai.generate_now(prompt, model=model, max_tokens=24, stop=["\nUser:"])
        out.append(r)
        prompt += r["text"]
    return out


def users_taking_turns(ai, model: str, turns: int, users: str = "ABCD") -> dict[str, list[dict]]:
    """Each user's chat, one turn of each user after the other (A B C D A B C D ...)."""
    prompts = {u: f"User {u} of the lab speaks. " + SYSTEM for u in users}
    out: dict[str, list[dict]] = {u: [] for u in users}
    for t in range(turns):
        for u in users:
            prompts[u] += f"\nUser: {u} asks question {t + 1}: which machine should run job {t + 1}?\nAssistant:"
            r = ai.generate_now(prompts[u], model=model, max_tokens=24, stop=["\nUser:"])
            out[u].append(r)
            prompts[u] += r["text"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    from cluster import connect
    from cluster.config import load_config

    cfg = load_config().model_dump(exclude={"path"})
    cfg["local"]["workers"] = [{"name": "pc1", "tier": "VRAM12", "nthreads": 1, "memory_limit": "4GB"}]
    plain = copy.deepcopy(cfg["models"]["gemma-270m"])
    plain["options"]["prefix_cache"] = False
    cfg["models"]["gemma-no-cache"] = plain
    cfg["models"]["gemma-270m"]["options"]["parallel"] = 8
    with_reuse, without = [], []
    many_w: dict[str, list] = {}
    many_wo: dict[str, list] = {}
    with connect(cfg, dashboard_port=0) as ai:
        ai.generate_now("warm up", max_tokens=2)
        ai.generate_now("warm up", model="gemma-no-cache", max_tokens=2)
        for _ in range(a.repeats):
            r = chat(ai, "gemma-270m", a.turns)
            n = chat(ai, "gemma-no-cache", a.turns)
            with_reuse.append(r[-1])
            without.append(n[-1])
        for _ in range(a.repeats):
            for u, rs in users_taking_turns(ai, "gemma-270m", a.turns).items():
                many_w.setdefault(u, []).append(rs[-1])
            for u, rs in users_taking_turns(ai, "gemma-no-cache", a.turns).items():
                many_wo.setdefault(u, []).append(rs[-1])
    w = min(x["prefill_seconds"] for x in with_reuse)
    wo = min(x["prefill_seconds"] for x in without)
    last = with_reuse[-1]
    print("one worker, one process, llama.cpp 1 thread (options.n_threads), both sides alike")
    print(f"1. one chat, turn {a.turns}: {last['prompt_tokens']} prompt tokens, {last['cached_prompt_tokens']} of them "
          "reused")
    print(f"   prefill with reuse:    {w * 1000:7.1f} ms")
    print(f"   prefill without reuse: {wo * 1000:7.1f} ms (same model, prefix_cache: false)")
    print(f"2. four users taking turns (parallel: 8), turn {a.turns} of each:")
    ratios = {}
    for u in many_w:
        mw = min(x["prefill_seconds"] for x in many_w[u])
        mwo = min(x["prefill_seconds"] for x in many_wo[u])
        ratios[u] = mwo / mw
        lx = many_w[u][-1]
        print(f"   user {u}: {lx['prompt_tokens']} prompt tokens, {lx['cached_prompt_tokens']} reused; prefill "
              f"{mw * 1000:6.1f} ms with reuse, {mwo * 1000:6.1f} ms without ({ratios[u]:.2f}x)")
    print(f"RESULT prefix_reuse ratio={wo / w:.3f} target={TARGET}")
    print(f"RESULT prefix_reuse_4users ratio={min(ratios.values()):.3f} target={TARGET}")


if __name__ == "__main__":
    main()
