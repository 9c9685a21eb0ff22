"""One GGUF model split by layers across several workers, on llama.cpp's RPC backend.

The pieces live where their code runs (see the README, "Models bigger than one GPU", and
ARCHITECTURE.md):

* ``workloads/shard_protocol.py``: what a plan is (``ShardPlan``) and how a head talks to
  shard servers and their workers (``probe``, ``hold``, ``release``, ``lost_servers``);
  the head (``workloads.backends.llama_head``) and this client side both use it.
* ``cluster/shard_plan.py``: the planner, pure (a GGUF layout and the workers' budgets in,
  a plan out).
* ``cluster/shard_servers.py``: the worker side, the supervised ggml RPC server a
  ``worker.shard_server: true`` worker runs.
* this module, the client side: plan for the workers connected now, route requests to the
  head that holds the model, load it with a progress bar (``AICluster`` delegates here).
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import asdict
from pathlib import Path

from workloads.backends import EMBED_BACKENDS, GENERATE_BACKENDS
from workloads.backends.sources import local_path, resolve_source
from workloads.llm import load_task
from workloads.shard_protocol import ShardPlan

from .shard_plan import GGUFLayout, ShardPlanError, candidates_of, plan, read_layout
from .shard_servers import host_state

__all__ = ["plan_for", "route_for", "load_model", "forget_plan", "current_plan", "layout_for"]

logger = logging.getLogger("cluster.shards")


# -- the client's side: plan, hold, route (AICluster delegates here) --------------------------
def _layout_on_worker(source: str, n_ctx: int) -> dict:
    return asdict(read_layout(resolve_source(source), n_ctx))


def layout_for(core, spec, candidates: list[dict]) -> GGUFLayout:
    """The model's layout, read here when the file is on this machine, else on a worker."""
    # the batch engine keeps n_ctx tokens for each of its `parallel` sequences
    n_ctx = int(spec.options.get("n_ctx", 2048)) * int(spec.options.get("parallel", 8))
    path = local_path(spec.source)
    if path is not None and Path(path).is_file():
        return read_layout(path, n_ctx)
    if not candidates:
        raise ShardPlanError("no worker runs a shard server (see `aicluster worker --help`, --shard-server)")
    where = candidates[0]["address"]
    out = core.client.run(_layout_on_worker, spec.source, n_ctx, workers=[where])
    return GGUFLayout(**out[where])


#: seconds a plan waits for shard servers that are being restarted
RESTART_WAIT = 20.0


def _restarting(states: dict) -> list[str]:
    return [st["name"] for st in states.values()
            if isinstance(st, dict) and (st.get("shard_server") or {}).get("restarting")]


def plan_for(core, model: str, workers: list[str] | None = None) -> ShardPlan:
    """``AICluster.plan_shards``: the plan for ``model`` on the workers connected now."""
    spec = core.config.model(model)
    if spec.backend != "llamacpp":
        raise ValueError(f"model {model!r} ({spec.backend}) cannot be split across workers: only llamacpp (GGUF) "
                         f"models can")
    # asked of the workers now, not read from heartbeats: a worker that just joined has not
    # reported its shard server yet, and a plan is made once per load
    states = core.client.run(host_state, on_error="return")
    deadline = time.monotonic() + RESTART_WAIT
    while _restarting(states) and time.monotonic() < deadline:
        # a server that died moments ago (its supervisor starts it again within seconds) is
        # waited for, not planned without, nor reported as missing
        time.sleep(0.5)
        states = core.client.run(host_state, on_error="return")
    candidates = candidates_of(states, core.config.tier_names, model)
    wanted = list(workers or spec.shard_workers)
    down = [(st["name"], st["shard_server"]) for addr, st in states.items()
            if isinstance(st, dict) and (st.get("shard_server") or {}).get("alive") is False
            and (not wanted or st["name"] in wanted or addr in wanted)]
    if down and (wanted or not candidates):
        raise ShardPlanError(f"model {model!r}: the shard server of " + "; of ".join(
            f"{name} ({ss['endpoint']}) is down: {ss.get('last_error') or 'no message'}"
            + ("" if ss.get("restarting") else ", and its worker gave up restarting it: restart that worker")
            for name, ss in down))
    layout = layout_for(core, spec, candidates)
    notes = []
    if spec.shard_plan_by == "speed" and candidates:
        try:
            speeds = measure_speeds(core, spec, layout, candidates, wanted)
        except Exception as e:  # (a plan by memory still works; the plan says why)
            logger.warning("model %s: shard speeds not measured: %s", model, e)
            notes.append(f"layers divided by memory: the shard servers' speeds could not be measured ({e})")
        else:
            for c in candidates:
                if c["name"] in speeds:
                    c["speed"] = speeds[c["name"]]
    out = plan(model, layout, candidates, wanted or None, spec.shard_output, spec.shard_plan_by)
    out.notes = notes + out.notes
    return out


