"""The embedded cluster: a scheduler and the ``local:`` workers of config.yaml on one machine.

Each worker is a Dask ``Nanny`` (a process of its own, like a separate PC) or, with
``local.processes: false``, an in-process ``Worker``; both run the ``cluster.worker``
preload with the tier forced from config, so on a machine without GPUs the tiers are
simulated and say so.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time

import dask
import yaml
from distributed import Nanny, Scheduler, SpecCluster, Worker
from distributed.comm.addressing import unparse_host_port

from .config import Config, load_config
from .routing import TierGuard

__all__ = ["local_cluster", "worker_spec", "ai_worker_environ", "wait_for_hosts", "unguarded_main_call",
           "refuse_in_worker_bootstrap", "shut_down", "MAIN_GUARD_HELP"]


def _config_file(cfg: Config) -> str:
    """A path the worker processes can read the config from."""
    if cfg.path:
        return cfg.path
    data = cfg.model_dump(exclude={"path"})
    for key in ("ca_file", "cert_file", "key_file"):  # relative to the caller's folder, not the temp file's
        if data["security"][key]:
            data["security"][key] = os.path.abspath(os.path.expanduser(data["security"][key]))
    f = tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="aicluster-", delete=False)
    with f:
        yaml.safe_dump(data, f)
    return f.name


def worker_spec(cfg: Config, processes: bool | None = None, quiet: bool = True, host: str | None = None) -> dict:
    """SpecCluster worker specs for the ``local.workers`` of ``cfg``.

    Every worker (and nanny) listens on ``host`` (default ``local.host``, 127.0.0.1), over
    ``tls://`` when ``security.tls`` is on.
    """
    processes = cfg.local.processes if processes is None else processes
    host = cfg.local.host if host is None else host
    path = _config_file(cfg)
    spec = {}
    for w in cfg.local.workers:
        options = {
            "name": w.name,
            "nthreads": w.nthreads,
            "host": host,
            "protocol": cfg.scheme,
            "security": cfg.security_object(),
            "preload": ["cluster.worker"],
            "preload_argv": ["--config", path, "--tier", w.tier]
            + (["--shard-server", "--shard-port", str(w.shard_port)] if w.shard_server else ["--no-shard-server"]),
        }
        if w.memory_limit != "auto":
            options["memory_limit"] = w.memory_limit
        if processes:
            # llama.cpp and torch read these; two cores are shared by every worker here
            options["env"] = {"OMP_NUM_THREADS": str(w.nthreads), "MKL_NUM_THREADS": str(w.nthreads)}
            if quiet:  # as LocalCluster does: the worker processes log warnings and errors only
                options["silence_logs"] = logging.WARNING
        spec[w.name] = {"cls": Nanny if processes else Worker, "options": options}
    return spec


def local_cluster(config=None, scheduler_port: int = 0, dashboard_port: int | None = None,
                  processes: bool | None = None, asynchronous: bool = False, quiet: bool = True,
                  host: str | None = None, **kwargs) -> SpecCluster:
    """Start the embedded cluster described by ``config.local``.

    Parameters
    ----------
    config
        A path, dict or Config (None: the usual search, see ``load_config``).
    scheduler_port
        0 picks a free port.
    dashboard_port
        None: ``scheduler.dashboard_port`` from config, falling back to a free port when it
        is taken; 0: a free port.
    processes
        Override ``local.processes``.
    quiet
        Dask's INFO logs (worker starts, plugin registrations, ...) off, warnings and errors
        on: in a notebook they would bury the output. ``quiet=False`` for debugging.
    host
        The interface every process (scheduler, dashboard, workers, nannies) listens on;
        default ``local.host`` (127.0.0.1: nothing is reachable from the network).
    """
    cfg = load_config(config)
    if not cfg.local.workers:
        raise ValueError(f"{cfg.path or 'config'}: local.workers is empty; the embedded cluster needs at least one worker")
    if dashboard_port is None:
        dashboard_port = cfg.scheduler.dashboard_port
    host = cfg.local.host if host is None else host
    scheduler = {
        "cls": Scheduler,
        "options": {
            "host": host,
            "protocol": cfg.scheme,
            "port": scheduler_port,
            "dashboard_address": unparse_host_port(host, dashboard_port),
            "preload": ["cluster.scheduler"],
            # the embedded cluster's job board lives as long as the cluster: a temporary file
            "preload_argv": ["--config", _config_file(cfg), "--jobs-db",
                             os.path.join(tempfile.mkdtemp(prefix="aicluster-jobs-"), "jobs.sqlite3")],
            "security": cfg.security_object(),
        },
    }
    # the dashboard's TLS comes from Dask's config, read while the scheduler is built here
    # and handed to the worker processes by their nannies (which keep it for restarts)
    in_process = not (cfg.local.processes if processes is None else processes)
    # In-process workers share this process: its memory (a notebook's, the other workers')
    # would read as theirs, and they would pause for memory that is not theirs. Their model
    # budgets still come from their memory_limit.
    memory = {"distributed.worker.memory.pause": False} if in_process else {}
    with ai_worker_environ(), dask.config.set(cfg.dask_settings()), dask.config.set(memory):
        if quiet:
            for name in ("distributed.scheduler", "distributed.nanny", "distributed.worker", "distributed.core",
                         "distributed.preloading", "distributed.http.proxy", "distributed.deploy"):
                logging.getLogger(name).setLevel(logging.WARNING)
        return SpecCluster(
            scheduler=scheduler, workers=worker_spec(cfg, processes, quiet, host), asynchronous=asynchronous,
            security=cfg.security_object(), name="aicluster", **kwargs,
        )


def ai_worker_environ():
    """Dask config for nannies that start AI workers.

    The nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` in each worker by default, to give
    unmanaged memory back sooner; with torch's many short-lived allocations that makes
    glibc trim all the time, and sentence-transformers embeds about 30% slower (measured:
    24.6 s against 17.1 s for 2,000 texts on one thread). Unset, glibc's own adaptive
    threshold applies. (Read when a Nanny is created, hence a context manager.)
    """
    import dask

    return dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})


# -- starting and stopping the embedded cluster (``cluster.connect``, ``AICluster.close``) ----------
def _hosts_reporting(dask_scheduler=None) -> int:
    return sum(1 for ws in dask_scheduler.workers.values() if "aicluster" in (ws.metrics or {}))


def wait_for_hosts(client, n: int, timeout: float) -> None:
    """Until ``n`` workers' heartbeats carry their ModelHost (budget, models, shard server),
    so that the first ``status()`` of a new embedded cluster shows them (at most ``timeout``)."""
    deadline = time.monotonic() + timeout
    while client.run_on_scheduler(_hosts_reporting) < n and time.monotonic() < deadline:
        time.sleep(0.1)


MAIN_GUARD_HELP = (
    "connect() is called at the top level of this script; the embedded cluster starts each worker in a "
    "new Python process that imports the script, which would call connect() again, without end. Put the "
    "calls under  if __name__ == \"__main__\":  (see the README, \"From Python and notebooks\")."
)


def unguarded_main_call() -> str | None:
    """``"script.py:12"`` when this call comes from the top level of the ``__main__`` script,
    outside ``if __name__ == "__main__":`` (each worker process would run it again), else None.
    """
    import ast
    import inspect

    frame = inspect.currentframe().f_back
    while frame is not None and not (frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__main__"):
        frame = frame.f_back
    path = frame.f_globals.get("__file__") if frame is not None else None
    if not path or not str(path).endswith(".py"):
        return None  # a notebook, `python -c`, an interactive session: nothing re-imports them
    try:
        tree = ast.parse(open(path, encoding="utf-8").read())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    line = frame.f_lineno

    def is_main_guard(node) -> bool:
        t = node.test
        return (isinstance(t, ast.Compare) and len(t.ops) == 1 and isinstance(t.ops[0], ast.Eq)
                and {ast.unparse(t.left), ast.unparse(t.comparators[0])} == {"__name__", "'__main__'"})

    for node in ast.walk(tree):
        if isinstance(node, ast.If) and is_main_guard(node) and node.lineno <= line <= (node.end_lineno or line):
            return None
    return f"{path}:{line}"


def refuse_in_worker_bootstrap() -> None:
    """Inside a process that multiprocessing is still starting (it re-imports the parent's
    script as ``__mp_main__``), starting a cluster would fork processes without end; Python
    answers with a wall of tracebacks. Say what to do instead, once, and leave."""
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        import sys

        print(f"aicluster: {MAIN_GUARD_HELP}", file=sys.stderr, flush=True)
        raise SystemExit(1)


def shut_down(client, cluster) -> None:
    """Shut the embedded cluster down: workers first, then the scheduler."""
    if client.status != "running":
        client.close()
        cluster.close()
        return
    # The embedded cluster goes away on purpose: the TierGuard stops re-routing, and
    # every task is released, so that no worker leaves with results the scheduler
    # still wants ("Removing worker ... lose already computed task(s)"). Then workers
    # before the scheduler: a worker process whose scheduler vanished first logs a
    # heartbeat traceback on the way out.
    # A task still running (Ctrl-C in the middle of a job) is abandoned: its worker
    # would log the cancelled task, and its nanny that it had to kill the busy
    # process; both are expected here, so those two loggers keep quiet meanwhile.
    from distributed import Future

    nanny_log = logging.getLogger("distributed.nanny")
    level = nanny_log.level
    try:
        client.run_on_scheduler(_stand_down)
        client.run(_quiet_shutdown)
        keys = list(client.futures)
        if keys:
            client.cancel([Future(k, client) for k in keys], force=True)
        nanny_log.setLevel(logging.ERROR)
        cluster.scale(0)
        deadline = time.monotonic() + 15
        while client.scheduler_info(n_workers=-1)["workers"] and time.monotonic() < deadline:
            time.sleep(0.1)
    except Exception:  # closing anyway
        logging.getLogger("cluster.local").debug("graceful worker shutdown failed", exc_info=True)
    finally:
        client.close()
        cluster.close()
        nanny_log.setLevel(level)


def _stand_down(dask_scheduler=None) -> None:
    guard = dask_scheduler.plugins.get(TierGuard.name)
    if guard is not None:
        guard.closing = True


def _quiet_shutdown(dask_worker=None) -> None:
    logging.getLogger("distributed.worker.state_machine").setLevel(logging.ERROR)
