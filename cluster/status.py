"""One view of the cluster's workers, shared by status(), the CLI, the dashboard and /metrics.

Everything here reads the worker identities the scheduler already has
(``scheduler_info()["workers"]`` on a client, ``ws.identity()`` on the scheduler): the
tier the worker preload published and the models the ModelHost plugin reports in each
heartbeat.
"""
from __future__ import annotations

from dask.utils import format_bytes

from workloads.tables import text_table

__all__ = ["ClusterStatus", "text_table", "worker_rows", "format_table", "format_models", "format_bench", "format_shards"]


def worker_rows(workers: dict, tiers=()) -> list[dict]:
    """One dict per worker, sorted by tier order (``tiers``) then name."""
    rows = []
    order = {t: i for i, t in enumerate(tiers)}
    for addr, w in workers.items():
        metrics = w.get("metrics") or {}
        tier_info = metrics.get("aicluster-tier") or {}
        host = metrics.get("aicluster") or {}
        resources = w.get("resources") or {}
        tier = tier_info.get("tier") or host.get("tier") or next((r for r in resources if r in order), None)
        counts = metrics.get("task_counts") or {}
        rows.append({
            "name": str(w.get("name", addr)),
            "address": addr,
            "tier": tier,
            "simulated": bool(tier_info.get("simulated", host.get("simulated", False))),
            "device": tier_info.get("device") or host.get("device") or "cpu",
            "device_name": tier_info.get("device_name") or host.get("device_name") or "",
            "vram_total": tier_info.get("vram_total") or host.get("vram_total"),
            "vram_used": host.get("vram_used"),
            "memory_limit": w.get("memory_limit"),
            "nthreads": w.get("nthreads"),
            "resources": dict(resources),
            "running": int(counts.get("executing", 0)),
            # paused: Dask stopped giving it tasks for memory (its ModelHost evicts idle models)
            "status": str(w.get("status", "running")).removeprefix("Status."),
            "memory": (w.get("metrics") or {}).get("memory"),
            "memory_kind": host.get("memory_kind", "ram"),
            "budget": host.get("budget"),
            "used": host.get("used", 0),
            "models": host.get("models", {}),
            "loading": host.get("loading", []),
            # models whose native code crashed here: not loaded again until unloaded or changed
            "quarantined": host.get("quarantined", {}),
            "build": host.get("build", {}),
            "bench": host.get("bench", {}),
            "shard_server": host.get("shard_server"),
            "shard_servers": host.get("shard_servers") or ([host["shard_server"]] if host.get("shard_server") else []),
            "shards": host.get("shards", {}),
            "tiered": tier is not None,
            "reason": tier_info.get("reason", ""),
        })
    rows.sort(key=lambda r: (order.get(r["tier"], len(order)), r["name"]))
    return rows


def _b(n) -> str:
    return "-" if n is None else format_bytes(n)


def format_table(rows: list[dict], models: bool = True) -> str:
    """A plain-text table of workers (and, below it, their resident models)."""
    head = ["worker", "tier", "hardware", "device", "VRAM", "RAM limit", "models / budget", "running"]
    body = []
    for r in rows:
        tier = r["tier"] or "(no tier)"
        hw = "simulated" if r["simulated"] else ("real" if r["tiered"] else "-")
        body.append([
            r["name"], tier, hw, f"{r['device']} {r['device_name']}" if r["device"] != "cpu" else r["device_name"] or "cpu",
            _b(r["vram_total"]), _b(r["memory_limit"]),
            f"{_b(r['used'])} / {_b(r['budget'])} {r['memory_kind'].upper()}" if r["budget"] else "-",
            str(r["running"]) + ("" if r.get("status", "running") == "running" else f" ({r['status'].upper()})"),
        ])
    out = text_table(head, body)
    if not body:
        out.append("(no workers connected)")
    if any(r["simulated"] for r in rows):
        out.append("simulated: the tier is forced or injected on a machine without such a GPU; work runs on the CPU.")
    for r in rows:
        if r.get("status") == "paused":
            out.append(f"PAUSED: {r['name']} uses {_b(r.get('memory'))} of its {_b(r['memory_limit'])} memory limit, over "
                       f"Dask's pause threshold: it takes no new tasks until it is under (idle models are unloaded).")
    if models:
        text = format_models(rows)
        if text:
            out += ["", text]
        text = format_bench(rows)
        if text:
            out += ["", text]
        text = format_shards(rows)
        if text:
            out += ["", text]
    return "\n".join(out)


