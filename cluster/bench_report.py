"""Benchmark suites over the cluster's workers, seed-format job files, and reports.

``run_suite`` runs a suite of ``workloads.bench`` jobs on every chosen worker and
``write_report`` turns the records into a folder: ``report.md`` (tables per job x worker,
speedups over the CPU tier, model throughput), ``results.csv`` and PNG charts.
``run_jobs`` takes the seed's job dicts (``{"job_type": "matrix_multiply", "size": 1000,
"iterations": 10, "prefer_gpu": true}``), routes them, streams each result as a JSON line,
and ends with the seed's statistics.
"""
from __future__ import annotations

import csv
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable

from workloads import bench
from workloads.bench import job_task, suite_task

from .files import atomic_write
from .jobs import failure, wait_all
from .plugin import PROCESS_HEADROOM
from .routing import NoWorkerForTier
from .status import text_table, worker_rows

__all__ = ["SUITES", "run_suite", "write_report", "run_jobs", "job_stats", "format_stats"]

#: suites: (job function name, kwargs); model entries are expanded per model kind
SUITES = {
    "quick": [
        ("matrix_multiply", {"size": 256, "iterations": 5}),
        ("vector_addition", {"size": 1_000_000, "iterations": 20}),
        ("neural_network", {"epochs": 3, "batch_size": 64, "input_size": 784, "hidden_size": 128, "output_size": 10}),
        ("image_processing", {"batch_size": 4, "image_size": 64, "iterations": 5}),
    ],
    "models": [
        ("llm_throughput", {"batch_sizes": [1, 2], "context_lengths": [32, 256], "max_tokens": 16}),
        ("embed_throughput", {"batch_sizes": [16, 64], "n_texts": 128}),
    ],
    # the seed's own sizes: minutes per worker on a CPU
    "seed": [
        ("matrix_multiply", {"size": 1000, "iterations": 10}),
        ("vector_addition", {"size": 10_000_000, "iterations": 100}),
        ("neural_network", {"epochs": 5, "batch_size": 64, "input_size": 784, "hidden_size": 256, "output_size": 10}),
        ("image_processing", {"batch_size": 32, "image_size": 224, "iterations": 50}),
    ],
}
SUITES["full"] = SUITES["quick"] + SUITES["models"]


def _targets(core, tiers: Iterable[str] | None, workers: Iterable[str] | None) -> list[dict]:
    rows = worker_rows(core.workers(), core.config.tier_names)
    if workers:
        wanted = set(workers)
        chosen = [r for r in rows if r["name"] in wanted or r["address"] in wanted]
        missing = wanted - {r["name"] for r in chosen} - {r["address"] for r in chosen}
        if missing:
            raise ValueError(f"no such worker(s): {', '.join(sorted(missing))}; workers: {', '.join(r['name'] for r in rows)}")
        return chosen
    if tiers:
        unknown = set(tiers) - set(core.config.tiers)
        if unknown:
            raise ValueError(f"unknown tier(s) {', '.join(sorted(unknown))}; known: {', '.join(core.config.tiers)}")
        chosen = [r for r in rows if r["tier"] in set(tiers)]
        if not chosen:
            raise ValueError(f"no live worker has tier {', '.join(tiers)}; live tiers: {', '.join(sorted({r['tier'] for r in rows if r['tier']}))}")
        return chosen
    return [r for r in rows if r["tier"]]


