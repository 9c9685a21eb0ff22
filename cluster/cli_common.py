"""What every ``aicluster`` command shares: config loading, addresses, clients, quiet logs.

Both ``cli.py`` and ``cli_batch.py`` import this module (and not each other).
"""
from __future__ import annotations

import errno
import logging
import os

import click

from .config import ConfigError, load_config

CONFIG_HELP = "config.yaml to use (default: $AICLUSTER_CONFIG, ./config.yaml, the project's)."
ADDRESS_HELP = "Scheduler address, e.g. tcp://192.168.1.10:8786 (default: start the embedded cluster)."


def quiet_dask() -> None:
    """Only warnings from Dask here and in worker processes started from here."""
    import distributed  # noqa: F401  (sets up its loggers from dask config first)

    os.environ["DASK_LOGGING__DISTRIBUTED"] = "warning"  # read by each worker process at start
    for name in ["distributed", *logging.root.manager.loggerDict]:
        if name.startswith("distributed"):
            logging.getLogger(name).setLevel(logging.WARNING)


def load_cfg(path):
    """The config, or a one-line error naming the file and key."""
    try:
        return load_config(path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


def checked_address(address: str, cfg) -> str:
    """``address`` checked against the config (scheme, port, TLS, the name resolves)."""
    from .security import AddressError, check_address

    try:
        return check_address(address, cfg.security.tls, cfg.path or "the config")
    except AddressError as e:
        raise click.ClickException(str(e)) from None


def scheduler_client(address: str | None, cfg):
    """A Client of the scheduler at ``address`` (default ``scheduler.address``), or a
    one-line error that names it."""
    from distributed import Client

    address = checked_address(address or cfg.scheduler.address, cfg)
    try:
        return Client(address, timeout=10, security=cfg.security_object())
    except OSError as e:
        raise click.ClickException(f"cannot reach the scheduler at {address}: {explain_connect_error(e)}") from None


def explain_connect_error(e: BaseException) -> str:
    text = str(e)
    if "certificate" in text.lower() or "ssl" in text.lower():
        return f"{text} (a TLS handshake failed: do both sides use certificates from the same CA?)"
    return text


def connect_ai(address: str | None, config_path, **kwargs):
    """``cluster.connect`` for a CLI command: the scheduler at ``address``, or the embedded
    cluster (dashboard on a free port) when None; errors as one line."""
    from .client import connect

    quiet_dask()
    cfg = load_cfg(config_path)
    if address:
        address = checked_address(address, cfg)
    try:
        if address:
            return connect(cfg, address=address, **kwargs)
        return connect(cfg, dashboard_port=0, **kwargs)
    except (ConfigError, ConnectionError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    except RuntimeError as e:
        busy = port_in_use(e)
        if busy:
            raise click.ClickException(busy) from None
        raise


def port_in_use(exc: BaseException) -> str | None:
    """The friendly message for an "address already in use" anywhere in ``exc``'s chain
    (SpecCluster wraps the OSError in RuntimeErrors), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            return (f"a port is already in use ({exc.strerror}): is another cluster running? "
                    "Stop it, or pick other ports (--scheduler-port 0 --dashboard-port 0 choose free ones)")
        exc = exc.__cause__ or exc.__context__
    return None
