"""The head of a model split across workers (``cluster/shards.py``, ``workloads/shard_protocol.py``):
a child process.

``ShardedModel`` is what the head worker's ModelHost keeps resident: the engine child of
``engine_proc.py`` (the same batch engine as a one-worker model, tokens over a pipe) with
the planned shard servers registered as llama.cpp devices before the load. llama.cpp
aborts the whole process when a shard server is lost (``GGML_ABORT``, nothing can catch
it): only this child dies, its requests fail naming the lost worker, the worker and its
other models carry on, and the model is planned again on the next request. A server that
stays connected but stops answering (a frozen PC, a stopped process) is found by its
worker: no progress from the head for ``STALL`` seconds while that server's process does
no work ends the head with ``ShardLost`` naming it.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from .engine_proc import ChildModel

logger = logging.getLogger("workloads.backends.llama_head")


class ShardLost(RuntimeError):
    """The split model's head process died (a shard server was lost, or it crashed)."""


class ShardedModel(ChildModel):
    """A split model, used like a resident ``LlamaModel``; its layers are on the planned
    workers' shard servers and its decoding loop in a child process of this worker."""

    #: while requests run, how often the head checks that every part's worker is still here
    WATCH_EVERY = 5.0
    #: no piece or result from the head for this long while requests wait: ask the parts'
    #: workers whether their servers still work
    STALL = 10.0

    def __init__(self, spec, plan: dict, name: str, threads: int, on_progress: Callable[[float], None] | None = None,
                 client=None, tls_context=None, local: dict[str, str] | None = None):
        from ..shard_protocol import ShardPlan, ShardServerError, probe
        from ..tls_tunnel import reach

        from .sources import resolve_source

        self.plan = ShardPlan.from_dict(plan)
        if self.plan.tls and tls_context is None:
            raise ShardLost(f"model {name!r}: its shard servers take TLS only, and this worker has no TLS "
                            f"certificate (security.tls)")
        # with TLS, llama.cpp talks to a local end of a mutual-TLS tunnel to each other PC's
        # server, and straight to this worker's own server's 127.0.0.1 port (``local``)
        self._tunnel, self._via = reach(self.plan.endpoints, tls_context if self.plan.tls else None, local)
        path = Path(resolve_source(spec.source))
        opts = {k: v for k, v in spec.options.items() if k != "shard_plan"}
        for part in self.plan.parts:  # a server that is down or of another version would abort the child
            try:
                probe(self._via[part.endpoint])
            except ShardServerError as e:
                self._close_tunnel()
                raise ShardLost(f"model {name!r} cannot be loaded: {e} (worker {part.name})") from None
        # which server process each part is on: when the head dies, the ones that changed were lost
        self._client = client
        self._servers = self._server_infos()
        self._last_check = time.monotonic()
        self._stall_since: float | None = None
        self._stall_cpu: dict = {}
        if client is not None:  # each part's bytes count against its worker's budget (LRU eviction)
            from ..shard_protocol import hold

            hold(client, self.plan)
        cfg = {"options": opts, "device": "cpu", "threads": threads,
               "endpoints": [self._via[e] for e in self.plan.endpoints], "tensor_split": self.plan.tensor_split}
        # only the shard servers hold layers (this worker's own GPU through its own server)
        env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads)}
        try:
            super().__init__(name, path, "workloads.backends.llamacpp:load_here", cfg,
                             n_ctx=int(opts.get("n_ctx", 2048)), chat_format=opts.get("chat_format"), env=env,
                             on_progress=on_progress)
        except BaseException:
            if client is not None:
                from ..shard_protocol import release

                release(client, self.plan)
            self._close_tunnel()
            raise
        self.nbytes = self.plan.head_bytes

    def _close_tunnel(self) -> None:
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._close_tunnel()

    @property
    def shard_info(self) -> dict:
        return {"plan": self.plan.to_dict(), "pid": self._proc.pid, "healthy": self.healthy}

    # -- ChildModel's hooks ----------------------------------------------------------------------
    def stalled(self) -> BaseException:
        return ShardLost(
            f"model {self.name!r}: loading across {', '.join(p.name for p in self.plan.parts)} made no progress "
            f"for {self.LOAD_STALL:.0f} s: a shard server is serving another model's head (one at a time) "
            f"or stopped answering")

    def died(self, loading: bool = False) -> BaseException:
        why = self._death()
        if loading:
            return ShardLost(f"model {self.name!r} could not be loaded across "
                             f"{', '.join(p.name for p in self.plan.parts)}: {why}")
        return ShardLost(why)

    def watch(self) -> None:
        now = time.monotonic()
        if self._client is None:
            return
        if now - self._last_check > self.WATCH_EVERY:
            self._last_check = now
            self._check_parts()
        self._check_stall(now)

    # -- internals ---------------------------------------------------------------------------
    def _server_infos(self) -> dict:
        from ..shard_protocol import server_info

        if self._client is None:
            return {}
        try:
            return self._client.run(server_info, self.plan.endpoints, workers=self.plan.workers, on_error="return")
        except Exception:
            return {}

    def _death(self) -> str:
        """Why the child died, naming the workers whose shard servers were lost (died and
        restarted, or gone with their worker), or that no longer answer."""
        from ..shard_protocol import ShardServerError, lost_servers, probe

        from .native import describe_exit

        code = self._proc.wait()
        self._stderr_done.wait(5)
        if self._client is not None and self._servers:
            lost = [f"{p.name} ({p.endpoint})" for p in lost_servers(self._client, self.plan.parts, self._servers)]
        else:
            lost = []
            for part in self.plan.parts:
                try:
                    probe(self._via.get(part.endpoint, part.endpoint), timeout=2.0)
                except ShardServerError:
                    lost.append(f"{part.name} ({part.endpoint})")
        tail = next((t for t in reversed(self._stderr) if "error" in t.lower() or "abort" in t.lower()), "")
        why = (f"lost the shard server(s) of {', '.join(lost)}" if lost
               else f"its head process ended ({describe_exit(code, chr(10).join(self._stderr))['text']})")
        return (f"model {self.name!r} (split over {', '.join(p.name for p in self.plan.parts)}) {why}"
                + (f" [{tail}]" if tail else "") + "; it is planned again on the next request")

    def _end(self, why: str) -> None:
        self._closing = True
        with self._lock:
            self._dead = why
        if self._proc.poll() is None:
            self._proc.kill()
        self._fail_all(ShardLost(why))

    def _check_parts(self) -> None:
        """A part's worker that left the cluster (a PC switched off, its link cut): its server
        may never answer again and llama.cpp would wait on the socket for minutes. End the
        child now; its requests fail naming the worker."""
        try:
            here = self._client.scheduler_info(n_workers=-1)["workers"]
        except Exception:
            return
        if not here:
            return  # an empty answer says nothing (the client's identity cache, issue 12)
        gone = [p for p in self.plan.parts if p.worker not in here]
        if gone:
            self._end(f"model {self.name!r} (split over {', '.join(p.name for p in self.plan.parts)}) lost the "
                      f"worker(s) {', '.join(f'{p.name} ({p.endpoint})' for p in gone)}: it left the cluster; it is "
                      f"planned again on the next request")

    def _check_stall(self, now: float) -> None:
        """No word from the head for ``STALL`` s: a shard server whose process did no work
        meanwhile (stopped, frozen, or waiting on a link that went silent) is lost."""
        if now - self.last_message < self.STALL:
            self._stall_since = None
            return
        if self._stall_since is None:
            self._stall_since, self._stall_cpu = now, self._cpu_of_servers()
            return
        if now - self._stall_since < self.STALL:
            return
        cpu = self._cpu_of_servers()
        before = self._stall_cpu
        # stopped or gone; else, when none is, those that did not one bit of work while the head
        # waited (a server waiting on a stopped one is idle too: the stopped one is named)
        stopped = [p for p in self.plan.parts if cpu.get(p.worker) is None]
        lost = stopped or [p for p in self.plan.parts if before.get(p.worker) is None
                           or cpu[p.worker] - before[p.worker] < 0.05]
        if lost:
            self._end(f"model {self.name!r} (split over {', '.join(p.name for p in self.plan.parts)}): the shard "
                      f"server(s) of {', '.join(f'{p.name} ({p.endpoint})' for p in lost)} stopped answering (no "
                      f"progress for {now - self.last_message:.0f} s); it is planned again on the next request")
        else:  # the servers work (a long prefill on a slow PC): look again later
            self._stall_since, self._stall_cpu = now, cpu

    def _cpu_of_servers(self) -> dict:
        """``{worker: CPU seconds of its shard server}``; None for a server not running
        (or stopped: a stopped process is not working)."""
        out = {}
        for addr, info in self._server_infos().items():
            ok = isinstance(info, dict) and info.get("alive") and info.get("state") not in ("stopped", "zombie")
            out[addr] = float(info.get("cpu") or 0.0) if ok else None
        return out


def load_sharded(spec, device: str = "cpu", threads: int = 1, name: str = "model") -> ShardedModel:
    """The head of ``spec`` (its ``options.shard_plan``, made by the client's planner)."""
    try:
        from distributed import get_client, get_worker

        worker, client = get_worker(), get_client()
    except ValueError:
        worker = client = None
    last = [-1.0]

    def progress(p: float) -> None:  # to the client's progress bar (AICluster.load_sharded)
        if worker is not None and (p - last[0] >= 0.02 or p >= 1.0):
            last[0] = p
            worker.log_event("aicluster-load", {"model": name, "progress": p})

    from ..host import PLUGIN_NAME
    from ..tls_tunnel import worker_client_context

    local = {}  # this worker's own shard servers: their inner 127.0.0.1 ports, no tunnel
    host = worker.plugins.get(PLUGIN_NAME) if worker is not None else None
    if host is not None:
        local = {i["endpoint"]: i["local"] for i in host.server_infos() if i.get("local")}
    return ShardedModel(spec, spec.options["shard_plan"], name, threads, on_progress=progress, client=client,
                        tls_context=worker_client_context(worker) if worker is not None else None, local=local)
