"""Text generation tasks: run on a worker, with the model the worker keeps resident."""
from __future__ import annotations

import time

from distributed import secede
from distributed.core import Status

from ._host import host_and_worker, where
from .backends import WrongModelKind, chat_prompt, precheck


def generate_task(prompt: str | None, model: str, spec, params: dict, index: int | None = None,
                  topic: str | None = None, stream_id: str | None = None, task_priority: int = 0,
                  messages: list[dict] | None = None) -> dict:
    """Generate for one prompt (or chat ``messages``, formatted here with the model's chat
    template); ``topic`` streams ``(stream_id, piece)`` worker events; ``task_priority``
    (the Dask priority it was submitted with) orders requests waiting for a slot of the
    model's batch."""
    host, worker = host_and_worker()
    t0 = time.perf_counter()
    loads_before = host.load_counts.get(model, 0)
    if messages is not None:
        formatted = chat_prompt(spec, messages, model)  # from the vocabulary, when the file is here
        if formatted is not None:
            prompt, chat_stops = formatted
            params = {**params, "stop": list(params.get("stop") or []) + chat_stops}
    # a prompt over the context is refused before this task waits for (or loads) the model,
    # when the model file is here already; otherwise once the model is loaded
    checked = prompt is not None and precheck(spec, [prompt], model, params["max_tokens"], index)
    with host.acquire(model, spec) as m:
        acquired = time.perf_counter()
        if getattr(m, "kind", "generate") != "generate":
            raise WrongModelKind(f"model {model!r} is an embedding model; it cannot generate text")
        if prompt is None:
            prompt, chat_stops = m.chat_prompt(messages)
            params = {**params, "stop": list(params.get("stop") or []) + chat_stops}
        if not checked:
            m.check_fits(prompt, params["max_tokens"], index)
        on_token = (lambda piece: worker.log_event(topic, (stream_id, piece))) if topic else None
        key = worker.get_current_task()
        should_stop = lambda: host.is_cancelled(key)  # noqa: E731
        if getattr(m, "concurrent", False):
            # the request joins the model's running batch; this task then leaves its worker
            # thread (secede), so the worker starts the next generation task at once: the
            # tier resource each takes (a fraction, see cluster.routing) bounds how many
            req = m.submit(prompt, on_token=on_token, should_stop=should_stop, priority=task_priority, **params)
            # Not while the worker closes: its thread pool's shutdown holds the lock that
            # secede() takes while it joins the pool's threads, this one included (distributed
            # 2026.8), and the close would hang for its whole timeout.
            if worker.status == Status.running:
                secede()
            out = req.wait()
        else:
            out = m.generate(prompt, on_token=on_token, should_stop=should_stop, **params)
    if out["finish_reason"] == "cancelled":
        # the client has let go of this task; say how far it got, for the job board and tests
        worker.log_event("aicluster-cancelled", {"key": str(key), "model": model,
                                                 "completion_tokens": out["completion_tokens"]})
    if topic:
        worker.log_event(topic, (stream_id, None))  # end of stream
    out.update(where(host, worker))
    if messages is not None:
        out["message"] = {"role": "assistant", "content": out["text"]}
    out.update(model=model, loaded_now=host.load_counts.get(model, 0) > loads_before,
               wait_seconds=acquired - t0, total_seconds=time.perf_counter() - t0)
    secs = out["generate_seconds"]
    out["tokens_per_second"] = out["completion_tokens"] / secs if secs > 0 else None
    return out


def load_task(model: str, spec) -> dict:
    """Load ``model`` on this worker (a split model: its head, across its planned shard
    servers) and say what is resident."""
    host, worker = host_and_worker()
    res = host.get(model, spec)
    out = {"model": model, **res.info(), **where(host, worker)}
    out.pop("shard", None)
    return out
