"""Pipelines: named stages of model calls and Python functions, compiled into Dask futures.

A spec (a dict, a YAML file, or the name of one shipped in ``workloads/pipelines/``)::

    name: rag
    params:                      # values a run may override (--set question="...")
      question: "How much memory does the RTX 3060 have?"
    stages:
      corpus:        {kind: "workloads.retrieval:load_corpus", tier: CPU}
      passages:      {kind: embed, model: minilm, texts: $corpus, options: {normalize: true}}
      query:         {kind: embed, model: minilm, texts: "{question}"}
      nearest:       {kind: "workloads.retrieval:nearest_passages", tier: CPU,
                      args: {query: $query, vectors: $passages, passages: $corpus, k: 3}}
      answer:        {kind: generate, model: gemma-270m,
                      prompt: "Context: {nearest}\\nQuestion: {question}\\nAnswer:",
                      options: {max_tokens: 48, stop: ["\\n"]}}

* ``kind``: ``generate``, ``embed``, or a function as ``"package.module:function"``.
* ``$name`` is the whole output of stage (or param) ``name``; ``$name.key`` one item of it.
* ``{name}`` inside a string is replaced by that output as text (a generation's text, list
  items one per line); ``{{`` and ``}}`` are literal braces.
* ``tier`` overrides the model's tier (a function without one runs on any worker).

Everything is checked before anything is submitted: unknown keys and kinds, unknown or
mistyped models, references to missing stages or params, and cycles, each error naming
the stage. Independent stages run at the same time on their tiers; a stage receives its
inputs worker to worker (Dask moves the upstream results; the client never holds them).
"""
from __future__ import annotations

import graphlib
import string
import uuid
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from workloads.stages import as_text, import_callable, ref, run_stage

from . import routing
from .jobs import failure, wait_all
from .status import text_table

__all__ = ["PipelineError", "StageFailed", "Plan", "PipelineRun", "PipelineResult", "compile_pipeline",
           "load_spec", "shipped_pipelines", "as_text"]

STAGE_KEYS = {
    "generate": {"kind", "model", "tier", "prompt", "options", "description", "priority"},
    "chat": {"kind", "model", "tier", "messages", "options", "description", "priority"},
    "embed": {"kind", "model", "tier", "texts", "options", "description", "priority"},
    "call": {"kind", "tier", "args", "description", "priority"},
}
OPTIONS = {
    "generate": {"max_tokens", "temperature", "top_p", "stop", "seed"},
    "chat": {"max_tokens", "temperature", "top_p", "stop", "seed"},
    "embed": {"batch_size", "normalize", "truncate"},
}
MODEL_BACKENDS = {"generate": ("llamacpp", "transformers"), "chat": ("llamacpp", "transformers"),
                  "embed": ("sentence_transformers",)}
#: stage kinds that run a model (the others call a function)
MODEL_KINDS = ("generate", "chat", "embed")


class PipelineError(ValueError):
    """A spec that cannot run; one line per problem, each naming the stage."""

    def __init__(self, name: str, problems: list[str]):
        self.name, self.problems = name, list(problems)
        super().__init__(f"pipeline {name!r}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))

    def __reduce__(self):
        return (type(self), (self.name, self.problems))


class StageFailed(RuntimeError):
    """A stage raised while running; ``stage`` names it, ``__cause__`` is the error."""

    def __init__(self, pipeline: str, stage: str, error: BaseException):
        self.pipeline, self.stage, self.error = pipeline, stage, error
        super().__init__(f"pipeline {pipeline!r}, stage {stage!r} failed: {type(error).__name__}: {error}")

    def __reduce__(self):
        return (type(self), (self.pipeline, self.stage, self.error))


# -- references and templates (the worker resolves them: workloads/stages.py) -------------------
def _template_fields(text: str) -> list[tuple[str, str | None]]:
    out = []
    for _, fieldname, _, _ in string.Formatter().parse(text):
        if fieldname is not None:
            name, _, key = fieldname.partition(".")
            out.append((name, key or None))
    return out


def _refs_in(value) -> list[tuple[str, str | None]]:
    """Every reference in a stage value: $refs, {template} fields, inside lists and dicts."""
    r = ref(value)
    if r:
        return [r]
    if isinstance(value, str):
        try:
            return _template_fields(value)
        except ValueError as e:  # a lone brace
            raise PipelineError("?", [f"bad template {value[:60]!r}: {e}; write {{{{ and }}}} for literal braces"])
    if isinstance(value, dict):
        return [x for v in value.values() for x in _refs_in(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _refs_in(v)]
    return []


# -- specs and plans ------------------------------------------------------------------------
def shipped_pipelines() -> dict[str, Path]:
    """Pipelines shipped with the project, by name."""
    folder = files("workloads").joinpath("pipelines")
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith((".yaml", ".yml"))}


def load_spec(source: str | Path | dict) -> dict:
    """A spec dict from a dict, a YAML file, or the name of a shipped pipeline."""
    if isinstance(source, dict):
        return source
    shipped = shipped_pipelines()
    path = shipped.get(str(source)) or Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"pipeline {str(source)!r}: no such file, and not a shipped pipeline "
                                f"({', '.join(sorted(shipped)) or 'none'})")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise PipelineError(str(path), [f"not valid YAML: {e}"]) from None
    if not isinstance(spec, dict):
        raise PipelineError(str(path), ["expected a mapping with 'stages'"])
    spec.setdefault("name", path.stem)
    return spec