async def _measure_on_worker(source: str, layout: dict, servers: dict, threads: int, keys: dict, skip: list,
                             tls: bool = False, dask_worker=None) -> dict:
    """``shard_speed.measure`` on this worker, in a thread: the timings take seconds to
    minutes, and a worker whose event loop they held missed its heartbeats (the scheduler
    dropped it mid-measurement on a LAN with a short worker-ttl)."""
    import asyncio

    from workloads.backends.shard_speed import measure
    from workloads.tls_tunnel import reach, worker_client_context

    def run() -> dict:
        tunnel, via = reach(list(servers.values()), worker_client_context(dask_worker) if tls else None)
        try:
            return measure(str(resolve_source(source)), layout, {n: via[e] for n, e in servers.items()},
                           threads=threads, keys=keys, skip=set(skip))
        finally:
            if tunnel is not None:
                tunnel.close()

    return await asyncio.to_thread(run)


def _prober(core, spec, lay: dict, use: list[dict], threads: int) -> str:
    """The candidate whose PC runs the probe fastest (each one's own run of the slices,
    cached there): the probe runs the input and output layers of every timing, so on a slow
    PC (a CPU quota that stalls it) its stalls drown the servers' differences."""
    if len(use) == 1:
        return use[0]["address"]
    cost, why = {}, []
    for c in use:  # one at a time: PCs of a lab share cores, and a timing shares none
        try:
            here = core.client.run(_measure_on_worker, spec.source, lay, {}, threads, {}, [], False,
                                   workers=[c["address"]])[c["address"]]["here"]
        except Exception as e:  # (that PC lacks the model file, say: it does not probe)
            why.append(f"{c['name']}: {e}")
            continue
        cost[c["address"]] = here["base_ms"] + here["layer_ms"]
    if not cost:
        raise RuntimeError("no candidate could time the model: " + "; ".join(why))
    return min(cost, key=cost.get)


def measure_speeds(core, spec, layout: GGUFLayout, candidates: list[dict], wanted: list[str]) -> dict:
    """``{name: {"layer_ms", "link_ms", "out_ms"}}`` of the candidates' shard servers, timed
    from the candidate's PC that runs the probe fastest (``workloads/backends/shard_speed.py``;
    cached there per model file and server device). A server a head is connected to now is
    not timed (it serves one head at a time): its cached figure, if any, is used."""
    use = [c for c in candidates if not wanted or c["name"] in wanted or c["address"] in wanted]
    if not use:
        return {}
    servers = {c["name"]: c["endpoint"] for c in use}
    keys = {c["name"]: c["device_key"] for c in use}
    skip = [c["name"] for c in use if c["connected"]]
    threads = max(int(c.get("threads") or 1) for c in use)
    lay = {"n_layer": layout.n_layer, "layer_bytes": layout.layer_bytes}
    tls = any(c.get("tls") for c in use)
    prober = _prober(core, spec, lay, use, threads)
    got = core.client.run(_measure_on_worker, spec.source, lay, servers, threads, keys, skip, tls,
                          workers=[prober])[prober]
    here = got.pop("here", None)
    out = {}
    for name, m in got.items():
        # the output layer (and the input embedding) on that server: as long as here, scaled
        # by how much faster or slower its layers run than here
        scale = m["layer_ms"] / here["layer_ms"] if here and here["layer_ms"] > 0 else 1.0
        out[name] = {"layer_ms": m["layer_ms"], "link_ms": m["link_ms"],
                     "out_ms": (here["base_ms"] if here else m["base_ms"]) * scale}
    return out


