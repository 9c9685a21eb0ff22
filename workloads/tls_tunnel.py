"""Mutual-TLS tunnels for ggml RPC, which has neither authentication nor encryption.

With ``security.tls`` a worker's shard server listens on 127.0.0.1 only; ``serve`` puts a
TLS listener on the worker's LAN address in front of it that takes only peers with a
certificate from the cluster's CA (Dask's own listen context for the worker, the same
certificates that guard the scheduler and workers). A split model's head reaches each
server through ``forward``: a listener on its own 127.0.0.1 whose connections go on over
TLS with the head worker's certificate. llama.cpp talks plain ggml RPC to the local end.

Written here because nothing in the project's dependencies forwards a TCP port over TLS
(stunnel or socat would be one more program to install on every PC); it is a byte pump on
one asyncio loop in a thread (protocol callbacks), with TCP_NODELAY on both legs (ggml RPC sends small
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

#: a leg stops reading while more than this waits to be sent on the other (weights uploads)
HIGH_WATER = 4 << 20


class _Leg(asyncio.Protocol):
    """One side of a relayed connection: what it receives is written to ``peer``'s transport.
    Protocol callbacks, not streams: a message costs no task switch per hop (ggml RPC makes
    several small round trips per token). Back-pressure: a leg whose transport has too much
    to send pauses the other leg's reading."""

    def __init__(self, tunnel: "Tunnel", on_made=None) -> None:
        self.tunnel = tunnel
        self._on_made = on_made  # (a listener's leg: opens the other leg once this one is made)
        self.transport: asyncio.Transport | None = None
        self.peer: _Leg | None = None
        self._early: list[bytes] = []  # what came before the other leg was connected

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.tunnel._legs.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        transport.set_write_buffer_limits(high=HIGH_WATER)
        if self._on_made is not None:
            self.tunnel.loop.create_task(self._on_made(self))

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self._early.append(data)
            self.transport.pause_reading()
        else:
            self.peer.transport.write(data)

    def connection_lost(self, exc) -> None:
        self.tunnel._legs.discard(self)
        if self.peer is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.resume_reading()

    def join(self, other: "_Leg") -> None:
        self.peer, other.peer = other, self
        for leg in (self, other):
            if leg.transport.is_closing():  # one side went while the other was connecting
                leg.peer.transport.close()
                return
        for leg in (self, other):
            for data in leg._early:
                leg.peer.transport.write(data)
            if leg._early:
                leg._early.clear()
                leg.transport.resume_reading()


class Tunnel:
    """TLS listeners and forwards on one background event loop; ``close`` ends them all."""

    def __init__(self, name: str = "aicluster-tls-tunnel") -> None:
        self.loop = asyncio.new_event_loop()
        self._servers: list[asyncio.base_events.Server] = []
        self._legs: set[_Leg] = set()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def _run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _listen(self, host: str, port: int, context: ssl.SSLContext | None, connect, what: str) -> int:
        """A listener on ``host:port`` (TLS with ``context``) whose each connection is relayed
        to the one ``connect()`` opens; the port it listens on."""
        async def pair(down: _Leg) -> None:
            try:
                _, up = await asyncio.wait_for(connect(), 30)
            except Exception as e:
                logger.warning("shard tunnel %s: connection from %s not relayed: %s: %s", what,
                               down.transport.get_extra_info("peername"), type(e).__name__, e)
                down.transport.close()
                return
            down.join(up)

        async def start():  # (with TLS, a leg is made once the handshake, the peer's certificate checked, is done)
            srv = await self.loop.create_server(lambda: _Leg(self, pair), host, port, ssl=context,
                                                ssl_handshake_timeout=30 if context is not None else None)
            self._servers.append(srv)
            return srv.sockets[0].getsockname()[1]

        return self._run(start())

    def serve(self, host: str, port: int, target: tuple[str, int], context: ssl.SSLContext) -> int:
        """TLS on ``host:port`` (0: a free port) to plain TCP ``target``; the port it listens on.
        ``context``: a server context that requires a client certificate."""
        return self._listen(host, port, context, lambda: self.loop.create_connection(lambda: _Leg(self), *target),
                            f"{host}:{port} -> {target[0]}:{target[1]}")

    def forward(self, remote: str, context: ssl.SSLContext) -> str:
        """A listener on 127.0.0.1 whose connections go on to ``remote`` (host:port) over TLS;
        its ``127.0.0.1:port``. ``context``: a client context with this PC's certificate."""
        host, _, rport = remote.rpartition(":")
        hostname = host if context.check_hostname else ""
        here = self._listen("127.0.0.1", 0, None, lambda: self.loop.create_connection(
            lambda: _Leg(self), host, int(rport), ssl=context, server_hostname=hostname), f"to {remote}")
        return f"127.0.0.1:{here}"

    def close(self) -> None:
        async def stop():
            for s in self._servers:
                s.close()
            self._servers.clear()
            for leg in list(self._legs):  # (open connections)
                leg.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]  # (connecting ones)
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
