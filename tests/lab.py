"""A lab of separate "PCs" on this one machine: Linux network namespaces on a bridge.

Each PC is a network namespace with its own address (10.77.<n>.<i>/24) and a veth pair into
a bridge that lives in a namespace of its own (the "hub"), so nothing is changed in this
machine's own network. Every link has a rate limit (``tc tbf``). Processes run inside a PC
with ``ip netns exec``; they see only the lab's addresses and their own loopback.

This kernel has no ``netem``, so delay and loss cannot be emulated here: only bandwidth
(``tbf``) and cut links (``cut``/``restore``, the veth set down and up). On a kernel with
``sch_netem`` (``modprobe sch_netem``), add delay and loss to a PC's link with:

    ip netns exec <ns> tc qdisc replace dev <veth> root netem delay 20ms 5ms loss 1% rate 100mbit

Run it by hand (as root):

    python tests/lab.py demo      # scheduler, two GPU-tier PCs, a CPU PC; `aicluster status`; Ctrl-C ends it
    python tests/lab.py down      # remove a lab left behind by a killed run
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFIX = "aicl"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def can_build() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces); CI runs as root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "the lab needs iproute2 (ip, tc)"
    name = f"{PREFIX}probe{os.getpid() % 10000}"
    r = _ip("netns", "add", name, check=False)
    if r.returncode != 0:
        return f"cannot make a network namespace here: {r.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


class Lab:
    """PCs ``names`` on one bridge, ``rate`` per link (a tc rate, e.g. "100mbit")."""

    def __init__(self, names: list[str], net: int | None = None, rate: str = "100mbit"):
        self.id = os.getpid() % 10000
        self.net = net if net is not None else 10 + self.id % 240
        self.names = list(names)
        self.rate = rate
        self.hub = f"{PREFIX}{self.id}-hub"
        self.procs: list[subprocess.Popen] = []

    # -- naming ------------------------------------------------------------------------------
    def ns(self, pc: str) -> str:
        return f"{PREFIX}{self.id}-{pc}"

    def ip(self, pc: str) -> str:
        return f"10.77.{self.net}.{self.names.index(pc) + 1}"

    def _veth(self, pc: str) -> tuple[str, str]:
        i = self.names.index(pc)
        return f"ah{self.id}x{i}", f"ap{self.id}x{i}"  # hub side, PC side (15 characters at most)

    # -- building ----------------------------------------------------------------------------
    def up(self) -> "Lab":
        try:
            _ip("netns", "add", self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            for pc in self.names:
                ns, (hub_end, pc_end) = self.ns(pc), self._veth(pc)
                _ip("netns", "add", ns)
                _ip("link", "add", hub_end, "type", "veth", "peer", "name", pc_end)
                _ip("link", "set", hub_end, "netns", self.hub)
                _ip("link", "set", pc_end, "netns", ns)
                _ip("-n", self.hub, "link", "set", hub_end, "master", "br0")
                _ip("-n", self.hub, "link", "set", hub_end, "up")
                _ip("-n", ns, "addr", "add", f"{self.ip(pc)}/24", "dev", pc_end)
                _ip("-n", ns, "link", "set", pc_end, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", pc_end, "root", "tbf",
                                "rate", self.rate, "burst", "256kb", "latency", "50ms"], check=True,
                               capture_output=True)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for pc in self.names:
            _ip("netns", "del", self.ns(pc), check=False)  # its veth pair goes with it
        _ip("netns", "del", self.hub, check=False)

    def __enter__(self) -> "Lab":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # -- using -------------------------------------------------------------------------------
    def popen(self, pc: str, args: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
        """``args`` (``args[0]`` a command of this venv, e.g. "aicluster") run on ``pc``; a
        thread reads its output (``wait_for``), so a chatty process never blocks on a full pipe."""
        import queue
        import threading

        cmd = ["ip", "netns", "exec", self.ns(pc), str(BIN / args[0]), *args[1:]]
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
        p.lines = queue.Queue()

        def pump() -> None:
            for line in p.stdout:
                p.lines.put(line)
            p.lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        self.procs.append(p)
        return p

    def run(self, pc: str, args: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        cmd = ["ip", "netns", "exec", self.ns(pc), str(BIN / args[0]), *args[1:]]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)

    def cut(self, pc: str) -> None:
        """Unplug ``pc``'s cable: its link goes down (packets are dropped, nothing is reset)."""
        _ip("-n", self.hub, "link", "set", self._veth(pc)[0], "down")

    def restore(self, pc: str) -> None:
        _ip("-n", self.hub, "link", "set", self._veth(pc)[0], "up")


def wait_for(p: subprocess.Popen, needle: str, timeout: float = 120, seen: list | None = None) -> str:
    """Read ``p``'s output (from ``Lab.popen``) until a line holds ``needle`` (an
    AssertionError with the output on timeout or exit)."""
    import queue

    lines = seen if seen is not None else []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = p.lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if line is None:
            break
        lines.append(line)
        if needle in line:
            return "".join(lines)
    raise AssertionError(f"{needle!r} not seen within {timeout}s (exit {p.poll()}):\n" + "".join(lines[-40:]))


def demo() -> None:
    import tempfile

    import yaml

    why = can_build()
    if why:
        sys.exit(why)
    folder = Path(tempfile.mkdtemp(prefix="aicluster-lab-"))
    data = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg = folder / "config.yaml"
    with Lab(["sched", "gpu1", "gpu2", "cpu", "client"]) as lab:
        data["scheduler"]["address"] = f"tcp://{lab.ip('sched')}:8786"
        data["scheduler"]["jobs_db"] = str(folder / "jobs.sqlite3")
        cfg.write_text(yaml.safe_dump(data))
        env = {**os.environ, "AICLUSTER_CONFIG": str(cfg), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        s = lab.popen("sched", ["aicluster", "scheduler", "--host", lab.ip("sched")], env)
        wait_for(s, "scheduler at")
        for pc, tier in (("gpu1", "VRAM12"), ("gpu2", "VRAM6"), ("cpu", "CPU")):
            w = lab.popen(pc, ["aicluster", "worker", "--tier", tier, "--host", lab.ip(pc), "--name", pc], env)
            wait_for(w, "Registered to")
        print(lab.run("client", ["aicluster", "status"], env).stdout)
        print(f"lab up: {', '.join(f'{pc} {lab.ip(pc)} ({lab.ns(pc)})' for pc in lab.names)}")
        print(f"e.g. ip netns exec {lab.ns('client')} {BIN}/aicluster generate --prompts P.jsonl -o out.jsonl "
              f"--address tcp://{lab.ip('sched')}:8786\nCtrl-C ends the lab")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


def down_all() -> None:
    """Remove every lab namespace (a run killed before it cleaned up)."""
    out = _ip("netns", "list").stdout
    for line in out.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(PREFIX):
            _ip("netns", "del", name, check=False)
            print("removed", name)


if __name__ == "__main__":
    {"demo": demo, "down": down_all}.get(sys.argv[1] if len(sys.argv) > 1 else "", lambda: sys.exit(__doc__))()
