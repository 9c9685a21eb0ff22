"""``aicluster``: start, inspect and use a dask-ai-cluster from the shell.

Also reachable as ``dask aicluster ...`` (a ``dask_cli`` entry point, like dask-cuda's).
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys

import click

from .cli_common import (CONFIG_HELP, checked_address, explain_connect_error, load_cfg, port_in_use, quiet_dask,
                         scheduler_client)
from .config import ConfigError

logger = logging.getLogger("cluster.cli")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("cluster").setLevel(logging.INFO)
    logging.getLogger("workloads.transfer").setLevel(logging.INFO)  # a model file's fetch, on the worker's log


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ConfigError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            # the `with` blocks of the command have closed its cluster on the way here
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(name="aicluster", cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--host", default=None,
              help="Interface to listen on, e.g. 192.168.1.10 (default: scheduler.host in config; empty = every interface).")
@click.option("--port", type=int, default=None, help="Port to listen on (default: scheduler.port in config, e.g. 8786).")
@click.option("--dashboard-port", type=int, default=None, help="Dashboard port (default: scheduler.dashboard_port, e.g. 8787).")
@click.option("--config", "config_path", default=None, help=CONFIG_HELP)
def scheduler(host, port, dashboard_port, config_path):
    """Run the scheduler (same as `dask scheduler --preload cluster.scheduler`).

    It serves the LAN (every interface) unless --host or scheduler.host names one; without
    security.tls it prints a warning line, since anyone who can reach the port can run code.

    \b
    Examples:
      aicluster scheduler --port 8786 --dashboard-port 8787
      aicluster scheduler --host 192.168.1.10     # only the LAN card, not Wi-Fi or VPN
    """
    _setup_logging(True)
    cfg = load_cfg(config_path)
    import dask
    from distributed import Scheduler
    from workloads.compat import wait_for_signals
    from distributed.comm.addressing import unparse_host_port

    host = cfg.scheduler.host if host is None else host
    port = cfg.scheduler.port if port is None else port
    dport = cfg.scheduler.dashboard_port if dashboard_port is None else dashboard_port

    async def run():
        with dask.config.set(cfg.dask_settings()):
            async with Scheduler(
                host=host or None, port=port, protocol=cfg.scheme,
                dashboard_address=unparse_host_port(host, dport) if host else f":{dport}",
                preload=["cluster.scheduler"], preload_argv=["--config", cfg.path] if cfg.path else [],
                security=cfg.security_object(),
            ) as s:
                click.echo(f"scheduler at {s.address}  dashboard {_dashboard(s)}", err=True)
                await _until(s.finished(), wait_for_signals())

    try:
        asyncio.run(run())
    except (OSError, RuntimeError) as e:
        raise click.ClickException(port_in_use(e) or f"the scheduler could not start: {e}") from None


def _dashboard(server) -> str:
    http = getattr(server, "http_server", None)
    if http is None:
        return "(no dashboard)"
    from distributed.comm import get_address_host
    from distributed.comm.addressing import unparse_host_port

    # the address others reach the scheduler at (its LAN IP when it listens everywhere)
    scheme = "https" if getattr(http, "ssl_options", None) else "http"
    return f"{scheme}://{unparse_host_port(get_address_host(server.address), http.port)}/status"


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
@click.option("--host", default=None,
              help="Interface the worker and its nanny listen on, e.g. 192.168.1.11 (default: worker.host; empty = every interface).")
@click.option("--listen-address", default=None,
              help="The worker's full listen address, e.g. tcp://192.168.1.11:9000 (sets --host and --worker-port).")
@click.option("--worker-port", type=click.IntRange(0, 65535), default=None,
              help="The worker's port, for a firewall rule (default: worker.port; 0 = any free port).")
@click.option("--nanny-port", type=click.IntRange(0, 65535), default=None,
              help="The nanny's port (default: worker.nanny_port; 0 = any free port).")
@click.option("--no-nanny", is_flag=True, help="Run the worker in this process (no restart on crash).")
@click.option("--once", is_flag=True, help="Exit when the scheduler goes away instead of reconnecting.")
@click.option("--shard-server/--no-shard-server", default=None,
              help="Run a shard server so that models split across workers can place layers here (default: "
                   "worker.shard_server, off). ggml RPC has no authentication or TLS: LAN addresses only.")
@click.option("--shard-port", type=click.IntRange(0, 65535), default=None,
              help="The shard server's port, for a firewall rule (default: worker.shard_port, 50052).")
@click.option("--config", "config_path", default=None, help=CONFIG_HELP)
def worker(address, tier, name, nthreads, memory_limit, host, listen_address, worker_port, nanny_port, no_nanny, once,
           shard_server, shard_port, config_path):
    """Run a worker that joins ADDRESS (default: scheduler.address in config).

    Same as `dask worker ADDRESS --preload cluster.worker`, but comes back by itself when
    the scheduler restarts or the network drops (backoff doubling from
    worker.reconnect.initial_delay to max_delay, one log line per attempt).

    \b
    Examples:
      aicluster worker tcp://192.168.1.10:8786              # tier from the GPU found
      aicluster worker tcp://192.168.1.10:8786 --tier CPU   # keep the GPU out of it
      aicluster worker tls://192.168.1.10:8786 --host 192.168.1.11 --worker-port 9000 --nanny-port 9001
      aicluster worker tcp://192.168.1.10:8786 --host 192.168.1.11 --shard-server   # holds layers of split models
    """
    _setup_logging(True)
    cfg = load_cfg(config_path)
    if tier is not None and tier not in cfg.tiers and tier != "auto":
        raise click.BadParameter(f"{tier!r} is not a tier; known: {', '.join(cfg.tiers)}, auto", param_hint="--tier")
    address = checked_address(address or cfg.scheduler.address, cfg)
    if listen_address:
        if host is not None or worker_port is not None:
            raise click.UsageError("--listen-address sets the host and the worker port; give it or --host/--worker-port")
        from distributed.comm import parse_host_port
        from distributed.comm.addressing import parse_address

        try:
            proto, loc = parse_address(listen_address)
            host, worker_port = parse_host_port(loc)
        except ValueError as e:
            raise click.BadParameter(f"{listen_address!r}: {e} (e.g. {cfg.scheme}://192.168.1.11:9000)",
                                     param_hint="--listen-address") from None
        if proto != cfg.scheme:
            raise click.BadParameter(f"{listen_address!r}: security.tls is {str(cfg.security.tls).lower()}, so "
                                     f"workers listen on {cfg.scheme}://", param_hint="--listen-address")
    host = cfg.worker.host if host is None else host
    worker_port = cfg.worker.port if worker_port is None else worker_port
    nanny_port = cfg.worker.nanny_port if nanny_port is None else nanny_port
    opts = {
        "nthreads": nthreads or cfg.worker.nthreads,
        "preload": ["cluster.worker"],
        "preload_argv": (["--config", cfg.path] if cfg.path else []) + (["--tier", tier] if tier else [])
        + ([] if shard_server is None else ["--shard-server" if shard_server else "--no-shard-server"])
        + ([] if shard_port is None else ["--shard-port", str(shard_port)]),
        "security": cfg.security_object(),
        "host": host or None,
        "protocol": cfg.scheme,
    }
    if no_nanny:
        opts["port"] = worker_port
    else:
        opts["port"], opts["worker_port"] = nanny_port, worker_port
    if name:
        opts["name"] = name
    mem = memory_limit or cfg.worker.memory_limit
    if mem != "auto":
        opts["memory_limit"] = mem
    import dask

    with dask.config.set(cfg.dask_settings()):  # the worker's HTTP server (/metrics) over HTTPS with TLS
        asyncio.run(_run_worker(address, cfg, opts, nanny=not no_nanny, once=once))


async def _run_worker(address: str, cfg, opts: dict, nanny: bool = True, once: bool = False) -> None:
    from distributed import Nanny, Worker
    from workloads.compat import wait_for_signals
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
                raise click.ClickException(f"cannot reach the scheduler at {address}: {explain_connect_error(e)}") from None
            logger.warning("scheduler %s unreachable (attempt %d: %s); retrying in %.0f s", address, attempt, explain_connect_error(e), delay)
            await _until(asyncio.sleep(delay), asyncio.shield(signals))
            delay = min(delay * 2, cfg.worker.reconnect.max_delay)
            continue
        try:
            with ai_worker_environ():
                server = await cls(address, **opts)
        except Exception as e:  # the scheduler went away between the check and the start
            busy = port_in_use(e)
            if busy:
                raise click.ClickException(busy.replace("--scheduler-port 0 --dashboard-port 0", "--worker-port 0 --nanny-port 0")) from None
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
@click.option("--host", default=None,
              help="Interface every process listens on (default: local.host in config, 127.0.0.1: this machine only).")
@click.option("--scheduler-port", type=int, default=None, help="Scheduler port (default: scheduler.port, e.g. 8786; 0 = any free port).")
@click.option("--dashboard-port", type=int, default=None, help="Dashboard port (default: scheduler.dashboard_port; 0 = any free port).")
@click.option("--config", "config_path", default=None, help=CONFIG_HELP)
def up(host, scheduler_port, dashboard_port, config_path):
    """Start the embedded cluster (scheduler + the local: workers) until Ctrl-C.

    Every process listens on 127.0.0.1 unless --host (or local.host) says otherwise.

    \b
    Examples:
      aicluster up --scheduler-port 8786 --dashboard-port 8787
      aicluster status tcp://127.0.0.1:8786      # in another terminal
      aicluster up --host 192.168.1.10           # reachable from the LAN (use TLS: see README)
    """
    quiet_dask()
    cfg = load_cfg(config_path)
    from workloads.compat import wait_for_signals

    from .client import connect

    port = cfg.scheduler.port if scheduler_port is None else scheduler_port
    try:
        ai = connect(cfg, scheduler_port=port, dashboard_port=dashboard_port, host=host, timeout=120)
    except (OSError, RuntimeError) as e:
        raise click.ClickException(port_in_use(e) or f"the embedded cluster could not start: {e}") from None
    with ai:
        click.echo(f"scheduler: {ai.scheduler_address}")
        click.echo(f"dashboard: {ai.dashboard_link}")
        click.echo(str(ai.status()))
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
    cfg = load_cfg(config_path)
    from .status import format_table, worker_rows

    address = checked_address(address or cfg.scheduler.address, cfg)
    with scheduler_client(address, cfg) as client:
        rows = worker_rows(client.scheduler_info(n_workers=-1)["workers"], cfg.tier_names)
        if as_json:
            click.echo(json.dumps({"scheduler": address, "dashboard": cfg.dashboard_link(client), "workers": rows},
                                  indent=2, default=str))
        else:
            click.echo(f"scheduler: {address}   dashboard: {cfg.dashboard_link(client)}")
            click.echo(format_table(rows))


@main.command()
@click.argument("address", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--no-smoke", is_flag=True,
              help="Skip the smoke decode per model (each loads its model in a child process: seconds to minutes).")
@click.option("--checksums", is_flag=True, help="Compute each model file's SHA-256 (reads every byte; default: size only).")
@click.option("--config", "config_path", default=None, help=CONFIG_HELP)
def doctor(address, as_json, no_smoke, checksums, config_path):
    """Check this PC, or every PC of the cluster at ADDRESS, with a fix for each failing row.

    Python and package versions; the llama.cpp binding's build against this CPU (a feature
    the CPU lacks: SIGILL; AMX: a segfault), RPC and CUDA; torch/CUDA/NVML visibility; each
    model's source (present, size, SHA-256 with --checksums); a smoke decode per model in a
    child process; free disk in the caches; the config's ports (free, or in use by whom);
    the TLS certificates (readable, in date, host names). With ADDRESS, every worker runs
    the same checks and its clock is compared with this PC's. Exit status 1 when a row fails.

    \b
    Examples:
      aicluster doctor                            # this PC
      aicluster doctor --no-smoke --json          # quick, for scripts
      aicluster doctor tcp://192.168.1.10:8786    # this PC, then every worker of the cluster
    """
    cfg = load_cfg(config_path)
    if address:
        quiet_dask()
        address = checked_address(address, cfg)
    from .doctor import format_report, run_doctor

    report = run_doctor(cfg, address=address, smoke=not no_smoke, checksums=checksums)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    sys.exit(report["exit_code"])


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
    cfg = load_cfg(config_path)
    from .demo import run_demo

    try:
        run_demo(cfg, dashboard_port=dashboard_port)
    except (KeyboardInterrupt, click.ClickException):
        raise
    except Exception as e:  # the first thing a new user meets: say what to run next
        raise click.ClickException(f"{type(e).__name__}: {e}\nThe demo failed. Run `aicluster doctor`: it checks "
                                   "this PC's build against its CPU, the models, the ports and the certificates, "
                                   "with a fix for each failing row.") from None


@main.command()
@click.option("--address", default=None, help="Scheduler address, e.g. tcp://192.168.1.10:8786 (default: start the embedded cluster).")
@click.option("--host", default=None,
              help="Interface to listen on (default: server.host, 127.0.0.1). Beyond loopback only with API keys set.")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Port (default: server.port, 8000).")
@click.option("--ssl-certfile", default=None, help="Serve HTTPS with this certificate (PEM), e.g. from `aicluster certs`.")
@click.option("--ssl-keyfile", default=None, help="The certificate's private key (PEM).")
@click.option("--config", "config_path", default=None, help=CONFIG_HELP)
def serve(address, host, port, ssl_certfile, ssl_keyfile, config_path):
    """Serve the cluster over HTTP: OpenAI's API and the seed's routes.

    /v1/models, /v1/chat/completions, /v1/completions (stream: server-sent events),
    /v1/embeddings; /inference, /embed, /embed-batch, /health, /status, /config, /models.
    Keys from server.api_keys or $AICLUSTER_API_KEYS (clients send "Authorization: Bearer
    KEY"); without a key it listens on loopback only. Ctrl-C stops it.

    \b
    Examples:
      aicluster serve                                      # embedded cluster, http://127.0.0.1:8000/v1
      AICLUSTER_API_KEYS=sk-lab-one aicluster serve --address tcp://192.168.1.10:8786 --host 192.168.1.10
      curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \\
           -d '{"model": "gemma-270m", "messages": [{"role": "user", "content": "Hi"}]}'
    """
    quiet_dask()
    cfg = load_cfg(config_path)
    from .security import is_loopback
    from .gateway import KEYS_ENV, Gateway, api_keys, create_app

    keys = api_keys(cfg)
    host = cfg.server.host if host is None else host
    port = cfg.server.port if port is None else port
    if not keys and not is_loopback(host):
        raise click.ClickException(
            f"--host {host or '(every interface)'} would let anyone on the network use the cluster: set API keys first "
            f"(server.api_keys in config.yaml, or ${KEYS_ENV}=key1,key2), or keep the default 127.0.0.1. Behind a "
            "reverse proxy every client looks local: set keys there too.")
    if bool(ssl_certfile) != bool(ssl_keyfile):
        raise click.UsageError("--ssl-certfile and --ssl-keyfile go together")
    import uvicorn

    from .cli_common import connect_ai

    with connect_ai(address, config_path) as ai:
        app = create_app(Gateway(ai, keys))
        scheme = "https" if ssl_certfile else "http"
        click.echo(f"serving the cluster at {scheme}://{host}:{port} (OpenAI API under /v1, docs at /docs; "
                   f"{'API keys required' if keys else 'no API key: loopback only'}); Ctrl-C to stop", err=True)
        try:
            uvicorn.run(app, host=host, port=port, log_level="warning", ssl_certfile=ssl_certfile,
                        ssl_keyfile=ssl_keyfile, timeout_graceful_shutdown=5)
        except SystemExit as e:  # uvicorn exits 1 when it cannot bind
            if e.code:
                raise click.ClickException(f"the HTTP server could not start on {host}:{port} (is the port in use?)") \
                    from None


@main.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--hosts", required=True,
              help="Comma-separated PCs, each a name or IP, optionally NAME=IP (e.g. pc1=192.168.1.10,pc2,192.168.1.12).")
@click.option("--days", type=click.IntRange(min=1), default=825, show_default=True, help="How long the certificates are valid.")
@click.option("--force", is_flag=True, help="Replace existing certificates of these hosts.")
def certs(folder, hosts, days, force):
    """Make a CA and a key pair per PC in FOLDER for `security.tls: true`.

    Writes ca.pem (give it to every PC), ca.key (keep it safe; it signs PCs added later:
    run the command again with the new host), and <host>.pem / <host>.key per host (copy
    each pair to its PC). Then prints the config lines to use.

    \b
    Example:
      aicluster certs ~/aicluster-certs --hosts pc1=192.168.1.10,pc2=192.168.1.11,pc3
    """
    from .security import make_certs

    names = [h.strip() for h in hosts.split(",") if h.strip()]
    try:
        made = make_certs(folder, names, days=days, force=force)
    except (ValueError, FileExistsError) as e:
        raise click.ClickException(str(e)) from None
    import os

    folder = os.path.abspath(folder)
    click.echo(f"CA: {made['ca']} (key: {made['ca_key']}, keep it private)")
    for name, (cert, key) in made["hosts"].items():
        click.echo(f"{name}: {cert} {key}")
    click.echo(f"""
Put these lines in the config.yaml of every PC, with the folder copied to the same place
({{hostname}} is replaced by each PC's host name; name the files after the hostnames, or
write each PC's own file names):

security:
  tls: true
  ca_file: {folder}/ca.pem
  cert_file: {folder}/{{hostname}}.pem
  key_file: {folder}/{{hostname}}.key
scheduler:
  address: tls://SCHEDULER_PC:8786

For a plain `dask worker`: dask worker tls://SCHEDULER_PC:8786 --preload cluster.worker \\
  --tls-ca-file {folder}/ca.pem --tls-cert {folder}/THIS_PC.pem --tls-key {folder}/THIS_PC.key""")


from .cli_batch import (bench_cmd, cancel_cmd, embed_cmd, generate_cmd, jobs_cmd, models_cmd, pipeline_cmd, shard_cmd,  # noqa: E402
                        submit_cmd)

main.add_command(embed_cmd)
main.add_command(generate_cmd)
main.add_command(pipeline_cmd)
main.add_command(jobs_cmd)
main.add_command(models_cmd)
main.add_command(cancel_cmd)
main.add_command(bench_cmd)
main.add_command(submit_cmd)
main.add_command(shard_cmd)

if __name__ == "__main__":
    main()
