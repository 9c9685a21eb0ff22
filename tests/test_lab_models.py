"""Models travel across the lab of hosts (tests/lab.py): the model file (an Ollama store) is
only on the scheduler's PC; the worker PCs fetch it over the cluster's TLS connections, on
links limited to 400 Mbit/s with tc, and generate what one machine generates.

* gpu1 fetches it from the scheduler PC;
* gpu2 fetches it from the scheduler PC and gpu1 while its cable is pulled for a few seconds
  in the middle: the transfer waits and goes on when the link is back;
* a chunk of the scheduler PC's file is corrupted on its disk (its modification time kept, so
  its cached hashes say otherwise): the cpu PC catches it by its SHA-256 and takes that chunk
  from another PC.

Needs root (network namespaces); skipped with the reason elsewhere."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from conftest import base_config
from lab import Lab, can_build, wait_for

pytestmark = [pytest.mark.skipif(can_build() is not None, reason=str(can_build())), pytest.mark.slow]

PCS = ["sched", "gpu1", "gpu2", "cpu", "client"]
PROMPTS = ["The three primary colors are", "Once upon a time"]
N = 16
MODELS = {"gemma-pc1": "VRAM12", "gemma-pc2": "VRAM6", "gemma-cpu": "CPU"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from test_sources import GEMMA, ollama_store
    from workloads.backends.sources import resolve_source

    folder = tmp_path_factory.mktemp("labmodels")
    store = ollama_store(folder / "ollama", resolve_source(GEMMA), copy=True)  # (its own bytes: corrupted below)

    def edit(pc, data):
        for name, tier in MODELS.items():  # one name per PC's tier: each PC fetches for itself
            data["models"][name] = {**data["models"]["gemma-270m"], "source": "ollama:gemma3:270m", "tier": tier}
        data["routing"]["fallback"] = {t: [] for t in data["tiers"]}

    def env(pc):  # each PC its own Ollama folder, model cache and hashes; the scheduler's the only store
        home = folder / pc
        return {"OLLAMA_MODELS": str(store if pc == "sched" else home / "ollama"),
                "AICLUSTER_MODEL_CACHE": str(home / "cache"), "AICLUSTER_DIGESTS": str(home / "digests")}

    with Lab(PCS, rate="400mbit") as lab:
        lab.configure(folder, tls=True, edit=edit, env=env)
        lab.store, lab.w = store, {}
        lab.scheduler()
        for pc, tier in (("gpu1", "VRAM12"), ("gpu2", "VRAM6"), ("cpu", "CPU")):
            lab.w[pc] = lab.worker(pc, tier)
        yield lab


@pytest.fixture(scope="module")
def reference():
    from cluster.config import load_config
    from workloads.backends import llamacpp

    m = llamacpp.load(load_config(base_config()).models["gemma-270m"], threads=1, name="gemma-270m")
    try:
        return [m.generate(p, max_tokens=N)["text"] for p in PROMPTS]
    finally:
        m.close()


def _generate(lab, model: str, tmp_path: Path, background: bool = False):
    prompts = tmp_path / f"{model}.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    out = tmp_path / f"{model}-answers.jsonl"
    args = ["aicluster", "generate", "--prompts", str(prompts), "-o", str(out), "--address", lab.addr, "--model", model,
            "--max-tokens", str(N), "--in-flight", "1"]
    if background:
        return lab.popen("client", args, lab.env["client"]), out
    r = lab.run("client", args, lab.env["client"], timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r, out


def _texts(out: Path) -> tuple[list[str], set[str]]:
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    return [rows[f"p{i}"]["text"] for i in range(len(PROMPTS))], {r["worker"] for r in rows.values()}


def _cached(lab, pc: str) -> list[Path]:
    return sorted((lab.folder / pc / "cache" / pc).glob("*/*.gguf"))


def test_a_worker_fetches_the_model_only_the_scheduler_pc_has(lab, reference, tmp_path):
    _, out = _generate(lab, "gemma-pc1", tmp_path)
    texts, workers = _texts(out)
    assert texts == reference and workers == {"gpu1"}
    (path,) = _cached(lab, "gpu1")
    (blob,) = [b for b in lab.store.glob("blobs/sha256-*") if b.stat().st_size > 1 << 20]
    assert path.read_bytes() == blob.read_bytes()
    assert not (lab.folder / "gpu1" / "ollama").exists()  # it never had it itself


def test_a_cable_pulled_during_the_transfer_waits_and_goes_on(lab, reference, tmp_path):
    gen, out = _generate(lab, "gemma-pc2", tmp_path, background=True)
    cache = lab.folder / "gpu2" / "cache" / "gpu2"
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size and (p.with_name(p.name + ".json")).exists() for p in cache.glob("*/*.part")):
        assert time.monotonic() < deadline and gen.poll() is None, "the transfer did not start"
        time.sleep(0.2)
    lab.cut("gpu2")
    try:
        time.sleep(6)
        unfinished = list(cache.glob("*/*.part"))  # the cut came in the middle of the transfer
    finally:
        lab.restore("gpu2")
    assert unfinished, "the transfer ended before the cable was pulled"
    log = wait_for(gen, "wrote 2 answers", timeout=400)
    assert gen.wait(60) == 0, log
    texts, workers = _texts(out)
    assert texts == reference and workers == {"gpu2"}
    assert len(_cached(lab, "gpu2")) == 1 and not list(cache.glob("*/*.part"))


def test_a_corrupted_chunk_is_caught_and_taken_from_another_pc(lab, reference, tmp_path, monkeypatch):
    from workloads.transfer import CHUNK, digest

    (blob,) = [p for p in lab.store.glob("blobs/sha256-*") if p.stat().st_size > CHUNK]
    monkeypatch.setenv("AICLUSTER_DIGESTS", lab.env["sched"]["AICLUSTER_DIGESTS"])
    digest(blob)  # the scheduler PC's hashes of its file, as its first answer made them (kept below)
    st = blob.stat()
    with open(blob, "r+b") as f:  # chunk 3: asked of the scheduler's PC first (holders in turn)
        f.seek(3 * CHUNK + 100)
        byte = f.read(1)
        f.seek(3 * CHUNK + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))  # (its cached hashes still apply)
    seen: list = []
    _, out = _generate(lab, "gemma-cpu", tmp_path)
    texts, workers = _texts(out)
    assert texts == reference and workers == {"cpu"}
    wait_for(lab.w["cpu"], "failed its SHA-256 check", timeout=30, seen=seen)
    line = next(x for x in seen if "failed its SHA-256 check" in x)
    assert "chunk 3 from the scheduler's PC" in line, line
