"""The scheduler's views of AI work: a dashboard page, a JSON route, Prometheus metrics.

* ``/individual-aicluster-models`` (Bokeh; listed under "More..." in the dashboard menu):
  one bar per worker, split by resident model, against the worker's model budget.
* ``/aicluster/workers.json`` (Tornado): the rows of ``cluster.status.worker_rows``.
* ``/aicluster/jobs.json`` (``?state=running``): the job board (``cluster.jobs``).
* ``/aicluster/transfers.json``: model files on their way to workers, and the latest that
  arrived or failed (``cluster.modelfiles.ModelFiles.transfers``); the page shows them too.
* ``aicluster_*`` gauges on the scheduler's ``/metrics``, and ``aicluster_http_*`` for the
  HTTP gateway (``aicluster serve``), which reports each request as a scheduler event that
  the ``HTTPStats`` plugin adds up.

``install(scheduler)`` wires the route and the collector into a running scheduler; the
Bokeh page must be known before the scheduler builds its dashboard, which is why
``register_page()`` is called when the scheduler preload module is imported.
"""
from __future__ import annotations

import json
import weakref

from distributed.diagnostics.plugin import SchedulerPlugin
from tornado import web

from .modelfiles import ModelFiles
from .status import worker_rows

__all__ = ["PAGE", "ROUTE", "register_page", "install", "rows_for", "HTTPStats"]

PAGE = "/individual-aicluster-models"
ROUTE = "/aicluster/workers.json"
JOBS_ROUTE = "/aicluster/jobs.json"
TRANSFERS_ROUTE = "/aicluster/transfers.json"

_schedulers: "weakref.WeakSet" = weakref.WeakSet()
_collector = None


def rows_for(scheduler) -> list[dict]:
    tiers = _tier_order(scheduler)
    return worker_rows({addr: ws.identity() for addr, ws in scheduler.workers.items()}, tiers)


def _tier_order(scheduler) -> list[str]:
    return getattr(scheduler, "aicluster_tiers", None) or ["VRAM12", "VRAM6", "CPU"]


class HTTPStats(SchedulerPlugin):
    """Requests of the HTTP gateway, added up on the scheduler (a scheduler plugin): per
    route, model and status; time to first token, tokens and seconds, queue depth per model.
    Every ``aicluster serve`` process reports its requests as ``aicluster-http`` events."""

    name = "aicluster-http"
    idempotent = True
    topic = "aicluster-http"

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.ttft: dict[str, list[float]] = {}       # model -> [sum, count]
        self.tokens: dict[str, list[float]] = {}     # model -> [tokens, seconds]
        self.queue: dict[str, int] = {}

    async def start(self, scheduler) -> None:
        pass

    def log_event(self, topic, msg) -> None:
        if topic != self.topic or not isinstance(msg, dict):
            return
        key = (str(msg.get("route")), str(msg.get("model")), int(msg.get("status", 0)))
        self.requests[key] = self.requests.get(key, 0) + 1
        model = key[1]
        if msg.get("ttft") is not None:
            t = self.ttft.setdefault(model, [0.0, 0])
            t[0] += float(msg["ttft"])
            t[1] += 1
        if msg.get("tokens"):
            t = self.tokens.setdefault(model, [0.0, 0.0])
            t[0] += float(msg["tokens"])
            t[1] += float(msg.get("seconds") or 0)
        self.queue.update({str(k): int(v) for k, v in (msg.get("queue") or {}).items()})

    def rows(self) -> list[dict]:
        """One row per model: requests, errors, mean time to first token, tokens/s, queue."""
        models = sorted({m for _, m, _ in self.requests} | set(self.queue))
        out = []
        for m in models:
            n = sum(v for (_, mm, _), v in self.requests.items() if mm == m)
            errors = sum(v for (_, mm, st), v in self.requests.items() if mm == m and st >= 400)
            t, k = self.ttft.get(m, [0.0, 0]), self.tokens.get(m, [0.0, 0.0])
            out.append({"model": m, "requests": n, "errors": errors, "ttft_s": t[0] / t[1] if t[1] else None,
                        "tokens_per_second": k[0] / k[1] if k[1] else None, "queue": self.queue.get(m, 0)})
        return out


