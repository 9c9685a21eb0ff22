"""Models travel through the cluster: a worker that lacks a model's file gets it from a PC of
the cluster that has it, over the cluster's own connections (``cluster/plugin.py`` and
``cluster/scheduler.py`` carry the chunks as Dask comm messages: TLS when ``security.tls``
is on, no new port).

This module is the part that knows files, not Dask:

* ``digest(path)``: size, SHA-256 and one SHA-256 per chunk, computed once per file
  (size and modification time) and kept under ``~/.cache/aicluster/digests``;
* ``Holdings``: the files this process offers (a holder answers ``info`` and ``chunk``);
* ``ModelCache``: a worker's cache folder (``worker.model_cache``), a size limit, least
  recently used out first, never a file in use; one file lock per model, so two workers
  never write one file at once (the second waits and finds it there);
* ``fetch``: chunks from the holders, each checked against its hash (a corrupted one is
  fetched again, from another holder when there is one), written at its offset into a
  ``.part`` file whose record of done chunks makes an interrupted transfer resume; the
  whole file checked against the holder's SHA-256 before it is used; the space needed is
  checked before the first byte.

* ``Receiver``: the other direction, chunks pushed by a PC that cannot be asked (a client).

Why by hand: no library moves a file between the processes of a Dask cluster (Dask moves
task results, held in memory); a model file is GBs, so it goes in verified chunks, to disk.

Why this module is long: the pieces share one file format (``.part`` and its record, the
chunk hashes of ``digest``) and one cache, and a change to one is a change to the others;
the Dask side (who asks whom) is in ``cluster/modelfiles.py``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .backends.sources import SourceError

__all__ = ["CHUNK", "digest", "Holdings", "ModelCache", "PartFile", "Receiver", "Holder", "fetch", "FetchError",
           "fetchable", "default_cache_dir"]

logger = logging.getLogger("workloads.transfer")

#: bytes per chunk: one Dask message each
CHUNK = 8 * 2**20


class FetchError(SourceError):
    """A model file no PC of the cluster could give (the message names each PC and why)."""


def fetchable(source: str) -> bool:
    """Sources a worker may get from a peer: a path, ``ollama:`` and ``hf://`` (a ``package:``
    is installed with pip on each PC)."""
    return not source.startswith("package:")


def default_cache_dir(worker_name: str) -> Path:
    base = os.environ.get("AICLUSTER_MODEL_CACHE") or "~/.cache/aicluster/models"
    return Path(base).expanduser() / "".join(c if c.isalnum() or c in "-_." else "_" for c in worker_name)


# -- digests --------------------------------------------------------------------------------------
def _digest_dir() -> Path:
    return Path(os.environ.get("AICLUSTER_DIGESTS") or "~/.cache/aicluster/digests").expanduser()


def digest(path: Path, chunk: int = CHUNK) -> dict:
    """``{"size", "sha256", "chunk", "chunks": [sha256 of each chunk], "file": its name}`` of ``path``, computed
    once for this size and modification time (a holder hashes a 4 GB file once, not per fetch)."""
    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}|{chunk}".encode()).hexdigest()
    cached = _digest_dir() / f"{key}.json"
    try:
        return json.loads(cached.read_text())
    except (OSError, ValueError):
        pass
    whole = hashlib.sha256()
    parts = []
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            whole.update(block)
            parts.append(hashlib.sha256(block).hexdigest())
    name = path.name
    with open(path, "rb") as f:
        if f.read(4) == b"GGUF" and not name.endswith(".gguf"):
            name += ".gguf"  # (an Ollama blob is named by its digest)
    out = {"size": st.st_size, "sha256": whole.hexdigest(), "chunk": chunk, "chunks": parts, "file": name}
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(out))
        os.replace(tmp, cached)
    except OSError:  # a read-only home: computed again next time
        pass
    return out


class Holdings:
    """The model files this process offers to the cluster, by SHA-256: whole files, and the
    chunks of a file it is fetching itself (``share``), so that the next fetcher of the same
    file takes them from here and the source PC's uplink is not the limit."""

    def __init__(self) -> None:
        self.paths: dict[str, Path] = {}
        #: sha256 -> (the .part file, the set of chunks done in it (the fetch adds to it), info,
        #: the chunks on their way here now)
        self.partial: dict[str, tuple[Path, set, dict, set]] = {}
        self.partial_sources: dict[str, str] = {}
        self.lock = threading.Lock()

    def share(self, source: str, info: dict, part: Path, done: set, pending: set = frozenset()) -> None:
        with self.lock:
            self.partial[info["sha256"]] = (Path(part), done, info, pending)
            self.partial_sources[source] = info["sha256"]

    def unshare(self, source: str) -> None:
        with self.lock:
            sha = self.partial_sources.pop(source, None)
            self.partial.pop(sha, None)

    def partial_info(self, source: str) -> dict | None:
        """The holder info of ``source`` while it is being fetched here, with the chunks done
        (``partial``) and those on their way here (``pending``: another fetcher waits for them
        rather than asking the source PC for them too)."""
        with self.lock:
            sha = self.partial_sources.get(source)
            if sha is None or sha not in self.partial:
                return None
            _, done, info, pending = self.partial[sha]
            return {**info, "partial": sorted(done), "pending": sorted(set(pending) - set(done))}

    def offer(self, path: Path) -> dict:
        d = digest(path)
        with self.lock:
            self.paths[d["sha256"]] = Path(path)
        return d

    def read(self, sha256: str, index: int, chunk: int = CHUNK) -> bytes:
        with self.lock:
            path = self.paths.get(sha256)
            if path is not None and not path.is_file():  # evicted from the cache, or removed by hand:
                del self.paths[sha256]  # (a fetch of it again here offers its chunks meanwhile)
                path = None
            part = self.partial.get(sha256)
        if path is None and part is not None and index in part[1]:
            path = part[0]
        if path is None:
            raise FetchError(f"no file with SHA-256 {sha256[:12]} (or not its chunk {index}) is offered here")
        with open(path, "rb") as f:
            f.seek(index * chunk)
            return f.read(chunk)


