"""The head of a model split across workers (``cluster/shards.py``): a child process.

``ShardedModel`` is what the head worker's ModelHost keeps resident: a proxy with the
interface of ``llamacpp.LlamaModel`` (submit / generate / tokenize / chat_prompt, many
requests at once). The model itself lives in a child process (``python -m
workloads.backends.llama_head``) that registers the planned shard servers as llama.cpp
devices and runs the same batch engine as a one-worker model. llama.cpp aborts the whole
process when a shard server is lost (``GGML_ABORT``, nothing can catch it): only this
child dies, its requests fail naming the lost worker, the worker and its other models
carry on, and the model is planned again on the next request.

Protocol: JSON lines. The child reads its settings, then requests, from stdin; it writes
progress, tokens and results to a copy of its stdout (llama.cpp's own prints go to stderr).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from . import InputError, TextGenerator

logger = logging.getLogger("workloads.backends.llama_head")


class ShardLost(RuntimeError):
    """The split model's head process died (a shard server was lost, or it crashed)."""


# -- in the worker ----------------------------------------------------------------------------
class _Pending:
    def __init__(self, on_token, should_stop):
        self.on_token, self.should_stop = on_token, should_stop
        self.done = threading.Event()
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.cancel_sent = False


class ShardedModel(TextGenerator):
    """A split model, used like a resident ``LlamaModel``; its layers are on the planned
    workers' shard servers and its decoding loop in a child process of this worker."""

    concurrent = True

    def __init__(self, spec, plan: dict, name: str, threads: int, on_progress: Callable[[float], None] | None = None,
                 client=None):
        from cluster.shards import ShardPlan, ShardServerError, probe

        from ._source import resolve_source

        self.name, self.plan = name, ShardPlan.from_dict(plan)
        self.path = Path(resolve_source(spec.source))
        opts = {k: v for k, v in spec.options.items() if k != "shard_plan"}
        self.n_ctx = int(opts.get("n_ctx", 2048))
        self.chat_format = opts.get("chat_format")
        self.nbytes = self.plan.head_bytes
        for part in self.plan.parts:  # a server that is down or of another version would abort the child
            try:
                probe(part.endpoint)
            except ShardServerError as e:
                raise ShardLost(f"model {name!r} cannot be loaded: {e} (worker {part.name})") from None
        # which server process each part is on: when the head dies, the ones that changed were lost
        self._client = client
        self._servers = self._server_infos()
        if client is not None:  # each part's bytes count against its worker's budget (LRU eviction)
            from cluster.shards import hold

            hold(client, self.plan)
        env = dict(os.environ)
        # only the shard servers hold layers (this worker's own GPU through its own server)
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", str(threads))
        self._stderr: deque[str] = deque(maxlen=40)
        self._send_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._dead: str | None = None
        self._closing = False
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "workloads.backends.llama_head"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env, start_new_session=True)
        try:
            self._load(opts, threads, on_progress)
        except BaseException:
            self._closing = True
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            if client is not None:
                from cluster.shards import release

                release(client, self.plan)
            raise

    #: a load that reports no progress for this long is given up: a shard server that serves
    #: another head (one at a time) or that went silent would keep it waiting for ever
    LOAD_STALL = 120.0
    #: while requests run, how often the head checks that every part's worker is still here
    WATCH_EVERY = 5.0

    def _load(self, opts: dict, threads: int, on_progress) -> None:
        import queue

        name = self.name
        threading.Thread(target=self._read_stderr, daemon=True, name=f"aicluster-head-err-{name}").start()
        loading: queue.Queue = queue.Queue()
        threading.Thread(target=self._reader, args=(loading,), daemon=True, name=f"aicluster-head-{name}").start()
        self._send({"path": str(self.path), "name": name, "endpoints": self.plan.endpoints,
                    "tensor_split": self.plan.tensor_split, "threads": threads, "options": opts})
        t0 = time.perf_counter()
        while True:  # load: progress lines, then "ready" (or the child's death)
            try:
                msg = loading.get(timeout=self.LOAD_STALL)
            except queue.Empty:
                raise ShardLost(
                    f"model {name!r}: loading across {', '.join(p.name for p in self.plan.parts)} made no progress "
                    f"for {self.LOAD_STALL:.0f} s: a shard server is serving another model's head (one at a time) "
                    f"or stopped answering") from None
            if msg is None:
                raise ShardLost(f"model {name!r} could not be loaded across {', '.join(p.name for p in self.plan.parts)}: "
                                + self._death())
            if "progress" in msg and on_progress is not None:
                on_progress(float(msg["progress"]))
            if "error" in msg:
                raise (InputError if msg.get("type") == "InputError" else RuntimeError)(msg["error"])
            if msg.get("ready"):
                break
        self.load_seconds = time.perf_counter() - t0
        threading.Thread(target=self._watch_stops, daemon=True, name=f"aicluster-head-stop-{name}").start()

    @property
    def shard_info(self) -> dict:
        return {"plan": self.plan.to_dict(), "pid": self._proc.pid, "healthy": self.healthy}

    # -- the interface of LlamaModel --------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        from .llamacpp import _vocab

        return _vocab(self.path).tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def chat_prompt(self, messages: list[dict]) -> tuple[str, list[str]]:
        from .chat import llama_chat_prompt
        from .llamacpp import _vocab

        return llama_chat_prompt(_vocab(self.path), messages, self.chat_format, self.name)

    def submit(self, prompt: str, max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
               stop: list[str] | None = None, seed: int | None = None, on_token=None, should_stop=None,
               priority: int = 0) -> "_Pending":
        self.check_fits(prompt, max_tokens)
        p = _Pending(on_token, should_stop)
        with self._lock:
            if self._dead is not None:
                raise ShardLost(self._dead)
            rid = self._next = self._next + 1
            self._pending[rid] = p
        p.wait = lambda: self._wait(rid, p)
        self._send({"op": "generate", "id": rid, "prompt": prompt, "priority": priority,
                    "params": {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                               "stop": [s for s in (stop or []) if s], "seed": seed}})
        return p

    def generate(self, prompt: str, **kwargs) -> dict:
        return self.submit(prompt, **kwargs).wait()

    @property
    def healthy(self) -> bool:
        return self._dead is None and self._proc.poll() is None

    def abort(self) -> None:
        self._kill("the model was unloaded while generating")

    def close(self) -> None:
        self._closing = True
        if self._proc.poll() is None:
            try:
                self._send({"op": "close"})
                self._proc.wait(10)
            except Exception:
                pass
        self._kill("the model was unloaded")

    # -- internals ---------------------------------------------------------------------------
    def _wait(self, rid: int, p: _Pending) -> dict:
        p.done.wait()
        if p.error is not None:
            raise p.error
        return p.result

    def _send(self, msg: dict) -> None:
        line = (json.dumps(msg) + "\n").encode()
        with self._send_lock:
            try:
                self._proc.stdin.write(line)
                self._proc.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass  # the reader sees the death and fails every request

    def _read(self) -> dict | None:
        line = self._proc.stdout.readline()
        return json.loads(line) if line else None

    def _read_stderr(self) -> None:
        for raw in self._proc.stderr:
            text = raw.decode("utf-8", errors="replace").rstrip()
            if text:
                self._stderr.append(text)
                logger.debug("head %s: %s", self.name, text)

    def _reader(self, loading) -> None:
        while True:
            try:
                msg = self._read()
            except (ValueError, OSError):
                msg = None
            if loading is not None:  # still loading: _load reads these (and handles an end or error)
                loading.put(msg)
                if msg is None or "error" in msg:
                    return
                if msg.get("ready"):
                    loading = None
                continue
            if msg is None:
                break
            p = self._pending.get(msg.get("id"))
            if p is None:
                continue
            if "piece" in msg:
                if p.on_token is not None:
                    try:
                        p.on_token(msg["piece"])
                    except Exception:
                        logger.exception("token callback of %s failed", self.name)
                continue
            if "result" in msg:
                p.result = msg["result"]
            else:
                p.error = (InputError if msg.get("type") == "InputError" else RuntimeError)(msg.get("error", "failed"))
            with self._lock:
                self._pending.pop(msg["id"], None)
            p.done.set()
        self._proc.wait()
        if not self._closing:  # closed on purpose: _kill said why
            self._fail_all(self._death())

    def _server_infos(self) -> dict:
        from cluster.shards import server_info

        if self._client is None:
            return {}
        try:
            return self._client.run(server_info, workers=self.plan.workers, on_error="return")
        except Exception:
            return {}

    def _death(self) -> str:
        """Why the child died, naming the workers whose shard servers were lost (died and
        restarted, or gone with their worker), or that no longer answer."""
        from cluster.shards import ShardServerError, lost_servers, probe

        code = self._proc.wait()
        if self._client is not None and self._servers:
            lost = [f"{p.name} ({p.endpoint})" for p in lost_servers(self._client, self.plan.parts, self._servers)]
        else:
            lost = []
            for part in self.plan.parts:
                try:
                    probe(part.endpoint, timeout=2.0)
                except ShardServerError:
                    lost.append(f"{part.name} ({part.endpoint})")
        tail = next((t for t in reversed(self._stderr) if "error" in t.lower() or "abort" in t.lower()), "")
        why = (f"lost the shard server(s) of {', '.join(lost)}" if lost
               else f"its head process exited with code {code}")
        return (f"model {self.name!r} (split over {', '.join(p.name for p in self.plan.parts)}) {why}"
                + (f" [{tail}]" if tail else "") + "; it is planned again on the next request")

    def _fail_all(self, why: str) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = why
            pending, self._pending = list(self._pending.values()), {}
        for p in pending:
            p.error = ShardLost(self._dead)
            p.done.set()

    def _kill(self, why: str) -> None:
        self._closing = True
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._fail_all(f"model {self.name!r}: {why}")

    def _watch_stops(self) -> None:
        last = time.monotonic()
        while self.healthy:
            for rid, p in list(self._pending.items()):
                if not p.cancel_sent and p.should_stop is not None and p.should_stop():
                    p.cancel_sent = True
                    self._send({"op": "cancel", "id": rid})
            if self._pending and self._client is not None and time.monotonic() - last > self.WATCH_EVERY:
                last = time.monotonic()
                self._check_parts()
            time.sleep(0.05)

    def _check_parts(self) -> None:
        """A part's worker that left the cluster (a PC switched off, its link cut): its server
        may never answer again and llama.cpp would wait on the socket for minutes. End the
        child now; its requests fail naming the worker."""
        try:
            here = self._client.scheduler_info(n_workers=-1)["workers"]
        except Exception:
            return
        if not here:
            return  # an empty answer says nothing (the client's identity cache, issue 12)
        gone = [p for p in self.plan.parts if p.worker not in here]
        if gone:
            why = (f"model {self.name!r} (split over {', '.join(p.name for p in self.plan.parts)}) lost the "
                   f"worker(s) {', '.join(f'{p.name} ({p.endpoint})' for p in gone)}: it left the cluster; it is "
                   f"planned again on the next request")
            self._closing = True
            with self._lock:
                self._dead = why
            if self._proc.poll() is None:
                self._proc.kill()
            self._fail_all(why)


