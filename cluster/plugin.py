"""ModelHost: the worker plugin that keeps models resident and reports what memory holds.

A task reaches it with ``get_worker().plugins[ModelHost.name]`` and asks for a model with
``host.acquire(name, spec)``; the first request loads it (once, however many tasks ask at
the same time), later requests reuse it. Models are evicted least-recently-used by bytes
when the worker's budget would be exceeded. ``worker.metrics["aicluster"]`` carries the
tier, device and resident models in every heartbeat to ``scheduler_info()``.

Why this module is long: ``ModelHost`` is one object with one lock over what a worker holds
(resident models, loads in flight, shard holds, quarantined models, the budget, eviction):
each of its methods reads and changes that state together, so it stays one class. Its
pieces that stand alone live elsewhere (the shard server in ``shard_servers.py``, tiers in
``tiers.py``, devices in ``devices.py``, the backends in ``workloads/backends``).
"""
from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Iterator

import psutil
from distributed.diagnostics.plugin import WorkerPlugin

from workloads.backends import BUILTIN, ModelCrashed, backend_module
from workloads.backends.sources import local_path
from workloads.compat import count_child_memory
from workloads.transfer import FetchError, Holdings, ModelCache, default_cache_dir, fetchable
from workloads.shard_protocol import ShardServerBusy
from workloads.host import PLUGIN_NAME  # the name the task functions look the plugin up by

from .config import Config, ModelConfig, load_config
from .devices import detect
from .modelfiles import fetch_model, serve_model_files
from .tiers import TierAssignment, assign_tier, tier_of_resources

__all__ = ["ModelHost", "ModelDoesNotFit", "Resident", "PLUGIN_NAME", "cancel_on_worker", "unload_on_worker"]

logger = logging.getLogger("cluster.plugin")


class ModelDoesNotFit(MemoryError):
    """A model needs more memory than this worker's whole model budget."""

    def __init__(self, model: str, need: int, budget: int, where: str, how: str = "estimated"):
        from dask.utils import format_bytes

        self.model, self.need, self.budget, self.where, self.how = model, need, budget, where, how
        super().__init__(
            f"model {model!r} does not fit on {where}: it needs {format_bytes(need)} ({how}) but the "
            f"worker's model budget is {format_bytes(budget)}. Route it to a larger tier "
            f"(models.{model}.tier in config.yaml) or raise worker.model_budget."
        )

    def __reduce__(self):
        return (type(self), (self.model, self.need, self.budget, self.where, self.how))


def backend_loader(backend: str):
    """The function that loads a model of ``backend``: ``load(spec, device, threads, name)``."""
    module, attr = backend_module(backend)
    return getattr(module, attr)


@dataclass
class Resident:
    """A loaded model and its bookkeeping."""

    name: str
    model: Any
    backend: str
    nbytes: int
    measured_by: str
    load_seconds: float
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    hits: int = 0
    #: tasks use a model exclusively, unless it says it serves many at once (``concurrent``,
    #: the batched llama.cpp backend); unloading waits for every user
    usage: "_Usage" = field(default_factory=lambda: _Usage(), repr=False)
    #: set (under exclusive use) when the model is unloaded; a task that waited loads it again
    closed: bool = False

    def info(self) -> dict:
        out = {
            "backend": self.backend, "bytes": self.nbytes, "measured_by": self.measured_by,
            "load_seconds": round(self.load_seconds, 3), "hits": self.hits,
            "loaded_at": self.loaded_at, "last_used": self.last_used,
        }
        shard = getattr(self.model, "shard_info", None)  # a split model's head (cluster/shards.py)
        if shard is not None:
            out["shard"] = shard
        return out


class WorkerClosing(RuntimeError):
    """A task asked for a model on a worker that is shutting down."""


