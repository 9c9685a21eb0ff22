"""Native crashes of model code: report them with the frame they happened in, and name them.

A process that runs native kernels (llama.cpp's engine child, the install's smoke check)
calls :func:`install_crash_report` first. When a fatal signal arrives (SIGSEGV, SIGILL,
SIGBUS, SIGFPE, or SIGABRT from ``GGML_ABORT``), the handler writes one marker line and
the native backtrace (glibc's ``backtrace_symbols_fd``) to stderr, puts the default action
back and returns, so the process still dies of that signal and its parent sees it.

Python 3.11's ``faulthandler`` prints only Python frames, and the crash is in C++; glibc's
``catchsegv`` and ``libSegFault`` are gone since glibc 2.35, so the handler is installed
through ctypes here. The parent reads the report with :func:`parse_crash`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import signal

__all__ = ["install_crash_report", "parse_crash", "describe_exit", "FATAL_SIGNALS", "MARKER"]

MARKER = "aicluster-native-crash"
FATAL_SIGNALS = (signal.SIGSEGV, signal.SIGILL, signal.SIGBUS, signal.SIGFPE, signal.SIGABRT)

_handler = None  # the ctypes callback must stay alive as long as it is installed


class _Sigaction(ctypes.Structure):
    # glibc's struct sigaction on x86-64 and aarch64 Linux
    _fields_ = [("sa_sigaction", ctypes.c_void_p), ("sa_mask", ctypes.c_ulong * 16), ("sa_flags", ctypes.c_int),
                ("sa_restorer", ctypes.c_void_p)]


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p), ("dli_sname", ctypes.c_char_p),
                ("dli_saddr", ctypes.c_void_p)]


SA_SIGINFO, SA_RESETHAND = 0x4, 0x80000000
#: where the faulting instruction's address sits in a ucontext_t (glibc, Linux)
_PC_OFFSET = {"x86_64": 168, "aarch64": 440}


def install_crash_report() -> bool:
    """Report fatal signals of this process on stderr (see module docstring); False where
    glibc is not there to do it (the process still dies of the signal)."""
    global _handler
    if _handler is not None:
        return True
    import platform

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        backtrace, symbols_fd, dladdr, sigaction = libc.backtrace, libc.backtrace_symbols_fd, libc.dladdr, libc.sigaction
    except (OSError, AttributeError):
        return False
    backtrace.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
    backtrace.restype = ctypes.c_int
    symbols_fd.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    sigaction.argtypes = [ctypes.c_int, ctypes.POINTER(_Sigaction), ctypes.c_void_p]
    frames = (ctypes.c_void_p * 64)()
    backtrace(frames, 64)  # the first call loads libgcc_s: never inside the handler
    info = _DlInfo()
    pc_offset = _PC_OFFSET.get(platform.machine())
    write = os.write

    @ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
    def on_signal(signum, siginfo, ucontext):
        # SA_RESETHAND put the default action back: returning re-runs the fault, which kills
        lines = [f"\n{MARKER} signal={signum} pid={os.getpid()}"]
        try:
            if siginfo and signum != signal.SIGABRT:
                addr = ctypes.c_void_p.from_address(siginfo + 16).value or 0
                lines.append(f"{MARKER} address=0x{addr:x}")
            # (an abort's own frame is libc's raise: the backtrace names its caller instead)
            if ucontext and pc_offset is not None and signum != signal.SIGABRT:
                pc = ctypes.c_void_p.from_address(ucontext + pc_offset).value or 0
                if pc and dladdr(pc, ctypes.byref(info)):
                    lib = (info.dli_fname or b"?").decode(errors="replace")
                    sym = (info.dli_sname or b"").decode(errors="replace")
                    lines.append(f"{MARKER} fault {lib}({sym}) [0x{pc:x}]")
            write(2, ("\n".join(lines) + "\n").encode())
            n = backtrace(frames, 64)
            symbols_fd(frames, n, 2)
        finally:
            write(2, f"{MARKER} end\n".encode())

    act = _Sigaction()
    act.sa_sigaction = ctypes.cast(on_signal, ctypes.c_void_p)
    act.sa_flags = SA_SIGINFO | SA_RESETHAND
    for sig in FATAL_SIGNALS:
        sigaction(int(sig), ctypes.byref(act), None)
    _handler = on_signal
    return True


_FRAME = re.compile(r"^(?P<lib>[^\s(]+)\((?P<sym>[^)+]*)(?:\+0x[0-9a-f]+)?\)\s*\[0x[0-9a-f]+\]")
# frames of the report itself, of libc's signal return and of Python/ctypes glue
_SKIP = ("libc.so", "python", "libffi", "_ctypes", "ld-linux", "libpython")


def _demangle(sym: str) -> str:
    """``_Z24ggml_backend_amx_mul_matPK19...`` -> ``ggml_backend_amx_mul_mat`` (the name only:
    enough to say where; a full demangler is not needed for that)."""
    m = re.match(r"_ZN?(?:\d+)", sym)
    if not m:
        return sym
    names, rest = [], sym[2:].lstrip("N")
    while True:
        d = re.match(r"(\d+)", rest)
        if not d:
            break
        n = int(d.group(1))
        start = len(d.group(1))
        names.append(rest[start:start + n])
        rest = rest[start + n:]
        if not sym.startswith("_ZN"):
            break
    return "::".join(names) or sym


def parse_crash(stderr: str) -> dict | None:
    """``{"signal": "SIGSEGV", "frame": "ggml_backend_amx_mul_mat", "library":
    "libggml-cpu.so.0", "frames": [...]}`` from a report on ``stderr``, or None."""
    start = stderr.rfind(f"{MARKER} signal=")
    if start < 0:
        return None
    block = stderr[start:]
    head, _, body = block.partition("\n")
    m = re.search(r"signal=(\d+)", head)
    signum = int(m.group(1)) if m else 0
    frames = []
    for line in body.splitlines():
        if line.startswith(MARKER):
            break
        f = _FRAME.match(line.strip())
        if f:
            frames.append((os.path.basename(f.group("lib")), _demangle(f.group("sym"))))
    native = [(lib, sym) for lib, sym in frames if not any(s in lib for s in _SKIP)]
    fault = re.search(rf"{MARKER} fault (.+)$", block, re.M)
    f = _FRAME.match(fault.group(1).strip()) if fault else None
    if f:  # the faulting instruction itself (from the signal's context)
        lib, sym = os.path.basename(f.group("lib")), _demangle(f.group("sym")) or None
    else:  # no context (SIGABRT, another architecture): the first frame outside libc/Python
        lib, sym = next(((lb, s) for lb, s in native if s), native[0] if native else (None, None))
    address = re.search(rf"{MARKER} address=(0x[0-9a-f]+)", block)
    return {"signal": _signame(signum), "frame": sym or None, "library": lib,
            "address": address.group(1) if address else None,
            "frames": [f"{s or '?'} ({lb})" for lb, s in native[:12]]}


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_exit(returncode: int | None, stderr: str = "") -> dict:
    """What ended a child process: ``{"signal", "frame", "library", "crashed", "text"}``.
    ``crashed`` is true for the fatal signals of native code (not SIGKILL or SIGTERM, which
    come from outside: the OOM killer, a user)."""
    report = parse_crash(stderr) or {}
    sig = report.get("signal")
    if sig is None and returncode is not None and returncode < 0:
        sig = _signame(-returncode)
    elif sig is None and returncode == 134:
        sig = "SIGABRT"
    abort = next((ln.strip() for ln in stderr.splitlines() if "GGML_ASSERT" in ln or "GGML_ABORT" in ln
                  or re.search(r"\.c(pp)?:\d+: ", ln)), None)
    crashed = sig in {s.name for s in FATAL_SIGNALS}
    where = report.get("frame")
    lib = report.get("library")
    text = f"{sig}" if sig else f"exit code {returncode}"
    if where or lib:
        text += f" in {where or '?'}" + (f" ({lib})" if lib else "")
    if report.get("address") in ("0x0",) and sig == "SIGSEGV":
        text += " (a null pointer)"
    if abort and sig == "SIGABRT":
        text += f": {abort}"
    return {"signal": sig, "frame": where, "library": lib, "crashed": crashed,
            "abort": abort, "text": text, "frames": report.get("frames", [])}
