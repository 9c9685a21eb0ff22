"""The facade people use from notebooks and scripts: ``from cluster import connect``.

``connect()`` returns an ``AICluster``: the Dask ``Client`` (``.client``) plus routing by
tier, model calls that go where the model is resident, and a status table. It keeps the
verbs users call and hands each to the module that owns it (ARCHITECTURE.md): routing and
submission to ``ai.core`` (``cluster/core.py``), model calls to ``cluster/calls.py``, split
models to ``cluster/shards.py``, pipelines and patterns to ``cluster/pipeline.py`` and
``cluster/patterns.py``, benchmarks to ``cluster/bench_report.py``, the embedded cluster's
start and stop to ``cluster/local.py``.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

from distributed import Client, Future

from workloads.backends import InputError

from . import bench_report, calls, local, patterns, pipeline, routing, shards
from .config import Config, load_config
from .core import Core, GenerationStream
from .jobs import STATES, JobBoard, JobList, job_rows
from .modelfiles import ModelFiles
from .plugin import ModelHost, unload_on_worker
from .redo import Resubmitted
from .status import ClusterStatus, worker_rows
from .streams import StreamHub
from .workerview import WorkerEvents

__all__ = ["AICluster", "connect", "ClusterStatus", "GenerationStream", "JobList"]


class AICluster:
    """A Dask client plus tier routing and model calls. Use ``connect()`` to make one.

    ``ai.core`` (``cluster.core.Core``) is what the verbs below and every feature submit
    through: routes, routed submits, model work, streams, the live workers."""

    def __init__(self, client: Client, config: Config, cluster=None):
        self.client = client
        self.config = config
        self.cluster = cluster
        client.register_plugin(routing.TierGuard(grace=config.routing.restart_grace))
        client.register_plugin(WorkerEvents())
        client.register_plugin(routing.ModelAffinity(prefer_resident=config.routing.prefer_resident))
        client.register_plugin(JobBoard())
        client.register_plugin(StreamHub())
        client.register_plugin(ModelFiles())
        client.register_plugin(ModelHost(config))
        self.core = Core(client, config)

    # -- plumbing ----------------------------------------------------------------------------
    @property
    def dashboard_link(self) -> str:
        return self.config.dashboard_link(self.client)

    @property
    def scheduler_address(self) -> str:
        return self.client.scheduler.address

    def new_stream_id(self) -> str:
        """An id for a stream of this client (see ``Core.open_stream``)."""
        return self.core.new_stream_id()

    def live_tiers(self) -> dict[str, list[str]]:
        """``{tier: [worker addresses]}`` of the workers connected now."""
        return self.core.live_tiers()

    def route(self, tier: str, what: str = "this task") -> routing.Route:
        """Where work for ``tier`` goes now (raises ``NoWorkerForTier`` when nowhere)."""
        return self.core.route(tier, what)

    def on_resubmit(self, callback: Callable[[list[Resubmitted]], None]) -> Callable[[], None]:
        """Call ``callback(items)`` each time jobs lost with a restarted scheduler have been
        submitted again (items: ``Resubmitted(key, what, times)``); returns a function that
        stops it. Without a callback the facade logs a warning that says how many."""
        return self.core.redo.listen(callback)

    # -- generic work ------------------------------------------------------------------------
    def submit(self, fn: Callable, *args, tier: str | None = None, key: str | None = None,
               pure: bool = False, retries: int | None = None, priority: int = 0, **kwargs) -> Future:
        """``Client.submit`` routed to a tier (with fallback); ``tier=None`` runs anywhere.

        ``key``, ``pure``, ``retries`` and ``priority`` are Dask's; other keyword arguments
        go to ``fn``. With ``retries``, the task is also submitted again if the scheduler
        restarts while you hold its future (even if it had finished: its result was on the
        old cluster); without, it may have side effects, so a restart cancels it
        (``SchedulerLost``), as Dask does.
        """
        return calls.submit(self.core, fn, args, tier, key, pure, retries, priority, kwargs)

    def map(self, fn: Callable, *iterables: Iterable, tier: str | None = None, pure: bool = False,
            retries: int | None = None, key: str | list | None = None, priority: int = 0,
            batch_size: int | None = None, **kwargs) -> list[Future]:
        """``Client.map`` routed to a tier (with fallback); ``key``, ``pure``, ``retries``,
        ``priority`` and ``batch_size`` are Dask's, other keyword arguments go to ``fn``. With
        ``retries``, each task is also submitted again after a scheduler restart (see ``submit``)."""
        return calls.map_tasks(self.core, fn, iterables, tier, pure, retries, key, priority, batch_size, kwargs)

    # -- models (cluster/calls.py) -----------------------------------------------------------
    def generate(self, prompt: str | Sequence[str], model: str = "gemma-270m", max_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, stop: str | Sequence[str] | None = None,
                 seed: int | None = None, stream: bool = False, tier: str | None = None, priority: int = 0,
                 spread: bool = False, **sampling) -> Future | list[Future] | GenerationStream:
        """Generate text with ``model`` on its tier; returns a Future (a list for a list of prompts).

        Parameters
        ----------
        prompt
            One prompt, or a list (one task each, spread over the tier's workers).
        max_tokens
            Tokens to generate at most (> 0). Prompt + max_tokens must fit the context.
        temperature, top_p, seed
            Sampling; ``temperature=0`` (default) is greedy and deterministic.
        stop
            A string, or a list of strings, that ends generation (not included in the text).
        stream
            Return a ``GenerationStream`` (single prompt only): iterate it for text pieces.
        tier
            Override the model's tier (fallbacks still apply).
        priority
            Dask priority: higher runs first where work queues (a worker's tasks, the
            model's batch slots); shown on the job board.
        spread
            A list of prompts over every worker that can run the model (its tier and the
            fallback tiers whose budget fits it), each kept busy as it finishes prompts;
            returns one ``concurrent.futures.Future`` of the results in prompt order.
        sampling
            OpenAI's ``presence_penalty``, ``frequency_penalty`` (-2 to 2), ``logit_bias``
            (``{token_id: -100..100}``), ``logprobs`` (alternatives per token, 0-20: the
            result gets ``logprobs``) and ``response_format`` (``{"type": "json_object"}``
            or ``{"type": "json_schema", "json_schema": {"schema": {...}}}``: the output is
            held to that JSON by a grammar); llamacpp models.

        The result dict holds ``text``, ``prompt_tokens``, ``completion_tokens``,
        ``finish_reason``, timings, and the ``worker`` / ``tier`` that ran it.
        """
        return calls.generate(self.core, prompt, model, max_tokens, temperature, top_p, stop, seed, stream, tier,
                              priority, spread, sampling)

    def chat(self, messages: Sequence[dict], model: str = "gemma-270m", max_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, stop: str | Sequence[str] | None = None,
             seed: int | None = None, stream: bool = False, tier: str | None = None,
             priority: int = 0, **sampling) -> Future | GenerationStream:
        """The assistant's next turn after ``messages`` (``[{"role": "user", "content": ...}]``,
        roles system / user / assistant), with the model's own chat template (see
        workloads/backends/chat.py). A Future of the same dict as ``generate`` plus
        ``message`` (``{"role": "assistant", "content": ...}``); ``stream=True`` gives a
        ``GenerationStream``. The other parameters are ``generate``'s (``sampling``: OpenAI's
        penalties, ``logit_bias``, ``logprobs``, ``response_format``)."""
        return calls.chat(self.core, messages, model, max_tokens, temperature, top_p, stop, seed, stream, tier,
                          priority, sampling)

    def chat_now(self, messages: Sequence[dict], **kwargs) -> dict:
        """Blocking ``chat``: the result dict (``r["message"]["content"]`` is the answer)."""
        return self.chat(messages, **kwargs).result()

    def generate_now(self, prompt: str | Sequence[str], **kwargs) -> dict | list[dict]:
        """Blocking ``generate``: the result dict (or list of dicts)."""
        return self.client.gather(self.generate(prompt, **kwargs))

    def embed(self, texts: str | Sequence[str], model: str = "minilm", batch_size: int = 64,
              normalize: bool = False, truncate: bool = False, chunk_size: int | None = None,
              details: bool = False, tier: str | None = None, priority: int = 0, spread: bool = False,
              count_tokens: bool = False) -> Future:
        """Embed ``texts`` on the model's tier; a Future of one array in the input order.

        Parameters
        ----------
        texts
            A list of non-empty strings (or one string, giving a 1-D vector).
        batch_size
            Texts per forward pass on the worker.
        normalize
            L2-normalise each vector.
        truncate
            Allow texts longer than the model reads to be cut (default: an error).
        chunk_size
            Texts per Dask task. None: at least 16 batches' worth, and about two tasks per
            live worker of the tier, so task overhead stays small.
        details
            Return ``{"embeddings": array, "batches": [{worker, tier, n, seconds}, ...]}``.
        count_tokens
            Each batch of ``details`` also says how many tokens the model read (``tokens``).
        priority
            Dask priority (higher first), on every chunk; shown on the job board.
        spread
            Split the job over every worker that can run the model (its tier and the
            fallback tiers whose budget fits it), a queue of chunks that each worker pulls
            from as it finishes, so faster workers do more; returns a
            ``concurrent.futures.Future`` of the same result.
        """
        return calls.embed(self.core, texts, model, batch_size, normalize, truncate, chunk_size, details, tier,
                           priority, spread, count_tokens)

    def embed_now(self, texts: str | Sequence[str], **kwargs):
        """Blocking ``embed``: a numpy array (or the details dict)."""
        return self.embed(texts, **kwargs).result()

    def unload(self, model: str) -> dict[str, bool]:
        """Unload ``model`` from every worker (a split model: its head, and the layers its
        workers' shard servers held); ``{worker: was_resident}``."""
        shards.forget_plan(self.core, model)
        return self.client.run(unload_on_worker, model)

    # -- models split across workers (cluster/shards.py) ----------------------------------------
    def plan_shards(self, model: str, workers: Sequence[str] | None = None):
        """How ``model`` would be split across the workers that run a shard server now: a
        ``ShardPlan`` (a table in Jupyter and ``print``). ``workers`` (names or addresses,
        head first): split over exactly these. Raises ``ShardPlanError`` naming the shortfall."""
        return shards.plan_for(self.core, model, list(workers) if workers else None)

    def load_model(self, model: str, progress: bool = True) -> dict:
        """Load ``model`` now (a split model: across its planned workers, with a progress bar
        of the layers sent) rather than on first use; returns the head's resident info."""
        return shards.load_model(self.core, model, progress)

    # -- pipelines and patterns (cluster/pipeline.py, cluster/patterns.py) -------------------
    def pipeline(self, spec, priority: int = 0, **params):
        """Check and submit a pipeline (a dict, a YAML path, or a shipped name like ``"rag"``);
        returns a ``PipelineRun`` whose ``result()`` is a ``PipelineResult`` (outputs by stage,
        with worker, tier and time span per stage). ``params`` override the spec's params;
        ``priority`` is the run's Dask priority (a stage's own ``priority:`` wins)."""
        return pipeline.submit_pipeline(self.core, spec, params, priority)

    def run_pipeline(self, spec, priority: int = 0, **params):
        """Blocking ``pipeline``: the ``PipelineResult``."""
        return self.pipeline(spec, priority=priority, **params).result()

    def fan_out(self, value, branches, aggregate: str = "all", priority: int = 0, **kwargs):
        """One input through several branches at once; ``aggregate`` is first, all, majority,
        weighted_average (``weights=``) or ensemble (``combine=``). See cluster/patterns.py."""
        return patterns.fan_out(self.core, value, branches, aggregate, priority=priority, **kwargs)

    def batch(self, branch, items, in_flight: int = 8, progress: bool = True, errors: str = "raise",
              priority: int = 0) -> list:
        """``branch`` over many ``items`` with at most ``in_flight`` at once and a progress bar."""
        return patterns.batch(self.core, branch, items, in_flight, progress, errors, priority)

    # -- benchmarks (workloads/bench.py on the workers, cluster/bench_report.py here) --------
    def bench(self, suite: str = "quick", tiers=None, workers=None, report: str | None = None,
              parallel: bool = False, progress: bool = True) -> list[dict]:
        """Run a benchmark suite (quick, models, full, seed) on every worker, or on the given
        ``tiers`` / ``workers``; returns the records and, with ``report=FOLDER``, writes
        report.md, results.csv and PNG charts there."""
        records = bench_report.run_suite(self.core, suite, tiers=tiers, workers=workers, parallel=parallel,
                                         progress=progress)
        if report:
            bench_report.write_report(records, report, title=f"Cluster benchmark ({suite})")
        return records

    def run_jobs(self, jobs: list, on_result=None, in_flight: int = 4, progress: bool = True,
                 ids: list | None = None, priority: int = 0) -> dict:
        """Run job dicts in the GPU job-queue seed's format; returns ``{"results": [...],
        "stats": {...}}`` (see cluster/bench_report.py). ``ids``: job_id of jobs naming none;
        ``priority``: of jobs without a ``"priority"`` key."""
        outcomes, wall = bench_report.run_jobs(self.core, jobs, on_result=on_result, in_flight=in_flight,
                                               progress=progress, ids=ids, priority=priority)
        return {"results": outcomes, "stats": bench_report.job_stats(outcomes, wall, self.config.cpu_tier)}

    # -- jobs --------------------------------------------------------------------------------
    def jobs(self, state: str | Sequence[str] | None = None, limit: int | None = None) -> "JobList":
        """Jobs submitted through any client of this cluster, oldest first.

        ``state``: one of pending, running, done, failed, cancelled (or a list of them).
        Each row has key, what, kind, tier, state, worker, submitted/started/finished times
        and the error of a failed job.
        """
        states = [state] if isinstance(state, str) else list(state) if state else None
        for st in states or ():
            if st not in STATES:
                raise InputError(f"state {st!r} is not one of {', '.join(STATES)}")
        return JobList(self.client.run_on_scheduler(job_rows, states=states, limit=limit))

    def job(self, key: str | Future) -> dict:
        """One job's row (see ``jobs``)."""
        key = key.key if isinstance(key, Future) else key
        for row in self.client.run_on_scheduler(job_rows):
            if row["key"] == str(key):
                return row
        if key in self.client.futures:  # submitted by this client, not yet on the scheduler
            return {"key": str(key), "what": str(key), "kind": "task", "tier": None, "state": "pending",
                    "worker": None, "address": None, "submitted": None, "started": None, "finished": None, "error": None}
        raise KeyError(f"no job {key!r} on the job board (it keeps the last 2000 jobs)")

    def cancel(self, job: str | Future | Sequence[str | Future]) -> None:
        """Cancel jobs (futures or keys, from any client). A running generation stops within
        a token or two; other running tasks finish but their results are dropped."""
        self.core.cancel(list(job) if isinstance(job, (list, tuple)) else [job])

    # -- status ------------------------------------------------------------------------------
    def status(self) -> ClusterStatus:
        """Workers with tier, simulated/real, device, VRAM/RAM, resident models, running tasks."""
        return ClusterStatus(worker_rows(self.core.workers(), self.config.tier_names))

    def close(self) -> None:
        """Disconnect; an embedded cluster is shut down (workers first, then the scheduler)."""
        self.core.close()
        if self.cluster is not None:
            local.shut_down(self.client, self.cluster)
        else:
            self.client.close()

    def __enter__(self) -> "AICluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        tiers = {t: len(a) for t, a in self.live_tiers().items()}
        return f"<AICluster {self.scheduler_address} tiers={tiers} dashboard={self.dashboard_link}>"


def connect(config: str | dict | Config | None = None, address: str | None = None,
            timeout: float = 30, **cluster_kwargs) -> AICluster:
    """Connect to a cluster, or start the embedded one.

    Parameters
    ----------
    config
        A config.yaml path, dict or Config (None: $AICLUSTER_CONFIG, ./config.yaml, the project's).
    address
        A scheduler address (``tcp://192.168.1.10:8786``); None starts the embedded cluster of
        ``local.workers`` (simulated tiers on a machine without GPUs) and waits for its workers.
    cluster_kwargs
        Passed to ``cluster.local.local_cluster`` (e.g. ``dashboard_port=0``).

    Examples
    --------
    >>> from cluster import connect
    >>> ai = connect()                                   # embedded cluster
    >>> ai = connect(address="tcp://192.168.1.10:8786")  # the scheduler on PC1
    >>> ai.submit(sum, [1, 2], tier="VRAM12").result()
    3
    """
    cfg = load_config(config)
    if address is None:
        local.refuse_in_worker_bootstrap()
        processes = cluster_kwargs.get("processes")
        if (cfg.local.processes if processes is None else processes):
            where = local.unguarded_main_call()
            if where:
                raise RuntimeError(f"{where}: {local.MAIN_GUARD_HELP}")
        cluster = local.local_cluster(cfg, **cluster_kwargs)
        try:
            client = Client(cluster, security=cfg.security_object())
            client.wait_for_workers(len(cfg.local.workers), timeout=timeout)
            ai = AICluster(client, cfg, cluster)
            local.wait_for_hosts(client, len(cfg.local.workers), timeout=15)
        except BaseException:
            cluster.close()  # do not leave worker processes behind
            raise
        return ai
    if cluster_kwargs:
        raise TypeError(f"{', '.join(cluster_kwargs)} only apply to the embedded cluster (address=None)")
    from .security import check_address

    address = check_address(address, cfg.security.tls, cfg.path or "the config")
    try:
        client = Client(address, security=cfg.security_object(), timeout=timeout)
    except OSError as e:
        raise ConnectionError(
            f"cannot reach the scheduler at {address} ({e}). Is `aicluster scheduler` (or "
            f"`dask scheduler --preload cluster.scheduler`) running there, and is the port open?"
        ) from None
    return AICluster(client, cfg)