def run_suite(core, suite: str = "quick", tiers=None, workers=None, parallel: bool = False,
              progress: bool = True) -> list[dict]:
    """Run ``suite`` on every chosen worker (default: all tiered workers); the records.

    One job at a time by default, so that workers sharing a machine (the embedded cluster)
    do not slow each other down; ``parallel=True`` runs all workers at once (separate PCs).
    """
    from tqdm.auto import tqdm

    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; suites: {', '.join(SUITES)}")
    targets = _targets(core, tiers, workers)
    jobs = []
    for t in targets:
        for name, kwargs in SUITES[suite]:
            if name == "llm_throughput":
                for model, spec in core.config.models.items():
                    if spec.backend == "llamacpp":
                        jobs.append((t, name, {"model": model, "spec": spec, **kwargs}))
            elif name == "embed_throughput":
                for model, spec in core.config.models.items():
                    if spec.backend == "sentence_transformers":
                        jobs.append((t, name, {"model": model, "spec": spec, **kwargs}))
            else:
                jobs.append((t, name, kwargs))
    records: list[dict] = []
    bar = tqdm(total=len(jobs), desc=f"bench {suite}", unit="job", disable=not progress)

    def submit(t, name, kwargs):
        route = core.route(t["tier"], f"bench {name}").__class__(tier=t["tier"], chain=[t["tier"]], workers=[t["address"]])
        return core.submit_routed(route, f"bench {name} on {t['name']}", suite_task, name, kwargs, kind="bench", pure=False)

    def collect(f, t, name):
        err = failure(f)
        if err is None:
            records.extend(f.result())
        else:  # one failed job is one error row; the rest of the suite goes on
            records.append({"job_type": name, "worker": t["name"], "tier": t["tier"], "simulated": t["simulated"],
                            "error": f"{type(err).__name__}: {err}"})

    try:
        if parallel:
            futures = [(submit(*j), j) for j in jobs]
            for f, (t, name, _) in futures:
                wait_all(core.client, [f])
                collect(f, t, name)
                bar.update(1)
        else:
            for t, name, kwargs in jobs:
                f = submit(t, name, kwargs)
                wait_all(core.client, [f])
                collect(f, t, name)
                bar.update(1)
    finally:
        bar.close()
    return records


# -- reports --------------------------------------------------------------------------------
def _label(r: dict) -> str:
    return f"{r['worker']} ({r['tier']}{', simulated' if r['simulated'] else ''})"


def _params(r: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in r["params"].items())


