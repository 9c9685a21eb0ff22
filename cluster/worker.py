"""Worker preload: ``dask worker tcp://HOST:8786 --preload cluster.worker [--tier VRAM12]``.

Before the worker registers with the scheduler it reads config.yaml, detects the hardware,
gives the worker its tier resource (``VRAM12=1``, ``CPU=<slots>``) and a clear name
(``<host>-<tier>``), publishes the tier as the ``aicluster-tier`` metric, and registers the
ModelHost plugin with the scheduler so that every worker, late joiners too, gets one.
"""
from __future__ import annotations

import logging
import socket

import click

from .config import load_config
from .devices import detect
from .security import listen_addresses, warn_if_open
from .tiers import assign_tier, tier_of_resources

logger = logging.getLogger("cluster.worker")

TIER_METRIC = "aicluster-tier"


async def setup_worker(worker, config=None, tier: str | None = None, register_host: bool = True,
                       shard_server: bool | None = None, shard_port: int | None = None):
    """Tag ``worker`` with its tier (see module docstring); returns the TierAssignment.

    ``shard_server`` / ``shard_port`` (default: ``worker.shard_server`` / ``shard_port`` in
    config) make the ModelHost run a shard server for models split across workers."""
    _leave_ctrl_c_to_the_nanny(worker)
    cfg = load_config(config)
    on = cfg.worker.shard_server if shard_server is None else shard_server
    # read by the ModelHost plugin: the port of this worker's shard server, or None
    worker.aicluster_shard_port = (cfg.worker.shard_port if shard_port is None else shard_port) if on else None
    if on:
        from distributed.comm import get_address_host

        from .shard_servers import check_bind_host

        try:  # the shard server binds the worker's own address: never a public one
            check_bind_host(get_address_host(worker.address))
        except ValueError as e:
            raise click.UsageError(f"--shard-server: {e}") from None
    state = worker.state
    given = tier_of_resources(state.total_resources, cfg.tiers)
    forced = tier or given or cfg.worker.tier
    if given and tier and given != tier:
        raise click.UsageError(f"--tier {tier} conflicts with --resources {given}=...; give one of them")
    assignment = assign_tier(detect(), cfg, forced=forced, nthreads=state.nthreads)
    if not given:
        for r, v in assignment.resources.items():
            state.total_resources[r] = v
            state.available_resources[r] = v
    if worker.name in (None, worker.address, worker.address_safe):
        worker.name = f"{socket.gethostname()}-{assignment.tier}-{worker.port}"
    info = {**assignment.to_dict(), "resources": dict(state.total_resources), "config": cfg.path}
    worker.metrics[TIER_METRIC] = lambda w: info
    logger.info("aicluster tier: %s on %s; %s", assignment.label, assignment.device_name, assignment.reason)
    # the nanny's own address: without --host it binds the interface that reaches the scheduler
    warn_if_open("this worker" + (" and its nanny" if worker.nanny else ""),
                 listen_addresses(worker) + ([worker.nanny] if worker.nanny else []))
    if register_host:
        from distributed.protocol import pickle

        from .plugin import PLUGIN_NAME, ModelHost

        await worker.scheduler.register_worker_plugin(
            plugin=pickle.dumps(ModelHost(cfg)), name=PLUGIN_NAME, idempotent=True
        )
    return assignment


def _leave_ctrl_c_to_the_nanny(worker) -> None:
    """A worker process started by a nanny is in the terminal's process group, so Ctrl-C
    reaches it too, and it died with a KeyboardInterrupt traceback while its nanny was
    already closing it in order. Under a nanny, the nanny alone handles Ctrl-C."""
    import signal
    import threading

    if worker.nanny and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@click.command()
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="config.yaml to read (default: $AICLUSTER_CONFIG, ./config.yaml, the project's).")
@click.option("--tier", default=None, help="Force a tier, e.g. VRAM12 (default: worker.tier in config; 'auto' detects).")
@click.option("--no-model-host", is_flag=True, default=False, help="Do not register the ModelHost plugin.")
@click.option("--shard-server/--no-shard-server", default=None,
              help="Run a shard server for models split across workers (default: worker.shard_server).")
@click.option("--shard-port", type=click.IntRange(0, 65535), default=None,
              help="The first shard server's port (default: worker.shard_port, 50052; 0 = any free "
                   "port); worker.shard_models servers (one per split model served at once) take "
                   "PORT, PORT+1, ...")
async def dask_setup(worker, config_path, tier, no_model_host, shard_server, shard_port):
    await setup_worker(worker, config=config_path, tier=tier, register_host=not no_model_host,
                       shard_server=shard_server, shard_port=shard_port)
