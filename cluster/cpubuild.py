"""What the llama.cpp binding is built for: the host's CPU features, AMX left out.

Runs with the standard library alone, because `make install` calls it with the system
Python before any virtual environment exists::

    python3 cluster/cpubuild.py cmake      # -DGGML_NATIVE=OFF -DGGML_AVX2=ON ... (x86-64)
    python3 cluster/cpubuild.py features   # AVX AVX2 ... what the build will use
    python3 cluster/cpubuild.py key ARGS   # what a build with CMake ARGS is for (cache key)

Why not ggml's default (`GGML_NATIVE`, i.e. `-march=native`): on a CPU with AMX it compiles
ggml's AMX kernels, and the first decode of a Q4_K model segfaults in
`ggml_backend_amx_mul_mat` (ggml-org/llama.cpp#20824, closed as stale without a fix; dspy
removed the AMX variant from its CI for the same crash). So on x86-64 the build turns
`GGML_NATIVE` off and names each instruction-set extension the host has, AMX never. Other
architectures (aarch64, ...) keep `GGML_NATIVE`: the AMX kernels are x86-only.

The same module tells the doctor and the tests what a build was meant to use
(:func:`expected_features`) and parses what the binding reports
(:func:`reported_features`).
"""
from __future__ import annotations

import hashlib
import platform
import re
import sys

# ggml's CMake option -> the /proc/cpuinfo flags the host must have for it; in ggml's
# order. GGML_AVX512 compiles with -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw.
X86_OPTIONS: dict[str, tuple[str, ...]] = {
    "SSE42": ("sse4_2",),
    "AVX": ("avx",),
    "F16C": ("f16c",),
    "FMA": ("fma",),
    "AVX2": ("avx2",),
    "BMI2": ("bmi2",),
    "AVX_VNNI": ("avx_vnni",),
    "AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "AVX512_VBMI": ("avx512f", "avx512vbmi"),
    "AVX512_VNNI": ("avx512f", "avx512_vnni"),
    "AVX512_BF16": ("avx512f", "avx512_bf16"),
}
# Never built (see the module's docstring), whatever the host has.
X86_LEFT_OUT = ("AMX_TILE", "AMX_INT8", "AMX_BF16")

# llama_print_system_info() names -> the ggml option that turns it on. SSE3 and SSSE3 come
# with SSE4.2; AMX_INT8 is printed for GGML_AMX_INT8.
REPORTED_AS = {
    "SSE3": "SSE42", "SSSE3": "SSE42", "AVX": "AVX", "AVX_VNNI": "AVX_VNNI", "AVX2": "AVX2",
    "F16C": "F16C", "FMA": "FMA", "BMI2": "BMI2", "AVX512": "AVX512",
    "AVX512_VBMI": "AVX512_VBMI", "AVX512_VNNI": "AVX512_VNNI", "AVX512_BF16": "AVX512_BF16",
    "AMX_INT8": "AMX_INT8",
}


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, ARM `Features`)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def is_x86(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64", "i686", "i386")


def expected_features(flags: set[str] | None = None, machine: str | None = None) -> list[str]:
    """The ggml options a build on this host turns on (x86-64); [] elsewhere (native)."""
    if not is_x86(machine):
        return []
    flags = cpu_flags() if flags is None else flags
    return [opt for opt, need in X86_OPTIONS.items() if all(f in flags for f in need)]


def cmake_args(flags: set[str] | None = None, machine: str | None = None) -> str:
    """CMake arguments for the CPU part of the build (appended to LLAMA_CMAKE_ARGS)."""
    if not is_x86(machine):
        return "-DGGML_NATIVE=ON"
    on = set(expected_features(flags, machine))
    parts = ["-DGGML_NATIVE=OFF"]
    parts += [f"-DGGML_{opt}={'ON' if opt in on else 'OFF'}" for opt in X86_OPTIONS]
    parts += [f"-DGGML_{opt}=OFF" for opt in X86_LEFT_OUT]
    return " ".join(parts)


def features_of(cpu_args: str) -> list[str] | None:
    """The x86 options CMake arguments turn on; None for a native (-march=native) build."""
    if "-DGGML_NATIVE=OFF" not in cpu_args.split():
        return None
    on = re.findall(r"-DGGML_([A-Z0-9_]+)=ON\b", cpu_args)
    return [opt for opt in (*X86_OPTIONS, *X86_LEFT_OUT) if opt in on]


def build_key(cpu_args: str | None = None, flags: set[str] | None = None,
              machine: str | None = None) -> str:
    """What a build with `cpu_args` is for, in words: the machine and the features it uses.

    A native build depends on every flag of the build host, so its key hashes them all: a
    cache copied to another CPU never hands back a wheel built for this one.
    """
    machine = machine or platform.machine()
    cpu_args = cmake_args(flags, machine) if cpu_args is None else cpu_args
    features = features_of(cpu_args)
    if features is not None:
        return f"{machine} " + " ".join(features)
    flags = cpu_flags() if flags is None else flags
    digest = hashlib.sha1(" ".join(sorted(flags)).encode()).hexdigest()[:8]
    return f"{machine} native-{digest}"


def reported_features(system_info: str) -> set[str]:
    """The ggml options a binding's `llama_print_system_info()` says it was built with."""
    on = {m.group(1) for m in re.finditer(r"([A-Z0-9_]+) = 1", system_info)}
    return {REPORTED_AS[name] for name in on if name in REPORTED_AS}


def unexpected_features(system_info: str, allowed: list[str] | set[str]) -> list[str]:
    """Features the binding reports that it was not meant to use (AMX always counts)."""
    allowed = set(allowed)
    return sorted(f for f in reported_features(system_info) if f not in allowed)


def build_record(prefix: str | None = None) -> dict:
    """What `make install` recorded of the binding in this environment
    (``<venv>/aicluster-llama-build.txt``: version, cmake, cpu, built-for); {} if none."""
    import os

    path = os.path.join(prefix or sys.prefix, "aicluster-llama-build.txt")
    try:
        with open(path, encoding="utf-8") as f:
            return dict(line.rstrip("\n").partition(" ")[::2] for line in f if line.strip())
    except OSError:
        return {}


def cpu_model(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return platform.processor() or platform.machine()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "cpu model"):
            return value.strip()
    return platform.machine()


def build_fingerprint() -> dict:
    """This PC's llama.cpp build and CPU, as a worker reports them: a model that crashed on
    one worker is tried on another only where these (or the device) differ."""
    rec = build_record()
    return {"llama": rec.get("built-for") or "unrecorded build", "cmake": rec.get("cmake", ""), "cpu": cpu_model()}


def main(argv: list[str]) -> int:
    what = argv[1] if len(argv) > 1 else ""
    if what == "cmake":
        print(cmake_args())
    elif what == "features":
        print(" ".join(expected_features()))
    elif what == "key":
        print(build_key(argv[2] if len(argv) > 2 else None))
    else:
        print("usage: python3 cluster/cpubuild.py cmake | features | key [CPU_ARGS]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