def speedups(records: list[dict], cpu_tier: str = "CPU") -> list[dict]:
    """Each worker's throughput over the CPU tier's, per job and parameters."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["job_type"], _params(r))].append(r)
    out = []
    for (jt, params), rs in groups.items():
        base = [r for r in rs if r["tier"] == cpu_tier]
        if not base:
            continue
        ref = statistics.median(r["value"] for r in base)
        for r in rs:
            if r["tier"] != cpu_tier and ref > 0:
                out.append({"job_type": jt, "params": params, "worker": _label(r), "speedup": r["value"] / ref,
                            "simulated": r["simulated"]})
    return out


def write_report(records: list[dict], folder: str | Path, title: str = "Cluster benchmark") -> Path:
    """Write report.md, results.csv and PNG charts for ``records`` into ``folder``."""
    # Figure objects, not pyplot: no backend switch, so a notebook's inline plots keep working
    from matplotlib.figure import Figure

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    errors = [r for r in records if "error" in r]
    records = [r for r in records if "error" not in r]
    fields = ["job_type", "params", "worker", "tier", "simulated", "device", "device_name", "dtype", "metric", "value",
              "unit", "time_min", "time_median", "iterations", "check_passed", "check_detail",
              "transfer_to_device_s", "transfer_to_host_s"]
    with atomic_write(folder / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in records:
            w.writerow({**{k: r.get(k, "") for k in fields}, "params": json.dumps(r["params"]),
                        "check_passed": r["check"]["passed"], "check_detail": r["check"]["detail"]})
    charts = []
    by_job = defaultdict(list)
    for r in records:
        by_job[r["job_type"]].append(r)
    sim_note = " (simulated tiers run on the CPU)"
    for jt, rs in by_job.items():
        x_param = {"llm_throughput": "context_length", "embed_throughput": "batch_size"}.get(jt)
        if x_param:
            # throughput over a swept parameter: one line per worker (and batch size)
            fig = Figure(figsize=(6.5, 3.2))
            ax = fig.subplots()
            lines = defaultdict(list)
            for r in rs:
                extra = f", batch {r['params']['batch_size']}" if jt == "llm_throughput" else ""
                lines[f"{_label(r)}, {r['params']['model']}{extra}"].append((r["params"][x_param], r["value"], r["simulated"]))
            for label, pts in lines.items():
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="--" if pts[0][2] else "-", label=label)
            ax.set_xlabel(x_param.replace("_", " ") + (" (tokens in the prompt)" if jt == "llm_throughput" else ""))
            ax.set_ylabel(rs[0]["unit"])
            ax.legend(fontsize=6)
            ax.set_title(jt + (sim_note + ", dashed" if any(r["simulated"] for r in rs) else ""), fontsize=9)
        else:
            fig = Figure(figsize=(6.5, 0.8 + 0.45 * len(rs)))
            ax = fig.subplots()
            ax.barh(range(len(rs)), [r["value"] for r in rs], color=["#999" if r["simulated"] else "#2a7" for r in rs])
            ax.set_yticks(range(len(rs)), [_label(r) for r in rs], fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(rs[0]["unit"])
            ax.set_title(f"{jt} ({_params(rs[0])})" + ("\ngrey:" + sim_note if any(r["simulated"] for r in rs) else ""), fontsize=9)
        fig.tight_layout()
        name = f"{jt}.png"
        with atomic_write(folder / name) as f:
            fig.savefig(f, dpi=90, format="png")
        charts.append(name)
    curves = [r for r in records if r.get("loss_curve")]
    if curves:
        fig = Figure(figsize=(6, 3))
        ax = fig.subplots()
        for r in curves:
            ax.plot(range(1, len(r["loss_curve"]) + 1), r["loss_curve"], marker="o", label=_label(r))
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss")
        ax.set_title("neural_network: loss per epoch")
        ax.legend(fontsize=7)
        fig.tight_layout()
        with atomic_write(folder / "loss_curves.png") as f:
            fig.savefig(f, dpi=90, format="png")
        charts.append("loss_curves.png")

    lines = [f"# {title}", "", time.strftime("%Y-%m-%d %H:%M:%S"), ""]
    if any(r["simulated"] for r in records):
        lines += ["Workers marked *simulated* carry a GPU tier on a machine without that GPU: their jobs ran on the CPU.", ""]
    failed = [r for r in records if not r["check"]["passed"]]
    lines += [f"{len(records)} results, {len(failed)} failed their own check, {len(errors)} jobs raised an error.", ""]
    if errors:
        lines += ["## Jobs that raised an error", "", "| job | worker | error |", "|---|---|---|"]
        lines += [f"| {e['job_type']} | {_label(e)} | {e['error']} |" for e in errors]
        lines.append("")
    for jt, rs in by_job.items():
        lines += [f"## {jt}", "", "| worker | device | dtype | parameters | result | median s | check |", "|---|---|---|---|---|---|---|"]
        for r in rs:
            extra = ""
            if jt == "vector_addition" and r["device"] != "cpu":
                extra = f" (copies: {r['transfer_to_device_s']:.4f} s in, {r['transfer_to_host_s']:.4f} s out)"
            lines.append(f"| {_label(r)} | {r['device_name']} | {r['dtype']} | {_params(r)} | {r['value']:.1f} {r['unit']}{extra} "
                         f"| {r['time_median']:.4f} | {'ok' if r['check']['passed'] else 'FAILED'}: {r['check']['detail']} |")
        lines += ["", f"![{jt}]({jt}.png)", ""]
    sp = speedups(records)
    if sp:
        lines += ["## Speedup over the CPU tier", "", "| job | parameters | worker | speedup |", "|---|---|---|---|"]
        lines += [f"| {s['job_type']} | {s['params']} | {s['worker']} | {s['speedup']:.2f}x |" for s in sp]
        lines.append("")
    if curves:
        lines += ["## Training loss", "", "![loss](loss_curves.png)", ""]
    with atomic_write(folder / "report.md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return folder


# -- the seed's job file ---------------------------------------------------------------------
#: what a job may take of a worker's free memory: the nanny restarts a worker at 95% of its
#: limit, and the job's own estimate is rough
JOB_MEMORY_SHARE = 0.8


def worker_room(workers: dict) -> dict[str, tuple[str, int, str]]:
    """``{address: (name, bytes a job may take, how)}`` from the workers' identities: free
    GPU memory on a real GPU tier, else the memory limit less its resident models and what
    the process itself needs."""
    from dask.utils import format_bytes


    out = {}
    for addr, w in workers.items():
        host = (w.get("metrics") or {}).get("aicluster") or {}
        name = str(w.get("name", addr))
        if host.get("device", "cpu").startswith("cuda") and host.get("vram_total"):
            free = host["vram_total"] - (host.get("vram_used") or 0)
            out[addr] = (name, int(JOB_MEMORY_SHARE * free), "free VRAM")
        elif w.get("memory_limit"):
            # what the worker process needs besides (Python, torch: PROCESS_HEADROOM) and its models
            held = PROCESS_HEADROOM + (host.get("used") or 0)
            out[addr] = (name, int(JOB_MEMORY_SHARE * (0.95 * w["memory_limit"] - held)),
                         f"memory limit {format_bytes(w['memory_limit'])} less its models and the process itself")
        else:
            out[addr] = (name, 1 << 62, "no memory limit")
    return out


def route_for_job(core, job: dict, room: dict | None = None):
    """``prefer_gpu`` jobs go to the GPU tiers (best first), then the CPU tier; with
    ``room`` (``worker_room``), only to workers that can hold the job's memory (a tier where
    some can: pinned to those), or ``JobTooBig`` naming the need and the largest room."""
    from dataclasses import replace

    from dask.utils import format_bytes

    cpu = core.config.cpu_tier
    gpu_tiers = [t for t in core.config.tiers if t != cpu]
    chain = (gpu_tiers + [cpu]) if job.get("prefer_gpu") else core.config.fallback_chain(cpu)
    what = f"{job.get('job_type')} job"
    route = core.resolve(chain, what)
    if room is None:
        return route
    jt, params, dtype = bench.validate_job(job)
    need = bench.job_memory(jt, params, dtype)
    live = core.live_tiers()
    if not any(w in room for t in route.chain for w in live.get(t, [])):
        return route  # its tier's workers are restarting (or unknown here): nothing to measure against
    for tier in route.chain[route.chain.index(route.tier):]:
        fits = [w for w in live.get(tier, []) if room.get(w, ("", 1 << 62, ""))[1] >= need]
        if fits:
            pinned = fits if len(fits) < len(live[tier]) else []
            return replace(route, tier=tier, workers=pinned, fell_back=tier != route.chain[0])
    cands = [room[w] for t in route.chain for w in live.get(t, []) if w in room]
    best = max(cands, key=lambda r: r[1]) if cands else ("?", 0, "")
    shown = ", ".join(f"{k}={v}" for k, v in params.items())
    raise bench.JobTooBig(
        f"{jt} ({shown}, {dtype}) needs about {format_bytes(need)}, but no worker of tiers {', '.join(route.chain)} "
        f"can give that much: the most is {format_bytes(max(best[1], 0))} on {best[0]} ({best[2]}). Lower its "
        f"parameters, or run it where a worker has more memory")


def _free_gpu_worker(core, route, busy: dict[str, int]):
    """``route`` pinned to a GPU worker that runs none of this run's jobs, trying the GPU
    tiers of the route's chain best first; None when every GPU worker is busy."""
    from dataclasses import replace

    live = core.live_tiers()
    for tier in route.chain:
        if not core.config.tiers[tier].is_gpu:
            continue
        for w in live.get(tier, []):
            if not busy.get(w):
                return replace(route, tier=tier, workers=[w], fell_back=tier != route.chain[0])
    return None


