"""One GGUF model split by layers across several workers, on llama.cpp's RPC backend.

Pieces (see the README, "Models bigger than one GPU"):

* **Shard servers.** A worker with ``worker.shard_server: true`` (or ``local.workers[].
  shard_server``) runs one ggml RPC server as a supervised child process on a fixed port
  (``ShardServer``, started by the ModelHost plugin): it holds the layers a head places on
  it, on the worker's GPU (or CPU). ggml RPC has no authentication and no TLS, so it is off
  by default and never binds a public address.
* **Planner.** ``plan(layout, candidates)`` divides the model's layers over the workers
  that run a shard server, from the GGUF's own metadata (``read_layout``) against each
  worker's free model budget: best tiers first, the fewest workers that hold it.
* **Head.** The worker that runs the model loads it in a child process
  (``workloads.backends.llama_head``) that registers the planned servers as llama.cpp
  devices; when a server is lost llama.cpp aborts the whole process, so only that child
  dies, and the request fails naming the lost worker.

Why by hand: llama.cpp's RPC layer split is the engine (no hand-made tensor transport
here); what no library offers is choosing the workers and checking a server before a head
connects to it (an unreachable or mismatched server aborts the head). ``read_layout``
parses the GGUF header itself because ``gguf.GGUFReader`` maps every tokenizer string
into numpy first (30 s for Gemma 3's 262k-token vocabulary on this machine).
"""
from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dask.utils import format_bytes

from .status import text_table

__all__ = ["GGUFLayout", "read_layout", "ShardPart", "ShardPlan", "ShardPlanError", "ShardServerError",
           "plan", "probe", "ShardServer", "RPC_PROTO", "candidates_of", "host_state", "plan_for", "route_for"]

logger = logging.getLogger("cluster.shards")

#: ggml RPC protocol of the llama.cpp this project builds (major, minor); a server answers
#: HELLO with its own, and a head refuses a different major or a newer minor
RPC_PROTO = (7, 0)
#: slack per shard for llama.cpp's compute buffers, on top of the weights and the KV cache
COMPUTE_SLACK = 64 * 2**20


class ShardPlanError(RuntimeError):
    """The cluster cannot hold the model split over the workers asked for."""


class ShardServerError(ConnectionError):
    """A shard server that does not answer, or answers with another protocol."""


# -- the model's layout, from its GGUF header ---------------------------------------------
@dataclass
class GGUFLayout:
    """What the planner needs of a GGUF model: bytes per repeating layer, the input and
    output layers, and the KV cache per layer at the context the model runs with."""

    path: str
    arch: str
    n_layer: int
    layer_bytes: list[int]
    input_bytes: int  # token embeddings: always on the head (llama.cpp keeps the input layer on the CPU)
    output_bytes: int  # output norm + output matrix (a copy of the embeddings when they are tied)
    kv_bytes_per_layer: int
    n_ctx: int

    @property
    def total(self) -> int:
        return sum(self.layer_bytes) + self.output_bytes + self.n_layer * self.kv_bytes_per_layer


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _read_gguf_header(path: str) -> tuple[dict, list[tuple[str, list[int], int]]]:
    """``(metadata, [(tensor name, dims, ggml type)])`` of a GGUF file; arrays of the
    metadata are skipped (only their length is kept)."""
    with open(path, "rb") as f:
        data = f.read(64 * 2**20)  # the header of any model sits in the first few MB
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v[0]

    def string():
        nonlocal pos
        n = take("<Q")
        s = data[pos:pos + n].decode("utf-8", errors="replace")
        pos += n
        return s

    def value(t):
        nonlocal pos
        if t in _GGUF_SCALARS:
            return take(_GGUF_SCALARS[t])
        if t == 8:
            return string()
        if t == 9:
            et, n = take("<I"), take("<Q")
            if et in _GGUF_SCALARS:
                pos += n * struct.calcsize(_GGUF_SCALARS[et])
            else:
                for _ in range(n):
                    value(et)
            return n
        raise ValueError(f"{path}: unknown GGUF value type {t}")

    if data[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    pos = 4
    version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is too old")
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("<I"))
    tensors = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("<Q") for _ in range(take("<I"))]
        ggml_type = take("<I")
        take("<Q")  # offset
        tensors.append((name, dims, ggml_type))
    return meta, tensors


