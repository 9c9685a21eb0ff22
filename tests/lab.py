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
        self.cgroups: dict[str, Path] = {}

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
                                "rate", self.rate, "burst", _burst(self.rate), "latency", "50ms"], check=True,
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
        for group in self.cgroups.values():
            for _ in range(20):  # (empty once its processes are gone)
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.25)

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

        cmd = self._in_cgroup(pc, ["ip", "netns", "exec", self.ns(pc), str(BIN / args[0]), *args[1:]])
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

    # -- a cluster on the lab -------------------------------------------------------------------
    def configure(self, folder: Path, *, tls: bool = False, edit=None, env=None, base=None) -> None:
        """Each PC its own ``folder/<pc>.yaml`` and environment, as on separate PCs: the
        project's config.yaml (or ``base()``) with the scheduler PC's (``sched``) address and
        3 GB workers, then ``edit(pc, data)``; with ``tls``, certificates for every PC from
        ``aicluster certs`` and a ``security`` block naming this PC's; ``env(pc)`` is added to
        the PC's environment (which has its config and tests/ importable). Sets ``addr``,
        ``env`` (per PC) and ``folder``."""
        import yaml

        self.folder = Path(folder)
        self.addr = f"{'tls' if tls else 'tcp'}://{self.ip('sched')}:8786"
        certs = self.folder / "certs"
        if tls and not certs.exists():
            hosts = ",".join(f"{pc}={self.ip(pc)}" for pc in self.names)
            r = subprocess.run([str(BIN / "aicluster"), "certs", str(certs), "--hosts", hosts],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"aicluster certs failed: {r.stderr}")
        self.env = {}
        for pc in self.names:
            data = base() if base is not None else yaml.safe_load((ROOT / "config.yaml").read_text())
            data["scheduler"]["address"] = self.addr
            data["worker"]["memory_limit"] = "3GB"
            if tls:
                data["security"] = {"tls": True, "ca_file": str(certs / "ca.pem"), "cert_file": str(certs / f"{pc}.pem"),
                                    "key_file": str(certs / f"{pc}.key")}
            if edit is not None:
                edit(pc, data)
            cfg = self.folder / f"{pc}.yaml"
            cfg.write_text(yaml.safe_dump(data))
            self.env[pc] = {**os.environ, "AICLUSTER_CONFIG": str(cfg),
                            "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
                            **(env(pc) if env is not None else {})}

    def scheduler(self, pc: str = "sched", dashboard_port: int = 0) -> subprocess.Popen:
        """``aicluster scheduler`` on ``pc`` (after ``configure``), once it listens."""
        p = self.popen(pc, ["aicluster", "scheduler", "--host", self.ip(pc), "--dashboard-port", str(dashboard_port)],
                       self.env[pc])
        wait_for(p, "scheduler at")
        return p

    def worker(self, pc: str, tier: str, *extra: str) -> subprocess.Popen:
        """``aicluster worker`` named ``pc`` on ``pc``, once it has joined the scheduler."""
        p = self.popen(pc, ["aicluster", "worker", "--tier", tier, "--host", self.ip(pc), "--name", pc, *extra],
                       self.env[pc])
        wait_for(p, "Registered to")
        return p

    # -- CPU: a slower PC -------------------------------------------------------------------
    def limit_cpu(self, pc: str, fraction: float) -> None:
        """Give ``pc`` ``fraction`` of one CPU (cgroup v2 ``cpu.max``, or v1's CFS quota where
        the cpu controller is on the v1 hierarchy): its processes started from now on run in
        that cgroup, and so do the children they start (a worker's shard server), as do
        those running in its namespace now; a PC already limited gets the new limit at once."""
        # a short period (10 ms, not the kernel's default 100 ms): a throttled process waits
        # for the next period, so with 100 ms one request to a shard server could wait up to
        # 75 ms and a few ms of compute hid inside the wait (the measured speed said little);
        # a real slow CPU is slow evenly, which a short period comes closer to
        period = 10_000
        quota = max(int(period * fraction), 1000)
        group = self.cgroups.get(pc)
        if group is None:
            group = _cgroup_root() / f"{PREFIX}{self.id}-{pc}"
            group.mkdir(exist_ok=True)
            self.cgroups[pc] = group
        if (group / "cpu.max").exists():
            (group / "cpu.max").write_text(f"{quota} {period}")
        else:
            (group / "cpu.cfs_period_us").write_text(str(period))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        # and what runs there already (every process in its network namespace)
        pids = subprocess.run(["ip", "netns", "pids", self.ns(pc)], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                (group / "cgroup.procs").write_text(pid)
            except OSError:  # (ended meanwhile)
                pass

    def set_rate(self, rate: str) -> None:
        """Every PC's link at ``rate`` from now on (a tc rate, e.g. "1gbit")."""
        for pc in self.names:
            subprocess.run(["ip", "netns", "exec", self.ns(pc), "tc", "qdisc", "replace", "dev", self._veth(pc)[1],
                            "root", "tbf", "rate", rate, "burst", _burst(rate), "latency", "50ms"], check=True,
                           capture_output=True)
        self.rate = rate

    def _in_cgroup(self, pc: str, cmd: list[str]) -> list[str]:
        group = self.cgroups.get(pc)
        if group is None:
            return cmd
        return ["sh", "-c", f'echo $$ > "{group}/cgroup.procs" && exec "$@"', "sh", *cmd]

    def cut(self, pc: str) -> None:
        """Unplug ``pc``'s cable: its link goes down (packets are dropped, nothing is reset)."""
        _ip("-n", self.hub, "link", "set", self._veth(pc)[0], "down")

    def restore(self, pc: str) -> None:
        _ip("-n", self.hub, "link", "set", self._veth(pc)[0], "up")


def _burst(rate: str) -> str:
    """tbf's bucket: at least a timer tick's worth of the rate (1 Gbit/s over a 250 Hz tick is
    500 KB; a smaller bucket would hold the link below its rate)."""
    return "1mb" if rate.endswith("gbit") else "256kb"


def _cgroup_root() -> Path:
    """Where a CPU-limited cgroup can be made: the v2 hierarchy when it has the cpu
    controller, else v1's cpu hierarchy."""
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.controllers").exists():
        if "cpu" not in (v2 / "cgroup.subtree_control").read_text().split():
            (v2 / "cgroup.subtree_control").write_text("+cpu")
        return v2
    for v1 in (v2 / "cpu", v2 / "cpu,cpuacct"):
        if (v1 / "cpu.cfs_quota_us").exists():
            return v1
    raise RuntimeError("no cgroup cpu controller here (neither v2 cpu.max nor v1 cpu.cfs_quota_us)")


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

    why = can_build()
    if why:
        sys.exit(why)
    folder = Path(tempfile.mkdtemp(prefix="aicluster-lab-"))
    with Lab(["sched", "gpu1", "gpu2", "cpu", "client"]) as lab:
        lab.configure(folder, edit=lambda pc, data: data["scheduler"].update(jobs_db=str(folder / "jobs.sqlite3")),
                      env=lambda pc: {"HF_HUB_OFFLINE": "1"})
        env = lab.env["client"]
        lab.scheduler("sched", dashboard_port=8787)
        for pc, tier in (("gpu1", "VRAM12"), ("gpu2", "VRAM6"), ("cpu", "CPU")):
            lab.worker(pc, tier)
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