@dataclass
class StagePlan:
    name: str
    kind: str  # generate | embed | call
    spec: dict
    deps: list[str]
    model: str | None = None
    tier: str | None = None
    fn: Any = None  # "pkg.mod:fn" or a callable
    priority: int | None = None  # the stage's own (None: the run's)


@dataclass
class Plan:
    name: str
    params: dict
    stages: dict[str, StagePlan] = field(default_factory=dict)  # in a topological order

    @property
    def order(self) -> list[str]:
        return list(self.stages)


def compile_pipeline(spec: dict, config, params: dict | None = None) -> Plan:
    """Check ``spec`` against ``config`` and order its stages; raises ``PipelineError``."""
    name = str(spec.get("name", "pipeline"))
    problems: list[str] = []
    extra = set(spec) - {"name", "params", "stages", "description", "output"}
    if extra:
        problems.append(f"unknown top-level key(s) {', '.join(sorted(extra))}; allowed: name, description, params, stages, output")
    base = spec.get("params") or {}
    if not isinstance(base, dict):
        problems.append("params: expected a mapping of name: default value")
        base = {}
    values = dict(base)
    for k, v in (params or {}).items():
        if k not in base:
            problems.append(f"param {k!r} is not declared under params (declared: {', '.join(base) or 'none'})")
        values[k] = v
    stages = spec.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise PipelineError(name, problems + ["stages: expected a non-empty mapping of stage name: stage"])
    clash = set(stages) & set(values)
    for c in sorted(clash):
        problems.append(f"stage {c!r}: a param has the same name; rename one")
    plans: dict[str, StagePlan] = {}
    for sname, st in stages.items():
        where = f"stage {sname!r}"
        if not isinstance(st, dict):
            problems.append(f"{where}: expected a mapping with at least 'kind'")
            continue
        kind_value = st.get("kind")
        if kind_value is None:
            problems.append(f"{where}: 'kind' is missing; use generate, chat, embed or 'package.module:function'")
            continue
        fn = None
        if kind_value in MODEL_KINDS:
            kind = kind_value
        elif callable(kind_value) or (isinstance(kind_value, str) and ":" in kind_value):
            kind = "call"
            if isinstance(kind_value, str):
                try:
                    import_callable(kind_value)
                except (ImportError, AttributeError, TypeError, ValueError) as e:
                    problems.append(f"{where}: kind {kind_value!r} cannot be imported ({type(e).__name__}: {e})")
            fn = kind_value
        else:
            problems.append(f"{where}: unknown kind {kind_value!r}; use generate, chat, embed or 'package.module:function'")
            continue
        unknown = set(st) - STAGE_KEYS[kind]
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed for {kind}: {', '.join(sorted(STAGE_KEYS[kind]))}")
        model = st.get("model")
        tier = st.get("tier")
        priority = st.get("priority")
        if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
            problems.append(f"{where}: priority must be an integer (higher runs first), got {priority!r}")
        if tier is not None and tier not in config.tiers:
            problems.append(f"{where}: tier {tier!r} is not a tier; known: {', '.join(config.tiers)}")
        if kind in MODEL_KINDS:
            if model is None:
                problems.append(f"{where}: a {kind} stage needs a model")
            elif model not in config.models:
                problems.append(f"{where}: unknown model {model!r}; models: {', '.join(config.models)}")
            elif config.models[model].backend in sum(MODEL_BACKENDS.values(), ()) and config.models[model].backend not in MODEL_BACKENDS[kind]:
                can = [n for n, m in config.models.items() if m.backend in MODEL_BACKENDS[kind]]
                problems.append(f"{where}: model {model!r} ({config.models[model].backend}) cannot {kind}; models that can: {', '.join(can)}")
            opts = st.get("options") or {}
            if not isinstance(opts, dict):
                problems.append(f"{where}: options must be a mapping")
            else:
                bad = set(opts) - OPTIONS[kind]
                if bad:
                    problems.append(f"{where}: unknown option(s) {', '.join(sorted(bad))}; allowed: {', '.join(sorted(OPTIONS[kind]))}")
                mt = opts.get("max_tokens", 1)
                if kind != "embed" and (isinstance(mt, bool) or not isinstance(mt, int) or mt <= 0):
                    problems.append(f"{where}: options.max_tokens must be a positive integer, got {mt!r}")
                stop = opts.get("stop", [])
                if kind != "embed" and not (isinstance(stop, list) and all(isinstance(x, str) for x in stop)):
                    problems.append(f"{where}: options.stop must be a list of strings, e.g. [\"\\n\"], got {stop!r}")
                for key, typ in (("temperature", (int, float)), ("top_p", (int, float)), ("batch_size", int)):
                    if key in opts and (isinstance(opts[key], bool) or not isinstance(opts[key], typ) or opts[key] < 0):
                        problems.append(f"{where}: options.{key} must be a non-negative number, got {opts[key]!r}")
            needed = {"generate": "prompt", "chat": "messages", "embed": "texts"}[kind]
            if needed not in st:
                problems.append(f"{where}: a {kind} stage needs {needed!r}")
            elif kind == "chat" and not (isinstance(st["messages"], list) and st["messages"] and all(
                    isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and "content" in m
                    for m in st["messages"])):
                problems.append(f"{where}: messages must be a list of {{role: system|user|assistant, content: ...}}")
        try:
            refs = _refs_in({k: v for k, v in st.items() if k in ("prompt", "texts", "args", "messages")})
        except PipelineError as e:
            problems.append(f"{where}: {e.problems[0]}")
            refs = []
        deps = []
        for name_ref, _ in refs:
            if name_ref in stages:
                if name_ref == sname:
                    problems.append(f"{where}: refers to itself")
                elif name_ref not in deps:
                    deps.append(name_ref)
            elif name_ref not in values:
                problems.append(f"{where}: refers to {name_ref!r}, which is neither a stage nor a param "
                                f"(stages: {', '.join(stages)}; params: {', '.join(values) or 'none'})")
        plans[sname] = StagePlan(sname, kind, st, deps, model=model, tier=tier, fn=fn,
                                 priority=priority if isinstance(priority, int) else None)
    order: list[str] = []
    if not problems:
        try:
            order = list(graphlib.TopologicalSorter({n: p.deps for n, p in plans.items()}).static_order())
        except graphlib.CycleError as e:
            cycle = e.args[1]
            problems.append(f"stages {' -> '.join(repr(c) for c in cycle)} form a cycle")
    if problems:
        raise PipelineError(name, problems)
    return Plan(name=name, params=values, stages={n: plans[n] for n in order})


