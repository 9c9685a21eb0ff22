"""Execution patterns: one input through several models at once, and bounded batches.

``fan_out`` sends one input to several branches (models or functions) in parallel and
aggregates their outputs:

* ``first``: the first branch to finish wins; the others are cancelled (a running
  generation stops within a token or two).
* ``all``: every output, by branch.
* ``majority``: the most common output (texts compared stripped); ties go to the branch
  listed first. For classification-like outputs.
* ``weighted_average``: numbers or arrays, weighted (equal weights by default).
* ``ensemble``: ``combine(outputs)``, your function, on the client.

``batch`` runs one branch over many inputs with at most ``in_flight`` submitted at once
and a progress bar, returning results in input order.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .jobs import failure, wait_all

from .pipeline import StageFailed, compile_pipeline, route_stage, submit_stage

__all__ = ["fan_out", "batch", "FanOutResult", "AGGREGATES"]

AGGREGATES = ("first", "all", "majority", "weighted_average", "ensemble")


@dataclass
class FanOutResult:
    value: Any
    aggregate: str
    outputs: dict[str, Any] = field(default_factory=dict)  # branch -> output (finished branches)
    workers: dict[str, str] = field(default_factory=dict)  # branch -> worker
    winner: str | None = None  # for first / majority
    votes: dict | None = None  # for majority
    cancelled: list[str] = field(default_factory=list)


def _branch_stage(branch, i: int) -> tuple[str, dict]:
    """A branch (a model name, a callable, a "pkg.mod:fn", or a stage dict) as a stage."""
    if isinstance(branch, dict):
        st = dict(branch)
        name = st.pop("name", None) or f"{st.get('model') or st.get('kind')}#{i}"
        kind = st.get("kind")
        if kind == "generate":
            st.setdefault("prompt", "{input}")
        elif kind == "chat":
            st.setdefault("messages", [{"role": "user", "content": "{input}"}])
        elif kind == "embed":
            st.setdefault("texts", "$input")
        elif kind is not None:
            st.setdefault("args", ["$input"])
        return name, st
    if callable(branch):
        return f"{getattr(branch, '__name__', 'fn')}#{i}", {"kind": branch, "args": ["$input"]}
    if isinstance(branch, str) and ":" in branch:
        return f"{branch.rsplit(':', 1)[1]}#{i}", {"kind": branch, "args": ["$input"]}
    raise TypeError(f"branch {i}: expected a stage dict, a callable or 'package.module:function', got {branch!r:.60}; "
                    f"for a model write {{'kind': 'generate', 'model': {branch!r}}}")


def _numeric(name: str, value):
    import numpy as np

    if isinstance(value, dict) and "text" in value:
        raise TypeError(f"branch {name!r} returned text; weighted_average needs numbers or arrays")
    arr = np.asarray(value)
    if arr.dtype.kind not in "iufb":
        raise TypeError(f"branch {name!r} returned {type(value).__name__}; weighted_average needs numbers or arrays")
    return arr.astype(float)


def _vote_key(value):
    if isinstance(value, dict) and "text" in value:
        return value["text"].strip()
    if isinstance(value, str):
        return value.strip()
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


def _submit_branches(core, value, branches, tag: str, priority: int = 0) -> tuple[dict, dict]:
    """Compile the branches as a one-input pipeline and submit them; (plan, futures)."""
    import uuid

    stages = dict(_branch_stage(b, i) for i, b in enumerate(branches))
    if len(stages) != len(branches):
        raise ValueError("two branches have the same name; give them distinct 'name' keys")
    plan = compile_pipeline({"name": tag, "params": {"input": value}, "stages": stages}, core.config)
    token = uuid.uuid4().hex[:8]
    futures = {}
    routes = {name: route_stage(core, sp, f"{tag}: {name}") for name, sp in plan.stages.items()}  # all before any submit
    for name, sp in plan.stages.items():
        spec_model, route = routes[name]
        args = (tag, name, sp.kind, sp.spec, sp.fn, plan.params, {}, sp.model, spec_model)
        futures[name] = submit_stage(core, route, f"{tag}: {name}", args, tag, f"{tag}-{name}-{token}".replace("#", "_"),
                                     priority=priority if sp.priority is None else sp.priority)
    return plan, futures


def fan_out(core, value, branches: Sequence, aggregate: str = "all", weights: Sequence[float] | None = None,
            combine: Callable[[list], Any] | None = None, timeout: float | None = None,
            priority: int = 0) -> FanOutResult:
    """Run ``value`` through every branch at once and aggregate (see the module docstring)."""
    from distributed import as_completed

    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate {aggregate!r} is not one of {', '.join(AGGREGATES)}")
    if not branches:
        raise ValueError("no branches given")
    if aggregate == "ensemble" and not callable(combine):
        raise ValueError("aggregate='ensemble' needs combine=<a function of the list of outputs>")
    if weights is not None and len(weights) != len(branches):
        raise ValueError(f"{len(weights)} weights for {len(branches)} branches")
    plan, futures = _submit_branches(core, value, branches, "fan-out", priority)
    names = list(futures)
    res = FanOutResult(value=None, aggregate=aggregate)
    if aggregate == "first":
        errors = {}
        by_key = {f.key: n for n, f in futures.items()}
        for f in as_completed(list(futures.values()), loop=core.client.loop, timeout=timeout):
            name = by_key[f.key]
            err = failure(f)
            if err is not None:
                errors[name] = err
                continue
            out = f.result()
            res.value, res.winner = out["output"], name
            res.outputs[name], res.workers[name] = out["output"], out["worker"]
            rest = [g for g in futures.values() if g.key != f.key and not g.done()]
            if rest:
                core.cancel(rest)
                res.cancelled = [by_key[g.key] for g in rest]
            return res
        raise StageFailed("fan-out", ", ".join(errors), RuntimeError(
            "every branch failed: " + "; ".join(f"{n}: {type(e).__name__}: {e}" for n, e in errors.items())))
    wait_all(core.client, futures.values(), timeout=timeout)
    for name, f in futures.items():
        err = failure(f)
        if err is not None:
            raise StageFailed("fan-out", name, err) from err
    results = core.client.gather(futures)
    res.outputs = {n: results[n]["output"] for n in names}
    res.workers = {n: results[n]["worker"] for n in names}
    outs = [res.outputs[n] for n in names]
    if aggregate == "all":
        res.value = dict(res.outputs)
    elif aggregate == "majority":
        keys = [_vote_key(o) for o in outs]
        counts = Counter(keys)
        top = max(counts.values())
        winner_i = next(i for i, k in enumerate(keys) if counts[k] == top)  # ties: first listed
        res.value, res.winner, res.votes = outs[winner_i], names[winner_i], dict(counts)
    elif aggregate == "weighted_average":
        w = [1.0] * len(outs) if weights is None else [float(x) for x in weights]
        if sum(w) == 0:
            raise ValueError("weights sum to 0")
        arrs = [_numeric(n, o) for n, o in zip(names, outs)]
        total = sum(wi * a for wi, a in zip(w, arrs)) / sum(w)
        res.value = float(total) if total.ndim == 0 else total
    else:  # ensemble
        res.value = combine(outs)
    return res


def batch(core, branch, items: Sequence, in_flight: int = 8, progress: bool = True,
          errors: str = "raise", priority: int = 0) -> list:
    """Run ``branch`` (as in ``fan_out``) over ``items``, at most ``in_flight`` at once.

    Returns the outputs in input order. ``errors="return"`` puts the exception in place of
    a failed item's output instead of raising at the first failure.
    """
    from distributed import as_completed
    from tqdm.auto import tqdm

    if errors not in ("raise", "return"):
        raise ValueError("errors must be 'raise' or 'return'")
    if isinstance(in_flight, bool) or not isinstance(in_flight, int) or in_flight <= 0:
        raise ValueError(f"in_flight must be a positive integer, got {in_flight!r}")
    items = list(items)
    out: list = [None] * len(items)
    pending = iter(enumerate(items))
    index: dict = {}
    live: dict = {}

    def submit_next(ac) -> None:
        nxt = next(pending, None)
        if nxt is not None:
            i, item = nxt
            _, futs = _submit_branches(core, item, [branch], "batch", priority)
            (f,) = futs.values()
            index[f.key] = i
            live[f.key] = f
            ac.add(f)

    ac = as_completed([], loop=core.client.loop)
    for _ in range(min(in_flight, len(items))):
        submit_next(ac)
    with tqdm(total=len(items), desc="batch", unit="item", disable=not progress) as bar:
        for f in ac:
            i = index.pop(f.key)
            live.pop(f.key, None)
            err = failure(f)
            if err is not None:
                if errors == "raise":
                    if live:
                        core.cancel(list(live.values()))
                    raise StageFailed("batch", f"item {i}", err) from err
                out[i] = err
            else:
                out[i] = f.result()["output"]
            bar.update(1)
            submit_next(ac)
    return out