def load_sharded(spec, device: str = "cpu", threads: int = 1, name: str = "model") -> ShardedModel:
    """The head of ``spec`` (its ``options.shard_plan``, made by the client's planner)."""
    try:
        from distributed import get_client, get_worker

        worker, client = get_worker(), get_client()
    except ValueError:
        worker = client = None
    last = [-1.0]

    def progress(p: float) -> None:  # to the client's progress bar (AICluster.load_sharded)
        if worker is not None and (p - last[0] >= 0.02 or p >= 1.0):
            last[0] = p
            worker.log_event("aicluster-load", {"model": name, "progress": p})

    return ShardedModel(spec, spec.options["shard_plan"], name, threads, on_progress=progress, client=client)


# -- in the child ------------------------------------------------------------------------------
def _child() -> None:
    # No PR_SET_PDEATHSIG here: it follows the thread that started the child (a task thread,
    # which can end), not the worker. The worker's death closes stdin, which ends the loop.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # llama.cpp's own prints must not mix with the protocol
    lock = threading.Lock()

    def send(msg: dict) -> None:
        with lock:
            out.write(json.dumps(msg) + "\n")

    cfg = json.loads(sys.stdin.readline())
    import ctypes

    import llama_cpp
    from llama_cpp._internals import LlamaModel as _LowLevelModel

    from .llamacpp import LlamaModel, _route_logs, engine_options
    from .rpc_server import ggml_libs

    _route_logs()
    ggml, rpc = ggml_libs()
    for ep in cfg["endpoints"]:
        reg = rpc.ggml_backend_rpc_add_server(ep.encode())
        if not reg:
            send({"error": f"llama.cpp could not add shard server {ep}"})
            return
        ggml.ggml_backend_register(reg)
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = -1  # every layer on the shard servers; the input layer stays here
    params.split_mode = llama_cpp.LLAMA_SPLIT_MODE_LAYER
    split = (ctypes.c_float * llama_cpp.llama_max_devices())(*cfg["tensor_split"])
    params.tensor_split = split

    @llama_cpp.llama_progress_callback
    def on_progress(p, user):
        send({"progress": float(p)})
        return True

    params.progress_callback = on_progress
    try:
        opts = cfg["options"]
        model = _LowLevelModel(path_model=cfg["path"], params=params, verbose=True)
        n_ctx, parallel, engine_opts = engine_options(opts, cfg["name"])
        llm = LlamaModel(model, Path(cfg["path"]), cfg["name"], n_ctx=n_ctx, parallel=parallel,
                         n_threads=int(cfg["threads"]), chat_format=opts.get("chat_format"), **engine_opts)
    except Exception as e:
        send({"error": f"loading {cfg['name']} across {', '.join(cfg['endpoints'])} failed: {e}",
              "type": type(e).__name__})
        return
    send({"ready": True})
    cancelled: set[int] = set()

    def run(msg: dict) -> None:
        rid = msg["id"]
        try:
            req = llm.submit(msg["prompt"], on_token=lambda piece: send({"id": rid, "piece": piece}),
                             should_stop=lambda: rid in cancelled, priority=msg.get("priority", 0), **msg["params"])
            send({"id": rid, "result": req.wait()})
        except Exception as e:
            send({"id": rid, "error": str(e), "type": "InputError" if isinstance(e, InputError) else type(e).__name__})
        finally:
            cancelled.discard(rid)

    for line in sys.stdin:
        msg = json.loads(line)
        op = msg.get("op")
        if op == "generate":
            threading.Thread(target=run, args=(msg,), daemon=True).start()
        elif op == "cancel":
            cancelled.add(msg["id"])
        elif op == "close":
            break
    llm.close()


if __name__ == "__main__":
    _child()