class WorkersJSON(web.RequestHandler):
    def initialize(self, dask_server=None, extra=None):
        self.server = dask_server

    def get(self):
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps({"workers": rows_for(self.server)}, default=str))


def transfer_rows(scheduler) -> list[dict]:
    plugin = scheduler.plugins.get(ModelFiles.name)
    return plugin.transfers() if plugin is not None and hasattr(plugin, "progress") else []


class TransfersJSON(web.RequestHandler):
    def initialize(self, dask_server=None, extra=None):
        self.server = dask_server

    def get(self):
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps({"transfers": transfer_rows(self.server)}, default=str))


class JobsJSON(web.RequestHandler):
    def initialize(self, dask_server=None, extra=None):
        self.server = dask_server

    def get(self):
        from .jobs import job_rows

        state = self.get_arguments("state") or None
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps({"jobs": job_rows(self.server, states=state)}, default=str))


def _models_doc(scheduler, extra, doc):
    from bokeh.models import ColumnDataSource, HoverTool
    from bokeh.palettes import Category10_10
    from bokeh.plotting import figure
    from distributed.dashboard.components.scheduler import BOKEH_THEME

    source = ColumnDataSource(dict(worker=[], left=[], right=[], model=[], color=[], mb=[], kind=[]))
    budget = ColumnDataSource(dict(worker=[], budget=[], label=[]))
    fig = figure(
        title="Resident models per worker (GB of the worker's model budget; simulated tiers hold models in RAM)",
        y_range=[], x_axis_label="GB", sizing_mode="stretch_both", tools="",
    )
    fig.hbar(y="worker", left="left", right="right", height=0.6, color="color", source=source, legend_field="model")
    fig.scatter(x="budget", y="worker", marker="dash", size=40, line_width=3, color="black", source=budget)
    fig.add_tools(HoverTool(tooltips=[("worker", "@worker"), ("model", "@model"), ("size", "@mb{0.0} MB"), ("memory", "@kind")]))

    def update():
        data = {k: [] for k in source.data}
        bud = {k: [] for k in budget.data}
        labels, colors = [], {}
        for r in rows_for(scheduler):
            tier = (r["tier"] or "no tier") + (" simulated" if r["simulated"] else "")
            label = f"{r['name']} [{tier}]" + (" PAUSED (memory)" if r.get("status") == "paused" else "")
            label += "".join(f" QUARANTINED {m} ({q.get('signal')})" for m, q in (r.get("quarantined") or {}).items())
            labels.append(label)
            left = 0.0
            for name, m in r["models"].items():
                gb = m["bytes"] / 1e9
                colors.setdefault(name, Category10_10[len(colors) % 10])
                for k, v in (("worker", label), ("left", left), ("right", left + gb), ("model", name),
                             ("color", colors[name]), ("mb", m["bytes"] / 1e6), ("kind", r["memory_kind"].upper())):
                    data[k].append(v)
                left += gb
            for name, nbytes in (r.get("shards") or {}).items():  # layers of a split model held here
                gb = nbytes / 1e9
                key = f"{name} (layers)"
                colors.setdefault(key, Category10_10[len(colors) % 10])
                for k, v in (("worker", label), ("left", left), ("right", left + gb), ("model", key),
                             ("color", colors[key]), ("mb", nbytes / 1e6), ("kind", r["memory_kind"].upper())):
                    data[k].append(v)
                left += gb
            bud["worker"].append(label)
            bud["budget"].append((r["budget"] or 0) / 1e9)
            bud["label"].append("budget")
        fig.y_range.factors = labels
        source.data = data
        budget.data = bud

    from bokeh.models import DataTable, TableColumn

    bench = ColumnDataSource(dict(worker=[], job=[], result=[], device=[]))
    table = DataTable(source=bench, height=160, sizing_mode="stretch_width", index_position=None, columns=[
        TableColumn(field="worker", title="worker [tier]"), TableColumn(field="job", title="last benchmark"),
        TableColumn(field="result", title="result"), TableColumn(field="device", title="device, dtype")])

    def update_bench():
        data = {k: [] for k in bench.data}
        for r in rows_for(scheduler):
            tier = (r["tier"] or "no tier") + (" simulated" if r["simulated"] else "")
            for job, b in r.get("bench", {}).items():
                data["worker"].append(f"{r['name']} [{tier}]")
                data["job"].append(job)
                data["result"].append(f"{b['value']:.1f} {b['unit']}")
                data["device"].append(f"{b['device']}, {b['dtype']}")
        bench.data = data

    http = ColumnDataSource(dict(model=[], requests=[], errors=[], ttft=[], tps=[], queue=[]))
    http_table = DataTable(source=http, height=120, sizing_mode="stretch_width", index_position=None, columns=[
        TableColumn(field="model", title="HTTP gateway: model"), TableColumn(field="requests", title="requests"),
        TableColumn(field="errors", title="errors"), TableColumn(field="ttft", title="time to first token"),
        TableColumn(field="tps", title="tokens/s"), TableColumn(field="queue", title="in flight")])

    def update_http():
        stats = scheduler.plugins.get(HTTPStats.name)
        rows = stats.rows() if stats else []
        http.data = {"model": [r["model"] for r in rows], "requests": [r["requests"] for r in rows],
                     "errors": [r["errors"] for r in rows],
                     "ttft": ["-" if r["ttft_s"] is None else f"{r['ttft_s'] * 1000:.0f} ms" for r in rows],
                     "tps": ["-" if r["tokens_per_second"] is None else f"{r['tokens_per_second']:.1f}" for r in rows],
                     "queue": [r["queue"] for r in rows]}

    moving = ColumnDataSource(dict(worker=[], model=[], file=[], size=[], done=[], speed=[], holders=[], state=[]))
    moving_table = DataTable(source=moving, height=140, sizing_mode="stretch_width", index_position=None, columns=[
        TableColumn(field="worker", title="model transfer: to worker"), TableColumn(field="model", title="model"),
        TableColumn(field="file", title="file"), TableColumn(field="size", title="size"),
        TableColumn(field="done", title="done"), TableColumn(field="speed", title="MB/s"),
        TableColumn(field="holders", title="from"), TableColumn(field="state", title="state")])

    def update_transfers():
        from dask.utils import format_bytes

        rows = transfer_rows(scheduler)
        moving.data = {"worker": [r["worker"] for r in rows], "model": [r["model"] for r in rows],
                       "file": [r.get("file", "") for r in rows],
                       "size": [format_bytes(r["size"]) if r.get("size") else "" for r in rows],
                       "done": [f"{100 * r['progress']:.0f}%" for r in rows],
                       "speed": ["-" if r["mb_per_s"] is None else f"{r['mb_per_s']:.1f}" for r in rows],
                       "holders": [r.get("holders", "") for r in rows],
                       "state": [r["state"] + (f": {r['error']}" if r.get("error") else "") for r in rows]}

    update()
    update_bench()
    update_http()
    update_transfers()
    doc.add_periodic_callback(update_transfers, 1000)
    doc.add_periodic_callback(update, 1000)
    doc.add_periodic_callback(update_bench, 5000)
    doc.add_periodic_callback(update_http, 2000)
    doc.title = "Dask: AI models"
    doc.add_root(fig)
    doc.add_root(table)
    doc.add_root(http_table)
    doc.add_root(moving_table)
    doc.theme = BOKEH_THEME


