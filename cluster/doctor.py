"""``aicluster doctor``: what is wrong with this PC, or with every PC of a cluster, and the fix.

Each check gives rows ``{"group", "check", "status", "detail", "fix"}`` (status ``ok``,
``warn`` or ``fail``; ``fix`` set on the rows that are not ok). :func:`local_rows` runs the
checks of one PC; :func:`run_doctor` runs them here and, given a scheduler address, on
every worker (``client.run``) with each worker's clock offset, one section per PC.

Only the standard library is imported at the top: workers import this module to run their
checks, and that should not pull the client stack into a worker process.

Why this module is long: eight independent sections of checks (versions, the llama.cpp
build against the CPU, torch and CUDA, models, disk, ports, TLS, the cluster's PCs), one
function each, plus the report; splitting them would scatter one command's checks.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dask.utils import format_bytes as _size  # dask is on every PC of a Dask cluster (config.py uses it too)

from . import cpubuild

__all__ = ["OK", "WARN", "FAIL", "local_rows", "run_doctor", "format_report", "version_rows", "build_rows",
           "gpu_rows", "model_rows", "smoke_rows", "disk_rows", "port_rows", "port_users", "tls_rows", "clock_row"]

OK, WARN, FAIL = "ok", "warn", "fail"
Row = dict[str, str]

PACKAGES = ("distributed", "dask", "llama-cpp-python", "torch", "sentence-transformers", "transformers", "fastapi")
REQUIRED = ("distributed", "dask")  # every PC needs these; the others only the backends that use them
MIN_FREE = 2 * 1024**3
CERT_WARN_DAYS = 14
CLOCK_WARN, CLOCK_FAIL = 1.0, 30.0
AMX_ISSUE = "ggml-org/llama.cpp#20824"
# a configured port held by one of these is the cluster itself, not a clash
CLUSTER_PROGRAMS = {"aicluster", "dask", "dask-scheduler", "dask-worker"}


def row(group: str, check: str, status: str, detail: str, fix: str = "") -> Row:
    """One result; an ok row has nothing to fix."""
    return {"group": group, "check": check, "status": status, "detail": detail, "fix": "" if status == OK else fix}


# -- 1. versions ---------------------------------------------------------------------------
def version_rows() -> list[Row]:
    """Python's version and those of the packages the cluster runs on (not imported: metadata)."""
    from importlib import metadata

    rows = [row("versions", "python", OK, f"{platform.python_version()} ({sys.executable})")]
    for dist in PACKAGES:
        try:
            rows.append(row("versions", f"package {dist}", OK, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            rows.append(row("versions", f"package {dist}", FAIL if dist in REQUIRED else WARN, "not installed",
                            "make install (builds it for this CPU)" if dist == "llama-cpp-python" else f"pip install {dist}"))
    return rows


# -- 2. the llama.cpp binding against the CPU ------------------------------------------------
_PROBE = """
from workloads.backends.native import install_crash_report
install_crash_report()  # a native crash names its frame on stderr
import json, llama_cpp
print(json.dumps([llama_cpp.llama_print_system_info().decode(), bool(llama_cpp.llama_supports_rpc())]))
"""


def probe_binding(timeout: float = 60) -> dict[str, Any]:
    """What the installed binding says of itself: ``{"system_info", "rpc"}`` or ``{"error"}``.

    Asked in a child process: a binding built for instructions this CPU lacks can die of
    SIGILL as it loads, and the doctor has to live to say so.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    try:
        p = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"importing llama_cpp took over {timeout:.0f} s"}
    if p.returncode == 0:
        info, rpc = json.loads(p.stdout.strip().splitlines()[-1])
        return {"system_info": info, "rpc": rpc}
    if "No module named 'llama_cpp'" in p.stderr:
        return {"error": "llama-cpp-python is not installed", "missing": True}
    from workloads.backends.native import describe_exit

    return {"error": f"importing llama_cpp died: {describe_exit(p.returncode, p.stderr)['text']} "
                     f"({(p.stderr.strip().splitlines() or ['?'])[-1]})"}


def build_rows(system_info: str, flags: set[str], record: dict[str, str], machine: str | None = None,
               rpc: bool | None = None, gpus: int = 0, need_rpc: bool = False) -> list[Row]:
    """The binding's build against this CPU: FAIL for a feature the CPU lacks (SIGILL) or AMX.

    Parameters
    ----------
    system_info, flags, record
        ``llama_print_system_info()``, the CPU's /proc/cpuinfo flags, ``cpubuild.build_record()``.
    machine
        ``platform.machine()`` (default: this one's).
    rpc, gpus, need_rpc
        Whether the binding has ggml RPC, this PC's GPU count, whether a model needs RPC.
    """
    g, fix = "build", f'make install LLAMA_CPU_ARGS="{cpubuild.cmake_args(flags, machine)}"'
    reported = cpubuild.reported_features(system_info)
    uses = " ".join(sorted(reported)) or "no SIMD extension"
    rows = []
    if "AMX_INT8" in reported:
        rows.append(row(g, "llama.cpp AMX", FAIL, "the binding has ggml's AMX kernels: the first decode of a Q4_K "
                        f"model segfaults in ggml_backend_amx_mul_mat ({AMX_ISSUE})", fix))
    lacking = sorted(reported - set(cpubuild.expected_features(flags, machine)) - {"AMX_INT8"})
    if not cpubuild.is_x86(machine):  # ggml builds natively there, and has no AMX kernels to avoid
        rows.append(row(g, "llama.cpp CPU features", OK, f"native build for {machine or platform.machine()}"))
    else:
        rows.append(row(g, "llama.cpp CPU features", FAIL if lacking else OK, f"the binding uses {' '.join(lacking)}, "
                        f"which this CPU lacks: SIGILL at the first use (it uses {uses})" if lacking else
                        f"uses {uses}; this CPU has them all", fix))
    meant = cpubuild.features_of(record.get("cpu", "")) if record else None
    if not record:
        rows.append(row(g, "llama.cpp build record", WARN, f"no {sys.prefix}/aicluster-llama-build.txt: not installed "
                        "by `make install`, so what it was built for is unknown (ggml's default -march=native "
                        "compiles AMX kernels on an AMX CPU)", "make install"))
    elif meant is not None and set(meant) - set(cpubuild.X86_LEFT_OUT) != reported:
        rows.append(row(g, "llama.cpp build record", WARN, f"the binding reports {uses}, but `make install` built "
                        f"{' '.join(meant)}: it was replaced since", "make install"))
    else:
        rows.append(row(g, "llama.cpp build record", OK, f"{record.get('version', '?')} built for "
                        f"{record.get('built-for', '?')}"))
    if rpc is not None:
        bad = need_rpc and not rpc
        rows.append(row(g, "llama.cpp RPC", WARN if bad else OK, ("on", "off")[not rpc] + (
            ": models split across workers (shard:) need it" if bad else ""), 'make install LLAMA_CMAKE_ARGS="-DGGML_RPC=ON"'))
    cuda = "CUDA" in system_info
    rows.append(row(g, "llama.cpp CUDA", WARN if gpus and not cuda else OK, ("on", "off")[not cuda] + (
        f": this PC has {gpus} GPU(s), but llama.cpp runs on the CPU" if gpus and not cuda else ""),
        'make install LLAMA_CMAKE_ARGS="-DGGML_RPC=ON -DGGML_CUDA=ON"'))
    return rows


# -- 3. torch, CUDA and NVML -----------------------------------------------------------------
def _nvml() -> tuple[int, str]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except ImportError:
        return 0, "nvidia-ml-py is not installed"
    except pynvml.NVMLError as e:  # the state of a PC without an NVIDIA driver, not an error
        return 0, f"NVML not available ({e}): no NVIDIA driver here"
    try:
        n = pynvml.nvmlDeviceGetCount()
        names = ", ".join(str(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))) for i in range(n))
        return n, f"driver {pynvml.nvmlSystemGetDriverVersion()}: {n} GPU(s) {names}".rstrip()
    finally:
        pynvml.nvmlShutdown()


def gpu_rows() -> tuple[list[Row], int]:
    """torch's and NVML's view of the GPUs and whether they agree; also the GPU count."""
    from .devices import GPUState, detect

    inv, (nv, nvml_text) = detect(), _nvml()
    n, state = len(inv.gpus), inv.gpu_state
    bad = {GPUState.ERROR: FAIL, GPUState.NO_TORCH: WARN}.get(state, OK)
    gpus = ", ".join(f"{g.name} {_size(g.total_bytes)}" for g in inv.gpus)
    rows = [row("gpu", "torch CUDA", bad, f"{state.value}: {inv.gpu_detail}" + (f": {gpus}" if gpus else ""),
                "check the driver with nvidia-smi" if bad == FAIL else "pip install torch"),
            row("gpu", "NVML", OK, nvml_text)]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if state == GPUState.INJECTED or n == nv:
        rows.append(row("gpu", "GPU visibility", OK, f"{n} GPU(s) injected (simulated); NVML sees {nv}" if n != nv else
                        f"torch and NVML agree: {nv} GPU(s)" + ("" if nv else " (workers here take the CPU tier)")))
    else:  # CUDA_VISIBLE_DEVICES hides GPUs from torch, never from NVML
        hidden = n < nv and visible is not None
        rows.append(row("gpu", "GPU visibility", OK if hidden else WARN, f"torch sees {n} GPU(s), NVML {nv}"
                        + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if hidden else ""), "pip install -U nvidia-ml-py" if
                        n > nv else "install a CUDA build of torch that this driver supports (pytorch.org/get-started)"))
    return rows, max(nv, n if state != GPUState.INJECTED else 0)


# -- 4, 5. models: their files, and a smoke decode ---------------------------------------------
def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    """A file's SHA-256; a folder's is that of its files' relative paths and hashes, in order."""
    def one(p: Path) -> str:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    return one(path) if path.is_file() else hashlib.sha256(
        "".join(f"{p.relative_to(path)}\0{one(p)}\n" for p in _files(path)).encode()).hexdigest()


def model_rows(cfg: Any, checksums: bool = False) -> list[Row]:
    """Each model's source here: present, its size, and with ``checksums`` its SHA-256
    (checked against the package's ``EXPECTED_SHA256`` where it has one)."""
    import importlib

    from workloads.backends.sources import local_path

    rows = []
    for name, spec in cfg.models.items():
        src, check = spec.source, f"model {name}"
        pkg = src.removeprefix("package:") if src.startswith("package:") else None
        try:
            mod = importlib.import_module(pkg) if pkg else None
        except ImportError:
            rows.append(row("models", check, FAIL, f"{src}: the package is not installed",
                            f"pip install {pkg.replace('_', '-')}"))
            continue
        path = local_path(src)  # never assembles: that is the loading worker's job
        if path is None:
            rows.append(row("models", check, OK, f"{src}: installed; its file is assembled at the first load")
                        if mod else row("models", check, FAIL, f"{src} does not exist on this PC",
                                        f"copy the model there on every PC that serves it, or change models.{name}.source"))
            continue
        r = row("models", check, OK, f"{path} ({_size(sum(p.stat().st_size for p in _files(path)))})")
        if checksums:
            digest, expected = _sha256(path), getattr(mod, "EXPECTED_SHA256", None)
            r["detail"] += f" sha256 {digest}"
            if expected and path.is_file() and digest != expected:
                r.update(status=FAIL, detail=r["detail"] + f", but the package expects {expected}",
                         fix=f"delete {path}: it is assembled again at the next load")
        rows.append(r)
    return rows


def smoke_rows(cfg: Any) -> list[Row]:
    """A short decode (or one embedding) per shipped model, each in a child process."""
    from .smoke import FIX, shipped_models, smoke_model

    rows = []
    for name in shipped_models(cfg):
        r = smoke_model(name, cfg.model(name), cfg.path)
        rows.append(row("smoke", f"smoke {name}", OK if r["ok"] else FAIL, f"{r['detail']} ({r['seconds']} s)",
                        FIX if r.get("signal") else "python -m cluster.smoke" + (f" --config {cfg.path}" if cfg.path
                                                                                 else "") + " shows the whole error"))
    return rows


# -- 6. disk -----------------------------------------------------------------------------------
def cache_dirs() -> dict[str, Path]:
    """Where models, wheels and temporary files go on this PC."""
    home = Path.home()
    return {"aicluster cache": home / ".cache" / "aicluster",
            "Hugging Face cache": Path(os.environ.get("HF_HOME") or home / ".cache" / "huggingface"),
            "temp dir": Path(tempfile.gettempdir())}


def disk_rows(min_free: int = MIN_FREE, dirs: dict[str, Path] | None = None) -> list[Row]:
    """Free space under each cache folder (a missing one: its nearest parent); WARN under ``min_free``."""
    import shutil

    rows = []
    for label, path in (dirs or cache_dirs()).items():
        where = next(p for p in (path, *path.parents) if p.exists())
        free = shutil.disk_usage(where).free
        rows.append(row("disk", f"disk {label}", OK if free >= min_free else WARN, f"{_size(free)} free at {path}",
                        f"free space on the disk of {where} (models and wheels need {_size(min_free)} or more)"))
    return rows


# -- 7. ports ----------------------------------------------------------------------------------
def config_ports(cfg: Any) -> dict[int, list[str]]:
    """The TCP ports the config names, each with the keys that name it (0, any free port, left out)."""
    named = [("scheduler.port", cfg.scheduler.port), ("scheduler.dashboard_port", cfg.scheduler.dashboard_port),
             ("server.port", cfg.server.port), ("worker.port", cfg.worker.port),
             ("worker.nanny_port", cfg.worker.nanny_port)]
    if (cfg.worker.shard_server or any(m.sharded for m in cfg.models.values())) and cfg.worker.shard_port:
        named += [("worker.shard_port" + (f" + {i} (worker.shard_models)" if i else ""), cfg.worker.shard_port + i)
                  for i in range(cfg.worker.shard_models)]
    named += [(f"local.workers[{i}].shard_port" + (f" + {k}" if k else ""), w.shard_port + k)
              for i, w in enumerate(cfg.local.workers) if w.shard_server and w.shard_port
              for k in range(cfg.worker.shard_models)]
    out: dict[int, list[str]] = {}
    for key, port in named:
        if port:
            out.setdefault(port, []).append(key)
    return out


def port_users(port: int) -> list[tuple[int | None, str]] | None:
    """``(pid, what)`` of each process listening on TCP ``port`` ([] when free; pid None where
    the OS hides another user's); None when there is no connection table (macOS, not root)."""
    import psutil

    try:
        conns = psutil.net_connections(kind="inet")
    except psutil.AccessDenied:
        return None
    out = []
    for pid in sorted({c.pid or 0 for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == port}):
        try:
            proc = psutil.Process(pid) if pid else None
            out.append((pid or None, " ".join([proc.name(), *proc.cmdline()[1:3]]) if proc else "another user's process"))
        except psutil.Error:
            out.append((pid or None, "a process this user cannot see"))
    return out


def port_rows(cfg: Any) -> list[Row]:
    """Each configured port: free, or in use and by whom (pid and process where the OS says)."""
    rows = []
    for port, keys in config_ports(cfg).items():
        users, check = port_users(port), f"port {port} ({', '.join(keys)})"
        if users is None:  # a connection attempt says whether something listens, not who
            with socket.socket() as s:
                users = [] if s.connect_ex(("127.0.0.1", port)) else [(None, "an unknown process")]
        who = "; ".join(f"pid {pid} ({what})" if pid else what for pid, what in users)
        ours = users and all(any(os.path.basename(w) in CLUSTER_PROGRAMS for w in what.split()[:2]) for _, what in users)
        pids = " ".join(str(p) for p, _ in users if p)
        rows.append(row("ports", check, OK, "free") if not users else
                    row("ports", check, OK, f"in use by this cluster: {who}") if ours else
                    row("ports", check, WARN, f"in use by {who}", f"stop it ({'kill ' + pids if pids else 'as root'}), "
                        f"or set {keys[0]} to a free port in config.yaml"))
    return rows


# -- 8. TLS certificates -----------------------------------------------------------------------
def this_pc_names() -> set[str]:
    """This PC's host names and addresses, loopback left out (every certificate names it)."""
    import psutil

    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    names |= {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family in (socket.AF_INET, socket.AF_INET6)}
    return {n for n in names if n not in ("", "localhost", "::1") and not n.startswith("127.")}


def tls_rows(cfg: Any, now: datetime.datetime | None = None, names: set[str] | None = None) -> list[Row]:
    """The CA and this PC's certificate: readable, in date (WARN within 14 days), signed by the
    CA, matching its key, naming this PC or the scheduler's host (``names``: this PC's)."""
    if not cfg.security.tls:
        return [row("tls", "tls", OK, "skipped: security.tls is off (plain TCP: whoever reaches the ports can run "
                    "code; a trusted LAN only, see the README's Security section)")]
    from urllib.parse import urlsplit

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization as ser

    now = now or datetime.datetime.now(datetime.timezone.utc)
    paths = {k: cfg.security_path(k) for k in ("ca_file", "cert_file", "key_file")}
    me = socket.gethostname()
    remake = (f"aicluster certs {Path(paths['cert_file'] or 'FOLDER').parent} --hosts {me}=THIS_PC_IP --force "
              "(where ca.key is kept), then copy the pair here")
    rows, certs = [], {}
    for key, label in (("ca_file", "tls CA"), ("cert_file", "tls certificate")):
        try:
            cert = certs[key] = x509.load_pem_x509_certificate(Path(paths[key]).read_bytes())
        except (OSError, ValueError) as e:
            rows.append(row("tls", label, FAIL, f"security.{key} {paths[key]}: cannot read: {e}", remake))
            continue
        end, where = cert.not_valid_after_utc, f"{paths[key]} ({cert.subject.rfc4514_string()})"
        days = (end - now).total_seconds() / 86400
        if end <= now:
            rows.append(row("tls", label, FAIL, f"{where} expired on {end:%Y-%m-%d}", remake))
        elif cert.not_valid_before_utc > now:
            rows.append(row("tls", label, FAIL, f"{where} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M}"
                            " UTC", "check this PC's clock (timedatectl), or " + remake))
        else:
            rows.append(row("tls", label, WARN if days < CERT_WARN_DAYS else OK,
                            f"{where} valid until {end:%Y-%m-%d} ({days:.0f} days)", remake))
    cert, ca = certs.get("cert_file"), certs.get("ca_file")
    if cert is not None and ca is not None:
        try:
            cert.verify_directly_issued_by(ca)
            rows.append(row("tls", "tls signed by CA", OK, "the certificate is signed by the CA"))
        except Exception as e:  # InvalidSignature, ValueError (another issuer), TypeError (key type)
            rows.append(row("tls", "tls signed by CA", FAIL, f"not signed by {paths['ca_file']}, so the other PCs "
                            f"refuse it ({type(e).__name__})", remake))
    if cert is None:
        return rows
    spki = (ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    try:
        same = ser.load_pem_private_key(Path(paths["key_file"]).read_bytes(), password=None).public_key() \
            .public_bytes(*spki) == cert.public_key().public_bytes(*spki)
        rows.append(row("tls", "tls key", OK if same else FAIL, f"{paths['key_file']} " +
                        ("matches the certificate" if same else "is not the certificate's key"), remake))
    except (OSError, ValueError, TypeError) as e:  # TypeError: a key with a password (Dask cannot ask for it)
        rows.append(row("tls", "tls key", FAIL, f"security.key_file {paths['key_file']}: cannot use: {e}", remake))
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = {n.lower() for n in san.get_values_for_type(x509.DNSName)} | \
            {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    except x509.ExtensionNotFound:
        sans = set()
    wanted = (this_pc_names() if names is None else names) | {urlsplit(cfg.scheduler.address).hostname or ""}
    covered = sorted(sans & wanted)
    # Dask trusts the CA and checks no host name: a miss breaks browsers on the HTTPS dashboard, not the cluster
    rows.append(row("tls", "tls host names", OK if covered else WARN, f"names {', '.join(sorted(sans)) or 'none'}; "
                    + (f"covers {', '.join(covered)}" if covered else f"not this PC ({', '.join(sorted(wanted))})"), remake))
    return rows


# -- one PC, and a cluster -------------------------------------------------------------------
def local_rows(cfg: Any, smoke: bool = True, checksums: bool = False) -> list[Row]:
    """Every check of this PC, in order: versions, build, GPUs, models, smoke, disk, ports, TLS.

    Parameters
    ----------
    cfg
        A ``cluster.config.Config``.
    smoke
        Load and run each shipped model in a child process (seconds to minutes).
    checksums
        Read every byte of each model file for its SHA-256 (default: sizes only).
    """
    gpus, n_gpus = gpu_rows()
    rows, probe = version_rows(), probe_binding()
    if "error" in probe:
        rows.append(row("build", "llama.cpp binding", WARN if probe.get("missing") else FAIL, probe["error"],
                        f'make install LLAMA_CPU_ARGS="{cpubuild.cmake_args()}"'))
    else:
        rows += build_rows(probe["system_info"], cpubuild.cpu_flags(), cpubuild.build_record(), rpc=probe["rpc"],
                           gpus=n_gpus, need_rpc=any(m.sharded for m in cfg.models.values()))
    rows += gpus + model_rows(cfg, checksums)
    rows += smoke_rows(cfg) if smoke else [row("smoke", "smoke", OK, "skipped (--no-smoke)")]
    return rows + disk_rows() + port_rows(cfg) + tls_rows(cfg)


async def _worker_checks(options: dict[str, Any], cfg: Any, dask_worker: Any = None) -> dict[str, Any]:
    """``local_rows`` on a worker, with the config its preload read where it has one."""
    # a coroutine, so that client.run awaits it while the checks (a smoke decode takes minutes)
    # run in a thread: the worker's event loop keeps its heartbeats going
    import asyncio
    import functools

    from .plugin import PLUGIN_NAME

    own = getattr(dask_worker.plugins.get(PLUGIN_NAME) if dask_worker else None, "config", None)
    cfg = own if hasattr(own, "models") else cfg
    rows = await asyncio.get_running_loop().run_in_executor(None, functools.partial(local_rows, cfg, **options))
    return {"host": socket.gethostname(), "rows": rows}


def clock_row(offset: float, rtt: float) -> Row:
    """A worker's clock against this PC's (``offset``: seconds, the worker's minus this PC's)."""
    status = FAIL if abs(offset) > CLOCK_FAIL else WARN if abs(offset) > CLOCK_WARN else OK
    return row("clock", "clock offset", status, f"{offset:+.3f} s against this PC (round trip {rtt * 1000:.0f} ms)",
               "turn on time sync on both PCs (Linux: timedatectl set-ntp true; Windows: w32tm /resync): Dask's "
               "timeouts and the certificates' dates assume the clocks agree")


def _clock(client: Any, address: str, tries: int = 3) -> tuple[float, float]:
    # the sample with the shortest round trip: its midpoint is the best guess of when the worker read its clock
    best = (0.0, float("inf"))
    for _ in range(tries):
        t0 = time.time()
        there = client.run(time.time, workers=[address])[address]
        t1 = time.time()
        best = min(best, (there - (t0 + t1) / 2, t1 - t0), key=lambda b: b[1])
    return best


def _release(check: str, detail: str | None) -> str | None:
    # what must match across PCs: Python's x.y (pickles), dask's and distributed's whole versions
    version = (detail or "").split(" ")[0]
    return ".".join(version.split(".")[:2]) if check == "python" else version


def cluster_sections(client: Any, cfg: Any, local: list[Row], smoke: bool = True,
                     checksums: bool = False) -> list[dict[str, Any]]:
    """One section per worker of ``client``'s cluster: its PC's checks and its clock offset."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    results = client.run(_worker_checks, {"smoke": smoke, "checksums": checksums}, cfg, on_error="return")
    mine = {r["check"]: r["detail"] for r in local if r["check"] in ("python", "package dask", "package distributed")}
    sections = []
    for addr, w in sorted(workers.items(), key=lambda kv: str(kv[1].get("name", kv[0]))):
        res = results.get(addr)
        host, rows = (res["host"], res["rows"]) if isinstance(res, dict) else ("?", [row(
            "worker", "checks", FAIL, f"the checks failed there: {type(res).__name__}: {res}", "run `aicluster doctor` "
            "on that PC")])
        for r in rows:
            if r["check"] in mine and _release(r["check"], r["detail"]) != _release(r["check"], mine[r["check"]]):
                r.update(status=WARN, detail=f"{r['detail']}; this PC has {mine[r['check']]}",
                         fix="install the same Python, dask and distributed versions on every PC")
        rows.append(clock_row(*_clock(client, addr)))
        sections.append({"pc": str(w.get("name", addr)), "address": addr, "host": host, "rows": rows})
    return sections


def run_doctor(cfg: Any, address: str | None = None, smoke: bool = True, checksums: bool = False,
               timeout: float = 10) -> dict[str, Any]:
    """All the checks: this PC's, then (given ``address``) every worker's of that cluster
    (``timeout``: seconds to reach its scheduler).

    Returns
    -------
    dict
        ``{"sections": [{"pc", "address", "host", "rows"}], "counts": {status: n}, "exit_code"}``;
        ``exit_code`` is 1 when a row fails, else 0.
    """
    local = local_rows(cfg, smoke, checksums)
    sections = [{"pc": "this machine", "address": None, "host": socket.gethostname(), "rows": local}]
    if address:
        from .client import connect

        try:
            with connect(cfg, address=address, timeout=timeout) as ai:
                sections += cluster_sections(ai.client, cfg, local, smoke, checksums)
        except (ConnectionError, OSError, ValueError) as e:
            sections.append({"pc": "cluster", "address": address, "host": None, "rows": [row(
                "cluster", "scheduler", FAIL, str(e), "start it (`aicluster scheduler`), or check the address and "
                "that the firewall lets its port through")]})
    rows = [r for s in sections for r in s["rows"]]
    counts = {s: sum(r["status"] == s for r in rows) for s in (OK, WARN, FAIL)}
    return {"sections": sections, "counts": counts, "exit_code": 1 if counts[FAIL] else 0}


def format_report(report: dict[str, Any]) -> str:
    """The report as text: a table per PC, each fix on the line under its row."""
    from .status import text_table

    out = []
    for s in report["sections"]:
        out += ["", f"== {s['pc']}" + (f" ({s['host']})" if s.get("host") else "")
                + (f" at {s['address']}" if s.get("address") else "")]
        body = []
        for r in s["rows"]:
            body.append([r["check"], r["status"] if r["status"] == OK else r["status"].upper(), r["detail"]])
            if r["fix"]:
                body.append(["", "", f"  fix: {r['fix']}"])
        out += text_table(["check", "status", "detail"], body)
    c = report["counts"]
    return "\n".join(out[1:] + ["", f"{c[OK]} ok, {c[WARN]} warning(s), {c[FAIL]} failure(s)"])
