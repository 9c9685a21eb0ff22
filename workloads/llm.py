"""Text generation tasks: run on a worker, with the model the worker keeps resident."""
from __future__ import annotations

import logging
import time

from distributed import secede
from distributed.core import Status

from .host import PLUGIN_NAME, host_and_worker, where
from .backends import ModelCrashed, WrongModelKind, chat_prompt, precheck
from .streaming import StreamSender

logger = logging.getLogger("workloads.llm")


class StreamCut(RuntimeError):
    """A stream whose earlier run sent text cannot be continued by this model's backend."""


def generate_task(prompt: str | None, model: str, spec, params: dict, index: int | None = None,
                  stream_id: str | None = None, task_priority: int = 0, messages: list[dict] | None = None,
                  crash_retry: bool = True, resume_from: dict | None = None) -> dict:
    """Generate for one prompt (or chat ``messages``, formatted here with the model's chat
    template). ``stream_id``: pieces go to the scheduler's stream hub
    (``workloads/streaming.py``); a run after a lost worker continues the text the stream
    sent already. ``task_priority`` (the Dask priority it was submitted with) orders requests
    waiting for a slot of the model's batch. ``crash_retry``: when the model crashes here
    (``ModelCrashed``), try it once on a worker with another build or device.
    ``resume_from``: what the client had received of this stream before its scheduler
    restarted (the new scheduler's hub starts from it)."""
    host, worker = host_and_worker()
    t0 = time.perf_counter()
    loads_before = host.load_counts.get(model, 0)
    key = worker.get_current_task()
    if messages is not None:
        formatted = chat_prompt(spec, messages, model)  # from the vocabulary, when the file is here
        if formatted is not None:
            prompt, chat_stops = formatted
            params = {**params, "stop": list(params.get("stop") or []) + chat_stops}
    # a prompt over the context is refused before this task waits for (or loads) the model,
    # when the model file is here already; otherwise once the model is loaded
    checked = prompt is not None and precheck(spec, [prompt], model, params["max_tokens"], index)
    sender = StreamSender(worker, stream_id) if stream_id else None
    prior = sender.start(seed=resume_from) if sender is not None else None
    seceded = False
    try:
        with host.acquire(model, spec) as m:
            acquired = time.perf_counter()
            if getattr(m, "kind", "generate") != "generate":
                raise WrongModelKind(f"model {model!r} is an embedding model; it cannot generate text")
            if prompt is None:
                prompt, chat_stops = m.chat_prompt(messages)
                params = {**params, "stop": list(params.get("stop") or []) + chat_stops}
            if not checked:
                m.check_fits(prompt, params["max_tokens"], index)
            extra: dict = {}
            if sender is not None:
                if prior["text"] or prior["ids"]:
                    if not getattr(m, "can_resume", False):
                        raise StreamCut(f"the stream was cut: its worker was lost after it had sent text, and model "
                                        f"{model!r} ({spec.backend}) cannot continue a generation; generate again")
                    extra["resume"] = prior
                if getattr(m, "can_resume", False):
                    extra["on_piece"] = sender.send
                else:
                    extra["on_token"] = lambda piece: sender.send(piece, [])
            should_stop = lambda: host.is_cancelled(key)  # noqa: E731
            if getattr(m, "concurrent", False):
                # the request joins the model's running batch; this task then leaves its worker
                # thread (secede), so the worker starts the next generation task at once: the
                # tier resource each takes (a fraction, see cluster.routing) bounds how many
                req = m.submit(prompt, should_stop=should_stop, priority=task_priority, **extra, **params)
                # Not while the worker closes: its thread pool's shutdown holds the lock that
                # secede() takes while it joins the pool's threads, this one included (distributed
                # 2026.8), and the close would hang for its whole timeout.
                if worker.status == Status.running:
                    secede()
                    seceded = True
                out = req.wait()
            else:
                out = m.generate(prompt, should_stop=should_stop, **extra, **params)
    except ModelCrashed as crash:
        if not crash_retry:
            raise
        return _retry_elsewhere(crash, host, worker, key, (prompt, model, spec, params, index, stream_id,
                                                           task_priority, messages), seceded)
    if out["finish_reason"] == "cancelled":
        # the client has let go of this task; say how far it got, for the job board and tests
        worker.log_event("aicluster-cancelled", {"key": str(key), "model": model,
                                                 "completion_tokens": out["completion_tokens"]})
    if sender is not None:
        sender.send(None)  # end of stream
    out.update(where(host, worker))
    if messages is not None:
        out["message"] = {"role": "assistant", "content": out["text"]}
    out.update(model=model, loaded_now=host.load_counts.get(model, 0) > loads_before,
               wait_seconds=acquired - t0, total_seconds=time.perf_counter() - t0)
    secs = out["generate_seconds"]
    out["tokens_per_second"] = out["completion_tokens"] / secs if secs > 0 else None
    return out


