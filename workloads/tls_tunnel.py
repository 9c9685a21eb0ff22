"""Mutual-TLS tunnels for ggml RPC, which has neither authentication nor encryption.

With ``security.tls`` a worker's shard server listens on 127.0.0.1 only; ``serve`` puts a
TLS listener on the worker's LAN address in front of it that takes only peers with a
certificate from the cluster's CA (Dask's own listen context for the worker, the same
certificates that guard the scheduler and workers). A split model's head reaches each
server through ``forward``: a listener on its own 127.0.0.1 whose connections go on over
TLS with the head worker's certificate. llama.cpp talks plain ggml RPC to the local end.

Written here because nothing in the project's dependencies forwards a TCP port over TLS
(stunnel or socat would be one more program to install on every PC); it is a byte pump on
one asyncio loop in a thread, with TCP_NODELAY on both legs (ggml RPC sends small
commands and waits for each answer: Nagle's delay would cost milliseconds per token).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading

__all__ = ["Tunnel", "reach", "worker_client_context"]

logger = logging.getLogger("workloads.tls_tunnel")

BUFFER = 1 << 20


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(BUFFER)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


class Tunnel:
    """TLS listeners and forwards on one background event loop; ``close`` ends them all."""

    def __init__(self, name: str = "aicluster-tls-tunnel") -> None:
        self.loop = asyncio.new_event_loop()
        self._servers: list[asyncio.base_events.Server] = []
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def _run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve(self, host: str, port: int, target: tuple[str, int], context: ssl.SSLContext) -> int:
        """TLS on ``host:port`` (0: a free port) to plain TCP ``target``; the port it listens on.
        ``context``: a server context that requires a client certificate."""
        async def handle(reader, writer):
            try:  # (called once the TLS handshake, with the peer's certificate checked, is done)
                up_reader, up_writer = await asyncio.open_connection(*target, limit=BUFFER)
            except Exception as e:
                logger.info("shard tunnel %s:%s: connection from %s refused or lost: %s", host, port,
                            writer.get_extra_info("peername"), e)
                writer.close()
                return
            _nodelay(writer)
            _nodelay(up_writer)
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))

        async def start():
            srv = await asyncio.start_server(handle, host, port, ssl=context, limit=BUFFER,
                                             ssl_handshake_timeout=30)
            self._servers.append(srv)
            return srv.sockets[0].getsockname()[1]

        return self._run(start())

    def forward(self, remote: str, context: ssl.SSLContext) -> str:
        """A listener on 127.0.0.1 whose connections go on to ``remote`` (host:port) over TLS;
        its ``127.0.0.1:port``. ``context``: a client context with this PC's certificate."""
        host, _, port = remote.rpartition(":")

        async def handle(reader, writer):
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(host, int(port), ssl=context, limit=BUFFER,
                                            server_hostname=host if context.check_hostname else ""), 30)
            except Exception as e:
                logger.warning("shard tunnel to %s: %s: %s", remote, type(e).__name__, e)
                writer.close()
                return
            _nodelay(writer)
            _nodelay(up_writer)
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))

        async def start():
            srv = await asyncio.start_server(handle, "127.0.0.1", 0, limit=BUFFER)
            self._servers.append(srv)
            return srv.sockets[0].getsockname()[1]

        return f"127.0.0.1:{self._run(start())}"

    def close(self) -> None:
        async def stop():
            for s in self._servers:
                s.close()
            self._servers.clear()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]  # (open connections)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self._run(stop(), timeout=10)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def worker_client_context(worker=None) -> ssl.SSLContext | None:
    """The Dask worker's own client TLS context (its certificate, the cluster's CA), or None
    when the cluster does not speak TLS."""
    if worker is None:
        try:
            from distributed import get_worker

            worker = get_worker()
        except ValueError:
            return None
    if not str(worker.address).startswith("tls://"):
        return None
    return worker.security.get_connection_args("worker").get("ssl_context")


def reach(endpoints: list[str], context: ssl.SSLContext | None,
          local: dict[str, str] | None = None) -> tuple[Tunnel | None, dict[str, str]]:
    """``(tunnel, {endpoint: where to connect})``: with a TLS context, a local forward to each
    endpoint (close the tunnel when done); without, the endpoints themselves. ``local``:
    ``{endpoint: its server's own 127.0.0.1 port}`` for the servers on this PC, reached
    directly (a tunnel on loopback would protect nothing: any process here can reach that
    port, and it would cost two proxy hops, the head's own server carrying the logits)."""
    local = local or {}
    if context is None:
        return None, {e: e for e in endpoints}
    if all(e in local for e in endpoints):
        return None, {e: local[e] for e in endpoints}
    t = Tunnel()
    try:
        return t, {e: local[e] if e in local else t.forward(e, context) for e in endpoints}
    except BaseException:
        t.close()
        raise
