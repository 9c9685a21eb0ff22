"""The main job (`aicluster demo`, `make demo`): one embedded cluster, every tier at work.

1. a routed job on each tier (which worker ran it);
2. the shipped corpus embedded on the VRAM6 worker;
3. questions embedded and matched to passages on the CPU worker (worker to worker, the
   corpus vectors never come back to the client);
4. answers generated on the VRAM12 worker with the best passage in the prompt;
5. the status table with resident models, and the dashboard address.
"""
from __future__ import annotations

import operator
import platform
import time

from distributed import as_completed, get_worker
from tqdm.auto import tqdm

from workloads.retrieval import load_corpus, top_k

QUESTIONS = [
    "How much memory does the RTX 3060 have?",
    "What does the nanny process do?",
    "Which file format does llama.cpp use?",
]


def whoami(tier: str) -> dict:
    w = get_worker()
    return {"asked": tier, "worker": str(w.name), "host": platform.node(), "resources": dict(w.state.total_resources)}


def prompt_for(question: str, passage: str) -> str:
    return f"Context: {passage}\nQuestion: {question}\nAnswer:"


def run_demo(config, dashboard_port: int = 0, max_tokens: int = 40) -> dict:
    from .client import connect

    t_start = time.perf_counter()
    print("Starting the embedded cluster (config: %s) ..." % (config.path or "dict"), flush=True)
    ai = connect(config, dashboard_port=dashboard_port)
    ran = []
    try:
        print(f"scheduler {ai.scheduler_address}, dashboard {ai.dashboard_link}\n")
        print(ai.status(), "\n", flush=True)

        print("1. A routed job on each tier")
        for tier in ai.config.tiers:
            r = ai.submit(whoami, tier, tier=tier).result()
            ran.append(("whoami", tier, r["worker"], None))

        corpus = load_corpus()
        emb_tier = ai.config.model("minilm").tier
        print(f"2. Embedding {len(corpus)} passages with minilm (tier {emb_tier}) ...", flush=True)
        t = time.perf_counter()
        corpus_f = ai.embed(corpus, model="minilm", normalize=True, details=True)
        corpus_out = corpus_f.result()
        for b in corpus_out["batches"]:
            ran.append((f"embed {b['n']} passages", emb_tier, b["worker"], b["seconds"]))
        print(f"   {corpus_out['embeddings'].shape} vectors in {time.perf_counter() - t:.1f} s (first call loads the model)")

        print(f"3. Embedding {len(QUESTIONS)} questions and finding the nearest passages on the CPU tier")
        q_f = ai.embed(QUESTIONS, model="minilm", normalize=True)
        vectors_f = ai.submit(operator.getitem, corpus_f, "embeddings", tier="CPU")
        hits = ai.submit(top_k, q_f, vectors_f, k=1, tier="CPU").result()
        ran.append(("top-k search", "CPU", _where(ai, vectors_f), None))

        gen_tier = ai.config.model("gemma-270m").tier
        print(f"4. Generating answers with gemma-270m (tier {gen_tier}) ...", flush=True)
        prompts = [prompt_for(q, corpus[i[0]]) for q, i in zip(QUESTIONS, hits["indices"])]
        futures = ai.generate(prompts, model="gemma-270m", max_tokens=max_tokens, stop=["\n", "Question:"])
        answers = {}
        order = {f.key: i for i, f in enumerate(futures)}
        for f in tqdm(as_completed(futures, loop=ai.client.loop), total=len(futures), desc="   answers", unit="answer"):
            answers[order[f.key]] = f.result()
        for i, q in enumerate(QUESTIONS):
            a = answers[i]
            ran.append((f"answer {i + 1}", gen_tier, a["worker"], a["total_seconds"]))
            print(f"\n   Q: {q}\n   passage: {corpus[hits['indices'][i][0]]}\n   A:{a['text']}")
            print(f"   ({a['completion_tokens']} tokens, {a['tokens_per_second']:.0f} tok/s, "
                  f"{'loaded the model' if a['loaded_now'] else 'model already resident'})")

        print("\n5. Which worker ran what")
        rows = ai.status()
        sim = {r["name"]: r["simulated"] for r in rows}
        print(f"   {'job':<24} {'tier asked':<11} {'worker':<8} {'hardware':<10} seconds")
        for job, tier, worker, secs in ran:
            hw = "simulated" if sim.get(worker) else "real"
            print(f"   {job:<24} {tier:<11} {worker:<8} {hw:<10} {'' if secs is None else f'{secs:.2f}'}")

        time.sleep(1.2)  # one heartbeat, so the table shows the resident models
        print("\n" + str(ai.status()))
        print(f"\ndashboard: {ai.dashboard_link}  (AI models page: {ai.dashboard_link.rsplit('/', 1)[0]}/individual-aicluster-models)")
        print(f"demo finished in {time.perf_counter() - t_start:.0f} s")
        return {"answers": [answers[i] for i in range(len(QUESTIONS))], "ran": ran}
    finally:
        ai.close()


def _where(ai, future) -> str:
    who = ai.client.who_has([future]).get(future.key) or []
    names = {a: r["name"] for r in ai.status() for a in [r["address"]]}
    return names.get(who[0], who[0]) if who else "?"
