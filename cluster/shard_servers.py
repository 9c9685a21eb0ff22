"""The worker side of split models: the shard server a ``worker.shard_server: true``
worker runs (a ggml RPC server as a supervised child process on a fixed port, started by
the ModelHost plugin), and what the planner asks of a worker (``host_state``).

It holds the layers a head places on it, on the worker's GPU (or CPU). ggml RPC has no
authentication and no TLS, so it is off by default and never binds a public address.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from workloads.backends import rpc_server
from workloads.backends.shard_speed import cpu_model, cpu_quota
from workloads.host import PLUGIN_NAME

__all__ = ["ShardServer", "check_bind_host", "host_state"]

logger = logging.getLogger("cluster.shards")


def host_state(dask_worker=None) -> dict | None:
    """What the planner needs of this worker, now (``client.run``): name, tier, budget,
    used bytes, what it holds for split models, and its shard server."""
    host = dask_worker.plugins.get(PLUGIN_NAME)
    if host is None or getattr(host, "shard_server", None) is None:
        return None
    a = host.assignment
    ss = host.shard_server
    # what the speed measured for this server depends on: measured again when it changes
    device_key = "|".join([socket.gethostname(), ss.device, str(ss.threads), a.tier if a else "?",
                           a.device_name if a else "?", cpu_model(), cpu_quota()])
    servers = [{**info, "threads": ss.threads, "device_key": device_key} for info in host.server_infos()]
    return {"name": str(dask_worker.name), "tier": a.tier if a else None, "simulated": a.simulated if a else False,
            "budget": host.budget, "used": host.used, "shards": host.holds(),
            "shard_server": servers[0], "shard_servers": servers}


def check_bind_host(host: str) -> None:
    """Refuse a public address for a shard server: ggml RPC runs whatever graph a client
    sends, with no authentication and no TLS. Loopback and private LAN addresses only."""
    try:
        ip = ipaddress.ip_address(socket.gethostbyname(host) if host else "0.0.0.0")
    except (OSError, ValueError):
        raise ValueError(f"shard server host {host!r} is not an address of this PC") from None
    if ip.is_unspecified:
        raise ValueError("a shard server must bind one address (worker.host or --host), not every interface: ggml "
                         "RPC has no authentication")
    vpn = ip.version == 4 and ip in ipaddress.ip_network("100.64.0.0/10")  # CGNAT: Tailscale and other VPNs
    if ip.version == 6:
        raise ValueError(f"shard server host {ip}: ggml RPC takes IPv4 addresses only here; give the worker an "
                         f"IPv4 --host")
    if not (ip.is_loopback or ip.is_private or ip.is_link_local or vpn):
        raise ValueError(f"refusing to start a shard server on the public address {ip}: ggml RPC has no "
                         f"authentication or TLS; bind a LAN address (10.x, 172.16-31.x, 192.168.x) behind your "
                         f"router, or a VPN's (e.g. Tailscale's 100.64-127.x)")


class ShardServer:
    """The worker's shard server: a child process (``workloads.backends.rpc_server``)
    restarted if it dies, stopped with the worker. ``cache_dir`` keeps the weights it
    received, keyed by hash, so a head that loads the model again sends hashes, not bytes."""

    def __init__(self, host: str, port: int, device: str = "cpu", threads: int = 1, cache_dir: str | None = None,
                 name: str = "worker", tls=None):
        check_bind_host(host)
        self.host, self.device, self.threads, self.name = host, device, threads, name
        #: with the cluster's TLS (an ``ssl.SSLContext`` that requires a client certificate):
        #: the ggml server listens on 127.0.0.1 only, a TLS tunnel on host:port in front of it
        self.tls = tls
        self._tunnel = None
        self._inner_port = _free_port("127.0.0.1") if tls is not None else None
        # a fixed port keeps its weight cache across restarts (~/.cache/aicluster/shards);
        # a server on a free port (the embedded cluster) caches in a folder removed at stop
        self._temp = not port and cache_dir is None
        self.port = port or _free_port(host)
        if cache_dir is None:
            base = os.environ.get("AICLUSTER_SHARD_CACHE") or os.path.expanduser("~/.cache/aicluster/shards")
            cache_dir = (tempfile.mkdtemp(prefix=f"aicluster-shard-{self.port}-") if self._temp else
                         os.path.join(base, f"{host}-{self.port}"))
        self.cache_dir = cache_dir
        self.restarts = 0
        self.started = 0.0
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.last_error = ""

    @property
    def endpoint(self) -> str:
        """Where heads reach it (with TLS: the tunnel's TLS listener)."""
        return f"{self.host}:{self.port}"

    @property
    def _listen(self) -> tuple[str, int]:
        """Where the ggml server itself listens."""
        return ("127.0.0.1", self._inner_port) if self.tls is not None else (self.host, self.port)

    def start(self) -> "ShardServer":
        os.makedirs(self.cache_dir, exist_ok=True)
        if self.tls is not None:
            from workloads.tls_tunnel import Tunnel

            self._tunnel = Tunnel(name=f"aicluster-shard-tls-{self.port}")
            self._tunnel.serve(self.host, self.port, self._listen, self.tls)
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name=f"aicluster-shard-{self.port}", daemon=True)
        self._thread.start()
        return self

    def _spawn(self) -> None:
        # from the worker's event loop (setup) or the watcher thread, which both live as long as
        # the server: the child's PR_SET_PDEATHSIG follows the thread that started it
        env = dict(os.environ)
        if not self.device.startswith("cuda"):
            env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU shard server must not grab a GPU
        cmd = [sys.executable, "-m", rpc_server.__name__, "--endpoint", "%s:%d" % self._listen,
               "--device", self.device, "--threads", str(self.threads), "--cache", self.cache_dir,
               "--parent", str(os.getpid())]
        log = open(os.path.join(self.cache_dir, "server.log"), "wb")  # this run's output only
        with self._lock:
            self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)  # Ctrl-C goes to the worker, which stops it
            self.started = time.time()
        log.close()
        logger.info("shard server for %s on %s (%s), pid %d", self.name, self.endpoint, self.device, self.proc.pid)

    #: a server that dies this many times in a row within seconds of starting is given up
    MAX_FAST_FAILURES = 5

    def _watch(self) -> None:
        fast = 0
        while not self._stop.wait(1.0):
            proc = self.proc
            if proc is not None and proc.poll() is not None and not self._stop.is_set():
                self.last_error = f"exited with {proc.returncode}: {self._log_tail() or 'no message'}"
                fast = fast + 1 if time.time() - self.started < 10 else 1
                if fast >= self.MAX_FAST_FAILURES:
                    logger.error("shard server %s failed %d times right after starting; giving up: %s",
                                 self.endpoint, fast, self.last_error)
                    return
                logger.warning("shard server %s %s; restarting it", self.endpoint, self.last_error)
                self.restarts += 1
                time.sleep(min(2 ** min(self.restarts, 4), 10) / 4)
                if not self._stop.is_set():
                    self._spawn()

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.cache_dir, "server.log"), "rb") as f:
                f.seek(max(f.seek(0, 2) - 4096, 0))
                lines = [x for x in f.read().decode("utf-8", "replace").splitlines() if x.strip()]
        except OSError:
            return ""
        return lines[-1].strip()[:300] if lines else ""

    def wait_ready(self, timeout: float = 30.0) -> bool:
        """True once the port accepts connections (the server then answers HELLO)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.alive and _port_open(*self._listen):
                return True
            time.sleep(0.1)
        return False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def connected(self) -> bool:
        """Whether a head holds a connection to the server now."""
        if not self.alive:
            return False
        try:
            import psutil

            conns = psutil.Process(self.proc.pid).net_connections(kind="tcp")
        except Exception:
            return False
        return any(c.status == "ESTABLISHED" and c.laddr and c.laddr.port == self._listen[1] for c in conns)

    def rss(self) -> int:
        try:
            import psutil

            return psutil.Process(self.proc.pid).memory_info().rss if self.alive else 0
        except Exception:
            return 0

    def cpu_state(self) -> tuple[float | None, str | None]:
        """(CPU seconds the server has used, its process state): a head that hears nothing
        from its servers asks whether they still work (``llama_head._check_stall``)."""
        try:
            import psutil

            p = psutil.Process(self.proc.pid)
            with p.oneshot():
                t = p.cpu_times()
                return t.user + t.system, p.status()
        except Exception:
            return None, None

    def cached_bytes(self) -> int:
        try:
            return sum(e.stat().st_size for e in os.scandir(self.cache_dir) if e.is_file() and e.name != "server.log")
        except OSError:
            return 0

    def info(self) -> dict:
        restarting = (not self.alive and self._thread is not None and self._thread.is_alive()
                      and not self._stop.is_set())  # died, and its supervisor starts it again
        cpu, state = self.cpu_state() if self.alive else (None, None)
        return {"endpoint": self.endpoint, "device": self.device, "alive": self.alive, "restarting": restarting,
                "cpu": cpu, "state": state,
                "pid": self.proc.pid if self.proc else None,
                "started": self.started, "restarts": self.restarts, "connected": self.connected(), "rss": self.rss(),
                "cached": self.cached_bytes(), "last_error": self.last_error, "tls": self.tls is not None,
                # with TLS, where a head on this same PC connects (no tunnel on loopback)
                "local": "%s:%d" % self._listen if self.tls is not None else None}

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None
        if self._temp:
            shutil.rmtree(self.cache_dir, ignore_errors=True)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
