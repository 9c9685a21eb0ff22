"""``aicluster``: start, inspect and use a dask-ai-cluster from the shell.

Also reachable as ``dask aicluster ...`` (a ``dask_cli`` entry point, like dask-cuda's).
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys

import click

from .config import ConfigError, load_config

logger = logging.getLogger("cluster.cli")

CONFIG_HELP = "config.yaml to use (default: $AICLUSTER_CONFIG, ./config.yaml, the project's)."


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("cluster").setLevel(logging.INFO)


def quiet_dask() -> None:
    """Only warnings from Dask here and in worker processes started from here."""
    import os

    import distributed  # noqa: F401  (sets up its loggers from dask config first)

    os.environ["DASK_LOGGING__DISTRIBUTED"] = "warning"  # read by each worker process at start
    for name in ["distributed", *logging.root.manager.loggerDict]:
        if name.startswith("distributed"):
            logging.getLogger(name).setLevel(logging.WARNING)


def scheduler_client(address: str, cfg):
    """A Client of the scheduler at ``address``, or a one-line error that names it."""
    from distributed import Client

    try:
        return Client(address, timeout=10, security=cfg.security_object())
    except OSError as e:
        raise click.ClickException(f"cannot reach the scheduler at {address}: {e}") from None


def _config(path):
    try:
        return load_config(path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ConfigError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """A Dask cluster for AI work on PCs with unequal GPUs.

    \b
    Examples, on one machine (simulated tiers when there is no GPU):
      aicluster demo                      # start, run the main job, stop
      aicluster up                        # start and keep running until Ctrl-C
    \b
    Examples, on several PCs (same config.yaml on each):
      aicluster scheduler                 # on PC1
      aicluster worker tcp://PC1:8786     # on every PC with a GPU or spare CPU
      aicluster status tcp://PC1:8786
    """


@main.command()
@click.option("--port", type=int, default=None, help="Port to listen on (default: scheduler.port in config, e.g. 8786).")
@click.option("--dashboard-port", type=int, default=None, help="Dashboard port (default: scheduler.dashboard_port, e.g. 8787).")
@click.option("--host", default="", help="Interface address to bind (default: all).")
@click.option("--config", "config_path", default=None, help=CONFIG_HELP)
def scheduler(port, dashboard_port, host, config_path):
    """Run the scheduler (same as `dask scheduler --preload cluster.scheduler`).

    \b
    Example:
      aicluster scheduler --port 8786 --dashboard-port 8787
    """
    _setup_logging(True)
    cfg = _config(config_path)
    from distributed import Scheduler
    from distributed._signals import wait_for_signals

    async def run():
        async with Scheduler(
            host=host or None, port=cfg.scheduler.port if port is None else port,
            dashboard_address=f":{cfg.scheduler.dashboard_port if dashboard_port is None else dashboard_port}",
            preload=["cluster.scheduler"], preload_argv=["--config", cfg.path] if cfg.path else [],
            security=cfg.security_object(),
        ) as s:
            click.echo(f"scheduler at {s.address}  dashboard {_dashboard(s)}", err=True)
            await _until(s.finished(), wait_for_signals())

    asyncio.run(run())


def _dashboard(server) -> str:
    port = server.http_server.port if getattr(server, "http_server", None) else None
    from distributed.utils import get_ip

    return f"http://{get_ip()}:{port}/status" if port else "(no dashboard)"


async def _until(*aws) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        t.cancel()


@main.command()
@click.argument("address", required=False)
@click.option("--tier", default=None, help="Force a tier, e.g. VRAM12 (default: worker.tier in config; 'auto' detects the GPU).")
@click.option("--name", default=None, help="Worker name (default: <host>-<tier>-<port>).")
@click.option("--nthreads", type=int, default=None, help="Threads (default: worker.nthreads in config).")
@click.option("--memory-limit", default=None, help="Memory limit, e.g. '8GB' (default: worker.memory_limit).")
@click.option("--no-nanny", is_flag=True, help="Run the worker in this process (no restart on crash).")
@click.option("--once", is_flag=True, help="Exit when the scheduler goes away instead of reconnecting.")
@click.option("--config", "config_path", default=None, help=CONFIG_HELP)
def worker(address, tier, name, nthreads, memory_limit, no_nanny, once, config_path):
    """Run a worker that joins ADDRESS (default: scheduler.address in config).

    Same as `dask worker ADDRESS --preload cluster.worker`, but comes back by itself when
    the scheduler restarts or the network drops (backoff doubling from
    worker.reconnect.initial_delay to max_delay, one log line per attempt).

    \b
    Examples:
      aicluster worker tcp://192.168.1.10:8786              # tier from the GPU found
      aicluster worker tcp://192.168.1.10:8786 --tier CPU   # keep the GPU out of it
    """
    _setup_logging(True)
    cfg = _config(config_path)
    if tier is not None and tier not in cfg.tiers and tier != "auto":
        raise click.BadParameter(f"{tier!r} is not a tier; known: {', '.join(cfg.tiers)}, auto", param_hint="--tier")
    address = address or cfg.scheduler.address
    opts = {
        "nthreads": nthreads or cfg.worker.nthreads,
        "preload": ["cluster.worker"],
        "preload_argv": (["--config", cfg.path] if cfg.path else []) + (["--tier", tier] if tier else []),
        "security": cfg.security_object(),
    }
    if name:
        opts["name"] = name
    mem = memory_limit or cfg.worker.memory_limit
    if mem != "auto":
        opts["memory_limit"] = mem
    asyncio.run(_run_worker(address, cfg, opts, nanny=not no_nanny, once=once))


async def _run_worker(address: str, cfg, opts: dict, nanny: bool = True, once: bool = False) -> None:
    from distributed import Nanny, Worker
    from distributed._signals import wait_for_signals
    from distributed.comm import connect

    from .local import ai_worker_environ

    cls = Nanny if nanny else Worker
    delay = cfg.worker.reconnect.initial_delay
    attempt = 0
    signals = asyncio.ensure_future(wait_for_signals())
    conn_args = (cfg.security_object().get_connection_args("worker") if cfg.security_object() else {})
    while not signals.done():
        attempt += 1
        try:
            comm = await connect(address, timeout=5, **conn_args)
            await comm.close()
        except (OSError, asyncio.TimeoutError) as e:
            if once:
                raise click.ClickException(f"cannot reach the scheduler at {address}: {e}") from None
            logger.warning("scheduler %s unreachable (attempt %d: %s); retrying in %.0f s", address, attempt, e, delay)
            await _until(asyncio.sleep(delay), asyncio.shield(signals))
            delay = min(delay * 2, cfg.worker.reconnect.max_delay)
            continue
        try:
            with ai_worker_environ():
                server = await cls(address, **opts)
        except Exception as e:  # the scheduler went away between the check and the start
            logger.warning("worker could not join %s (attempt %d: %s); retrying in %.0f s", address, attempt, e, delay)
            await _until(asyncio.sleep(delay), asyncio.shield(signals))
            delay = min(delay * 2, cfg.worker.reconnect.max_delay)
            continue
        logger.info("joined the scheduler at %s", address)
        delay, attempt = cfg.worker.reconnect.initial_delay, 0
        await _until(server.finished(), asyncio.shield(signals))
        await server.close()
        if signals.done() or once:
            break
        logger.warning("lost the scheduler at %s; reconnecting", address)
    signals.cancel()


@main.command()
@click.option("--scheduler-port", type=int, default=None, help="Scheduler port (default: scheduler.port, e.g. 8786; 0 = any free port).")
@click.option("--dashboard-port", type=int, default=None, help="Dashboard port (default: scheduler.dashboard_port; 0 = any free port).")
@click.option("--config", "config_path", default=None, help=CONFIG_HELP)
def up(scheduler_port, dashboard_port, config_path):
    """Start the embedded cluster (scheduler + the local: workers) until Ctrl-C.

    \b
    Example:
      aicluster up --scheduler-port 8786 --dashboard-port 8787
      aicluster status tcp://127.0.0.1:8786      # in another terminal
    """
    quiet_dask()
    cfg = _config(config_path)
    from distributed import Client
    from distributed._signals import wait_for_signals

    from .local import local_cluster
    from .status import format_table, worker_rows

    port = cfg.scheduler.port if scheduler_port is None else scheduler_port
    try:
        cluster = local_cluster(cfg, scheduler_port=port, dashboard_port=dashboard_port)
    except OSError as e:
        raise click.ClickException(f"cannot start the scheduler on port {port}: {e}. Is another cluster running? Try --scheduler-port 0.") from None
    with cluster, Client(cluster) as client:
        client.wait_for_workers(len(cfg.local.workers), timeout=120)
        click.echo(f"scheduler: {cluster.scheduler_address}")
        click.echo(f"dashboard: {client.dashboard_link}")
        click.echo(format_table(worker_rows(client.scheduler_info(n_workers=-1)["workers"], cfg.tier_names)))
        click.echo("running; Ctrl-C to stop", err=True)
        sys.stdout.flush()
        asyncio.run(wait_for_signals())


@main.command()
@click.argument("address", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--config", "config_path", default=None, help=CONFIG_HELP)
def status(address, as_json, config_path):
    """Show the workers of the cluster at ADDRESS: tier, simulated or real, device, VRAM, models.

    \b
    Example:
      aicluster status tcp://192.168.1.10:8786
    """
    cfg = _config(config_path)
    from distributed import Client

    from .status import format_table, worker_rows

    address = address or cfg.scheduler.address
    with scheduler_client(address, cfg) as client:
        rows = worker_rows(client.scheduler_info(n_workers=-1)["workers"], cfg.tier_names)
        if as_json:
            click.echo(json.dumps({"scheduler": address, "dashboard": client.dashboard_link, "workers": rows}, indent=2, default=str))
        else:
            click.echo(f"scheduler: {address}   dashboard: {client.dashboard_link}")
            click.echo(format_table(rows))


@main.command()
@click.option("--config", "config_path", default=None, help=CONFIG_HELP)
@click.option("--dashboard-port", type=int, default=0, help="Dashboard port (default: any free port).")
def demo(config_path, dashboard_port):
    """The main job on an embedded cluster: routed jobs per tier, embeddings, answers.

    \b
    Example:
      aicluster demo
    """
    quiet_dask()
    cfg = _config(config_path)
    # the demo is ML code, so it lives in workloads; imported by name (cluster never
    # imports workloads at module level)
    import importlib

    importlib.import_module("workloads.demo").run_demo(cfg, dashboard_port=dashboard_port)


from .cli_batch import bench_cmd, cancel_cmd, embed_cmd, generate_cmd, jobs_cmd, pipeline_cmd, submit_cmd  # noqa: E402

main.add_command(embed_cmd)
main.add_command(generate_cmd)
main.add_command(pipeline_cmd)
main.add_command(jobs_cmd)
main.add_command(cancel_cmd)
main.add_command(bench_cmd)
main.add_command(submit_cmd)

if __name__ == "__main__":
    main()