_layouts: dict = {}


def read_layout(path: str | os.PathLike, n_ctx: int) -> GGUFLayout:
    """The model's layout (cached per file and context); ``n_ctx`` is the whole KV cache in
    tokens (the batch engine's context is ``options.n_ctx`` x ``options.parallel``)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = str(path)
    key = (path, os.stat(path).st_mtime_ns, n_ctx)
    if key in _layouts:
        return _layouts[key]
    meta, tensors = _read_gguf_header(path)
    arch = meta.get("general.architecture", "llama")
    n_layer = int(meta[f"{arch}.block_count"])
    layer = [0] * n_layer
    other: dict[str, int] = {}
    for name, dims, t in tensors:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(t)]
        n = 1
        for d in dims:
            n *= d
        nbytes = n // block * size
        if name.startswith("blk."):
            layer[int(name.split(".")[1])] += nbytes
        else:
            other[name] = other.get(name, 0) + nbytes
    embd = other.get("token_embd.weight", 0)
    output = other.get("output.weight", embd) + other.get("output_norm.weight", 0)
    n_head = int(meta.get(f"{arch}.attention.head_count", 1))
    n_head_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_head))
    n_embd = int(meta.get(f"{arch}.embedding_length", 0))
    k_len = int(meta.get(f"{arch}.attention.key_length", n_embd // max(n_head, 1)))
    v_len = int(meta.get(f"{arch}.attention.value_length", k_len))
    kv = n_ctx * n_head_kv * (k_len + v_len) * 2  # f16 K and V for every position
    out = _layouts[key] = GGUFLayout(path, arch, n_layer, layer, embd, output, kv, n_ctx)
    return out


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

    @property
    def tensor_split(self) -> list[float]:
        """llama.cpp's ``tensor_split`` that puts exactly these layers on these devices
        (the output layer counts as one more layer of the last part)."""
        return [float(p.layers) for p in self.parts]

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
            rows.append([p.name, p.tier, head, span, format_bytes(p.nbytes), format_bytes(p.free), p.endpoint])
        return rows

    _HEAD = ["worker", "tier", "role", "layers", "bytes", "free before", "shard server"]

    def __repr__(self) -> str:
        return str(self)

    def __str__(self) -> str:
        lines = [f"model {self.model}: {self.n_layer} layers + output, {format_bytes(self.total)} to place "
                 f"(weights and a KV cache of {self.n_ctx} tokens) over {len(self.parts)} worker(s)"]
        lines += text_table(self._HEAD, self._rows())
        lines.append(f"head: {self.head_name} (runs the model in a child process; holds the input layer, "
                     f"{format_bytes(self.head_bytes)})")
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


def host_state(dask_worker=None) -> dict | None:
    """What the planner needs of this worker, now (``client.run``): name, tier, budget,
    used bytes, what it holds for split models, and its shard server."""
    from .plugin import PLUGIN_NAME

    host = dask_worker.plugins.get(PLUGIN_NAME)
    if host is None or getattr(host, "shard_server", None) is None:
        return None
    a = host.assignment
    return {"name": str(dask_worker.name), "tier": a.tier if a else None, "simulated": a.simulated if a else False,
            "budget": host.budget, "used": host.used, "shards": {m: b for m, (b, _) in host._holds.items()},
            "shard_server": host.shard_server.info()}


def candidates_of(states: dict, tiers, model: str | None = None) -> list[dict]:
    """Workers that run a shard server now, from ``{address: host_state()}``: address,
    name, tier, tier rank (0: best), endpoint, free budget (counting as free what the
    worker holds for ``model``'s own earlier shard), simulated."""
    order = {t: i for i, t in enumerate(tiers)}
    out = []
    for addr, st in states.items():
        if not isinstance(st, dict) or not (st.get("shard_server") or {}).get("alive"):
            continue
        budget = st["budget"] or 0
        free = budget - (st["used"] or 0) + int((st.get("shards") or {}).get(model, 0))
        out.append({"address": addr, "name": st["name"], "tier": st["tier"] or "?", "rank": order.get(st["tier"], len(order)),
                    "endpoint": st["shard_server"]["endpoint"], "free": max(free, 0), "budget": budget,
                    "simulated": bool(st["simulated"]), "connected": bool(st["shard_server"].get("connected")),
                    "holds": model in (st.get("shards") or {})})
    out.sort(key=lambda c: (c["rank"], c["name"]))
    return out


def plan(model: str, layout: GGUFLayout, candidates: list[dict], workers: list[str] | None = None) -> ShardPlan:
    """Divide ``layout``'s layers over ``candidates`` (see ``candidates_of``).

    ``workers`` (names or addresses): use exactly these, in this order, layers in
    proportion to their free budget. Otherwise: best tiers first (then most free), the
    fewest workers whose free budgets hold the model. The head is the first worker.
    Raises ``ShardPlanError`` naming the shortfall.
    """
    if not candidates:
        raise ShardPlanError(
            f"no worker runs a shard server, so model {model!r} cannot be split; start workers with "
            f"--shard-server (or worker.shard_server: true / local.workers[].shard_server: true in config.yaml)")
    if workers:
        by = {c["address"]: c for c in candidates} | {c["name"]: c for c in candidates}
        missing = [w for w in workers if w not in by]
        if missing:
            raise ShardPlanError(
                f"model {model!r}: {', '.join(map(repr, missing))} is not a worker with a shard server; workers "
                f"with one: " + ", ".join(c["name"] for c in candidates))
        chosen = [by[w] for w in workers]
        if len({c["address"] for c in chosen}) != len(chosen):
            raise ShardPlanError(f"model {model!r}: a worker is named twice in {workers}")
        busy = [c["name"] for c in chosen if _busy(c)]
        if busy:
            raise ShardPlanError(f"model {model!r}: the shard server(s) of {', '.join(busy)} serve another split "
                                 f"model's head (one head at a time); unload that model first (ai.unload)")
        parts = _divide(model, layout, chosen)
        if parts is None:
            raise ShardPlanError(_shortfall(model, layout, chosen, "the workers named"))
        return _finish(model, layout, chosen, parts)
    smallest = min(_need(layout, i, i) for i in range(layout.n_layer + 1))
    ordered = sorted((c for c in candidates if c["free"] >= smallest and not _busy(c)),
                     key=lambda c: (c["rank"], -c["free"]))
    for k in range(1, len(ordered) + 1):
        parts = _divide(model, layout, ordered[:k])
        if parts is not None:
            return _finish(model, layout, ordered[:k], parts)
    raise ShardPlanError(_shortfall(model, layout, sorted(candidates, key=lambda c: (c["rank"], -c["free"])),
                                    "all shard servers together"))


def _busy(c: dict) -> bool:
    """A server that a head of another model holds (a server serves one head at a time)."""
    return bool(c.get("connected")) and not c.get("holds")


def _need(layout: GGUFLayout, first: int, last: int) -> int:
    """Bytes of layers first..last (index n_layer: the output layer) with their KV cache."""
    n = 0
    for i in range(first, last + 1):
        n += layout.output_bytes if i == layout.n_layer else layout.layer_bytes[i] + layout.kv_bytes_per_layer
    return n + COMPUTE_SLACK


def _divide(model: str, layout: GGUFLayout, chosen: list[dict]) -> list[tuple[int, int, int]] | None:
    """``[(first, last, bytes)]`` per chosen worker, or None when they cannot hold it.

    Layers go in proportion to free budget, then move from any worker over its budget to
    the next; every chosen worker gets at least one layer.
    """
    n = layout.n_layer + 1  # the output layer is placed like a layer (on the last device)
    if len(chosen) > n:
        return None
    free = [max(c["free"], 0) for c in chosen]
    free[0] = max(free[0] - layout.input_bytes, 0)  # the head also holds the input layer
    total_free = sum(free) or 1
    counts = [max(1, round(n * f / total_free)) for f in free]
    while sum(counts) > n:
        counts[counts.index(max(counts))] -= 1
    while sum(counts) < n:
        counts[free.index(max(free))] += 1
    for _ in range(n * len(chosen)):  # move layers off over-full workers
        spans = _spans(counts)
        over = [i for i, (a, b) in enumerate(spans) if _need(layout, a, b) > free[i]]
        if not over:
            return [(a, b, _need(layout, a, b)) for a, b in spans]
        i = over[0]
        if counts[i] <= 1:
            return None
        room = [j for j in range(len(counts)) if j != i and _need(layout, *_grow(spans, j, i)) <= free[j]]
        if not room:
            return None
        counts[i] -= 1
        counts[min(room, key=lambda j: abs(j - i))] += 1
    return None


def _spans(counts: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for c in counts:
        out.append((start, start + c - 1))
        start += c
    return out


def _grow(spans, j: int, i: int) -> tuple[int, int]:
    """Span of worker j after taking one layer from worker i (an approximation for the check:
    j's span grows by one layer at its end nearest to i)."""
    a, b = spans[j]
    return (a, b + 1) if j < i else (a - 1, b)


def _shortfall(model: str, layout: GGUFLayout, chosen: list[dict], who: str) -> str:
    need = _need(layout, 0, layout.n_layer) + (len(chosen) - 1) * COMPUTE_SLACK + layout.input_bytes
    have = sum(max(c["free"], 0) for c in chosen)
    each = ", ".join(f"{c['name']} {format_bytes(c['free'])}" for c in chosen)
    short = max(need - have, 0)
    return (f"model {model!r} needs about {format_bytes(need)} (weights + a KV cache of {layout.n_ctx} tokens) but "
            f"{who} have {format_bytes(have)} free ({each}); short by {format_bytes(short)}"
            + (" (no worker can take the largest layer)" if short == 0 else "")
            + ". Add a worker with a shard server, unload other models, or lower the model's options.n_ctx or "
              "options.parallel.")


def _finish(model: str, layout: GGUFLayout, chosen: list[dict], parts) -> ShardPlan:
    head = chosen[0]
    return ShardPlan(
        model=model, head=head["address"], head_name=head["name"], head_bytes=layout.input_bytes,
        parts=[ShardPart(c["address"], c["name"], c["tier"], c["endpoint"], a, b, nb, c["free"])
               for c, (a, b, nb) in zip(chosen, parts)],
        n_layer=layout.n_layer, n_ctx=layout.n_ctx, total=_need(layout, 0, layout.n_layer),
        simulated=any(c["simulated"] for c in chosen))


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
                 name: str = "worker"):
        check_bind_host(host)
        self.host, self.device, self.threads, self.name = host, device, threads, name
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
        return f"{self.host}:{self.port}"

    def start(self) -> "ShardServer":
        os.makedirs(self.cache_dir, exist_ok=True)
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
        cmd = [sys.executable, "-m", "workloads.backends.rpc_server", "--endpoint", self.endpoint,
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
            if self.alive and _port_open(self.host, self.port):
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
        return any(c.status == "ESTABLISHED" and c.laddr and c.laddr.port == self.port for c in conns)

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
                "cached": self.cached_bytes(), "last_error": self.last_error}

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

        if self._temp:
            shutil.rmtree(self.cache_dir, ignore_errors=True)


def server_info(dask_worker=None) -> dict | None:
    """This worker's shard server (``client.run``): endpoint, pid, start time, state."""
    from .plugin import PLUGIN_NAME

    host = dask_worker.plugins.get(PLUGIN_NAME)
    srv = getattr(host, "shard_server", None)
    return None if srv is None else srv.info()


def lost_servers(client, parts: list[ShardPart], before: dict) -> list[ShardPart]:
    """The parts whose shard server died (or whose worker left) since ``before`` (``{worker
    address: server_info()}``): a restarted server has another pid and start time."""
    try:
        now = client.run(server_info, workers=[p.worker for p in parts], on_error="return")
    except Exception:
        now = {}
    lost = []
    for p in parts:
        a, b = before.get(p.worker) or {}, now.get(p.worker)
        if not isinstance(b, dict) or not b.get("alive") or (a.get("pid"), a.get("started")) != (b.get("pid"), b.get("started")):
            lost.append(p)
    return lost


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


# -- the client's side: plan, hold, route (AICluster delegates here) --------------------------
def _layout_on_worker(source: str, n_ctx: int) -> dict:
    import importlib

    path = importlib.import_module("workloads.backends._source").resolve_source(source)
    return asdict(read_layout(path, n_ctx))


def layout_for(ai, spec, candidates: list[dict]) -> GGUFLayout:
    """The model's layout, read here when the file is on this machine, else on a worker."""
    import importlib

    # the batch engine keeps n_ctx tokens for each of its `parallel` sequences
    n_ctx = int(spec.options.get("n_ctx", 2048)) * int(spec.options.get("parallel", 8))
    path = importlib.import_module("workloads.backends._source").local_path(spec.source)
    if path is not None and Path(path).is_file():
        return read_layout(path, n_ctx)
    if not candidates:
        raise ShardPlanError("no worker runs a shard server (see `aicluster worker --help`, --shard-server)")
    where = candidates[0]["address"]
    out = ai.client.run(_layout_on_worker, spec.source, n_ctx, workers=[where])
    return GGUFLayout(**out[where])


#: seconds a plan waits for shard servers that are being restarted
RESTART_WAIT = 20.0


def _restarting(states: dict) -> list[str]:
    return [st["name"] for st in states.values()
            if isinstance(st, dict) and (st.get("shard_server") or {}).get("restarting")]


def plan_for(ai, model: str, workers: list[str] | None = None) -> ShardPlan:
    """``AICluster.plan_shards``: the plan for ``model`` on the workers connected now."""
    spec = ai.config.model(model)
    if spec.backend != "llamacpp":
        raise ValueError(f"model {model!r} ({spec.backend}) cannot be split across workers: only llamacpp (GGUF) "
                         f"models can")
    # asked of the workers now, not read from heartbeats: a worker that just joined has not
    # reported its shard server yet, and a plan is made once per load
    states = ai.client.run(host_state, on_error="return")
    deadline = time.monotonic() + RESTART_WAIT
    while _restarting(states) and time.monotonic() < deadline:
        # a server that died moments ago (its supervisor starts it again within seconds) is
        # waited for, not planned without, nor reported as missing
        time.sleep(0.5)
        states = ai.client.run(host_state, on_error="return")
    candidates = candidates_of(states, ai.config.tier_names, model)
    wanted = list(workers or spec.shard_workers)
    down = [(st["name"], st["shard_server"]) for addr, st in states.items()
            if isinstance(st, dict) and (st.get("shard_server") or {}).get("alive") is False
            and (not wanted or st["name"] in wanted or addr in wanted)]
    if down and (wanted or not candidates):
        raise ShardPlanError(f"model {model!r}: the shard server of " + "; of ".join(
            f"{name} ({ss['endpoint']}) is down: {ss.get('last_error') or 'no message'}"
            + ("" if ss.get("restarting") else ", and its worker gave up restarting it: restart that worker")
            for name, ss in down))
    layout = layout_for(ai, spec, candidates)
    return plan(model, layout, candidates, wanted or None)


def current_plan(workers: dict, model: str) -> ShardPlan | None:
    """The plan of the head that holds ``model`` now and works (from the heartbeats), if
    every worker of it is still here; else None (plan again)."""
    for w in workers.values():
        m = (((w.get("metrics") or {}).get("aicluster") or {}).get("models") or {}).get(model) or {}
        if m.get("shard") and m["shard"].get("healthy", True):
            p = ShardPlan.from_dict(m["shard"]["plan"])
            if all(part.worker in workers for part in p.parts):
                return p
    return None


async def _hold(model: str, nbytes: int, dask_worker=None) -> dict:
    import asyncio

    from .plugin import PLUGIN_NAME

    # in a thread: making room may wait for a task that uses the model it evicts, and the
    # worker's event loop (heartbeats, cancels) must not wait with it
    return await asyncio.to_thread(dask_worker.plugins[PLUGIN_NAME].hold_shard, model, nbytes)


async def _release(model: str, dask_worker=None) -> bool:
    from .plugin import PLUGIN_NAME

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
        client.run(_hold, p.model, part.nbytes, workers=[part.worker])


class _Plans:
    """A client's plans of split models not yet reported by their heads: concurrent first
    requests wait for one plan (one client.run on every worker, one GGUF header read) and
    all get it, instead of each making its own and the head loading, unloading and loading
    again as the splits differ."""

    #: a plan the head has not reported for this long is made again
    FRESH = 300.0

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.locks: dict[str, threading.Lock] = {}
        self.plans: dict[str, tuple[ShardPlan, float]] = {}

    def lock_for(self, model: str) -> threading.Lock:
        with self.lock:
            return self.locks.setdefault(model, threading.Lock())


def _plans_of(ai) -> _Plans:
    plans = ai.__dict__.get("_shard_plans")
    if plans is None:
        plans = ai.__dict__.setdefault("_shard_plans", _Plans())
    return plans


def forget_plan(ai, model: str) -> None:
    """The next request plans ``model`` afresh (it was unloaded)."""
    _plans_of(ai).plans.pop(model, None)


def _head_state(workers: dict, model: str) -> str | None:
    """"healthy", "broken" or "loading" as the heads' heartbeats report ``model``; None."""
    for w in workers.values():
        host = (w.get("metrics") or {}).get("aicluster") or {}
        m = (host.get("models") or {}).get(model) or {}
        if m.get("shard"):
            return "healthy" if m["shard"].get("healthy", True) else "broken"
        if model in (host.get("loading") or []):
            return "loading"
    return None


def route_for(ai, model: str, spec, parallel: int):
    """``(spec with its plan, Route to the head)`` for a split model: the head that holds
    it now, or a new plan (held on its workers) that the head loads on first use."""
    from dataclasses import replace

    from . import routing

    cache = _plans_of(ai)
    named = spec.shard_workers
    with cache.lock_for(model):
        workers = ai._workers()
        p = current_plan(workers, model)
        state = _head_state(workers, model)
        if p is None and state in (None, "loading") and model in cache.plans:
            # planned by an earlier request whose head has not reported it yet: the same plan
            cached, when = cache.plans[model]
            if time.monotonic() - when < cache.FRESH and all(part.worker in workers for part in cached.parts):
                p = cached
        if p is None or p.head not in workers or (named and [x.name for x in p.parts] != named
                                                  and [x.worker for x in p.parts] != named):
            p = plan_for(ai, model)  # the head holds the parts' bytes on their workers when it loads
            cache.plans[model] = (p, time.monotonic())
        elif state == "healthy":
            cache.plans.pop(model, None)  # the head reports it: its heartbeat is the truth now
    tier = next(part.tier for part in p.parts if part.worker == p.head)
    route = routing.Route(tier=tier, chain=[tier], workers=[p.head], tier_workers=[p.head], model=model)
    route = replace(route, amount=routing.slot_share(parallel))
    return spec.model_copy(update={"options": {**spec.options, "shard_plan": p.to_dict()}}), route


def load_model(ai, model: str, progress: bool = True) -> dict:
    """``AICluster.load_model``: load ``model`` now on the worker it is routed to (a split
    model: its head, with a progress bar fed by the head's ``aicluster-load`` events)."""
    import uuid

    from .client import EMBED_BACKENDS, GENERATE_BACKENDS, _task

    spec, route = ai._model_route(model, GENERATE_BACKENDS + EMBED_BACKENDS, "load")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=100, desc=f"loading {model}", unit="%", bar_format="{l_bar}{bar}| {n:.0f}/{total}%")

        def on_event(event) -> None:
            info = event[1]
            if info.get("model") == model:
                bar.n = round(100 * float(info["progress"]), 1)
                bar.refresh()

        ai.client.subscribe_topic("aicluster-load", on_event)
    out = None
    try:
        f = ai._submit_routed(route, f"load {model}", _task("load"), model, spec, kind="load",
                              key=f"load-{model}-{uuid.uuid4().hex[:12]}")
        out = f.result()
    finally:
        if bar is not None:
            ai.client.unsubscribe_topic("aicluster-load")
            if out is not None:
                bar.n = 100
            bar.close()
    return out