class _Usage:
    """Shared or exclusive use of a resident model (a readers-writer lock). A waiting
    exclusive user (an unload, a task of a non-concurrent model) holds new shared users
    back, so a stream of generations cannot keep an unload waiting for ever."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cv:
            while self._exclusive or self._waiting_exclusive:
                self._cv.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cv:
                self._shared -= 1
                self._cv.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cv:
            self._waiting_exclusive += 1
            while self._exclusive or self._shared:
                self._cv.wait()
            self._waiting_exclusive -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cv:
                self._exclusive = False
                self._cv.notify_all()

    @property
    def users(self) -> int:
        return self._shared + int(self._exclusive)


class _Loading:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None


def _log_to_the_workers_log() -> None:
    """A nanny's worker process has handlers on ``distributed``'s loggers only (Dask's logging
    config), so this project's own lines (a model file's fetch, a load) would be lost: give
    ``cluster`` and ``workloads`` a handler of the same format there, at INFO for the fetch."""
    if logging.getLogger().handlers:  # (a process that set up its logging: the CLI, pytest, Jupyter)
        return
    fmt = logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    for name in ("cluster", "workloads"):
        log = logging.getLogger(name)
        if not log.handlers:
            h = logging.StreamHandler()
            h.setFormatter(fmt)
            log.addHandler(h)
            log.propagate = False
    logging.getLogger("cluster").setLevel(logging.INFO)
    logging.getLogger("workloads.transfer").setLevel(logging.INFO)


class ModelHost(WorkerPlugin):
    """Resident models, a memory budget and metrics for one worker.

    Parameters
    ----------
    config
        The cluster config (pickled to the worker). None: the worker reads it itself.
    budget
        Bytes that models may hold. None: ``worker.model_budget`` x the GPU's memory on a
        real GPU tier, or x the worker's memory limit otherwise.
    preload
        Load the models configured with ``preload: true`` for this worker's tier, in the
        background, at setup.
    """

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self, config: Config | None = None, budget: int | None = None, preload: bool = True):
        self.config = config
        self.budget_override = budget
        self.preload = preload

    # -- lifecycle -------------------------------------------------------------------------
    def setup(self, worker) -> None:
        self.worker = worker
        _log_to_the_workers_log()
        self.config = load_config(self.config)
        # The tier label the worker carries (set by the preload or by --resources) decides
        # the device; the same derivation as the preload's, so both agree on "simulated".
        tier = tier_of_resources(worker.state.total_resources, self.config.tiers)
        self.assignment: TierAssignment | None = None
        if tier is not None:
            self.assignment = assign_tier(detect(), self.config, forced=tier, nthreads=worker.state.nthreads)
        self.budget = self.budget_override or self._default_budget()
        self._models: OrderedDict[str, Resident] = OrderedDict()
        self._loading: dict[str, _Loading] = {}
        #: model -> event set when its unload is over: until then it stays in ``_models`` (its
        #: bytes counted) and ``get`` waits, so no second copy loads beside the closing one
        self._unloading: dict[str, threading.Event] = {}
        #: model -> what its crash was (``quarantined``): not loaded again here until it is
        #: unloaded or its config changes
        self.quarantine: dict[str, dict] = {}
        from .cpubuild import build_fingerprint

        #: what this worker runs models with: a crash here is tried elsewhere only where it differs
        self.build = {**build_fingerprint(), "device": self.assignment.device_name if self.assignment else "cpu"}
        self._lock = threading.Lock()
        self.load_counts: dict[str, int] = {}
        self.evictions: list[str] = []
        self._cancelled: dict[str, float] = {}
        self._closing = False
        #: job_type -> last benchmark result on this worker (workloads/bench.py)
        self.bench: dict[str, dict] = {}
        self._threads_set = False
        #: model -> (bytes, since) this worker's shard servers hold for a split model
        self._holds: dict[str, tuple[int, float]] = {}
        #: model -> the endpoint of the shard server its layers are on (see ``hold_shard``)
        self._server_of: dict[str, str] = {}
        #: one shard server per split model served at once (``worker.shard_models``)
        self.shard_servers = self._start_shard_servers(worker)
        # model files: offered to the other PCs, and fetched from them into this cache
        wc = self.config.worker
        self.holdings = Holdings()
        self._model_paths: dict[str, str] = {}
        self.model_cache = ModelCache(Path(wc.model_cache).expanduser() if wc.model_cache
                                      else default_cache_dir(str(worker.name)), wc.model_cache_size)
        serve_model_files(worker, self.holdings, self.model_cache)
        self._watch_children(worker)
        self._evicting = False
        from tornado.ioloop import PeriodicCallback

        pc = worker.periodic_callbacks["aicluster-pressure"] = PeriodicCallback(self._relieve_pressure, 500)
        pc.start()
        worker.metrics["aicluster"] = self.metrics
        if self.preload and self.assignment is not None:
            # a split model is loaded by a client's plan (ai.load_model), never whole here
            names = [n for n, m in self.config.models.items()
                     if m.preload and m.tier == self.assignment.tier and not m.sharded]
            if names:
                threading.Thread(target=self._preload, args=(names,), name="aicluster-preload", daemon=True).start()

    def teardown(self, worker) -> None:
        # the worker is leaving: its tasks run again elsewhere, so a model that serves many
        # at once stops its batch now instead of finishing every request for nobody, and a
        # model still loading is not put to work
        self._closing = True
        pc = worker.periodic_callbacks.pop("aicluster-pressure", None)
        if pc is not None:
            pc.stop()
        for name in list(getattr(self, "_models", {})):
            self.unload(name, finish=False)
        for srv in getattr(self, "shard_servers", []):
            srv.stop()
        worker.metrics.pop("aicluster", None)
        self._empty_cuda_cache()

    # -- public ----------------------------------------------------------------------------
    @property
    def device(self) -> str:
        return self.assignment.device if self.assignment else "cpu"

    @property
    def used(self) -> int:
        return sum(r.nbytes for r in self._models.values()) + sum(b for b, _ in self._holds.values())

    # -- shards of split models (cluster/shards.py) ------------------------------------------
    #: a hold whose head never connects (or that disconnected) is dropped after this long
    HOLD_GRACE = 120.0

    @property
    def shard_server(self):
        """The first shard server (None: this worker runs none)."""
        return self.shard_servers[0] if self.shard_servers else None

    def hold_shard(self, model: str, nbytes: int, endpoint: str | None = None) -> dict:
        """Count ``nbytes`` of ``model``'s layers, about to be placed on this worker's shard
        server at ``endpoint`` (default: the first), against the model budget: least-recently-
        used models are evicted to make room (``ModelDoesNotFit`` when the budget cannot hold
        them). The server is reserved for ``model`` until ``release_shard``; a server another
        split model holds is refused with the reason (two heads cannot share one)."""
        if not self.shard_servers:
            raise RuntimeError(f"worker {self.worker.name} runs no shard server")
        endpoint = endpoint or self.shard_servers[0].endpoint
        if endpoint not in {s.endpoint for s in self.shard_servers}:
            raise RuntimeError(f"worker {self.worker.name} runs no shard server at {endpoint}; its servers: "
                               + ", ".join(s.endpoint for s in self.shard_servers))
        with self._lock:
            other = next((m for m, e in self._server_of.items() if e == endpoint and m != model and m in self._holds),
                         None)
            if other is not None:
                raise ShardServerBusy(f"the shard server {endpoint} of worker {self.worker.name} holds the layers of "
                                      f"split model {other!r}; plan {model!r} again (ai.plan_shards) to use another "
                                      f"of its servers, or raise worker.shard_models")
            self._holds.pop(model, None)
            self._server_of[model] = endpoint
        self._make_room(int(nbytes), f"{model} (shard)")
        with self._lock:
            self._holds[model] = (int(nbytes), time.time())
        return {"held": int(nbytes), "used": self.used, "budget": self.budget, "endpoint": endpoint}

    def holds(self) -> dict[str, int]:
        """``{model: bytes}`` of the split models' layers counted here (see ``hold_shard``)."""
        with self._lock:
            return {m: b for m, (b, _) in self._holds.items()}

    def server_infos(self) -> list[dict]:
        """Each shard server's ``info()`` with ``model``: the split model whose layers it holds."""
        with self._lock:
            of = {e: m for m, e in self._server_of.items() if m in self._holds}
        return [{**s.info(), "model": of.get(s.endpoint)} for s in self.shard_servers]

    def release_shard(self, model: str) -> bool:
        """Stop counting ``model``'s layers here (its head unloaded it); its server is free."""
        with self._lock:
            self._server_of.pop(model, None)
            return self._holds.pop(model, None) is not None

    def _expire_holds(self) -> None:
        if not self._holds or not self.shard_servers:
            return
        by_endpoint = {s.endpoint: s for s in self.shard_servers}
        now = time.time()
        with self._lock:
            holds = dict(self._holds)
            where = dict(self._server_of)
        for m, (b, t) in holds.items():
            srv = by_endpoint.get(where.get(m, self.shard_servers[0].endpoint))
            if srv is not None and srv.connected():  # its head is there: its layers are still here
                with self._lock:
                    if m in self._holds:
                        self._holds[m] = (b, now)
            elif now - t > self.HOLD_GRACE:
                logger.info("shard of %s released (no head connected for %.0f s)", m, self.HOLD_GRACE)
                self.release_shard(m)

    def _start_shard_servers(self, worker) -> list:
        port = getattr(worker, "aicluster_shard_port", None)
        if port is None:
            return []
        from distributed.comm import get_address_host

        from .shard_servers import ShardServer

        # with the cluster's TLS, shard traffic goes through a mutual-TLS tunnel made with the
        # worker's own certificate (Dask's listen context: a client certificate is required)
        tls = (worker.security.get_listen_args("worker").get("ssl_context")
               if worker.address.startswith("tls://") else None)
        servers = []
        for i in range(self.config.worker.shard_models):
            # a fixed port: the next ones follow it (one firewall range); 0: each a free port
            servers.append(ShardServer(get_address_host(worker.address), port + i if port else 0, device=self.device,
                                       threads=self.config.worker.torch_threads, name=str(worker.name), tls=tls).start())
        for server in servers:
            if not server.wait_ready(30):
                logger.warning("shard server %s did not come up: %s", server.endpoint,
                               server.last_error or "see its log in " + server.cache_dir)
        return servers

    def _watch_children(self, worker) -> None:
        """The worker's own memory thresholds (spill, pause) see what its child processes hold
        in RAM too: the llama.cpp engines of its models, the layers on its shard server, a
        split model's head. (Dask measures the worker process alone; ``get_process_memory``
        is its documented seam. The nanny's terminate threshold still measures the worker
        process only.)"""
        monitor = getattr(worker, "monitor", None)
        if monitor is None:
            return

        def children() -> int:
            n = 0
            for pid in self._child_pids():
                try:
                    n += psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    pass
            return n

        count_child_memory(monitor, children)

    def _child_pids(self) -> list[int]:
        """This host's own child processes (engines of its models, its shard server); not every
        child of the process, which in a test may host several workers."""
        pids = [getattr(r.model, "pid", None) for r in list(self._models.values())]
        pids += [srv.proc.pid for srv in self.shard_servers if srv.proc is not None]
        return [p for p in pids if p]

    def resident(self) -> list[str]:
        return list(self._models)

    @contextlib.contextmanager
    def acquire(self, name: str, spec: ModelConfig | None = None) -> Iterator[Any]:
        """Use model ``name`` for the duration of the ``with`` block: exclusively, or shared
        with other tasks when the model serves many at once (``model.concurrent``)."""
        while True:
            res = self.get(name, spec)
            use = res.usage.shared() if getattr(res.model, "concurrent", False) else res.usage.exclusive()
            with use:
                if res.closed:  # unloaded or evicted while this task waited for it
                    continue
                res.last_used = time.time()
                yield res.model
                return

    def get(self, name: str, spec: ModelConfig | None = None) -> Resident:
        """The resident model ``name``, loading it first if needed (one load per model)."""
        spec = spec or self.config.model(name)
        while True:
            if self._closing:
                raise WorkerClosing(f"worker {self.worker.name} is closing; the task runs again on another worker")
            self._check_quarantine(name, spec)
            with self._lock:
                unloading = self._unloading.get(name)
            if unloading is not None:  # the old copy is closing: load anew once it is gone
                unloading.wait()
                continue
            with self._lock:
                res = self._models.get(name)
                # its batch decoder failed, or it is split otherwise than this task asks
                broken = res is not None and (not getattr(res.model, "healthy", True) or _other_split(res.model, spec))
                if res is not None and not broken:
                    self._models.move_to_end(name)
                    res.hits += 1
                    res.last_used = time.time()
                    return res
                pending = self._loading.get(name)
                leader = pending is None
                if leader:
                    pending = self._loading[name] = _Loading()
            if not leader:
                pending.done.wait()
                if pending.error is not None:
                    raise pending.error
                continue
            try:
                crash = getattr(res.model, "crash", None) if broken else None
                if crash is not None:  # its engine process died of a native crash: quarantined
                    err = self._quarantine(name, spec, crash)
                    self.unload(name, lift_quarantine=False)
                    raise err
                if broken:  # load it afresh
                    logger.warning("model %s stopped working on this worker, or is split otherwise than asked; "
                                   "loading it again", name)
                    self.unload(name)
                res = self._load(name, spec)
            except ModelCrashed as e:
                pending.error = self._quarantine(name, spec, e) if name not in self.quarantine else e
                raise pending.error from None
            except BaseException as e:
                pending.error = e
                raise
            finally:
                with self._lock:
                    self._loading.pop(name, None)
                pending.done.set()
            return res

    def cancel(self, key: str) -> None:
        """Flag task ``key`` as cancelled; its generation loop stops at the next token."""
        now = time.time()
        with self._lock:
            self._cancelled[str(key)] = now
            for k in [k for k, t in self._cancelled.items() if now - t > 3600]:
                del self._cancelled[k]  # flags of tasks long gone

    def is_cancelled(self, key) -> bool:
        return str(key) in self._cancelled

    def unload(self, name: str, finish: bool = True, lift_quarantine: bool = True) -> bool:
        """Unload ``name`` (and lift its quarantine); tasks using it finish first.
        ``finish=False`` (a worker leaving): a model that can (``abort()``) ends the
        generations it serves with an error at once. A ``get`` meanwhile waits for the
        unload to end, then loads a fresh copy: never two at once."""
        with self._lock:
            was_quarantined = lift_quarantine and self.quarantine.pop(name, None) is not None
            res = self._models.get(name)
            if res is None:
                return was_quarantined
            busy = self._unloading.get(name)
            if busy is None:
                busy = self._unloading[name] = threading.Event()
                mine = True
            else:
                mine = False
        if not mine:  # another thread unloads it: wait for that
            busy.wait()
            return True
        try:
            abort = getattr(res.model, "abort", None)
            if not finish and callable(abort):
                abort()  # its waiting tasks get "unloaded while generating" and leave the model
            with res.usage.exclusive():  # never close a model a task is using: wait for it to finish
                res.closed = True
                close = getattr(res.model, "close", None)
                if callable(close):
                    close()
                res.model = None
        finally:
            with self._lock:
                if self._models.get(name) is res:
                    del self._models[name]
                self._unloading.pop(name, None)
            busy.set()
        del res
        gc.collect()
        self._empty_cuda_cache()
        logger.info("unloaded model %s", name)
        return True

    # -- native crashes (workloads/backends/engine_proc.py) --------------------------------------
    def _quarantine(self, name: str, spec: ModelConfig, crash: ModelCrashed) -> ModelCrashed:
        """Keep ``name`` off this worker after its process crashed (until an unload or a new
        config); the error names this worker."""
        if crash.worker != str(self.worker.name):
            crash = ModelCrashed(crash.model, str(self.worker.name), crash.signal, crash.frame, crash.library,
                                 crash.detail, crash.during, crash.note)
        with self._lock:
            self.quarantine[name] = {"key": _spec_key(spec), "since": time.time(), "error": crash,
                                     "signal": crash.signal, "frame": crash.frame, "library": crash.library,
                                     "during": crash.during, "message": str(crash)}
        logger.error("%s", crash)
        return crash

    def _crashed(self, name: str, spec: ModelConfig, crash: ModelCrashed) -> None:
        """A resident model's engine process died of a native crash (its reader thread tells):
        quarantine it now, so status shows it, and free what is left of it."""
        self._quarantine(name, spec, crash)

        def drop() -> None:
            with self._lock:
                res = self._models.get(name)
            if res is not None and getattr(res.model, "crash", None) is not None:
                self.unload(name, lift_quarantine=False)

        threading.Thread(target=drop, name=f"aicluster-crashed-{name}", daemon=True).start()

    def _check_quarantine(self, name: str, spec: ModelConfig) -> None:
        q = self.quarantine.get(name)
        if q is None:
            return
        if q["key"] != _spec_key(spec):  # its config changed: try it again
            with self._lock:
                self.quarantine.pop(name, None)
            logger.info("model %s: its config changed, so its quarantine after a crash is lifted", name)
            return
        since = time.strftime("%H:%M:%S", time.localtime(q["since"]))
        raise q["error"].with_note(f"(quarantined here since {since})")

    def metrics(self, worker=None) -> dict:
        a = self.assignment
        return {
            "tier": a.tier if a else None,
            "simulated": a.simulated if a else False,
            "device": self.device,
            "device_name": a.device_name if a else "cpu",
            "vram_total": a.vram_total if a else None,
            "vram_used": self._cuda_used_or_none(),
            "memory_kind": "vram" if self.device.startswith("cuda") else "ram",
            "budget": self.budget,
            "used": self.used,
            "models": {n: r.info() for n, r in list(self._models.items())},
            "loading": list(self._loading),
            "loads": dict(self.load_counts),
            "quarantined": {n: {k: v for k, v in q.items() if k not in ("error", "key")}
                            for n, q in list(self.quarantine.items())},
            "build": self.build,
            "bench": dict(self.bench),
            **self._shard_metrics(),
        }

    def _shard_metrics(self) -> dict:
        if not self.shard_servers:
            return {}
        try:
            self._expire_holds()
            servers = self.server_infos()
            info = {**servers[0], "free": max(self.budget - self.used, 0)}
        except Exception as e:  # a metric callback that raises drops the whole metric
            info = {"endpoint": self.shard_servers[0].endpoint, "alive": False, "last_error": str(e)}
            servers = [info]
        return {"shard_server": info, "shard_servers": servers, "shards": self.holds()}

    # -- internals -------------------------------------------------------------------------
    def _default_budget(self) -> int:
        frac = self.config.worker.model_budget
        a = self.assignment
        if a is not None and a.vram_total:
            return int(frac * a.vram_total)
        limit = getattr(self.worker.memory_manager, "memory_limit", None) or psutil.virtual_memory().total
        return ram_budget(frac, limit, _pause_fraction(self.worker))

    # -- memory pressure -----------------------------------------------------------------------
    def _relieve_pressure(self) -> None:
        """While Dask has paused this worker for memory, evict least-recently-used models that
        no task is using, one at a time, until it resumes: a resident model otherwise keeps
        the memory up and the worker paused for good. (A periodic callback on the worker's
        event loop; the unload itself runs in a thread.)"""
        from distributed.core import Status

        if self.worker.status != Status.paused or self._evicting or self._closing:
            return
        with self._lock:
            victim = next((n for n, r in self._models.items()
                           if r.usage.users == 0 and n not in self._loading and n not in self._unloading), None)
        if victim is None:
            return
        self._evicting = True
        mem = self.worker.monitor.get_process_memory()
        logger.warning("worker %s is paused (memory %s of %s): unloading %s, which no task is using",
                       self.worker.name, _fmt(mem), _fmt(self.worker.memory_manager.memory_limit), victim)

        def run() -> None:
            try:
                self.evictions.append(victim)
                self.unload(victim)
                _trim_malloc()  # hand the freed pages back to the OS, so the RSS drops
            finally:
                self._evicting = False

        threading.Thread(target=run, name="aicluster-pressure-evict", daemon=True).start()

    def _where(self) -> str:
        label = self.assignment.label if self.assignment else "untiered"
        return f"worker {self.worker.name} ({label})"

    def _make_room(self, need: int, name: str, keep: str | None = None, how: str = "estimated") -> None:
        """Evict least recently used models until ``need`` more bytes fit the budget.

        With ``keep`` (a model just loaded and already counted in ``used``), evict others
        until the total fits, never ``keep`` itself.
        """
        if need > self.budget:
            raise ModelDoesNotFit(name, need, self.budget, self._where(), how)
        extra = 0 if keep is not None else need
        while True:
            with self._lock:
                if self.used + extra <= self.budget:
                    return
                victim = next((n for n in self._models if n != keep), None)
            if victim is None:
                return
            logger.info("evicting %s to make room for %s", victim, name)
            self.evictions.append(victim)
            self.unload(victim)

    def set_threads(self) -> None:
        if self._threads_set:
            return
        self._threads_set = True
        try:
            import torch
        except ImportError:
            return
        torch.set_num_threads(self.config.worker.torch_threads)

    def _materialize(self, name: str, spec: ModelConfig) -> ModelConfig:
        """``spec`` with a source this PC has: as it is when the file is here, else the file
        fetched from a PC of the cluster that has it, in this worker's model cache (an
        ``hf://`` file no PC has is left to ``huggingface_hub`` to download)."""
        source = spec.source
        if spec.backend not in BUILTIN or not fetchable(source) or local_path(source) is not None:
            return spec  # (a backend of the user's reads its source its own way)
        path = self.model_cache.lookup(source)
        if path is None:
            in_use = {Path(s) for s in self.sources_in_use()}

            def progress(frac: float, details: dict) -> None:
                self.worker.log_event("aicluster-load", {"model": name, "progress": frac, "phase": "fetch",
                                                         "worker": self.worker.address, **details})

            try:
                path = fetch_model(self.worker, source, self.model_cache, in_use, progress, self.holdings)
            except FetchError as e:
                if "no PC of the cluster has it" not in str(e):  # (a fetch that began: its row says why it ended)
                    self.worker.log_event("aicluster-load", {"model": name, "phase": "fetch-failed", "source": source,
                                                             "worker": self.worker.address, "error": str(e)})
                if source.startswith("hf://"):
                    return spec  # (resolve_source downloads it, or says the cache lacks it offline)
                raise
        return spec.model_copy(update={"source": str(path)})

    def sources_in_use(self) -> list[str]:
        """The files the resident models were loaded from (never evicted from the cache)."""
        return [self._model_paths[n] for n in list(self._models) if n in self._model_paths]

    def _load(self, name: str, spec: ModelConfig) -> Resident:
        spec = self._materialize(name, spec)
        self._model_paths[name] = spec.source
        plan = spec.options.get("shard_plan")
        # a split model's head holds its input layer here; the rest is on the shard servers
        self._make_room(int(plan["head_bytes"]) if plan else spec.footprint, name)
        self.set_threads()
        module, attr = backend_module(spec.backend)
        load = getattr(module, attr)
        if hasattr(module, "prepare"):
            module.prepare()  # heavy imports happen before the memory baseline
        if self.device.startswith("cuda"):
            # create the CUDA context first: it costs a few hundred MB that are not the model's
            import torch

            torch.zeros(1, device=self.device)
        rss0, cuda0 = _rss(), self._cuda_used()
        t0 = time.perf_counter()
        logger.info("loading model %s (%s from %s) on %s", name, spec.backend, spec.source, self.device)
        model = load(spec, device=self.device, threads=self.config.worker.torch_threads, name=name)
        seconds = time.perf_counter() - t0
        if self.device.startswith("cuda"):
            measured, how = max((self._cuda_used() or 0) - (cuda0 or 0), 0), "GPU memory delta"
        else:
            measured, how = max(_rss() - rss0, 0), "RSS delta"
        if hasattr(model, "worker"):
            model.worker = str(self.worker.name)  # (its crashes name this worker)
        if hasattr(model, "on_crash"):
            model.on_crash = lambda err: self._crashed(name, spec, err)
        own = int(getattr(model, "nbytes", 0) or 0)  # weights the backend says it holds
        if own > measured:
            measured, how = own, ("engine process RSS" if getattr(model, "pid", None) and self.device == "cpu"
                                  else "weights size")
        if plan:  # a split model's head holds its input layer here; its shards are held on their workers
            measured, how = own, "input layer (split model)"
        res = Resident(name=name, model=model, backend=spec.backend, nbytes=measured, measured_by=how, load_seconds=seconds)
        if self._closing:  # torn down while this load ran
            close = getattr(model, "close", None)
            if callable(close):
                close()
            raise WorkerClosing(f"worker {self.worker.name} is closing; the task runs again on another worker")
        with self._lock:
            self._models[name] = res
            self.load_counts[name] = self.load_counts.get(name, 0) + 1
        try:
            self._make_room(measured, name, keep=name, how=how)
        except ModelDoesNotFit:
            self.unload(name)
            raise
        logger.info("model %s resident: %.1f MB (%s), loaded in %.2f s", name, measured / 1e6, how, seconds)
        return res

    def _preload(self, names: list[str]) -> None:
        for n in names:
            try:
                self.get(n)
            except Exception:
                logger.exception("preloading model %s failed", n)

    def _cuda_used(self) -> int | None:
        """Bytes in use on this worker's GPU (the whole device, every process on it).

        ``torch.cuda.mem_get_info`` rather than NVML: NVML numbers GPUs in PCI bus order,
        CUDA fastest first, so an index can name a different card on a mixed PC.
        """
        if not self.device.startswith("cuda"):
            return None
        import torch

        free, total = torch.cuda.mem_get_info(self.device)
        return int(total - free)

    def _cuda_used_or_none(self) -> int | None:
        # a metric callback that raises drops the whole "aicluster" metric from the heartbeat
        try:
            return self._cuda_used()
        except Exception:
            return None

    def _empty_cuda_cache(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def _spec_key(spec: ModelConfig) -> str:
    """What a model's quarantine is tied to: its backend, source and options."""
    import json

    opts = {k: v for k, v in spec.options.items() if k != "shard_plan"}
    return json.dumps([spec.backend, spec.source, opts], sort_keys=True, default=str)


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _other_split(model, spec: ModelConfig) -> bool:
    """A resident model split otherwise than ``spec`` asks (another plan), or split when it
    should not be, or the reverse."""
    want = spec.options.get("shard_plan")
    have = getattr(model, "plan", None) if hasattr(model, "shard_info") else None
    if want is None and spec.sharded:
        return False  # asked by name only (no plan in hand): the resident head serves
    if want is None or have is None:
        return (want is None) != (have is None)
    key = lambda parts: [(p["endpoint"], p["first"], p["last"]) for p in parts]  # noqa: E731
    return key(want["parts"]) != key(have.to_dict()["parts"])


def _fmt(n) -> str:
    from dask.utils import format_bytes

    return "?" if n is None else format_bytes(n)


def _pause_fraction(worker) -> float | None:
    """Dask's ``distributed.worker.memory.pause`` for this worker (None: it never pauses)."""
    mm = getattr(worker, "memory_manager", None)
    frac = getattr(mm, "memory_pause_fraction", None)
    return float(frac) if frac else None


#: memory a worker process needs besides its models (Python, torch, Dask, task data)
PROCESS_HEADROOM = 512 * 2**20


def ram_budget(frac: float, limit: int, pause: float | None) -> int:
    """The model budget of a worker whose models sit in RAM: ``frac`` x its memory limit,
    but always below Dask's pause threshold by the room the process itself needs
    (``max(10% of the limit, 512 MiB)``). Filling a budget equal to the pause threshold
    paused the worker for good: the resident models kept the memory up."""
    budget = int(frac * limit)
    if pause:
        budget = min(budget, int(pause * limit - max(0.1 * limit, PROCESS_HEADROOM)))
    return max(budget, 0)


def _trim_malloc() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# -- run on every worker by the client (``client.run``) ------------------------------------------
def cancel_on_worker(keys: list, dask_worker=None) -> None:
    """``client.run``: end the running generations of ``keys`` on this worker."""
    host = dask_worker.plugins.get(PLUGIN_NAME)
    if host is not None:
        for k in keys:
            host.cancel(k)


async def unload_on_worker(model: str, dask_worker=None) -> bool:
    """``client.run``: unload ``model`` here (and its split layers); whether it was resident."""
    import asyncio

    host = dask_worker.plugins.get(PLUGIN_NAME)
    if host is None:
        return False
    # in a thread: unload waits for a task that is using the model, and the worker's
    # event loop (heartbeats) must not wait with it
    was = bool(await asyncio.to_thread(host.unload, model))
    return host.release_shard(model) or was