# -- results --------------------------------------------------------------------------------
class PipelineResult(dict):
    """``{stage: output}``, with ``.stages`` (worker, tier, times per stage) and a table."""

    def __init__(self, name: str, results: dict[str, dict], output: str):
        super().__init__({k: v["output"] for k, v in results.items()})
        self.name, self.stages, self.output_stage = name, results, output
        t0 = min(r["start"] for r in results.values())
        self.spans = {k: (r["start"] - t0, r["end"] - t0) for k, r in results.items()}

    @property
    def output(self):
        """The output of the final stage (or the spec's ``output`` stage)."""
        return self[self.output_stage]

    def table(self) -> str:
        head = ["stage", "tier", "hardware", "worker", "start s", "end s"]
        body = [[k, str(r.get("tier") or "-"), "simulated" if r.get("simulated") else "real", r["worker"],
                 f"{self.spans[k][0]:.2f}", f"{self.spans[k][1]:.2f}"] for k, r in self.stages.items()]
        return "\n".join(text_table(head, body))

    def __str__(self) -> str:
        return f"pipeline {self.name!r}\n{self.table()}"

    def _repr_html_(self) -> str:
        import html

        return "<pre>" + html.escape(str(self)) + "</pre>"


class PipelineRun:
    """The futures of one pipeline run; ``result()`` waits for all stages."""

    def __init__(self, plan: Plan, futures: dict, client, output: str):
        self.plan, self.futures, self.client, self.output_stage = plan, futures, client, output

    def result(self, timeout=None) -> PipelineResult:
        wait_all(self.client, self.futures.values(), timeout=timeout)
        # the first stage (in order) that failed is the cause; later ones failed because of it
        # (a stage whose result was lost with a worker is computed again: gather waits for it)
        for name, f in self.futures.items():
            exc = failure(f)
            if exc is not None:
                raise StageFailed(self.plan.name, name, exc) from exc
        results = self.client.gather(self.futures)
        return PipelineResult(self.plan.name, {n: results[n] for n in self.plan.order}, self.output_stage)

    def cancel(self) -> None:
        self.client.cancel(list(self.futures.values()))