def current_plan(workers: dict, model: str) -> ShardPlan | None:
    """The plan of the head that holds ``model`` now and works (from the heartbeats), if
    every worker of it is still here; else None (plan again)."""
    for w in workers.values():
        m = (((w.get("metrics") or {}).get("aicluster") or {}).get("models") or {}).get(model) or {}
        if m.get("shard") and m["shard"].get("healthy", True):
            p = ShardPlan.from_dict(m["shard"]["plan"])
            if all(part.worker in workers for part in p.parts):
                return p
    return None


class _Plans:
    """A client's plans of split models not yet reported by their heads: concurrent first
    requests wait for one plan (one client.run on every worker, one GGUF header read) and
    all get it, instead of each making its own and the head loading, unloading and loading
    again as the splits differ."""

    #: a plan the head has not reported for this long is made again
    FRESH = 300.0

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.locks: dict[str, threading.Lock] = {}
        self.plans: dict[str, tuple[ShardPlan, float]] = {}

    def lock_for(self, model: str) -> threading.Lock:
        with self.lock:
            return self.locks.setdefault(model, threading.Lock())


#: each client's (``Core``'s) plans
_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_PLANS_LOCK = threading.Lock()


def _plans_of(core) -> _Plans:
    with _PLANS_LOCK:
        plans = _PLANS.get(core)
        if plans is None:
            plans = _PLANS[core] = _Plans()
        return plans


def forget_plan(core, model: str) -> None:
    """The next request plans ``model`` afresh (it was unloaded)."""
    _plans_of(core).plans.pop(model, None)


def _head_state(workers: dict, model: str) -> str | None:
    """"healthy", "broken" or "loading" as the heads' heartbeats report ``model``; None."""
    for w in workers.values():
        host = (w.get("metrics") or {}).get("aicluster") or {}
        m = (host.get("models") or {}).get(model) or {}
        if m.get("shard"):
            return "healthy" if m["shard"].get("healthy", True) else "broken"
        if model in (host.get("loading") or []):
            return "loading"
    return None


def route_for(core, model: str, spec, parallel: int):
    """``(spec with its plan, Route to the head)`` for a split model: the head that holds
    it now, or a new plan (held on its workers) that the head loads on first use."""
    from dataclasses import replace

    from . import routing

    cache = _plans_of(core)
    named = spec.shard_workers
    with cache.lock_for(model):
        workers = core.workers()
        p = current_plan(workers, model)
        state = _head_state(workers, model)
        if p is None and state in (None, "loading") and model in cache.plans:
            # planned by an earlier request whose head has not reported it yet: the same plan
            cached, when = cache.plans[model]
            if time.monotonic() - when < cache.FRESH and all(part.worker in workers for part in cached.parts):
                p = cached
        if p is None or p.head not in workers or p.output != spec.shard_output or (
                named and named not in ([x.name for x in p.named_order], [x.worker for x in p.named_order])):
            p = plan_for(core, model)  # the head holds the parts' bytes on their workers when it loads
            cache.plans[model] = (p, time.monotonic())
        elif state == "healthy":
            cache.plans.pop(model, None)  # the head reports it: its heartbeat is the truth now
    tier = next(part.tier for part in p.parts if part.worker == p.head)
    route = routing.Route(tier=tier, chain=[tier], workers=[p.head], tier_workers=[p.head], model=model)
    route = replace(route, amount=routing.slot_share(parallel))
    return spec.model_copy(update={"options": {**spec.options, "shard_plan": p.to_dict()}}), route


def load_model(core, model: str, progress: bool = True) -> dict:
    """``AICluster.load_model``: load ``model`` now on the worker it is routed to (a split
    model: its head, with a progress bar fed by the head's ``aicluster-load`` events)."""
    import uuid

    spec, route = core.model_route(model, GENERATE_BACKENDS + EMBED_BACKENDS, "load")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=100, desc=f"loading {model}", unit="%", bar_format="{l_bar}{bar}| {n:.0f}/{total}%")

        def on_event(event) -> None:
            info = event[1]
            if info.get("model") == model:
                bar.n = round(100 * float(info["progress"]), 1)
                bar.refresh()

        core.client.subscribe_topic("aicluster-load", on_event)
    out = None
    try:
        f = core.submit_routed(route, f"load {model}", load_task, model, spec, kind="load",
                              key=f"load-{model}-{uuid.uuid4().hex[:12]}")
        out = f.result()
    finally:
        if bar is not None:
            core.client.unsubscribe_topic("aicluster-load")
            if out is not None:
                bar.n = 100
            bar.close()
    return out