def run_jobs(core, jobs: list, on_result: Callable[[dict], None] | None = None, in_flight: int = 4,
             progress: bool = True, ids: list | None = None, priority: int = 0) -> tuple[list[dict], float]:
    """Run seed-format job dicts; each outcome (result or error) goes to ``on_result`` as it
    finishes. A bad job is an error line of its own; the others go on. ``ids``: the job_id
    of jobs that name none (default: their index). ``priority``: for jobs that set no
    ``"priority"`` of their own. Returns ``(outcomes in input order, wall seconds)``.

    ``prefer_gpu`` jobs go to a free GPU worker, best tier first, and queue on the best
    live GPU tier only when every GPU worker is busy with one of this run's jobs.
    """
    if isinstance(in_flight, bool) or not isinstance(in_flight, int) or in_flight <= 0:
        raise ValueError(f"in_flight must be a positive integer, got {in_flight!r}")
    from distributed import KilledWorker, as_completed
    from tqdm.auto import tqdm


    outcomes: list = [None] * len(jobs)
    t0 = time.perf_counter()
    todo = []
    room = worker_room(core.workers())  # once per run: what each worker can give a job
    for i, job in enumerate(jobs):
        default_id = ids[i] if ids is not None else i
        jid = job.get("job_id", job.get("id", default_id)) if isinstance(job, dict) else default_id
        try:
            bench.validate_job(job)
            route = route_for_job(core, job, room)
        except (bench.BenchJobError, NoWorkerForTier) as e:
            outcomes[i] = {"index": i, "job_id": jid, "job": job, "status": "failed", "error": str(e)}
            if on_result:
                on_result(outcomes[i])
            continue
        todo.append((i, jid, job, route))
    pending = iter(todo)
    meta = {}
    busy: dict[str, int] = {}  # this run's jobs in flight per pinned worker
    ac = as_completed([], loop=core.client.loop)

    def submit(item, note: str = ""):
        i, jid, job, route = item
        if job.get("prefer_gpu") and not route.workers:
            route = _free_gpu_worker(core, route, busy) or route
        what = f"{job['job_type']} job {jid}" + note
        f = core.submit_routed(route, what, job_task, job, kind="bench-job", pure=False,
                              priority=job.get("priority", priority))
        meta[f.key] = (i, jid, job, route)
        for w in route.workers:
            busy[w] = busy.get(w, 0) + 1
        ac.add(f)

    def submit_next():
        nxt = next(pending, None)
        if nxt is not None:
            submit(nxt)

    # A job that kills its worker (out of memory, say) fails with KilledWorker once Dask has
    # seen the worker die `allowed-failures` times; so does every job that was only queued on
    # that worker. Those run again one at a time at the end: the innocent ones complete,
    # the one that kills its worker fails alone, with an error that says so.
    killed: list = []
    retried = False

    def finish(f) -> None:
        if f.status in ("lost", "pending"):  # its result went with a worker: Dask computes it again
            ac.add(f)
            return
        i, jid, job, route = meta.pop(f.key)
        for w in route.workers:
            busy[w] -= 1
        e = failure(f)
        if isinstance(e, KilledWorker) and not retried:
            killed.append((i, jid, job, route))
            submit_next()
            return
        if isinstance(e, KilledWorker):
            jt, params, dtype = bench.validate_job(job)
            from dask.utils import format_bytes

            out = {"index": i, "job_id": jid, "job": job, "status": "failed",
                   "error": f"KilledWorker: {job['job_type']} job {jid} killed its worker again when it ran alone: it "
                            f"needs more memory than the worker has (estimated {format_bytes(bench.job_memory(jt, params, dtype))}"
                            f" for its tensors); lower its parameters", "retried": True}
        elif e is not None:
            out = {"index": i, "job_id": jid, "job": job, "status": "failed", "error": f"{type(e).__name__}: {e}"}
        else:
            out = {"index": i, "job_id": jid, "job_type": job["job_type"], "status": "completed",
                   "worker_type": "GPU" if route.tier != core.config.cpu_tier else "CPU", **f.result()}
        if retried:
            out["retried"] = True
        if f.key in again:
            out["resubmitted"] = again.pop(f.key)
        outcomes[i] = out
        if on_result:
            on_result(out)
        bar.update(1)
        submit_next()

    # a job lost with a restarting scheduler is submitted again by the facade (the same job,
    # not "cancelled"): say so, and count it in the job's outcome
    again: dict[str, int] = {}

    def resubmitted(items) -> None:
        for r in items:
            if r.key in meta:
                again[r.key] = r.times
                tqdm.write(f"job {meta[r.key][1]}: lost with the scheduler; submitted again", file=sys.stderr)

    stop = core.redo.listen(resubmitted)
    try:
        for _ in range(in_flight):
            submit_next()
        with tqdm(total=len(todo), desc="jobs", unit="job", disable=not progress) as bar:
            for f in ac:
                finish(f)
            retried = True
            for item in killed:  # alone, one after another
                i, jid, job, route = item
                try:
                    route = route_for_job(core, job, worker_room(core.workers()))
                except Exception:
                    pass  # the old route stands
                submit((i, jid, job, route), " (retried alone)")
                for f in ac:
                    finish(f)
    finally:
        stop()
    return outcomes, time.perf_counter() - t0


