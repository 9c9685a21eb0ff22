"""Models travel through the cluster (README, "Models on several PCs"): the Dask side.

Every worker (``ModelHost``) and the scheduler (``ModelFiles``, a scheduler plugin) answer
two comm messages on the connections the cluster already has (TLS with ``security.tls``;
no new port): ``aicluster_model_info(source)`` (the size, SHA-256 and chunk hashes of the
file this process resolves ``source`` to, or what it lacks) and
``aicluster_model_chunk(sha256, index)`` (one chunk). The scheduler also answers
``aicluster_model_holders(source)``: it asks itself and every worker at once. A worker
that must load a model whose file it lacks asks the scheduler who has it and fetches it
into its cache (``workloads/transfer.py``); a second load finds it there.

A client holds no server, so nobody can ask it for a file: when a model's file is on the
client's PC only, the client sends it to the scheduler's PC first (``offer_from_client``,
``aicluster_model_upload_*``; into the scheduler's model cache), which then offers it to
the workers like its own. The scheduler also keeps the workers' fetch progress (their
``aicluster-load`` events) for the dashboard page and ``/aicluster/transfers.json``.

What a member may read: any file a source string resolves to on the PC asked (a path, an
Ollama blob, a Hugging Face cache file). That is no new access: a member of a Dask cluster
can run any function on every PC (``client.run``), which is why the cluster's connections
need ``security.tls`` beyond a trusted LAN (README, "Security").
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from distributed.diagnostics.plugin import SchedulerPlugin

from workloads.backends.sources import local_path, why_missing
from workloads.host import PLUGIN_NAME
from workloads.transfer import (FetchError, Holder, Holdings, ModelCache, Receiver, default_cache_dir, digest, fetch,
                                fetchable)

__all__ = ["ModelFiles", "serve_model_files", "fetch_model", "offer_from_client", "cache_listing", "format_caches",
           "INFO_OP", "CHUNK_OP", "HOLDERS_OP"]

logger = logging.getLogger("cluster.modelfiles")

INFO_OP, CHUNK_OP, HOLDERS_OP = "aicluster_model_info", "aicluster_model_chunk", "aicluster_model_holders"
#: seconds a holder has to answer ``info`` (its first answer for a file hashes it)
INFO_TIMEOUT = 600


def serve_model_files(server, holdings: Holdings, cache: ModelCache | None = None) -> None:
    """Make ``server`` (a worker or the scheduler) answer ``info`` and ``chunk`` for the model
    files it can resolve itself (or has in ``cache``)."""

    async def info(source: str, quick: bool = False) -> dict:
        path = local_path(source) if fetchable(source) else None
        if path is None and cache is not None:
            path = cache.lookup(source)
        if quick:  # (whether it is here, without hashing a file nobody may need from this PC)
            ok = path is not None and Path(path).is_file()
            return {"has": True, "size": Path(path).stat().st_size} if ok else {"missing": "not here whole"}
        if path is None:
            partial = holdings.partial_info(source)  # being fetched here: the chunks it has so far
            if partial is not None:
                return partial
        if path is None or not Path(path).is_file():
            return {"missing": why_missing(source) if path is None else f"{path} is a folder (only files travel)"}
        return await asyncio.to_thread(holdings.offer, Path(path))

    async def chunk(sha256: str, index: int) -> dict:
        return {"data": await asyncio.to_thread(holdings.read, sha256, int(index))}

    server.handlers[INFO_OP] = info
    server.handlers[CHUNK_OP] = chunk


class ModelFiles(SchedulerPlugin):
    """The scheduler offers the model files of its PC (and those a client sent it) and finds
    the holders of one; it keeps the workers' fetch progress (``transfers()``)."""

    name = "aicluster-model-files"
    idempotent = True  # (the scheduler's preload and each client register it; the first one stays)
    #: finished or failed transfers shown (the latest) beside those in progress
    KEEP = 20

    async def start(self, scheduler) -> None:
        self.holdings = Holdings()  # (made here: the plugin travels pickled from a client)
        self.cache = ModelCache(default_cache_dir("scheduler"))
        self.receiver = Receiver(self.cache, self.holdings)
        self.progress: dict[tuple[str, str], dict] = {}
        self.scheduler = scheduler
        serve_model_files(scheduler, self.holdings, self.cache)

        async def holders(source: str, exclude: list | None = None, quick: bool = False) -> list[dict]:
            skip = set(exclude or ())

            async def ask(addr: str, name: str) -> dict:
                try:
                    r = await asyncio.wait_for(scheduler.rpc(addr).aicluster_model_info(source=source, quick=quick),
                                               INFO_TIMEOUT)
                except Exception as e:  # a worker without the ModelHost, gone, or too slow
                    r = {"missing": f"did not answer ({type(e).__name__}: {e})"}
                return {"address": addr, "name": name, **r}

            mine = {"address": scheduler.address, "name": "the scheduler's PC",
                    **await scheduler.handlers[INFO_OP](source=source, quick=quick)}
            if quick and mine.get("has"):  # (whether a PC has it whole, not each that does)
                return [mine]
            rest = await asyncio.gather(*(ask(a, str(ws.name)) for a, ws in list(scheduler.workers.items())
                                          if a not in skip))
            return [mine, *rest]

        async def upload_begin(source: str, info: dict) -> list[int]:
            return await asyncio.to_thread(self.receiver.begin, source, info)

        async def upload_chunk(sha256: str, index: int, data: bytes) -> None:
            await asyncio.to_thread(self.receiver.put, sha256, int(index), data)

        async def upload_end(sha256: str) -> str:
            return await asyncio.to_thread(self.receiver.end, sha256)

        scheduler.handlers.update({HOLDERS_OP: holders, "aicluster_model_upload_begin": upload_begin,
                                   "aicluster_model_upload_chunk": upload_chunk,
                                   "aicluster_model_upload_end": upload_end})

    def log_event(self, topic, msg) -> None:
        if topic != "aicluster-load" or not isinstance(msg, dict) or not str(msg.get("phase", "")).startswith("fetch"):
            return
        ws = self.scheduler.workers.get(msg.get("worker"))  # (the name the dashboard shows it by)
        worker = str(ws.name) if ws is not None else str(msg.get("worker", "?"))
        key = (worker, str(msg.get("model")))
        now = time.time()
        row = self.progress.get(key)
        if row is None or row["state"] != "fetching":
            row = self.progress[key] = {"worker": worker, "model": key[1], "began": now, "state": "fetching",
                                        "first_progress": float(msg.get("progress") or 0)}
        row.update({k: msg[k] for k in ("file", "size", "source", "holders", "error") if k in msg})
        row["progress"] = float(msg.get("progress") or 0)
        row["updated"] = now
        if msg["phase"] == "fetch-failed":
            row["state"] = "failed"
        elif row["progress"] >= 1:
            row["state"] = "done"
        ended = sorted((k for k, r in self.progress.items() if r["state"] != "fetching"),
                       key=lambda k: self.progress[k]["updated"])
        for k in ended[:-self.KEEP]:
            del self.progress[k]

    def transfers(self) -> list[dict]:
        """Model files on their way to workers (and the latest done or failed): worker, model,
        file, size, progress, MB/s since it began, from whom, state."""
        out = []
        for r in sorted(self.progress.values(), key=lambda r: r["began"]):
            seconds = max(r["updated"] - r["began"], 1e-6)
            got = (r["progress"] - r["first_progress"]) * (r.get("size") or 0)
            out.append({**r, "seconds": seconds, "mb_per_s": got / seconds / 1e6 if got else None})
        return out


