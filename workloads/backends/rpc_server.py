"""A ggml RPC server (a "shard server"): ``python -m workloads.backends.rpc_server``.

Started by a worker's ModelHost (``cluster.shard_servers.ShardServer``) as a child process; a
head (``llama_head.py``) on another worker places layers of a split model on it. It serves
from the llama.cpp library that llama-cpp-python ships (built with ``-DGGML_RPC=ON``, see
the Makefile), through ctypes: ``ggml_backend_rpc_start_server`` is what llama.cpp's own
``rpc-server`` tool calls, so no separate binary needs building or installing.

ggml RPC has no authentication and no TLS: whoever reaches the port can run computations
on this device. The worker refuses to bind it to a public address.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
from pathlib import Path

GGML_BACKEND_DEVICE_TYPE_CPU, GGML_BACKEND_DEVICE_TYPE_GPU = 0, 1


def ggml_libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """``(libggml, libggml-rpc)`` of the installed llama-cpp-python, loaded so that they
    share the device registry that ``llama_cpp`` uses (the ``.so.0`` files it links)."""
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    if not llama_cpp.llama_supports_rpc() or not (lib / "libggml-rpc.so.0").exists():
        raise RuntimeError(
            "this llama-cpp-python was built without ggml RPC, so models cannot be split across workers; "
            "reinstall it with `make install` (it builds with CMAKE_ARGS=-DGGML_RPC=ON)")
    mode = getattr(os, "RTLD_GLOBAL", 0)
    ggml = ctypes.CDLL(str(lib / "libggml.so.0"), mode=mode)
    rpc = ctypes.CDLL(str(lib / "libggml-rpc.so.0"), mode=mode)
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_type.restype = ctypes.c_int
    ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_name.restype = ctypes.c_char_p
    ggml.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_register.restype = None
    rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    rpc.ggml_backend_rpc_start_server.restype = None
    rpc.ggml_backend_rpc_start_server.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                                                  ctypes.POINTER(ctypes.c_void_p)]
    return ggml, rpc


def find_device(ggml, device: str):
    """The ggml device for ``cpu`` or ``cuda:N`` (the N-th GPU ggml sees)."""
    want = GGML_BACKEND_DEVICE_TYPE_GPU if device.startswith("cuda") else GGML_BACKEND_DEVICE_TYPE_CPU
    index = int(device.split(":")[1]) if device.startswith("cuda") and ":" in device else 0
    seen = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        seen.append(ggml.ggml_backend_dev_name(dev).decode())
        if ggml.ggml_backend_dev_type(dev) == want:
            if index == 0:
                return dev
            index -= 1
    raise RuntimeError(f"no ggml device {device!r}; this llama.cpp build has {', '.join(seen) or 'none'}"
                       + (" (build it with -DGGML_CUDA=ON for GPUs)" if want == GGML_BACKEND_DEVICE_TYPE_GPU else ""))


def die_with_parent(ppid: int) -> None:
    """End this process when the worker that started it dies, even by SIGKILL (Linux
    ``PR_SET_PDEATHSIG``): an orphaned server would keep the port and its layers."""
    import signal

    try:
        libc = ctypes.CDLL(None)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != ppid:  # the parent died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", required=True, help="host:port to listen on")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (for a CPU device)")
    p.add_argument("--cache", default=None, help="folder for received weights (keyed by hash)")
    p.add_argument("--parent", type=int, default=None, help="exit when this process (the worker) dies")
    a = p.parse_args(argv)
    if a.parent:
        die_with_parent(a.parent)
    ggml, rpc = ggml_libs()
    dev = find_device(ggml, a.device)
    devices = (ctypes.c_void_p * 1)(dev)
    print(f"shard server {a.endpoint} on {ggml.ggml_backend_dev_name(dev).decode()}", flush=True)
    # serves one head at a time, for ever (the worker terminates this process)
    rpc.ggml_backend_rpc_start_server(a.endpoint.encode(), a.cache.encode() if a.cache else None,
                                      max(a.threads, 1), 1, devices)
    sys.exit(f"shard server {a.endpoint} stopped: the port is taken or the address is not this PC's")


if __name__ == "__main__":
    main()
