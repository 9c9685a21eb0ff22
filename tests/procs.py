"""Real subprocesses for the CLI tests: output read by a thread, clean stops, listening sockets."""
from __future__ import annotations

import queue
import signal
import subprocess
import threading
import time
from contextlib import contextmanager

import psutil

from conftest import BIN


class Proc(subprocess.Popen):
    """A subprocess whose merged output is read by a thread, so waits never block on a pipe."""

    def __init__(self, args, env, **kw):
        super().__init__([str(BIN / args[0]), *args[1:]], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, **kw)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.stdout:
            self.lines.put(line)
        self.lines.put(None)


@contextmanager
def proc(args, env, **kw):
    p = Proc(args, env, **kw)
    try:
        yield p
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def read_until(p: Proc, needle: str, timeout: float = 90) -> str:
    """Lines of ``p``'s output up to one containing ``needle`` (fails on timeout or exit)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = p.lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if line is None:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} not seen within {timeout}s (exit {p.poll()}):\n" + "".join(seen[-40:]))


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket that ``pid`` and its children listen on."""
    out = set()
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            conns = p.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        out |= {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return out


def run(args, env, timeout=300, **kw):
    """``aicluster ARGS`` to completion: the CompletedProcess (text)."""
    return subprocess.run([str(BIN / "aicluster"), *args], env=env, capture_output=True, text=True, timeout=timeout, **kw)
