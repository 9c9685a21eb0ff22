"""The scheduler's AI views over HTTP: the Bokeh page, the JSON route, Prometheus /metrics."""
from __future__ import annotations

import json
import time
import urllib.request

import pytest

pytestmark = pytest.mark.slow


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        return r.read().decode()


@pytest.fixture(scope="module")
def base(ai):
    ai.embed_now(["resident for the dashboard"])
    deadline = time.monotonic() + 30
    url = ai.dashboard_link.rsplit("/", 1)[0]
    while time.monotonic() < deadline:
        rows = json.loads(get(url + "/aicluster/workers.json"))["workers"]
        if any("minilm" in r["models"] for r in rows):
            return url
        time.sleep(0.3)
    raise AssertionError("minilm never showed up in the JSON route")


def test_json_route_lists_workers_tiers_and_models(base):
    rows = {r["name"]: r for r in json.loads(get(base + "/aicluster/workers.json"))["workers"]}
    assert {n: (r["tier"], r["simulated"]) for n, r in rows.items()} == {
        "pc1": ("VRAM12", True), "pc2": ("VRAM6", True), "cpu": ("CPU", False)}
    assert rows["pc2"]["models"]["minilm"]["bytes"] > 50e6
    from cluster.plugin import ram_budget

    assert rows["pc2"]["budget"] == ram_budget(0.8, 4 * 10**9, 0.8)  # below Dask's pause threshold


def test_prometheus_metrics_carry_aicluster_gauges(base):
    text = get(base + "/metrics")
    assert 'aicluster_workers{simulated="true",tier="VRAM12"} 1.0' in text
    assert 'aicluster_workers{simulated="false",tier="CPU"} 1.0' in text
    line = next(l for l in text.splitlines()
                if l.startswith("aicluster_model_bytes{") and 'model="minilm"' in l and 'worker="pc2"' in l)
    assert 'tier="VRAM6"' in line and float(line.rsplit(" ", 1)[1]) > 50e6


def test_models_page_is_served_and_listed_in_the_menu(base):
    page = get(base + "/individual-aicluster-models")
    assert "bokeh" in page.lower()
    assert "Dask: AI models" in page
    status = get(base + "/status")
    assert "individual-aicluster-models" in status


def test_models_page_plots_the_resident_models(ai, base):
    def plot_data(dask_scheduler):
        from bokeh.document import Document

        from cluster.dashboard import _models_doc

        doc = Document()
        _models_doc(dask_scheduler, {}, doc)
        fig = doc.roots[0]
        bars = next(r.data_source.data for r in fig.renderers if "model" in r.data_source.data)
        return {"title": fig.title.text, "factors": list(fig.y_range.factors),
                "bars": list(zip(bars["worker"], bars["model"], bars["mb"]))}

    d = ai.client.run_on_scheduler(plot_data)
    assert "pc2 [VRAM6 simulated]" in d["factors"] and "cpu [CPU]" in d["factors"]
    assert any(w == "pc2 [VRAM6 simulated]" and m == "minilm" and mb > 50 for w, m, mb in d["bars"])
