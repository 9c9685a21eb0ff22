"""Models travel through the cluster (workloads/transfer.py, cluster/modelfiles.py).

The fetch itself on real files (no cluster): chunks checked against their hashes (a corrupted
one is fetched again), an interrupted transfer resumed with only the missing chunks, the disk
space refused before the first byte, the cache's LRU limit that never evicts a file in use,
two fetchers of one file writing it once. Then a cluster of ``aicluster scheduler`` and
``aicluster worker`` processes, as on separate PCs: the model (an Ollama store) is only on
the scheduler's PC, the workers fetch it over the cluster's connections and generate what
the packaged model generates; a second load fetches nothing; a source no PC has is refused
naming every PC asked."""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
import yaml

from conftest import base_config, free_port
from workloads.transfer import FetchError, Holder, ModelCache, digest, fetch

CHUNK = 1 << 20


@pytest.fixture
def blob(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("AICLUSTER_DIGESTS", str(tmp_path / "digests"))
    path = tmp_path / "src" / "model.bin"
    path.parent.mkdir()
    path.write_bytes(os.urandom(5 * CHUNK + 12345))
    return path


def _reader(path: Path, log: list, fail_at: set = frozenset(), corrupt_once: set | None = None):
    def read(i: int) -> bytes:
        log.append(i)
        if i in fail_at:
            raise ConnectionError("the link is down")
        with open(path, "rb") as f:
            f.seek(i * CHUNK)
            data = f.read(CHUNK)
        if corrupt_once is not None and i in corrupt_once:
            corrupt_once.discard(i)
            return b"\0" + data[1:]
        return data

    return read


def test_a_corrupted_chunk_is_caught_and_fetched_again(blob, tmp_path):
    info = digest(blob, CHUNK)
    log: list = []
    cache = ModelCache(tmp_path / "cache")
    got = fetch("path", [Holder("pc1", info, _reader(blob, log, corrupt_once={2}))], cache)
    assert got.read_bytes() == blob.read_bytes()
    assert log.count(2) == 2 and len(log) == len(info["chunks"]) + 1


def test_an_interrupted_fetch_resumes_with_the_missing_chunks_only(blob, tmp_path):
    info = digest(blob, CHUNK)
    cache = ModelCache(tmp_path / "cache")
    first: list = []
    with pytest.raises(FetchError, match=r"chunk 3 of 6 could not be fetched.*the next load resumes"):
        fetch("path", [Holder("pc1", info, _reader(blob, first, fail_at={3}))], cache, patience=1.0,
              parallel=1)
    assert first[:4] == [0, 1, 2, 3] and set(first[3:]) == {3}  # chunk 3 tried again until the patience ran out
    again: list = []
    got = fetch("path", [Holder("pc2", info, _reader(blob, again))], cache)
    assert sorted(again) == [3, 4, 5]  # the chunks fetched before stayed
    assert hashlib.sha256(got.read_bytes()).hexdigest() == info["sha256"]
    assert cache.lookup("path") == got


def test_a_disk_without_room_is_refused_before_the_transfer(blob, tmp_path, monkeypatch):
    import shutil

    info = digest(blob, CHUNK)
    log: list = []
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(FetchError, match=rf"{info['size']} bytes are needed in .* only 1000 are free"):
        fetch("path", [Holder("pc1", info, _reader(blob, log))], ModelCache(tmp_path / "cache"))
    assert log == []


def test_the_cache_evicts_least_recently_used_never_a_file_in_use(blob, tmp_path):
    info = digest(blob, CHUNK)
    cache = ModelCache(tmp_path / "cache", limit=2 * info["size"] + 10)
    paths = []
    for k in range(2):
        other = tmp_path / "src" / f"m{k}.bin"
        other.write_bytes(os.urandom(info["size"]))
        d = digest(other, CHUNK)
        paths.append(fetch(f"m{k}", [Holder("pc1", d, _reader(other, []))], cache))
    # m0 is older but in use: a third file pushes out m1
    got = fetch("blob", [Holder("pc1", info, _reader(blob, []))], cache, in_use={paths[0]})
    assert paths[0].is_file() and not paths[1].exists() and got.is_file()
    assert [e["sources"] for e in cache.entries()] == [["blob"], ["m0"]]
    with pytest.raises(FetchError, match="holds at most"):
        ModelCache(tmp_path / "cache", limit=info["size"]).make_room(info["size"], in_use={paths[0], got})


def test_two_fetchers_of_one_file_write_it_once(blob, tmp_path):
    info = digest(blob, CHUNK)
    cache = ModelCache(tmp_path / "cache")
    log: list = []
    out: list = []
    threads = [threading.Thread(target=lambda: out.append(fetch("path", [Holder("pc1", info, _reader(blob, log))], cache)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(out) == 2 and out[0] == out[1] and sorted(log) == list(range(len(info["chunks"])))


@pytest.mark.slow
def test_workers_fetch_a_model_that_only_the_scheduler_pc_has(tmp_path, env_with_tests):
    from distributed import Client

    from procs import proc, read_until, run
    from test_sources import GEMMA, ollama_store
    from workloads.backends.sources import resolve_source

    store = ollama_store(tmp_path / "ollama", resolve_source(GEMMA))
    data = base_config()
    data["models"]["gemma-ollama"] = {**data["models"]["gemma-270m"], "source": "ollama:gemma3:270m", "tier": "VRAM6"}
    data["models"]["gemma-missing"] = {**data["models"]["gemma-ollama"], "source": "ollama:gemma3:9b"}
    data["models"]["gemma-270m"]["tier"] = "VRAM6"
    data["routing"]["fallback"]["VRAM6"] = []
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    pcs = {"scheduler": dict(env_with_tests, OLLAMA_MODELS=str(store))}
    for name in ("pc1", "pc2"):  # their Ollama folders are empty; their caches their own
        pcs[name] = dict(env_with_tests, OLLAMA_MODELS=str(tmp_path / name / "ollama"),
                         AICLUSTER_MODEL_CACHE=str(tmp_path / name / "cache"))
    sched_args = ["aicluster", "scheduler", "--port", str(port), "--dashboard-port", "0", "--config", str(cfg)]
    prompt = "The three primary colours are"
    with proc(sched_args, pcs["scheduler"]) as sched:
        read_until(sched, "scheduler at")
        with proc(["aicluster", "worker", addr, "--tier", "VRAM6", "--name", "pc1", "--config", str(cfg)], pcs["pc1"]), \
             proc(["aicluster", "worker", addr, "--tier", "VRAM6", "--name", "pc2", "--config", str(cfg)], pcs["pc2"]):
            from cluster import connect

            with Client(addr) as c:
                c.wait_for_workers(2, timeout=120)
            with connect(str(cfg), address=addr) as ai:
                want = ai.generate_now(prompt, model="gemma-270m", max_tokens=12)["text"]
                got = [ai.generate_now(prompt, model="gemma-ollama", max_tokens=12) for _ in range(2)]
                assert [g["text"] for g in got] == [want, want]

                def cache_of(dask_worker):
                    host = dask_worker.plugins["aicluster-modelhost"]
                    entries = host.model_cache.entries()
                    for e in entries:  # (when the file was written: a new fetch writes a new one)
                        e["mtime"] = host.model_cache.path_for(e["sha256"], e["name"]).stat().st_mtime_ns
                    return entries, host.load_counts.get("gemma-ollama", 0)

                state = ai.client.run(cache_of)
                fetched = {w: e for w, (e, _) in state.items() if e}
                assert len(fetched) >= 1
                for entries in fetched.values():
                    assert [e["sources"] for e in entries] == [["ollama:gemma3:270m"]]
                    assert entries[0]["size"] == resolve_source(GEMMA).stat().st_size
                assert sum(n for _, n in state.values()) == len(fetched)  # loaded once where it was fetched
                # unloaded and asked again: loaded from the cache, nothing fetched anew
                ai.unload("gemma-ollama")
                assert ai.generate_now(prompt, model="gemma-ollama", max_tokens=12)["text"] == want
                again = {w: e for w, (e, _) in ai.client.run(cache_of).items() if e}
                for w, entries in again.items():
                    assert len(entries) == 1
                    if w in fetched:
                        assert (entries[0]["sha256"], entries[0]["mtime"]) == (fetched[w][0]["sha256"],
                                                                               fetched[w][0]["mtime"])
                # `aicluster models`: what each PC's cache holds, in use by a resident model
                listed = run(["models", addr, "--json", "--config", str(cfg)], env_with_tests)
                assert listed.returncode == 0, listed.stderr
                caches = json.loads(listed.stdout)
                assert set(caches) == {"pc1", "pc2"}
                held = [(name, e) for name, c in caches.items() for e in c["entries"]]
                assert held and all(e["sources"] == ["ollama:gemma3:270m"] for _, e in held)
                table = run(["models", addr, "--config", str(cfg)], env_with_tests).stdout
                assert held[0][1]["sha256"][:12] in table and "ollama:gemma3:270m" in table and "yes" in table
                # a tag no PC has: one line naming each PC asked
                with pytest.raises(FetchError) as e:
                    ai.generate_now(prompt, model="gemma-missing", max_tokens=4)
                msg = str(e.value)
                assert "no PC of the cluster has it" in msg and "the scheduler's PC" in msg, msg
                assert "Ollama has not pulled gemma3:9b" in msg and ("pc1" in msg and "pc2" in msg), msg


def test_a_second_fetcher_takes_chunks_from_the_first(tmp_path, monkeypatch):
    """Two workers fetch one file at once from one source (its uplink slow: 0.05 s a chunk),
    beginning at different chunks: each offers the chunks it has (``Holdings``), and each
    takes from the other what the other has, so the source serves fewer chunks than twice
    the file."""
    import time

    import workloads.transfer as transfer
    from workloads.transfer import Holdings

    monkeypatch.setenv("AICLUSTER_DIGESTS", str(tmp_path / "digests"))
    monkeypatch.setattr(transfer, "REFRESH", 0.05)
    path = tmp_path / "model.bin"
    path.write_bytes(os.urandom(24 * CHUNK))
    info = digest(path, CHUNK)
    n = len(info["chunks"])
    served: list = []

    def slow(i: int) -> bytes:
        time.sleep(0.05)
        return _reader(path, served)(i)

    source = Holder("sched", info, slow)
    shops = {"a": Holdings(), "b": Holdings()}
    peer_reads = {"a": 0, "b": 0}

    def peer(name: str) -> Holder:
        part = shops[name].partial_info("m")
        have = set(part["partial"]) if part else set()

        def read(i: int) -> bytes:
            peer_reads[name] += 1
            return shops[name].read(info["sha256"], i, CHUNK)

        return Holder(name, info, read, have if part else set())

    out = {}

    def run(me: str, other: str, start: int) -> None:
        out[me] = fetch("m", [source], ModelCache(tmp_path / me), holdings=shops[me], start=start,
                        refresh=lambda: [source, peer(other)])

    threads = [threading.Thread(target=run, args=("a", "b", 0)), threading.Thread(target=run, args=("b", "a", n // 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert out["a"].read_bytes() == out["b"].read_bytes() == path.read_bytes()
    assert len(served) < 2 * n and peer_reads["a"] + peer_reads["b"] == 2 * n - len(served), (len(served), peer_reads)
    assert peer_reads["a"] > 0 and peer_reads["b"] > 0


def test_fetchers_wait_for_a_chunk_another_is_getting_rather_than_ask_the_source_again(tmp_path, monkeypatch):
    """Three workers fetch one file at once, all beginning at chunk 0 (the worst case: each
    would ask the source for the same chunks). Each advertises the chunks on their way to it
    (``pending``), the others wait for those and take them from it, so the source's slow
    uplink sends the file about once, not three times (``bench/transfer.py``'s fetch_fanout
    measures the time this saves on the lab)."""
    import time

    import workloads.transfer as transfer
    from workloads.transfer import Holdings

    monkeypatch.setenv("AICLUSTER_DIGESTS", str(tmp_path / "digests"))
    monkeypatch.setattr(transfer, "REFRESH", 0.02)
    path = tmp_path / "model.bin"
    path.write_bytes(os.urandom(30 * CHUNK))
    info = digest(path, CHUNK)
    n = len(info["chunks"])
    served: list = []
    uplink = threading.Lock()  # one chunk at a time leaves the source PC

    def slow(i: int) -> bytes:
        with uplink:
            time.sleep(0.05)
            return _reader(path, served)(i)

    source = Holder("sched", info, slow)
    shops = {k: Holdings() for k in "abc"}

    def peer(name: str) -> Holder:
        part = shops[name].partial_info("m")

        def read(i: int) -> bytes:
            return shops[name].read(info["sha256"], i, CHUNK)

        return Holder(name, info, read, set(part["partial"]) if part else set(),
                      set(part["pending"]) if part else set())

    out = {}

    def run(me: str) -> None:
        out[me] = fetch("m", [source], ModelCache(tmp_path / me), holdings=shops[me], start=0,
                        refresh=lambda: [source] + [peer(o) for o in shops if o != me])

    threads = [threading.Thread(target=run, args=(k,)) for k in shops]
    for t in threads:
        t.start()
        time.sleep(0.03)  # (each sees the one before it at its first look)
    for t in threads:
        t.join(120)
    assert all(out[k].read_bytes() == path.read_bytes() for k in shops)
    assert len(served) < 1.5 * n, f"the source sent {len(served)} chunks of a {n}-chunk file to three fetchers"


@pytest.mark.slow
def test_a_model_only_the_clients_pc_has_goes_to_the_scheduler_pc_and_on_to_the_workers(tmp_path, env_with_tests,
                                                                                          monkeypatch):
    """The file is in this (client) process's Ollama store only: the scheduler's PC and the
    worker PC have empty stores and caches of their own. The first generation sends it to
    the scheduler's PC (``offer_from_client``), the worker fetches it from there, and the
    dashboard's transfer table (``/aicluster/transfers.json``) shows that fetch done."""
    import urllib.request

    from distributed import Client

    from procs import proc, read_until
    from test_sources import GEMMA, ollama_store
    from workloads.backends.sources import resolve_source

    gemma = resolve_source(GEMMA)
    store = ollama_store(tmp_path / "ollama", gemma)
    data = base_config()
    data["models"]["gemma-ollama"] = {**data["models"]["gemma-270m"], "source": "ollama:gemma3:270m", "tier": "VRAM6"}
    data["models"]["gemma-270m"]["tier"] = "VRAM6"
    data["routing"]["fallback"]["VRAM6"] = []
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    pcs = {name: dict(env_with_tests, OLLAMA_MODELS=str(tmp_path / name / "ollama"),
                      AICLUSTER_MODEL_CACHE=str(tmp_path / name / "cache")) for name in ("sched", "pc1")}
    monkeypatch.setenv("OLLAMA_MODELS", str(store))  # (this process: the client's PC)
    sched_args = ["aicluster", "scheduler", "--port", str(port), "--dashboard-port", "0", "--config", str(cfg)]
    prompt = "The three primary colours are"
    with proc(sched_args, pcs["sched"]) as sched:
        read_until(sched, "scheduler at")
        with proc(["aicluster", "worker", addr, "--tier", "VRAM6", "--name", "pc1", "--config", str(cfg)], pcs["pc1"]):
            from cluster import connect

            with Client(addr) as c:
                c.wait_for_workers(1, timeout=120)
            with connect(str(cfg), address=addr) as ai:
                want = ai.generate_now(prompt, model="gemma-270m", max_tokens=12)["text"]
                assert ai.generate_now(prompt, model="gemma-ollama", max_tokens=12)["text"] == want
                held = {p.name: p.stat().st_size for p in (tmp_path / "sched" / "cache").rglob("*") if p.is_file()
                        and not p.name.endswith((".json", ".part"))}
                assert gemma.stat().st_size in held.values(), held  # the scheduler's PC has it now
                fetched = ai.client.run(lambda dask_worker: dask_worker.plugins["aicluster-modelhost"]
                                        .model_cache.entries())
                (entries,) = fetched.values()
                assert [e["sources"] for e in entries] == [["ollama:gemma3:270m"]]
                url = ai.client.dashboard_link.rsplit("/", 1)[0] + "/aicluster/transfers.json"
                with urllib.request.urlopen(url, timeout=30) as r:
                    rows = json.loads(r.read())["transfers"]
                done = [r for r in rows if r["worker"] == "pc1" and r["model"] == "gemma-ollama"]
                assert done and done[-1]["state"] == "done" and done[-1]["progress"] == 1.0, rows
                assert done[-1]["holders"] == "the scheduler's PC" and done[-1]["size"] == gemma.stat().st_size


def test_fetchers_that_know_of_each_other_take_distinct_shares_from_the_source():
    """What each fetcher asks the source for is decided from the fetchers' names alone, so
    three fetchers with the same (or the same stale) view never pick the same chunk: each its
    own third, in order; then the far end of the previous one's third."""
    from workloads.transfer import region_pick

    n, names = 30, ["w1", "w2", "w3"]
    fresh = list(range(n))
    picks = {me: region_pick(fresh, n, me, [o for o in names if o != me]) for me in names}
    assert picks == {"w1": 0, "w2": 10, "w3": 20}
    # w2's own third is done or on its way: the last fresh chunk of w1's third (w1 works up from 0)
    fresh = [c for c in range(n) if not 10 <= c < 20 and c not in (0, 1, 2)]
    assert region_pick(fresh, n, "w2", ["w1", "w3"]) == 9
    # the first fetcher wraps around to the end of the last one's third
    assert region_pick([c for c in range(n) if c >= 10], n, "w1", ["w2", "w3"]) == 29


def test_a_file_gone_from_the_cache_is_not_offered_but_its_new_fetch_is(tmp_path, monkeypatch):
    """A worker offered a file, the file left its cache (evicted, or removed by hand) and the
    worker fetches it again: other fetchers get the chunks it has so far, not an error."""
    from workloads.transfer import FetchError, Holdings

    monkeypatch.setenv("AICLUSTER_DIGESTS", str(tmp_path / "digests"))
    path = tmp_path / "model.bin"
    path.write_bytes(os.urandom(3 * CHUNK))
    shop = Holdings()
    info = shop.offer(path)
    path.unlink()
    part = tmp_path / "model.bin.part"
    part.write_bytes(path_bytes := os.urandom(CHUNK))
    shop.share("m", info, part, {0})
    assert shop.read(info["sha256"], 0, CHUNK) == path_bytes
    with pytest.raises(FetchError, match="not its chunk 1"):
        shop.read(info["sha256"], 1, CHUNK)
