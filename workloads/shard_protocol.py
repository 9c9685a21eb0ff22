"""The split-model protocol: what a plan is, and how a head talks to its shard servers.

Used by both sides of a split model: the client plans it and routes to its head
(``cluster/shards.py``), and the head, a child process on a worker
(``backends/llama_head.py``), checks each server before it connects (an unreachable or
mismatched ggml RPC server aborts the head's process) and counts each part against its
worker's budget. It lives here, on the lower side, so that the head imports it without
reaching up into ``cluster`` (ARCHITECTURE.md).
"""
from __future__ import annotations

import socket
import struct
from dataclasses import asdict, dataclass, field

from dask.utils import format_bytes

from .compat import RPC_PROTO
from .host import PLUGIN_NAME
from .tables import text_table

__all__ = ["ShardPart", "ShardPlan", "ShardServerError", "ShardServerBusy", "probe", "server_info", "lost_servers", "hold", "release",
           "RPC_PROTO"]


class ShardServerError(ConnectionError):
    """A shard server that does not answer, or answers with another protocol."""


class ShardServerBusy(RuntimeError):
    """A shard server that holds another split model's layers (it serves one head at a time)."""


# -- the plan -------------------------------------------------------------------------------
@dataclass
class ShardPart:
    """Layers ``[first, last]`` of the model on one worker's shard server."""

    worker: str  # address
    name: str
    tier: str
    endpoint: str  # host:port of its shard server
    first: int
    last: int  # inclusive; the output layer is index n_layer
    nbytes: int
    free: int
    #: expected ms per generated token on this part (its layers, the output layer if it has
    #: it, its link), from measured speeds; None when the plan was made by memory alone
    ms: float | None = None
    #: its server's measured ms per layer per token (None: not measured)
    layer_ms: float | None = None

    @property
    def layers(self) -> int:
        return self.last - self.first + 1


@dataclass
class ShardPlan:
    """Where a split model lives: the head worker (runs the model's child process and
    holds its input layer) and the parts (layer ranges) on each worker's shard server."""

    model: str
    head: str  # address
    head_name: str
    head_bytes: int
    parts: list[ShardPart]
    n_layer: int
    n_ctx: int
    total: int
    simulated: bool = False
    notes: list[str] = field(default_factory=list)
    #: where the output layer is: "head" (the head's own server, parts[-1]) or "last"
    output: str = "last"
    #: how the layers were divided: "speed" (measured speeds and links) or "memory"
    by: str = "memory"
    #: the shard servers are reached through mutual-TLS tunnels (``security.tls``)
    tls: bool = False

    @property
    def expected_ms(self) -> float | None:
        """Expected ms per generated token (one sequence), from the measured speeds."""
        if any(p.ms is None for p in self.parts):
            return None
        return sum(p.ms for p in self.parts)

    @property
    def expected_tokens_per_s(self) -> float | None:
        ms = self.expected_ms
        return 1000.0 / ms if ms else None

    @property
    def tensor_split(self) -> list[float]:
        """llama.cpp's ``tensor_split`` that puts exactly these layers on these devices
        (the output layer counts as one more layer of the last part)."""
        return [float(p.layers) for p in self.parts]

    @property
    def named_order(self) -> list[ShardPart]:
        """The parts as ``shard.workers`` names them: the head's first, then the others in
        layer order (with the output on the head, the head's part is last in layer order)."""
        return ([p for p in self.parts if p.worker == self.head]
                + [p for p in self.parts if p.worker != self.head])

    @property
    def endpoints(self) -> list[str]:
        return [p.endpoint for p in self.parts]

    @property
    def workers(self) -> list[str]:
        return [p.worker for p in self.parts]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ShardPlan":
        d = dict(d)
        d["parts"] = [ShardPart(**p) for p in d["parts"]]
        return cls(**d)

    def _rows(self) -> list[list[str]]:
        rows = []
        for p in self.parts:
            span = f"{p.first}-{min(p.last, self.n_layer - 1)}" if p.first < self.n_layer else "-"
            if p.last >= self.n_layer:
                span += " + output"
            head = "head" if p.worker == self.head else ""
            rows.append([p.name, p.tier, head, span, format_bytes(p.nbytes), format_bytes(p.free),
                         "-" if p.ms is None else f"{p.ms:.1f}", p.endpoint])
        return rows

    _HEAD = ["worker", "tier", "role", "layers", "bytes", "free before", "ms/token", "shard server"]

    def __repr__(self) -> str:
        return str(self)

    def __str__(self) -> str:
        lines = [f"model {self.model}: {self.n_layer} layers + output, {format_bytes(self.total)} to place "
                 f"(weights and a KV cache of {self.n_ctx} tokens) over {len(self.parts)} worker(s)"]
        lines += text_table(self._HEAD, self._rows())
        lines.append(f"head: {self.head_name} (runs the model in a child process; holds the input layer, "
                     f"{format_bytes(self.head_bytes)})")
        if len(self.parts) > 1:
            lines.append("output layer on the head's own shard server: per token only hidden states cross the "
                         "network" if self.output == "head" else
                         f"output layer on {self.parts[-1].name} (shard.output: last): the logits, a row as wide "
                         f"as the vocabulary, cross the network every token")
        if self.expected_ms:
            lines.append(f"expected: {self.expected_tokens_per_s:.1f} tokens/s for one sequence "
                         f"({self.expected_ms:.1f} ms per token; layers divided by measured speed and links)")
        if self.simulated:
            lines.append("simulated: some of these workers have a forced tier on a machine without such a GPU; "
                         "their shards sit in RAM.")
        lines += self.notes
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from html import escape

        head = "".join(f"<th>{escape(h)}</th>" for h in self._HEAD)
        body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in self._rows())
        text = str(self).splitlines()
        foot = "".join(f"<p>{escape(t)}</p>" for t in text[3 + len(self.parts):])
        return f"<p><b>{escape(text[0])}</b></p><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{foot}"


