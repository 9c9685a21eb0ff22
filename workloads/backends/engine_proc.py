"""A llama.cpp engine in a child process of its worker: a native crash ends the child only.

A model's native kernels can crash on one PC and not another (ggml's AMX kernel segfaults
on some Xeons; a driver aborts; ``GGML_ABORT`` on a bad file). In-process, that kills the
worker with every other resident model and finished result on it, and Dask then retries
the task on every worker in turn. So each llama.cpp model runs in ``python -m
workloads.backends.engine_proc``, a child of its worker, with the same batch engine as
ever (``llama_batch.BatchEngine``) and tokens over a pipe:

* the worker tokenizes (the vocabulary alone, ``llama_lib.load_vocab``) and sends token ids;
* the child sends text pieces with the token ids they came from, then the result;
* when the child dies of a signal, every request it served fails with ``ModelCrashed``
  (model, worker, signal, native frame from ``native.py``'s report), and the worker's
  ModelHost quarantines the model (``cluster/plugin.py``).

Protocol: JSON lines. The child reads its settings, then requests, from stdin; it writes
progress, pieces and results to a copy of its stdout (llama.cpp's own prints go to stderr,
which the worker keeps the tail of and logs at debug level). A split model's head
(``llama_head.py``) is the same child with shard servers registered first.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from .base import InputError, ModelCrashed, TextGenerator

logger = logging.getLogger("workloads.backends.engine_proc")

__all__ = ["ChildModel", "child_main"]


class _Pending:
    def __init__(self, on_token, on_piece, should_stop):
        self.on_token, self.on_piece, self.should_stop = on_token, on_piece, should_stop
        self.done = threading.Event()
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.cancel_sent = False
        #: token ids of the pieces received so far (a retry elsewhere resumes from them)
        self.ids: list[int] = []
        self.text = ""

    def wait(self, timeout: float | None = None) -> dict:
        if not self.done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        if self.error is not None:
            raise self.error
        return self.result


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except ValueError:
        import socket

        return socket.gethostname()


class ChildModel(TextGenerator):
    """A resident llama.cpp model whose engine runs in a child process; used like the
    in-process ``llamacpp.LlamaModel`` (submit / generate / tokenize / chat_prompt, many
    requests at once).

    Parameters
    ----------
    name, path
        The model's name in config.yaml and its GGUF file (the worker reads its vocabulary).
    loader
        ``"module:function"`` the child calls as ``function(cfg, on_progress)`` to get an
        in-process model (``llamacpp.load_here`` unless a test names its own).
    cfg
        Settings for the loader (JSON): options, device, threads, shard servers.
    env
        Extra environment of the child (e.g. ``CUDA_VISIBLE_DEVICES``).
    """

    concurrent = True
    can_resume = True
    #: a load that reports no progress for this long is given up
    LOAD_STALL = 120.0

    def __init__(self, name: str, path: Path, loader: str, cfg: dict, n_ctx: int, chat_format: str | None = None,
                 env: dict | None = None, on_progress: Callable[[float], None] | None = None, device: str = "cpu"):
        self.name, self.path, self.n_ctx, self.chat_format, self.device = name, Path(path), n_ctx, chat_format, device
        self.worker = _worker_name()
        self.crash: ModelCrashed | None = None
        #: called with the ``ModelCrashed`` when the child dies of a native crash (ModelHost)
        self.on_crash: Callable[[ModelCrashed], None] | None = None
        self._stderr: deque[str] = deque(maxlen=200)
        self._send_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._dead: str | None = None
        self._closing = False
        #: when (monotonic) the child last sent anything
        self.last_message = time.monotonic()
        child_env = dict(os.environ)
        # the child imports what this process can (a test's backend under tests/, say)
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        child_env["GGML_NO_BACKTRACE"] = "1"  # ggml would fork gdb; native.py reports instead
        child_env.update(env or {})
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "workloads.backends.engine_proc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=child_env, start_new_session=True)
        self._stderr_done = threading.Event()
        try:
            self._start(loader, cfg, on_progress)
        except BaseException:
            self._closing = True
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            raise

    def _start(self, loader: str, cfg: dict, on_progress) -> None:
        name = self.name
        threading.Thread(target=self._read_stderr, daemon=True, name=f"aicluster-engine-err-{name}").start()
        loading: queue.Queue = queue.Queue()
        threading.Thread(target=self._reader, args=(loading,), daemon=True, name=f"aicluster-engine-{name}").start()
        t0 = time.perf_counter()
        self._send({"loader": loader, "cfg": {**cfg, "name": name, "path": str(self.path), "worker": self.worker}})
        while True:  # progress lines, then "ready" (or the child's death)
            try:
                msg = loading.get(timeout=self.LOAD_STALL)
            except queue.Empty:
                raise self.stalled() from None
            if msg is None:
                raise self.died(loading=True)
            if "progress" in msg and on_progress is not None:
                on_progress(float(msg["progress"]))
            if "error" in msg:
                raise (InputError if msg.get("type") == "InputError" else RuntimeError)(msg["error"])
            if msg.get("ready"):
                self.info = msg
                break
        self.load_seconds = time.perf_counter() - t0
        # CPU: what the child holds (weights mapped in, KV cache, compute buffers); on a GPU
        # the host measures the device's memory, and the weights count as the file's size
        size = self.path.stat().st_size
        self.nbytes = max(size, int(msg.get("rss") or 0)) if self.device == "cpu" else size
        threading.Thread(target=self._watch, daemon=True, name=f"aicluster-engine-watch-{name}").start()

    # -- hooks for a split model's head (llama_head.py) -----------------------------------------
    def stalled(self) -> BaseException:
        return RuntimeError(f"model {self.name!r} made no loading progress for {self.LOAD_STALL:.0f} s")

    def died(self, loading: bool = False) -> BaseException:
        """The error for every request when the child died (and for the load, ``loading``)."""
        from .native import describe_exit

        code = self._proc.wait()
        self._stderr_done.wait(5)  # the crash report is the last thing on stderr
        exit_ = describe_exit(code, "\n".join(self._stderr))
        what = "loading" if loading else "generating"
        if exit_["crashed"]:
            self.crash = ModelCrashed(self.name, self.worker, exit_["signal"], exit_["frame"], exit_["library"],
                                      exit_["text"], during=what)
            return self.crash
        tail = next((t for t in reversed(self._stderr) if "error" in t.lower()), "")
        return RuntimeError(f"model {self.name!r}: its engine process on worker {self.worker} ended while {what} "
                            f"({exit_['text']})" + (f" [{tail}]" if tail else "") + "; it is loaded again on the next "
                            "request")

    def watch(self) -> None:
        """Called every 50 ms while requests run (a split head checks its servers)."""

    # -- the interface of LlamaModel ------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        from .chat import tokenize_prompt
        from .llama_lib import load_vocab

        return tokenize_prompt(load_vocab(self.path), text)

    def detokenize(self, ids: list[int]) -> str:
        from .llama_lib import load_vocab

        return load_vocab(self.path).detokenize(ids, special=False).decode("utf-8", errors="ignore")

    def chat_prompt(self, messages: list[dict]) -> tuple[str, list[str]]:
        from .chat import llama_chat_prompt
        from .llama_lib import load_vocab

        return llama_chat_prompt(load_vocab(self.path), messages, self.chat_format, self.name)

    def submit(self, prompt: str, max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
               stop: list[str] | None = None, seed: int | None = None, on_token=None, should_stop=None,
               priority: int = 0, on_piece=None, resume: dict | None = None, **sampling) -> _Pending:
        """Queue a generation (``.wait()`` for the result). ``on_piece(text, ids)`` gets each
        piece with its token ids; ``resume`` (``{"ids", "text"}``) continues a generation that
        produced those tokens elsewhere (see ``llama_batch.Request.prior_ids``)."""
        ids = self.check_fits(prompt, max_tokens)
        if sampling.get("logit_bias"):
            from .llama_lib import load_vocab

            self.check_bias(sampling["logit_bias"], load_vocab(self.path).n_vocab())
        p = _Pending(on_token, on_piece, should_stop)
        with self._lock:
            if self._dead is not None:
                raise self.crash or RuntimeError(self._dead)
            rid = self._next = self._next + 1
            self._pending[rid] = p
        self._send({"op": "generate", "id": rid, "ids": ids, "priority": priority, "resume": resume,
                    "params": {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                               "stop": [s for s in (stop or []) if s], "seed": seed, **sampling}})
        return p

    def generate(self, prompt: str, **kwargs) -> dict:
        return self.submit(prompt, **kwargs).wait()

    def stats(self, timeout: float = 10.0) -> dict:
        """The engine's counters: requests decoding now (``active``), the most at once
        (``max_active``), decode steps (``steps``)."""
        p = _Pending(None, None, None)
        with self._lock:
            if self._dead is not None:
                raise self.crash or RuntimeError(self._dead)
            rid = self._next = self._next + 1
            self._pending[rid] = p
        self._send({"op": "stats", "id": rid})
        return p.wait(timeout)

    @property
    def healthy(self) -> bool:
        return self._dead is None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        return self._proc.pid

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

    # -- internals -------------------------------------------------------------------------------
    def _send(self, msg: dict) -> None:
        line = (json.dumps(msg) + "\n").encode()
        with self._send_lock:
            try:
                self._proc.stdin.write(line)
                self._proc.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass  # the reader sees the death and fails every request

    def _read_stderr(self) -> None:
        try:
            for raw in self._proc.stderr:
                text = raw.decode("utf-8", errors="replace").rstrip()
                if text:
                    self._stderr.append(text)
                    logger.debug("engine %s: %s", self.name, text)
        finally:
            self._stderr_done.set()

    def _reader(self, loading) -> None:
        while True:
            try:
                line = self._proc.stdout.readline()
                msg = json.loads(line) if line else None
            except (ValueError, OSError):
                msg = None
            self.last_message = time.monotonic()
            if loading is not None:  # still loading: _start reads these
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
                p.ids += msg.get("ids") or []
                p.text += msg["piece"]
                try:
                    if p.on_piece is not None:
                        p.on_piece(msg["piece"], msg.get("ids") or [])
                    elif p.on_token is not None:
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
            err = self.died()
            if isinstance(err, ModelCrashed) and self.on_crash is not None:
                try:
                    self.on_crash(err)
                except Exception:
                    logger.exception("crash handler of %s failed", self.name)
            self._fail_all(err)

    def _fail_all(self, err: BaseException) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = str(err)
            pending, self._pending = list(self._pending.values()), {}
        for p in pending:
            p.error = err
            p.done.set()

    def _kill(self, why: str) -> None:
        self._closing = True
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._fail_all(RuntimeError(f"model {self.name!r}: {why}"))

    def _watch(self) -> None:
        while self.healthy:
            for rid, p in list(self._pending.items()):
                if not p.cancel_sent and p.should_stop is not None and p.should_stop():
                    p.cancel_sent = True
                    self._send({"op": "cancel", "id": rid})
            if self._pending:
                try:
                    self.watch()
                except Exception:  # the watch goes on (a check that failed is tried again)
                    logger.exception("watching the engine of %s", self.name)
            else:
                self.last_message = time.monotonic()  # an idle engine is not a stalled one
            time.sleep(0.05)


# -- in the child ------------------------------------------------------------------------------
def child_main() -> None:
    from .native import install_crash_report

    install_crash_report()
    # No PR_SET_PDEATHSIG: it follows the thread that started the child (a task thread,
    # which can end), not the worker. The worker's death closes stdin, which ends the loop.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # llama.cpp's own prints must not mix with the protocol
    lock = threading.Lock()

    def send(msg: dict) -> None:
        with lock:
            out.write(json.dumps(msg) + "\n")

    first = json.loads(sys.stdin.readline())
    import importlib

    import psutil

    module, _, attr = first["loader"].partition(":")
    cfg = first["cfg"]
    try:
        load = getattr(importlib.import_module(module), attr)
        llm = load(cfg, lambda p: send({"progress": float(p)}))
    except Exception as e:
        send({"error": f"loading {cfg['name']} failed: {e}", "type": type(e).__name__})
        return
    send({"ready": True, "rss": psutil.Process().memory_info().rss, "pid": os.getpid()})
    cancelled: set[int] = set()

    def run(msg: dict) -> None:
        rid = msg["id"]
        try:
            req = llm.submit_ids(msg["ids"], on_piece=lambda text, ids: send({"id": rid, "piece": text, "ids": ids}),
                                 should_stop=lambda: rid in cancelled, priority=msg.get("priority", 0),
                                 resume=msg.get("resume"), **msg["params"])
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
        elif op == "stats":
            send({"id": msg["id"], "result": llm.stats()})
        elif op == "close":
            break
    llm.close()


if __name__ == "__main__":
    child_main()