def format_shards(rows: list[dict]) -> str:
    """Each worker's shard server (models split across workers, cluster/shards.py)."""
    body = []
    tls = False
    for r in rows:
        shards = r.get("shards") or {}
        device = r["device"] + (" (simulated: RAM)" if r["simulated"] else "")
        for srv in r.get("shard_servers") or ([r["shard_server"]] if r.get("shard_server") else []):
            tls = tls or bool(srv.get("tls"))
            state = ("in use by a head" if srv.get("connected") else "idle") if srv.get("alive") else \
                f"down ({srv.get('last_error') or 'starting'})"
            m = srv.get("model")
            held = f"{m} {format_bytes(shards[m])}" if m in shards else "-"
            body.append([r["name"], srv.get("endpoint", "?"), device, state, held, _b(srv.get("cached"))])
    if not body:
        return ""
    how = "ggml RPC behind mutual-TLS tunnels" if tls else "ggml RPC, no auth: LAN only"
    return f"shard servers ({how}; one split model each):\n" + "\n".join(
        "  " + line for line in text_table(["worker", "endpoint", "device", "state", "layers held", "cache"], body))


def format_bench(rows: list[dict]) -> str:
    """Each worker's last benchmark result per job (``aicluster bench``)."""
    lines = []
    for r in rows:
        for job, b in r.get("bench", {}).items():
            lines.append(f"  {r['name']:<16} {job:<18} {b['value']:>10.1f} {b['unit']:<10} ({b['device']}, {b['dtype']})")
    return "last benchmarks:\n" + "\n".join(lines) if lines else ""


def format_models(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        for name, m in r["models"].items():
            lines.append(
                f"  {r['name']:<16} {name:<14} {format_bytes(m['bytes']):>10} ({m['measured_by']}), "
                f"loaded in {m['load_seconds']:.2f} s, {m['hits']} hits"
            )
        for name in r["loading"]:
            lines.append(f"  {r['name']:<16} {name:<14} loading...")
        for name, q in (r.get("quarantined") or {}).items():
            where = f" in {q['frame']}" if q.get("frame") else ""
            lines.append(f"  {r['name']:<16} {name:<14} QUARANTINED: crashed ({q.get('signal') or 'killed'}{where}) while "
                         f"{q.get('during', 'generating')}; ai.unload({name!r}) lifts it")
    return "resident models:\n" + "\n".join(lines) if lines else ""


class ClusterStatus(list):
    """Worker rows (a list of dicts) that print as a table and render in notebooks."""

    def __str__(self) -> str:
        return format_table(self)

    def _repr_html_(self) -> str:
        import html

        cols = ["name", "tier", "simulated", "device", "device_name", "vram_total", "memory_limit", "budget", "used", "running"]
        head = "".join(f"<th>{c}</th>" for c in cols + ["models"])
        body = ""
        for r in self:
            cells = "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in cols)
            models = ", ".join(f"{n} ({m['bytes'] / 1e6:.0f} MB)" for n, m in r["models"].items())
            body += f"<tr>{cells}<td>{html.escape(models)}</td></tr>"
        note = "<p><i>simulated</i>: tier forced on a machine without such a GPU; work runs on the CPU.</p>" if any(r["simulated"] for r in self) else ""
        return f"<table><tr>{head}</tr>{body}</table>{note}"

    def to_dict(self) -> dict:
        return {"workers": list(self)}

    @property
    def tiers(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for r in self:
            out.setdefault(r["tier"], []).append(r["name"])
        return out