# -- talking to a shard server --------------------------------------------------------------
def probe(endpoint: str, timeout: float = 5.0) -> tuple[int, int, int]:
    """Ask the server at ``host:port`` for its protocol version (ggml RPC ``HELLO``).

    Raises ``ShardServerError`` when it does not answer in ``timeout`` (down, firewalled,
    or busy: a server serves one head at a time) or speaks another protocol. Checked before
    a head registers a server, because llama.cpp aborts the head's process otherwise.
    """
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(bytes([14]) + struct.pack("<Q", 24) + bytes(24))  # RPC_CMD_HELLO, no capabilities
            head = _recv(s, 8)
            size = struct.unpack("<Q", head)[0]
            if size < 3 or size > 4096:
                raise ShardServerError(f"shard server {endpoint} answered HELLO with {size} bytes: not a ggml RPC "
                                       f"server of a known version")
            major, minor, patch = _recv(s, size)[:3]
    except ShardServerError:
        raise
    except socket.timeout:
        raise ShardServerError(
            f"shard server {endpoint} did not answer within {timeout:.0f} s: it is serving another model's head "
            f"(one at a time), or a firewall drops the port") from None
    except OSError as e:
        raise ShardServerError(f"shard server {endpoint} cannot be reached: {e.strerror or e}") from None
    if major != RPC_PROTO[0] or minor > RPC_PROTO[1]:
        raise ShardServerError(
            f"shard server {endpoint} speaks ggml RPC {major}.{minor}.{patch}, this head {RPC_PROTO[0]}.{RPC_PROTO[1]}: "
            f"install the same llama-cpp-python version on both PCs (make install)")
    return major, minor, patch


def _recv(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ShardServerError(
                f"shard server {':'.join(map(str, s.getpeername()[:2]))} closed the connection during HELLO: it is "
                f"probably another llama-cpp-python (ggml RPC version) than this head's {RPC_PROTO[0]}.{RPC_PROTO[1]}; "
                f"install the same version on both PCs (make install)")
        buf += chunk
    return buf


def server_info(endpoints: list[str] | None = None, dask_worker=None) -> dict | None:
    """This worker's shard server (``client.run``): endpoint, pid, start time, state; of its
    servers, the one at one of ``endpoints`` (a plan's: a worker is in a plan once), else
    the first."""
    host = dask_worker.plugins.get(PLUGIN_NAME)
    servers = getattr(host, "shard_servers", None) or []
    srv = next((s for s in servers if endpoints and s.endpoint in endpoints), servers[0] if servers else None)
    return None if srv is None else srv.info()


def lost_servers(client, parts: list[ShardPart], before: dict) -> list[ShardPart]:
    """The parts whose shard server died (or whose worker left) since ``before`` (``{worker
    address: server_info()}``): a restarted server has another pid and start time."""
    try:
        now = client.run(server_info, [p.endpoint for p in parts], workers=[p.worker for p in parts],
                         on_error="return")
    except Exception:
        now = {}
    lost = []
    for p in parts:
        a, b = before.get(p.worker) or {}, now.get(p.worker)
        if not isinstance(b, dict) or not b.get("alive") or (a.get("pid"), a.get("started")) != (b.get("pid"), b.get("started")):
            lost.append(p)
    return lost


async def _hold(model: str, nbytes: int, endpoint: str | None = None, dask_worker=None) -> dict:
    import asyncio

    # in a thread: making room may wait for a task that uses the model it evicts, and the
    # worker's event loop (heartbeats, cancels) must not wait with it
    return await asyncio.to_thread(dask_worker.plugins[PLUGIN_NAME].hold_shard, model, nbytes, endpoint)


async def _release(model: str, dask_worker=None) -> bool:
    host = dask_worker.plugins.get(PLUGIN_NAME)
    return bool(host and host.release_shard(model))


def release(client, p: ShardPlan) -> None:
    """Stop counting ``p``'s parts on their workers (the head unloaded it, or never loaded it)."""
    try:
        client.run(_release, p.model, workers=p.workers, on_error="ignore")
    except Exception:
        pass


def hold(client, p: ShardPlan) -> None:
    """Count each part's bytes against its worker's model budget (evicting LRU models
    there); raises the worker's ``ModelDoesNotFit`` when one cannot make room."""
    for part in p.parts:
        client.run(_hold, p.model, part.nbytes, part.endpoint, workers=[part.worker])