def register_page() -> None:
    """Add the Bokeh page to distributed's scheduler dashboard (idempotent)."""
    try:
        from distributed.dashboard import scheduler as dash
    except ImportError:  # bokeh missing: the JSON route and /metrics still work
        return
    dash.applications.setdefault(PAGE, _models_doc)


def _make_collector():
    from prometheus_client.core import GaugeMetricFamily

    class Collector:
        def collect(self):
            workers = GaugeMetricFamily("aicluster_workers", "Workers per tier", labels=["tier", "simulated"])
            budget = GaugeMetricFamily("aicluster_model_budget_bytes", "Bytes models may hold", labels=["worker", "tier"])
            used = GaugeMetricFamily("aicluster_model_used_bytes", "Bytes held by resident models", labels=["worker", "tier"])
            model = GaugeMetricFamily("aicluster_model_bytes", "Bytes of one resident model", labels=["worker", "tier", "model"])
            hits = GaugeMetricFamily("aicluster_model_hits", "Requests served by a resident model", labels=["worker", "model"])
            vram = GaugeMetricFamily("aicluster_vram_total_bytes", "GPU memory of a worker's device", labels=["worker", "tier"])
            shard = GaugeMetricFamily("aicluster_shard_bytes", "Bytes of a split model's layers this worker's shard "
                                      "server holds", labels=["worker", "tier", "model"])
            server = GaugeMetricFamily("aicluster_shard_server_up", "1 when the worker's shard server runs",
                                       labels=["worker", "tier", "endpoint"])
            counts: dict = {}
            for s in list(_schedulers):
                for r in rows_for(s):
                    tier = r["tier"] or "none"
                    key = (tier, str(r["simulated"]).lower())
                    counts[key] = counts.get(key, 0) + 1
                    if r["budget"]:
                        budget.add_metric([r["name"], tier], r["budget"])
                        used.add_metric([r["name"], tier], r["used"])
                    if r["vram_total"]:
                        vram.add_metric([r["name"], tier], r["vram_total"])
                    for name, m in r["models"].items():
                        model.add_metric([r["name"], tier, name], m["bytes"])
                        hits.add_metric([r["name"], name], m["hits"])
                    for name, nbytes in (r.get("shards") or {}).items():
                        shard.add_metric([r["name"], tier, name], nbytes)
                    for srv in r.get("shard_servers") or ([r["shard_server"]] if r.get("shard_server") else []):
                        server.add_metric([r["name"], tier, srv.get("endpoint", "?")], 1 if srv.get("alive") else 0)
            for key, n in counts.items():
                workers.add_metric(list(key), n)
            yield from (workers, budget, used, model, hits, vram, shard, server)
            yield from _http_metrics()

    return Collector()


