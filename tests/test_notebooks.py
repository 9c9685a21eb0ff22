"""Every notebook in notebooks/ runs top to bottom (so they never rot)."""
from __future__ import annotations


import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT

pytestmark = pytest.mark.slow

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS][:4] == ["01_quickstart.ipynb", "02_pipelines.ipynb", "03_benchmarks.ipynb",
                                               "04_pooled_vram.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", iopub_timeout=30, raise_on_iopub_timeout=True,
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    # the embedded cluster is quiet: Dask's INFO logs would bury the notebook's own output
    logs = [l for c in nb.cells for o in c.get("outputs", []) for l in (o.get("text") or "").splitlines() if " - INFO - " in l]
    assert not logs, logs[:5]
    if path.name == "01_quickstart.ipynb":
        text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                         if o.output_type == "stream")
        assert "loaded the model again: False" in text
        assert "gemma-270m" in text and "minilm" in text and "simulated" in text
    if path.name == "02_pipelines.ipynb":
        text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                         if o.output_type == "stream")
        assert "pipeline 'rag'" in text and "refers to 'vectorz'" in text and "cancelled" in text
    if path.name == "03_benchmarks.ipynb":
        text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                         if o.output_type == "stream")
        assert "matrix_multiply" in text and "VRAM12 (simulated)" in text and "last benchmarks:" in text
        assert "parameter 'size' must be positive" in "\n".join(
            str(o.get("data", {}).get("text/plain", "")) for c in nb.cells for o in c.get("outputs", []))
    if path.name == "04_pooled_vram.ipynb":
        text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                          if o.output_type == "stream")
        html = "\n".join(str(o.get("data", {}).get("text/html", "")) for c in nb.cells for o in c.get("outputs", []))
        assert "head" in html and "+ output" in html  # the plan's table
        assert "ShardPlanError" in text and "nobody" in text
        assert "head: pc1" in text and "shard servers (ggml RPC" in text and "gemma-270m-split" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the plot was not drawn"