# -- submitting -----------------------------------------------------------------------------
def route_stage(core, sp: StagePlan, what: str):
    """``(model spec, Route)`` for a stage: a model's tier (or the stage's override), the
    stage's tier for a function, or ``(None, None)`` for a function that runs anywhere."""
    if sp.kind in MODEL_KINDS:
        verb = {"generate": "generate text", "chat": "chat", "embed": "embed texts"}[sp.kind]
        return core.model_route(sp.model, MODEL_BACKENDS[sp.kind], verb, sp.tier)
    if sp.tier is not None:
        return None, core.route(sp.tier, what)
    return None, None


def submit_stage(core, route, what: str, args: tuple, kind: str, key: str, priority: int = 0):
    """Submit ``run_stage(*args)`` along ``route`` (anywhere when it is None)."""
    if route is None:
        return core.submit_anywhere(what, run_stage, *args, kind=kind, key=key, priority=priority,
                                   task_priority=priority)
    return core.submit_routed(route, what, run_stage, *args, kind=kind, key=key, priority=priority,
                             task_priority=priority)


def submit_pipeline(core, spec: str | Path | dict, params: dict | None = None, priority: int = 0) -> PipelineRun:
    """Check ``spec`` and submit its stages to the cluster of ``core`` (an ``AICluster``'s ``core``).

    Everything is checked first (spec, models, references, cycles, and that a live worker
    can serve each stage's tier); nothing is submitted when something is wrong. Each stage
    gets its own ``priority`` from the spec, else the run's ``priority``.
    """
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority must be an integer (higher runs first), got {priority!r}")
    spec = load_spec(spec)
    plan = compile_pipeline(spec, core.config, params)
    output = spec.get("output") or plan.order[-1]
    if output not in plan.stages:
        raise PipelineError(plan.name, [f"output: {output!r} is not a stage"])
    # route every stage before submitting any, so a missing tier fails the whole run up front
    routes = {}
    for name, sp in plan.stages.items():
        what = f"pipeline {plan.name}: {name}"
        try:
            routes[name] = (*route_stage(core, sp, what), what)
        except routing.NoWorkerForTier as e:
            raise PipelineError(plan.name, [f"stage {name!r}: {e}"]) from None
    token = uuid.uuid4().hex[:8]
    futures: dict = {}
    for name, sp in plan.stages.items():
        spec_model, route, what = routes[name]
        upstream = {d: futures[d] for d in sp.deps}
        args = (plan.name, name, sp.kind, sp.spec, sp.fn, plan.params, upstream, sp.model, spec_model)
        futures[name] = submit_stage(core, route, what, args, f"pipeline-{sp.kind}", f"{plan.name}-{name}-{token}",
                                     priority=priority if sp.priority is None else sp.priority)
    return PipelineRun(plan, futures, core.client, output)