def _retry_elsewhere(crash: ModelCrashed, host, worker, key, args: tuple, seceded: bool) -> dict:
    """Run the generation once more on a worker that differs from this one (another llama.cpp
    build, CPU or device) and has not quarantined the model; else raise the crash. A native
    crash tried on every worker in turn took each one down (the same build crashes the same
    way)."""
    from distributed import get_client

    model, spec = args[1], args[2]
    client = get_client()
    chain = host.config.fallback_chain(spec.tier)
    ts = worker.state.tasks.get(key)
    amount = max((ts.resource_restrictions or {}).values(), default=1) if ts is not None else 1
    mine = _fingerprint(host.build)
    # asked of the workers now, not read from their last heartbeats: a quarantine lifted a
    # moment ago (ai.unload) or a worker that just joined is seen as it is
    facts = client.run(_crash_facts, model, on_error="return")
    target, why = None, []
    for addr, w in client.scheduler_info(n_workers=-1)["workers"].items():
        if addr == worker.address:
            continue
        name = w.get("name", addr)
        tier = next((t for t in chain if (w.get("resources") or {}).get(t, 0) > 0), None)
        f = facts.get(addr)
        if tier is None:
            why.append(f"{name}: not of its tiers")
        elif not isinstance(f, dict):
            why.append(f"{name}: did not answer ({f})")
        elif f["quarantined"]:
            why.append(f"{name}: quarantined it")
        elif _fingerprint(f["build"]) == mine:
            why.append(f"{name}: the same build, CPU and device")
        else:
            target = (addr, tier)
            break
    if target is None:
        raise crash.with_note("It was not tried elsewhere: no other worker of its tiers has another llama.cpp "
                              "build, CPU or device" + (f" ({'; '.join(why)})" if why else "")) from None
    addr, tier = target
    logger.warning("%s; trying it once on %s, which has another build or device", crash, addr)
    prompt, model, spec, params, index, stream_id, task_priority, messages = args
    f = client.submit(generate_task, prompt, model, spec, params, index, stream_id, task_priority, messages,
                      crash_retry=False, key=f"{key}-after-crash", workers=[addr], resources={tier: amount},
                      allow_other_workers=False, pure=False, priority=task_priority)
    if not seceded and worker.status == Status.running:
        secede()  # (its thread waits; the worker runs other tasks meanwhile)
    try:
        out = f.result()
    except ModelCrashed as again:
        raise again.with_note(f"It crashed on {crash.worker} first ({crash.signal}), then here") from None
    out["retried_after_crash"] = {"worker": crash.worker, "signal": crash.signal, "frame": crash.frame}
    return out


def _crash_facts(model: str, dask_worker=None) -> dict:
    host = dask_worker.plugins.get(PLUGIN_NAME)
    if host is None:
        return {"build": {}, "quarantined": True}
    return {"build": host.build or {}, "quarantined": model in host.quarantine}


def _fingerprint(build: dict) -> tuple:
    return (build.get("llama"), build.get("cpu"), build.get("device"))


def load_task(model: str, spec) -> dict:
    """Load ``model`` on this worker (a split model: its head, across its planned shard
    servers) and say what is resident."""
    host, worker = host_and_worker()
    res = host.get(model, spec)
    out = {"model": model, **res.info(), **where(host, worker)}
    out.pop("shard", None)
    return out