def fetch_model(worker, source: str, cache: ModelCache, in_use: set[Path], progress=None,
                holdings: Holdings | None = None) -> Path:
    """``source``'s file into ``cache`` from the PCs of the cluster that have it (called in a
    thread of ``worker``, not on its event loop), taking chunks from the other workers that
    fetch it at the same time too, and offering its own to them (``holdings``; each fetcher
    begins at a random chunk, so they have more to give each other). ``FetchError`` names
    every PC asked and what it lacked. ``progress(fraction, details)``: details names the
    file, its size, the source and the PCs it comes from."""
    from distributed.utils import sync

    async def ask() -> list[dict]:
        return await worker.scheduler.aicluster_model_holders(source=source, exclude=[worker.address])

    def holders_of(answers: list[dict]) -> list[Holder]:
        return [Holder(a["name"], a, reader(a["address"], a["sha256"]),
                       set(a["partial"]) if "partial" in a else None, set(a.get("pending", ())))
                for a in answers if "sha256" in a]

    def reader(addr: str, sha: str):
        async def one(i: int) -> bytes:
            r = await worker.rpc(addr).aicluster_model_chunk(sha256=sha, index=i)
            return r["data"]

        return lambda i: sync(worker.loop, one, i)

    try:
        answers = sync(worker.loop, ask)
    except Exception as e:
        raise FetchError(f"model source {source!r} is not on {worker.name}, and the scheduler could not say who has it "
                         f"({type(e).__name__}: {e}); is it a scheduler of this project (aicluster scheduler, or "
                         f"dask scheduler --preload cluster.scheduler)?") from None
    have = [a for a in answers if "sha256" in a]
    if not any("partial" not in a for a in have):  # only other fetchers: nobody has it whole
        have = []
    if not have:
        raise FetchError(f"model source {source!r}: no PC of the cluster has it; asked " + "; ".join(
            [f"{worker.name} (this worker): {why_missing(source)}"] + [f"{a['name']}: {a.get('missing')}" for a in answers]))
    logger.info("fetching %s (%d MB) from %s", source, have[0]["size"] // 2**20, ", ".join(a["name"] for a in have))

    import random

    if progress is not None:  # (what the dashboard's transfer table shows beside the fraction)
        details = {"file": Path(source).name if "://" not in source else source.rsplit("/", 1)[-1],
                   "size": int(have[0]["size"]), "source": source,
                   "holders": ", ".join(a["name"] for a in have)}
        report = progress

        def progress(frac: float) -> None:
            report(frac, details)

    return fetch(source, holders_of(have), cache, in_use=in_use, progress=progress, holdings=holdings,
                 refresh=lambda: holders_of(sync(worker.loop, ask)),
                 start=random.randrange(len(have[0]["chunks"]) or 1), me=str(worker.name))


def offer_from_client(client, source: str, progress: bool = True) -> str | None:
    """The client's PC is a holder nobody can ask (a client holds no server): when ``source``
    is a file here and no PC of the cluster has it whole, send it to the scheduler's PC (its
    model cache; resumed if cut), which offers it to the workers from then on. The path it
    has there, or None when nothing was sent."""
    path = local_path(source) if fetchable(source) else None
    if path is None or not Path(path).is_file():
        return None
    answers = client.sync(client.scheduler.aicluster_model_holders, source=source, quick=True)
    if not isinstance(answers, (list, tuple)) or any(a.get("has") for a in answers):  # (None: a scheduler without this
        # module's handlers, whose workers cannot fetch anyway; distributed answers an unknown op with None)
        return None  # (a PC of the cluster has it: the workers fetch it from there)
    info = digest(Path(path))
    sha, chunk = info["sha256"], info["chunk"]
    need = client.sync(client.scheduler.aicluster_model_upload_begin, source=source, info=info)
    bar = None
    if progress and need:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(info["chunks"]), initial=len(info["chunks"]) - len(need), unit="chunk",
                   desc=f"sending {info['file']} to the scheduler's PC (only this PC has it)")
    logger.info("%s is on this client's PC only: sending it (%d MB) to the scheduler's PC", source,
                info["size"] // 2**20)

    async def send() -> str:
        ahead = asyncio.Semaphore(3)  # (chunks in flight: the link stays busy between round trips)

        async def one(i: int) -> None:
            async with ahead:
                def read() -> bytes:
                    with open(path, "rb") as f:
                        f.seek(i * chunk)
                        return f.read(chunk)

                data = await asyncio.to_thread(read)
                await client.scheduler.aicluster_model_upload_chunk(sha256=sha, index=i, data=data)
                if bar is not None:
                    bar.update(1)

        await asyncio.gather(*(one(i) for i in need))
        return await client.scheduler.aicluster_model_upload_end(sha256=sha)

    try:
        return client.sync(send)
    finally:
        if bar is not None:
            bar.close()


def cache_listing(dask_worker=None) -> dict:
    """``client.run``: this worker's model cache (folder, limit, entries) for ``aicluster models``."""
    host = dask_worker.plugins.get(PLUGIN_NAME)
    cache = getattr(host, "model_cache", None)
    if cache is None:
        return {"folder": None, "limit": None, "entries": []}
    return {"folder": str(cache.folder), "limit": cache.limit, "entries": cache.entries(),
            "in_use": [str(p) for p in host.sources_in_use()]}


def format_caches(listing: dict) -> str:
    """The ``aicluster models`` table: per PC, what its model cache holds."""
    import datetime

    from dask.utils import format_bytes

    from .status import text_table

    body = []
    for name, c in sorted(listing.items()):
        if not c["entries"]:
            body.append([name, "(empty)", "", "", "", "", ""])
        for e in c["entries"]:
            path = str(Path(c["folder"]) / e["sha256"] / e["name"])
            used = datetime.datetime.fromtimestamp(e.get("last_use", 0)).strftime("%Y-%m-%d %H:%M")
            body.append([name, e["name"], format_bytes(e["size"]), e["sha256"][:12], ", ".join(e["sources"]), used,
                         "yes" if path in c.get("in_use", []) else ""])
    lines = text_table(["PC", "file", "size", "sha256", "source", "last use", "in use"], body)
    for name, c in sorted(listing.items()):
        total = sum(e["size"] for e in c["entries"])
        limit = format_bytes(c["limit"]) if c["limit"] else "no limit"
        lines.append(f"{name}: {c['folder']} holds {format_bytes(total)} ({limit})")
    return "\n".join(lines)