# -- the cache --------------------------------------------------------------------------------------
class ModelCache:
    """A worker's model cache: ``<folder>/<sha256>/<file name>``, at most ``limit`` bytes."""

    def __init__(self, folder: Path, limit: int | None = None):
        self.folder = Path(folder).expanduser()
        self.limit = limit
        self.index = self.folder / "index.json"

    def _read(self) -> dict:
        try:
            return json.loads(self.index.read_text())
        except (OSError, ValueError):
            return {}

    def _write(self, data: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.index.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.index)

    def path_for(self, sha256: str, name: str) -> Path:
        return self.folder / sha256 / name

    def lookup(self, source: str) -> Path | None:
        """The cached file of ``source``, if a fetch finished (and it is still there)."""
        for sha, e in self._read().items():
            if source in e.get("sources", []):
                p = self.path_for(sha, e["name"])
                if p.is_file() and p.stat().st_size == e["size"]:
                    self.touch(sha)
                    return p
        return None

    def touch(self, sha256: str, source: str | None = None, name: str | None = None, size: int | None = None) -> None:
        from filelock import FileLock

        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.folder / "index.lock")):
            data = self._read()
            e = data.setdefault(sha256, {"sources": [], "name": name, "size": size})
            if source and source not in e["sources"]:
                e["sources"].append(source)
            e["last_use"] = time.time()
            self._write(data)

    def entries(self) -> list[dict]:
        """What is cached: sha256, name, size, sources, last use (newest first)."""
        out = [{"sha256": sha, **e} for sha, e in self._read().items() if self.path_for(sha, e["name"]).is_file()]
        return sorted(out, key=lambda e: -e.get("last_use", 0))

    def make_room(self, need: int, in_use: set[Path] = frozenset()) -> list[str]:
        """Evict least recently used files (never one in ``in_use``) until ``need`` more bytes
        fit the limit; the evicted SHA-256s. ``FetchError`` when even that is not enough."""
        if self.limit is None:
            return []
        from filelock import FileLock

        evicted = []
        with FileLock(str(self.folder / "index.lock")):
            data = self._read()
            held = {sha: e for sha, e in data.items() if self.path_for(sha, e["name"]).is_file()}
            total = sum(e["size"] for e in held.values())
            for sha, e in sorted(held.items(), key=lambda kv: kv[1].get("last_use", 0)):
                if total + need <= self.limit:
                    break
                path = self.path_for(sha, e["name"])
                if path.resolve() in {Path(p).resolve() for p in in_use}:
                    continue
                shutil.rmtree(path.parent, ignore_errors=True)
                data.pop(sha, None)
                total -= e["size"]
                evicted.append(sha)
                logger.info("model cache %s: evicted %s (%s, least recently used)", self.folder, e["name"], sha[:12])
            self._write(data)
        if total + need > self.limit:
            raise FetchError(f"the model cache {self.folder} holds at most {self.limit} bytes (worker.model_cache_size); "
                             f"{need} more do not fit beside the models in use: raise the limit or unload a model")
        return evicted