def _http_metrics():
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    req = CounterMetricFamily("aicluster_http_requests", "HTTP gateway requests by route, model and status",
                              labels=["route", "model", "status"])
    ttft = GaugeMetricFamily("aicluster_http_time_to_first_token_seconds", "Mean time to the first token",
                             labels=["model"])
    tps = GaugeMetricFamily("aicluster_http_tokens_per_second", "Generated tokens per second of request time",
                            labels=["model"])
    queue = GaugeMetricFamily("aicluster_http_queue_depth", "Requests running or waiting per model", labels=["model"])
    for s in list(_schedulers):
        stats = s.plugins.get(HTTPStats.name)
        if stats is None:
            continue
        for (route, model, status), n in stats.requests.items():
            req.add_metric([route, model, str(status)], n)
        for r in stats.rows():
            if r["ttft_s"] is not None:
                ttft.add_metric([r["model"]], r["ttft_s"])
            if r["tokens_per_second"] is not None:
                tps.add_metric([r["model"]], r["tokens_per_second"])
            queue.add_metric([r["model"]], r["queue"])
    yield from (req, ttft, tps, queue)


def install(scheduler, tiers=None) -> None:
    """Add the JSON route and the Prometheus collector to a running scheduler."""
    global _collector
    if tiers:
        scheduler.aicluster_tiers = list(tiers)
    _schedulers.add(scheduler)
    app = getattr(scheduler, "http_application", None)
    if app is not None:
        app.add_handlers(r".*", [(ROUTE, WorkersJSON, {"dask_server": scheduler}),
                                 (JOBS_ROUTE, JobsJSON, {"dask_server": scheduler}),
                                 (TRANSFERS_ROUTE, TransfersJSON, {"dask_server": scheduler})])
    try:
        import prometheus_client
    except ImportError:
        return
    if _collector is None:
        _collector = _make_collector()
        prometheus_client.REGISTRY.register(_collector)
