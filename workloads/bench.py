"""Benchmark jobs: what each machine is worth, measured on the worker's own device.

The four job types of the GPU job-queue seed, with its parameter names:

* ``matrix_multiply(size, iterations)`` -> GFLOP/s (2 n^3 per product)
* ``vector_addition(size, iterations)`` -> GB/s (3 x size x 4 bytes per add), with the
  host->device and device->host copies timed apart (zero on a CPU device)
* ``neural_network(epochs, batch_size, input_size, hidden_size, output_size)``: a real
  two-layer MLP trained with Adam on synthetic data -> samples/s and the loss curve
* ``image_processing(batch_size, image_size, iterations)``: 2D convolutions -> images/s

and model throughput:

* ``llm_throughput(model, batch_sizes, context_lengths, max_tokens)`` -> tokens/s
* ``embed_throughput(model, batch_sizes, n_texts)`` -> vectors/s

Each job runs on the worker's device (CUDA, synchronised around every timed region, when
the worker's tier is a real GPU; else CPU), records device, dtype, worker, tier,
simulated, min/median times, and checks its own result (``check.passed``). A job's record
is also kept on the worker (``ModelHost.bench``: in every heartbeat, so ``status`` and the
dashboard show each node's last benchmark) and in a JSON file per node
(``~/.cache/aicluster/bench/<node>.json``) keyed by job/device/dtype/parameters.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path

__all__ = ["JOB_TYPES", "BenchJobError", "JobTooBig", "job_memory", "run_job", "validate_job", "matrix_multiply", "vector_addition",
           "neural_network", "image_processing", "llm_throughput", "embed_throughput"]

#: job_type -> {param: (type, default or None when required)}
JOB_TYPES: dict[str, dict[str, tuple[type, object]]] = {
    "matrix_multiply": {"size": (int, None), "iterations": (int, 10)},
    "vector_addition": {"size": (int, None), "iterations": (int, 100)},
    "neural_network": {"epochs": (int, None), "batch_size": (int, 64), "input_size": (int, 784),
                       "hidden_size": (int, 256), "output_size": (int, 10)},
    "image_processing": {"batch_size": (int, None), "image_size": (int, 224), "iterations": (int, 50)},
}
#: keys of a seed job dict that are not parameters
META_KEYS = {"job_type", "prefer_gpu", "job_id", "id", "dtype", "priority"}
DTYPES = ("float32", "float16", "bfloat16")


class BenchJobError(ValueError):
    """A job dict that cannot run: unknown job_type, a missing, negative or mistyped parameter."""


class JobTooBig(BenchJobError):
    """A job whose memory (estimated from its parameters) no worker of its tiers can give."""


def validate_job(job: dict) -> tuple[str, dict, str]:
    """``(job_type, params with defaults, dtype)`` or ``BenchJobError`` naming the problem."""
    if not isinstance(job, dict):
        raise BenchJobError(f"a job must be a JSON object, got {type(job).__name__}")
    jt = job.get("job_type")
    if jt not in JOB_TYPES:
        raise BenchJobError(f"unknown job_type {jt!r}; known: {', '.join(JOB_TYPES)}")
    spec = JOB_TYPES[jt]
    unknown = set(job) - set(spec) - META_KEYS
    if unknown:
        raise BenchJobError(f"{jt}: unknown parameter(s) {', '.join(sorted(unknown))}; parameters: {', '.join(spec)}")
    params = {}
    for name, (typ, default) in spec.items():
        value = job.get(name, default)
        if value is None:
            raise BenchJobError(f"{jt}: parameter {name!r} is missing")
        if isinstance(value, bool) or not isinstance(value, typ):
            raise BenchJobError(f"{jt}: parameter {name!r} must be an integer, got {value!r}")
        if value <= 0:
            raise BenchJobError(f"{jt}: parameter {name!r} must be positive, got {value}")
        params[name] = value
    if "prefer_gpu" in job and not isinstance(job["prefer_gpu"], bool):
        raise BenchJobError(f"{jt}: prefer_gpu must be true or false, got {job['prefer_gpu']!r}")
    if "priority" in job and (isinstance(job["priority"], bool) or not isinstance(job["priority"], int)):
        raise BenchJobError(f"{jt}: priority must be an integer (higher runs first), got {job['priority']!r}")
    dtype = job.get("dtype", "float32")
    if dtype not in DTYPES:
        raise BenchJobError(f"{jt}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return jt, params, dtype


def job_memory(job_type: str, params: dict, dtype: str = "float32") -> int:
    """Bytes a job holds at its peak (its tensors; not the worker's own ~0.5 GB), from its
    parameters, so that a job no worker can hold is refused before it runs, and one that
    only some workers can hold goes to those. A few float32 temporaries are counted."""
    e = 2 if dtype in ("float16", "bfloat16") else 4
    p = params
    if job_type == "matrix_multiply":
        # float32 randn for a and b, a and b in dtype, the product
        return p["size"] ** 2 * (2 * 4 + 3 * e)
    if job_type == "vector_addition":
        # host vectors in float32 and dtype, the device copies and the sum
        return p["size"] * (2 * 4 + 5 * e)
    if job_type == "neural_network":
        n = p["batch_size"] * 20
        weights = p["input_size"] * p["hidden_size"] + p["hidden_size"] * p["output_size"]
        return n * (p["input_size"] + 2 * p["output_size"]) * 4 + 4 * weights * 4 + 4 * p["batch_size"] * p["hidden_size"] * 4
    if job_type == "image_processing":
        px = p["batch_size"] * p["image_size"] ** 2
        # images (float32 and dtype), 16 channels after the first convolution, 8 after pooling
        return px * (3 * 4 + 3 * e + 16 * e + 8 * e)
    return 0


# -- device plumbing ------------------------------------------------------------------------
def _context() -> dict:
    """Device, worker, tier and simulated flag of the worker running this (or of this process)."""
    try:
        from .host import host_and_worker, where

        host, worker = host_and_worker()
        host.set_threads()
        name = host.assignment.device_name if host.assignment else None
        return {**where(host, worker), "host": host, "device_name": name}
    except (RuntimeError, ValueError):  # not on a worker: in-process baseline
        return {"worker": "local", "address": None, "tier": None, "simulated": False, "device": "cpu", "host": None}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def _timed(device: str, fn) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine() or "cpu"


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _record(job_type: str, params: dict, dtype: str, ctx: dict, times: list[float], metric: str, value: float,
            unit: str, check: dict, **extra) -> dict:
    rec = {
        "job_type": job_type, "params": params, "dtype": dtype, "device": ctx["device"],
        "device_name": ctx.get("device_name") or _device_name(ctx["device"]), "worker": ctx["worker"], "tier": ctx["tier"],
        "simulated": ctx["simulated"], "time_min": min(times), "time_median": statistics.median(times),
        "time_total": sum(times), "iterations": len(times), "metric": metric, "value": value, "unit": unit,
        "check": check, "timestamp": time.time(), **extra,
    }
    _remember(rec, ctx.get("host"))
    return rec


def _remember(rec: dict, host) -> None:
    """Keep the record on the worker (for status and the dashboard) and in its node's JSON file."""
    key = f"{rec['job_type']}|{rec['device']}|{rec['dtype']}|" + ",".join(f"{k}={v}" for k, v in sorted(rec["params"].items()))
    if host is not None:
        host.bench[rec["job_type"]] = {k: rec[k] for k in ("value", "unit", "metric", "device", "dtype", "timestamp")}
    from filelock import FileLock

    folder = Path(os.environ.get("AICLUSTER_BENCH_DIR", Path.home() / ".cache" / "aicluster" / "bench"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{rec['worker']}.json"
        with FileLock(str(path) + ".lock", timeout=30):  # jobs of one node may finish together
            try:
                data = json.loads(path.read_text()) if path.exists() else {}
            except ValueError:
                data = {}  # a damaged file is started afresh rather than never updated again
            data[key] = {k: v for k, v in rec.items() if k != "loss_curve"}
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(data, indent=1, default=str))
            os.replace(tmp, path)
    except OSError:
        pass  # a read-only home must not fail the benchmark


# -- the four seed jobs ---------------------------------------------------------------------
def matrix_multiply(size: int, iterations: int = 10, dtype: str = "float32") -> dict:
    import torch

    ctx = _context()
    dev, dt = ctx["device"], _torch_dtype(dtype)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(dev, dt)
    b = torch.randn(size, size, generator=g).to(dev, dt)
    c = a @ b  # warm-up (kernels, caches)
    times = [_timed(dev, lambda: torch.matmul(a, b, out=c)) for _ in range(iterations)]
    rows = min(size, 16)
    ref = a[:rows].double().cpu() @ b.double().cpu()
    got = c[:rows].double().cpu()
    err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    tol = 1e-4 if dtype == "float32" else 2e-2
    gflops = 2 * size**3 / statistics.median(times) / 1e9
    return _record("matrix_multiply", {"size": size, "iterations": iterations}, dtype, ctx, times, "GFLOP/s", gflops,
                   "GFLOP/s", {"passed": err < tol, "detail": f"max relative error {err:.2e} vs float64 on {rows} rows (tolerance {tol:g})"})


def vector_addition(size: int, iterations: int = 100, dtype: str = "float32") -> dict:
    import torch

    ctx = _context()
    dev, dt = ctx["device"], _torch_dtype(dtype)
    host_a = torch.arange(size, dtype=torch.float32).to(dt)
    host_b = torch.full((size,), 2.0).to(dt)
    to_device = _timed(dev, lambda: (host_a.to(dev), host_b.to(dev))) if dev != "cpu" else 0.0
    a, b = host_a.to(dev), host_b.to(dev)
    out = torch.empty_like(a)
    torch.add(a, b, out=out)
    times = [_timed(dev, lambda: torch.add(a, b, out=out)) for _ in range(iterations)]
    back = {}
    to_host = _timed(dev, lambda: back.setdefault("v", out.cpu())) if dev != "cpu" else 0.0
    result = back.get("v", out)
    idx = torch.linspace(0, size - 1, steps=min(size, 64)).long()
    ok = bool(torch.equal(result[idx], (host_a[idx] + host_b[idx])))
    nbytes = 3 * size * a.element_size()
    gbs = nbytes / statistics.median(times) / 1e9
    return _record("vector_addition", {"size": size, "iterations": iterations}, dtype, ctx, times, "GB/s", gbs, "GB/s",
                   {"passed": ok, "detail": "a + b equals the host sum at 64 sampled indices" if ok else "a + b differs from the host sum"},
                   transfer_to_device_s=to_device, transfer_to_host_s=to_host)


def neural_network(epochs: int, batch_size: int = 64, input_size: int = 784, hidden_size: int = 256,
                   output_size: int = 10, dtype: str = "float32", batches_per_epoch: int = 20) -> dict:
    import torch
    from torch import nn

    ctx = _context()
    dev, dt = ctx["device"], _torch_dtype(dtype)
    torch.manual_seed(0)
    n = batch_size * batches_per_epoch
    x = torch.randn(n, input_size)
    teacher = torch.randn(input_size, output_size) / math.sqrt(input_size)
    y = (x @ teacher).argmax(dim=1)  # a learnable synthetic task
    x, y = x.to(dev, dt), y.to(dev)
    model = nn.Sequential(nn.Linear(input_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, output_size)).to(dev, dt)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    curve, times = [], []
    for _ in range(epochs):
        def epoch():
            total = 0.0
            for i in range(0, n, batch_size):
                opt.zero_grad()
                loss = loss_fn(model(x[i:i + batch_size]).float(), y[i:i + batch_size])
                loss.backward()
                opt.step()
                total += loss.item()
            curve.append(total / batches_per_epoch)
        times.append(_timed(dev, epoch))
    ok = len(curve) > 1 and curve[-1] < curve[0]
    sps = n / statistics.median(times)
    detail = f"loss {curve[0]:.3f} -> {curve[-1]:.3f} over {epochs} epochs" + ("" if ok or epochs > 1 else " (needs 2+ epochs to check)")
    return _record("neural_network", {"epochs": epochs, "batch_size": batch_size, "input_size": input_size,
                                      "hidden_size": hidden_size, "output_size": output_size}, dtype, ctx, times,
                   "samples/s", sps, "samples/s", {"passed": ok, "detail": detail}, loss_curve=curve)


def image_processing(batch_size: int, image_size: int = 224, iterations: int = 50, dtype: str = "float32") -> dict:
    import torch
    import torch.nn.functional as F

    ctx = _context()
    dev, dt = ctx["device"], _torch_dtype(dtype)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, image_size, image_size, generator=g).to(dev, dt)
    w1 = (torch.randn(16, 3, 3, 3, generator=g) / 5).to(dev, dt)
    w2 = (torch.randn(32, 16, 3, 3, generator=g) / 12).to(dev, dt)
    box = {}

    def step():
        h = F.relu(F.conv2d(images, w1, padding=1))
        h = F.max_pool2d(h, 2)
        box["out"] = F.conv2d(h, w2, padding=1)

    step()
    times = [_timed(dev, step) for _ in range(iterations)]
    # check the first convolution at one pixel against a float64 sum of products
    y, xx = image_size // 2, image_size // 3
    patch = images[0, :, y - 1:y + 2, xx - 1:xx + 2].double().cpu()
    ref = float((patch * w1[0].double().cpu()).sum())
    got = float(F.conv2d(images[:1], w1, padding=1)[0, 0, y, xx].double().cpu())
    err = abs(got - ref) / max(abs(ref), 1e-6)
    tol = 1e-4 if dtype == "float32" else 2e-2
    ips = batch_size / statistics.median(times)
    return _record("image_processing", {"batch_size": batch_size, "image_size": image_size, "iterations": iterations},
                   dtype, ctx, times, "images/s", ips, "images/s",
                   {"passed": err < tol, "detail": f"conv at pixel ({y},{xx}) off by {err:.2e} relative to float64"})


def run_job(job: dict) -> dict:
    """Run one seed-format job dict (``{"job_type": ..., params...}``) on this worker."""
    jt, params, dtype = validate_job(job)
    return {"matrix_multiply": matrix_multiply, "vector_addition": vector_addition,
            "neural_network": neural_network, "image_processing": image_processing}[jt](**params, dtype=dtype)


# -- model throughput -----------------------------------------------------------------------
def llm_throughput(model: str, spec, batch_sizes=(1, 4), context_lengths=(64, 512), max_tokens: int = 32) -> list[dict]:
    """Generation tokens/s for each batch size x prompt length, with the resident model;
    prefill and decode timed apart.

    A batch's prompts are submitted at once: the llama.cpp backend decodes them in one
    batch (up to its ``parallel`` slots), other backends one after another. Every prompt is
    new (a nonce at its start), so no cached prefix makes a later batch look faster. The
    check can fail: every request must end at ``max_tokens`` or a stop, and the lone
    request of the first length must give exactly the tokens of a fresh single-sequence
    llama.cpp context (a second engine, in its own child process, with the same batch
    settings; llamacpp models only). The value is decode tokens/s.
    """
    import uuid

    ctx = _context()
    host = ctx["host"]
    out = []
    with host.acquire(model, spec) as m:
        base = " ".join(["the cluster routes work to the worker that holds the model"] * 64)
        ids = m.tokenize(base) if hasattr(m, "tokenize") else None
        lone: dict | None = None
        for n_ctx in context_lengths:
            prompt = base
            if ids is not None and hasattr(m, "detokenize"):
                prompt = m.detokenize(ids[1:n_ctx])
            for bs in batch_sizes:
                run = uuid.uuid4().hex[:8]
                prompts = [f"Run {run} item {i}: {prompt}" for i in range(bs)]
                t = time.perf_counter()
                if hasattr(m, "submit"):  # batched decoding: all at once
                    reqs = [m.submit(p, max_tokens=max_tokens) for p in prompts]
                    results = [r.wait() for r in reqs]
                else:
                    results = [m.generate(p, max_tokens=max_tokens) for p in prompts]
                secs = time.perf_counter() - t
                if lone is None and bs == 1:
                    lone = {"prompt": prompts[0], "text": results[0]["text"]}
                tokens = sum(r["completion_tokens"] for r in results)
                # prefill: until the last request of the batch had its first token
                pre = max((r.get("queue_seconds") or 0) + (r.get("prefill_seconds") or 0) for r in results)
                pre = min(pre, secs) if pre else 0.0
                decode_tokens = tokens - sum(1 for r in results if r["completion_tokens"])
                decode_secs = max(secs - pre, 1e-9)
                short = [i for i, r in enumerate(results)
                         if r["finish_reason"] not in ("length", "stop")
                         or (r["finish_reason"] == "length" and r["completion_tokens"] != max_tokens)]
                check = {"passed": not short and tokens > 0,
                         "detail": f"{tokens} tokens generated" + (f"; requests {short} ended short" if short else "")}
                rec = _record("llm_throughput", {"model": model, "batch_size": bs, "context_length": n_ctx,
                                                 "max_tokens": max_tokens},
                              "q4_k_m" if spec.backend == "llamacpp" else "float32", ctx, [secs], "decode tokens/s",
                              decode_tokens / decode_secs, "tokens/s", check,
                              prefill_tokens_per_second=(sum(r["prompt_tokens"] for r in results) / pre) if pre else None,
                              prefill_seconds=pre, decode_seconds=decode_secs)
                out.append(rec)
    if lone is not None and spec.backend == "llamacpp" and out:
        ref = _single_process_text(model, spec, lone["prompt"], max_tokens)
        same = ref == lone["text"]
        first = next(r for r in out if r["params"]["batch_size"] == 1)
        first["check"]["passed"] = first["check"]["passed"] and same
        first["check"]["detail"] += ("; the lone request equals a fresh single-sequence context" if same else
                                     f"; the lone request differs from a fresh single-sequence context: {lone['text']!r}"
                                     f" vs {ref!r}")
    return out


def _single_process_text(model: str, spec, prompt: str, max_tokens: int) -> str:
    """Greedy text of ``prompt`` from a fresh one-slot engine of the same model and batch
    settings, in a child process of its own (and closed after)."""
    from .backends import llamacpp

    opts = {**spec.options, "parallel": 1, "prefix_cache": False}
    opts.pop("shard_plan", None)
    ref = llamacpp.load(spec.model_copy(update={"options": opts, "shard": False}), threads=int(opts.get("n_threads", 1)),
                        name=f"{model}-reference")
    try:
        return ref.generate(prompt, max_tokens=max_tokens)["text"]
    finally:
        ref.close()


def embed_throughput(model: str, spec, batch_sizes=(16, 64), n_texts: int = 256) -> list[dict]:
    """Embedding vectors/s for each batch size, with the resident model."""
    ctx = _context()
    host = ctx["host"]
    texts = [f"benchmark text number {i} about graphics cards and home labs" for i in range(n_texts)]
    out = []
    with host.acquire(model, spec) as m:
        m.encode(texts[:8], batch_size=8)
        for bs in batch_sizes:
            t = time.perf_counter()
            vecs = m.encode(texts, batch_size=bs)
            secs = time.perf_counter() - t
            out.append(_record("embed_throughput", {"model": model, "batch_size": bs, "n_texts": n_texts}, "float32", ctx,
                               [secs], "vectors/s", n_texts / secs, "vectors/s",
                               {"passed": vecs.shape[0] == n_texts, "detail": f"{vecs.shape[0]} vectors of {vecs.shape[1]}"}))
    return out


# -- the tasks cluster.bench_report submits ---------------------------------------------------
def suite_task(name: str, kwargs: dict):
    """Run benchmark ``name`` of this module on this worker (a task of ``cluster.bench_report``);
    a list of records."""
    try:
        out = globals()[name](**kwargs)
    finally:
        _free_cuda_cache()
    return out if isinstance(out, list) else [out]


def _free_cuda_cache() -> None:
    # benchmark tensors are not models: give their cached GPU memory back
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def job_task(job: dict) -> dict:
    """One job of the seed's job file on this worker, with its processing time."""
    t = time.perf_counter()
    rec = run_job(job)
    rec["processing_time"] = time.perf_counter() - t
    return rec