class PartFile:
    """A model file on its way into ``cache``: ``.part`` written at each chunk's offset, and
    ``.part.json``, the record of the chunks on disk for sure (a resumed transfer skips them).
    Made under the file's lock (``fetch``) or by the one receiver of a file (``Receiver``);
    the space needed is checked (after the cache made room) before the first byte."""

    def __init__(self, cache: "ModelCache", info: dict, source: str, in_use: set[Path] = frozenset()):
        self.cache, self.info, self.source = cache, info, source
        sha, size, chunk, name = info["sha256"], info["size"], info["chunk"], info["file"]
        self.target = cache.path_for(sha, name)
        self.part = self.target.with_name(name + ".part")
        self.record = self.target.with_name(name + ".part.json")
        self.done: set[int] = set()
        if self.part.exists():
            try:
                self.done = set(json.loads(self.record.read_text())["done"])
            except (OSError, ValueError, KeyError):
                self.done = set()
        have = sum(min(chunk, size - i * chunk) for i in self.done)
        cache.make_room(size, in_use)
        cache.folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(cache.folder).free
        if free < size - have:
            raise FetchError(f"model source {source!r}: {size - have} bytes are needed in {cache.folder}, only {free} "
                             f"are free on that disk; free some space or set worker.model_cache to another disk")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self.fd, size)

    def write(self, index: int, data: bytes) -> None:
        """Chunk ``index`` (checked against its hash first: ``FetchError`` if it is not it)."""
        if hashlib.sha256(data).hexdigest() != self.info["chunks"][index]:
            raise FetchError(f"chunk {index} of {self.info['file']} failed its SHA-256 check")
        os.pwrite(self.fd, data, index * self.info["chunk"])
        self.done.add(index)

    def save(self) -> None:  # what is on disk for sure: the next transfer resumes from it
        os.fsync(self.fd)
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"sha256": self.info["sha256"], "done": sorted(self.done)}))
        os.replace(tmp, self.record)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def finish(self) -> Path:
        """The whole file checked against the holder's SHA-256 and put in the cache: its path."""
        self.close()
        whole = hashlib.sha256()
        with open(self.part, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                whole.update(block)
        if whole.hexdigest() != self.info["sha256"]:
            self.part.unlink(missing_ok=True)
            self.record.unlink(missing_ok=True)
            raise FetchError(f"model source {self.source!r}: the fetched file's SHA-256 is not the holder's; it was "
                             f"removed (load again to fetch it anew)")
        os.replace(self.part, self.target)
        self.record.unlink(missing_ok=True)
        self.cache.touch(self.info["sha256"], self.source, self.info["file"], self.info["size"])
        return self.target


class Receiver:
    """Files pushed into ``cache`` chunk by chunk by a PC that cannot be asked for them (a
    client holds no server: ``cluster/modelfiles.py``'s ``offer_from_client`` sends its
    file to the scheduler's PC, which then offers it to the workers). ``begin`` says which
    chunks are still needed (an interrupted upload resumes), ``put`` checks each, ``end``
    checks the whole file. One upload of a file at a time."""

    def __init__(self, cache: "ModelCache", holdings: Holdings | None = None):
        self.cache, self.holdings = cache, holdings
        self.open: dict[str, PartFile] = {}
        self.lock = threading.Lock()

    def begin(self, source: str, info: dict) -> list[int]:
        sha = info["sha256"]
        with self.lock:
            target = self.cache.path_for(sha, info["file"])
            if target.is_file() and target.stat().st_size == info["size"]:
                self.cache.touch(sha, source, info["file"], info["size"])
                return []
            if sha not in self.open:
                self.open[sha] = PartFile(self.cache, info, source)
            file = self.open[sha]
        return [i for i in range(len(info["chunks"])) if i not in file.done]

    def put(self, sha256: str, index: int, data: bytes) -> None:
        file = self.open.get(sha256)
        if file is None:
            raise FetchError(f"no upload of SHA-256 {sha256[:12]} was begun here")
        file.write(index, data)
        if len(file.done) % 8 == 0:
            file.save()

    def end(self, sha256: str) -> str:
        with self.lock:
            file = self.open.pop(sha256, None)
        if file is None:
            raise FetchError(f"no upload of SHA-256 {sha256[:12]} was begun here")
        missing = len(file.info["chunks"]) - len(file.done)
        if missing:
            file.save()
            file.close()
            raise FetchError(f"the upload of {file.info['file']} lacks {missing} chunks (send them, then end again)")
        target = file.finish()
        if self.holdings is not None:
            self.holdings.offer(target)
        return str(target)


# -- fetching ----------------------------------------------------------------------------------------
@dataclass
class Holder:
    """A PC that has the file (``have`` None), or the chunks ``have`` of it (it is fetching
    it too, and ``pending`` are on their way to it): ``read(index) -> bytes`` of chunk ``index``."""

    name: str
    info: dict
    read: Callable[[int], bytes]
    have: set | None = None
    pending: set = field(default_factory=set)


#: seconds a chunk is tried for (every holder in turn, waiting longer each round) before the
#: fetch gives up: a cable pulled for a minute is waited for
PATIENCE = 120.0


#: seconds between two looks at who has which chunks (other fetchers progress meanwhile)
REFRESH = 0.5

#: seconds a fetcher waits for a chunk another fetcher is getting (then takes it from the
#: other PC's uplink) before it asks a whole file's holder for it too
WAIT_FOR_PEER = 10.0

_WAIT = -1  # (pick: every chunk left is on its way to another fetcher)


def region_pick(fresh: list[int], n: int, me: str, others: list[str]) -> int:
    """The chunk to ask the source for, of ``fresh`` (chunks nobody has or gets), when the
    fetchers ``others`` fetch the same file (of ``n`` chunks) too: each fetcher owns a share,
    the k-th of the sorted names the k-th n/m chunks, and takes its own first, in order; then
    the last fresh one before its share, at the end of the previous fetcher's share, farthest
    from where that one is taking its own (the two meet in the middle). Each decides from
    the names alone, so stale news of what the others get makes no two of them pick alike."""
    names = sorted({*others, me})
    m, k = len(names), names.index(me)
    lo, hi = k * n // m, (k + 1) * n // m
    mine = [c for c in fresh if lo <= c < hi]
    if mine:
        return min(mine)
    return max(fresh, key=lambda c: (c - lo) % n)


def fetch(source: str, holders: list[Holder], cache: ModelCache, in_use: set[Path] = frozenset(),
          progress: Callable[[float], None] | None = None, patience: float = PATIENCE,
          refresh: Callable[[], list[Holder]] | None = None, holdings: Holdings | None = None,
          start: int = 0, parallel: int = 3, me: str = "") -> Path:
    """Get ``source``'s file from ``holders`` into ``cache``; its path there.

    Each chunk is asked first of a PC that is fetching the same file and has it (to spare the
    source PC's uplink), else of the whole files' holders in turn (spread over them), and a
    chunk on its way to another fetcher is waited for (``WAIT_FOR_PEER`` s at most); again
    after a failed or corrupted one, for up to ``patience`` seconds. ``refresh()`` gives the
    holders anew (every ``REFRESH`` s); with ``holdings``, the chunks fetched here are offered
    to the others as they come. ``start``: the chunk to begin with (fetchers that begin at
    different places have more to give each other). ``parallel`` chunks are asked at once (one
    from a peer while another comes from the source). ``me``: this fetcher's name as the
    others see it (with it, each takes its own share of the file from the source)."""
    complete = [h for h in holders if h.have is None]
    if not holders:
        raise FetchError(f"model source {source!r}: no PC of the cluster has it")
    info = (complete or holders)[0].info
    same = [h for h in holders if h.info["sha256"] == info["sha256"]]
    sha, size, chunk, hashes, name = info["sha256"], info["size"], info["chunk"], info["chunks"], info["file"]
    from filelock import FileLock

    cache.folder.mkdir(parents=True, exist_ok=True)
    target = cache.path_for(sha, name)
    with FileLock(str(cache.folder / f"{sha}.lock")):  # one writer per file (the others wait, then find it)
        if target.is_file() and target.stat().st_size == size:
            cache.touch(sha, source, name, size)
            return target
        file = PartFile(cache, info, source, in_use)
        done, part, fd = file.done, file.part, file.fd
        save = file.save

        inflight: set[int] = set()
        if holdings is not None:
            holdings.share(source, {k: info[k] for k in ("size", "sha256", "chunk", "chunks", "file")}, part, done,
                           inflight)
        try:
            todo = [i for i in range(len(hashes)) if i not in done]
            k = start % len(todo) if todo else 0
            todo = todo[k:] + todo[:k]
            looked = time.monotonic()
            if done:
                logger.info("fetching %s: resuming, %d of %d chunks already here", name, len(done), len(hashes))
            last_report = 0.0
            remaining = list(todo)
            lock = threading.Lock()
            failed: list[FetchError] = []
            state = {"same": same, "looked": looked, "last_report": last_report, "waiting": None, "looking": False}

            def look() -> None:
                """Who has and gets which chunks now (one thread asks; the others go on meanwhile:
                over a busy LAN the answer takes a second or two)."""
                with lock:
                    if refresh is None or state["looking"] or time.monotonic() - state["looked"] <= REFRESH:
                        return
                    state["looking"] = True
                try:
                    fresh = [h for h in refresh() if h.info["sha256"] == sha]
                    error = None
                except Exception as e:  # (the holders known so far go on)
                    fresh, error = [], f"{type(e).__name__}: {e}"
                with lock:
                    state["same"] = fresh or state["same"]
                    state["looked"], state["looking"] = time.monotonic(), False
                    looks["n"] += 1
                    looks["with_peers"] += any(h.have is not None for h in fresh)
                    if error:
                        looks["failed"] += 1
                        looks["error"] = error

            def pick() -> int | None:
                look()
                with lock:
                    if failed:
                        return None
                    free = [c for c in remaining if c not in inflight]
                    if not free:
                        return None
                    # 1. a chunk another fetcher has comes from it (its uplink, not the source's)
                    peers = [h for h in state["same"] if h.have is not None]
                    at_peers = set().union(*(h.have for h in peers))
                    i = next((c for c in free if c in at_peers), None)
                    if i is not None:
                        state["waiting"] = None
                        return take(i, from_source=False)
                    # 2. from the source: while other fetchers fetch too, one chunk at a time
                    # here (the source's uplink is shared; this fetcher's other threads take
                    # the chunks the others bring), one nobody else has or is getting, from
                    # this fetcher's own share of the file (``region_pick``: what the others
                    # get is known only as of the last look, seconds old on a busy LAN)
                    if peers and source_reads[0] >= 1:
                        return _WAIT
                    elsewhere = set().union(*(h.pending for h in peers))
                    fresh = [c for c in free if c not in elsewhere]
                    if fresh:
                        state["waiting"] = None
                        return take(region_pick(fresh, len(hashes), me, [h.name for h in peers]) if peers and me
                                    else fresh[0], from_source=True)
                    # 3. every chunk left is on its way to another fetcher: wait for it (a while)
                    now = time.monotonic()
                    if state["waiting"] is None:
                        state["waiting"] = now
                    if now - state["waiting"] < WAIT_FOR_PEER:
                        return _WAIT
                    state["waiting"] = None
                    return take(free[0], from_source=True)

            served_by: dict[str, int] = {}  # (the log's summary: where the chunks came from)
            looks = {"n": 0, "with_peers": 0, "failed": 0, "error": "", "read_failed": 0, "read_error": ""}
            began = time.monotonic()
            source_reads = [0]  # chunks asked of a whole file's holder now (not of a peer)
            src_chunks: set[int] = set()

            def take(i: int, from_source: bool) -> int:
                if from_source:
                    source_reads[0] += 1
                    src_chunks.add(i)
                remaining.remove(i)
                inflight.add(i)
                return i

            def get(i: int) -> bytes | None:
                errors = []
                give_up = time.monotonic() + patience
                attempt = 0
                while attempt == 0 or time.monotonic() < give_up:
                    if failed:
                        return None
                    same_now = state["same"]
                    peers = [h for h in same_now if h.have is not None and i in h.have]
                    full = [h for h in same_now if h.have is None] or [h for h in same_now if h.have is not None]
                    full = full[i % len(full):] + full[:i % len(full)]  # spread over the whole files' holders
                    order = peers + full  # a peer that has it first; the next on a failure
                    h = order[attempt % len(order)]
                    attempt += 1
                    try:
                        got = h.read(i)
                    except Exception as e:  # a holder that left, a cut link: the next one, or again later
                        errors.append(f"{h.name}: {type(e).__name__}: {e}")
                        with lock:
                            looks["read_failed"] += 1
                            looks["read_error"] = errors[-1]
                        if h.have is not None:
                            h.have.discard(i)  # (a peer that lacks it after all: the others)
                        if attempt % len(order) == 0:
                            time.sleep(min(0.5 * attempt / len(order), 5))
                        continue
                    if hashlib.sha256(got).hexdigest() == hashes[i]:
                        with lock:
                            served_by[h.name] = served_by.get(h.name, 0) + 1
                        return got
                    errors.append(f"{h.name}: chunk {i} failed its SHA-256 check")
                    logger.warning("fetching %s: chunk %d from %s failed its SHA-256 check; fetching it again",
                                   name, i, h.name)
                    if attempt % len(order) == 0:
                        time.sleep(min(0.5 * attempt / len(order), 5))
                with lock:
                    failed.append(FetchError(
                        f"model source {source!r}: chunk {i} of {len(hashes)} could not be fetched: "
                        + "; ".join(errors[-4:]) + f" (the chunks fetched are kept in {part}: the next load resumes)"))
                return None

            def work() -> None:
                while True:
                    i = pick()
                    if i is None:
                        return
                    if i == _WAIT:
                        time.sleep(0.2)
                        continue
                    data = get(i)
                    if data is None:
                        return
                    os.pwrite(fd, data, i * chunk)
                    with lock:
                        done.add(i)
                        inflight.discard(i)
                        if i in src_chunks:
                            src_chunks.discard(i)
                            source_reads[0] -= 1
                        if len(done) % 8 == 0 or (not remaining and not inflight):
                            save()
                        frac = len(done) / len(hashes)
                        if frac - state["last_report"] >= 0.1 or frac == 1:
                            state["last_report"] = frac
                            logger.info("fetching %s: %.0f%% (%d of %d MB)", name, 100 * frac,
                                        len(done) * chunk // 2**20, size // 2**20)
                    if progress is not None:
                        progress(frac)

            threads = [threading.Thread(target=work, name=f"aicluster-fetch-{k}", daemon=True)
                       for k in range(max(1, min(parallel, len(todo))))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if failed:
                with lock:
                    save()
                raise failed[0]
            logger.info("fetched %s (%d MB) in %.1f s: chunks from %s; looked for other fetchers %d times, found "
                        "some %d times%s", name, size // 2**20, time.monotonic() - began,
                        ", ".join(f"{k} {v}" for k, v in sorted(served_by.items(), key=lambda kv: -kv[1])) or "none",
                        looks["n"], looks["with_peers"],
                        (f" ({looks['failed']} looks failed: {looks['error']})" if looks["failed"] else "")
                        + (f"; {looks['read_failed']} chunk reads failed (the last: {looks['read_error']})"
                           if looks["read_failed"] else ""))
        finally:
            file.close()
            if holdings is not None:
                holdings.unshare(source)
        target = file.finish()
        if holdings is not None:
            holdings.offer(target)
        return target