def job_stats(outcomes: list[dict], wall: float, cpu_tier: str = "CPU") -> dict:
    """The seed's statistics: count and avg/min/max time per job_type x tier, jobs per
    second, GPU-over-CPU speedup per job_type (same parameters only)."""
    done = [o for o in outcomes if o and o["status"] == "completed"]
    groups = defaultdict(list)
    for o in done:
        groups[(o["job_type"], o["tier"], o["simulated"])].append(o["processing_time"])
    rows = [{"job_type": jt, "tier": tier, "simulated": sim, "count": len(ts), "avg_s": statistics.mean(ts),
             "min_s": min(ts), "max_s": max(ts)} for (jt, tier, sim), ts in sorted(groups.items())]
    by_params = defaultdict(lambda: defaultdict(list))
    for o in done:
        by_params[(o["job_type"], json.dumps(o["params"], sort_keys=True))][o["tier"] == cpu_tier].append(o["processing_time"])
    speed = {}
    for (jt, _), sides in by_params.items():
        if sides[True] and sides[False]:
            speed.setdefault(jt, []).append(statistics.mean(sides[True]) / statistics.mean(sides[False]))
    per_worker: dict[str, int] = {}
    for o in done:
        per_worker[o["worker"]] = per_worker.get(o["worker"], 0) + 1
    return {"completed": len(done), "failed": sum(1 for o in outcomes if o and o["status"] == "failed"),
            "wall_seconds": wall, "jobs_per_second": len(done) / wall if wall > 0 else None, "by_type_and_tier": rows,
            "jobs_per_worker": dict(sorted(per_worker.items())),
            "gpu_over_cpu_speedup": {jt: statistics.mean(v) for jt, v in speed.items()},
            "simulated": any(o["simulated"] for o in done)}


def format_stats(stats: dict) -> str:
    head = ["job_type", "tier", "count", "avg s", "min s", "max s"]
    body = [[r["job_type"], r["tier"] + (" (simulated)" if r["simulated"] else ""), str(r["count"]), f"{r['avg_s']:.4f}",
             f"{r['min_s']:.4f}", f"{r['max_s']:.4f}"] for r in stats["by_type_and_tier"]]
    out = text_table(head, body)
    jps = stats["jobs_per_second"]
    out.append(f"\n{stats['completed']} completed, {stats['failed']} failed in {stats['wall_seconds']:.1f} s"
               + (f" ({jps:.2f} jobs/s)" if jps else ""))
    if stats.get("jobs_per_worker"):
        out.append("jobs per worker: " + ", ".join(f"{w} {n}" for w, n in stats["jobs_per_worker"].items()))
    for jt, s in stats["gpu_over_cpu_speedup"].items():
        out.append(f"GPU over CPU speedup, {jt}: {s:.2f}x" + (" (GPU tiers simulated on the CPU)" if stats["simulated"] else ""))
    return "\n".join(out)
