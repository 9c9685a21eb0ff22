"""Scheduler preload: ``dask scheduler --preload cluster.scheduler``.

Adds the TierGuard plugin (tasks never wait in ``no-worker``), ModelAffinity (model work
where the model is resident, while it has room), the JobBoard (job list), the StreamHub
(streamed text to its one client),
ModelFiles (model files offered to the workers that lack them), the "AI models" dashboard
page, the ``/aicluster/workers.json`` route and the ``aicluster_*`` Prometheus metrics.
"""
from __future__ import annotations

import os

import click

from . import dashboard
from .config import load_config
from .jobs import JobBoard
from .modelfiles import ModelFiles
from .routing import ModelAffinity, TierGuard
from .workerview import WorkerEvents
from .streams import StreamHub
from .security import listen_addresses, warn_if_open

# The dashboard's pages are read while the Scheduler is constructed, before preloads run;
# a preload module is imported earlier than that, so the page is registered here.
dashboard.register_page()


async def setup_scheduler(scheduler, config=None, jobs_db: str | None = None) -> None:
    cfg = load_config(config)
    if TierGuard.name not in scheduler.plugins:
        scheduler.add_plugin(TierGuard(grace=cfg.routing.restart_grace))
    if JobBoard.name not in scheduler.plugins:
        path = cfg.scheduler.jobs_db if jobs_db is None else jobs_db
        if path == "none":
            path = None
        elif not path:
            from .jobs import default_jobs_db

            path = default_jobs_db(scheduler.port)
        else:
            path = os.path.expanduser(path)
        scheduler.add_plugin(JobBoard(max_jobs=cfg.scheduler.jobs_max, db=path,
                                      max_age=cfg.scheduler.jobs_max_age))
    if WorkerEvents.name not in scheduler.plugins:
        scheduler.add_plugin(WorkerEvents())
    if ModelAffinity.name not in scheduler.plugins:
        scheduler.add_plugin(ModelAffinity(prefer_resident=cfg.routing.prefer_resident))
    if StreamHub.name not in scheduler.plugins:  # (a restarted scheduler has it before any client comes)
        scheduler.add_plugin(StreamHub())
    if ModelFiles.name not in scheduler.plugins:
        scheduler.add_plugin(ModelFiles())
    if dashboard.HTTPStats.name not in scheduler.plugins:
        scheduler.add_plugin(dashboard.HTTPStats())
    dashboard.install(scheduler, tiers=cfg.tier_names)
    warn_if_open("the scheduler", listen_addresses(scheduler))


@click.command()
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="config.yaml to read (default: $AICLUSTER_CONFIG, ./config.yaml, the project's).")
@click.option("--jobs-db", default=None,
              help="The job board's SQLite file (default: scheduler.jobs_db; 'none': memory only).")
async def dask_setup(scheduler, config_path, jobs_db):
    await setup_scheduler(scheduler, config_path, jobs_db=jobs_db)
