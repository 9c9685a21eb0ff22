"""Benchmark jobs, the seed's job format and reports, on real (in-process) clusters.

Tiers are forced, so the VRAM workers are simulated and run on the CPU: the numbers are
CPU numbers, and every report says so. No GPU code path runs here."""
from __future__ import annotations

import csv
import json
import subprocess
import time

import pytest

from cluster import connect
from conftest import BIN, base_config
from workloads import bench

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_matrix_multiply_checks_against_float64():
    r = bench.matrix_multiply(size=64, iterations=3)
    assert r["check"]["passed"] and r["metric"] == "GFLOP/s" and r["value"] > 0
    assert r["device"] == "cpu" and r["dtype"] == "float32" and r["iterations"] == 3
    assert r["time_min"] <= r["time_median"]


def test_vector_addition_reports_transfers_apart():
    r = bench.vector_addition(size=10_000, iterations=5)
    assert r["check"]["passed"] and r["unit"] == "GB/s"
    assert r["transfer_to_device_s"] == 0.0 and r["transfer_to_host_s"] == 0.0  # a CPU device copies nothing


def test_neural_network_trains_and_the_loss_falls():
    r = bench.neural_network(epochs=4, batch_size=32, input_size=64, hidden_size=32, output_size=4)
    curve = r["loss_curve"]
    assert len(curve) == 4 and curve[-1] < curve[0] and r["check"]["passed"]
    assert r["unit"] == "samples/s" and r["value"] > 0


def test_image_processing_checks_a_convolution():
    r = bench.image_processing(batch_size=2, image_size=32, iterations=2)
    assert r["check"]["passed"] and r["unit"] == "images/s"


@pytest.mark.parametrize("job, message", [
    ({"job_type": "fft", "size": 10}, "unknown job_type 'fft'"),
    ({"job_type": "matrix_multiply"}, "parameter 'size' is missing"),
    ({"job_type": "matrix_multiply", "size": -5}, "parameter 'size' must be positive, got -5"),
    ({"job_type": "vector_addition", "size": "big"}, "parameter 'size' must be an integer"),
    ({"job_type": "image_processing", "batch_size": 2, "colour": True}, "unknown parameter(s) colour"),
    ("matrix_multiply", "a job must be a JSON object"),
])
def test_bad_job_dicts_name_the_problem(job, message):
    with pytest.raises(bench.BenchJobError) as e:
        bench.validate_job(job)
    assert message in str(e.value)


def test_seed_jobs_land_on_the_requested_tier_and_bad_ones_do_not_stop_the_rest(tiers):
    jobs = [
        {"job_type": "matrix_multiply", "size": 64, "iterations": 2, "prefer_gpu": True},
        {"job_type": "matrix_multiply", "size": 64, "iterations": 2, "prefer_gpu": False},
        {"job_type": "vector_addition", "size": 1000, "iterations": 2, "prefer_gpu": True},
        {"job_type": "nope"},
        {"job_type": "neural_network", "epochs": 0},
        {"job_type": "image_processing", "batch_size": 1, "image_size": 16, "iterations": 1, "prefer_gpu": False},
    ]
    seen = []
    res = tiers.run_jobs(jobs, on_result=seen.append, progress=False)
    out = res["results"]
    assert len(seen) == 6
    assert [o["status"] for o in out] == ["completed", "completed", "completed", "failed", "failed", "completed"]
    assert (out[0]["tier"], out[0]["worker"], out[0]["worker_type"]) == ("VRAM12", "pc1", "GPU")
    assert (out[1]["tier"], out[1]["worker"], out[1]["worker_type"]) == ("CPU", "cpu", "CPU")
    # the VRAM12 worker is busy with job 0: the next prefer_gpu job takes the free VRAM6 worker
    assert (out[2]["tier"], out[2]["worker"]) == ("VRAM6", "pc2") and out[5]["tier"] == "CPU"
    assert "unknown job_type 'nope'" in out[3]["error"] and "'epochs' must be positive" in out[4]["error"]
    st = res["stats"]
    assert st["completed"] == 4 and st["failed"] == 2 and st["jobs_per_second"] > 0 and st["simulated"]
    counts = {(r["job_type"], r["tier"]): r["count"] for r in st["by_type_and_tier"]}
    assert counts == {("image_processing", "CPU"): 1, ("matrix_multiply", "CPU"): 1, ("matrix_multiply", "VRAM12"): 1,
                      ("vector_addition", "VRAM6"): 1}
    assert st["jobs_per_worker"] == {"cpu": 2, "pc1": 1, "pc2": 1}
    assert set(st["gpu_over_cpu_speedup"]) == {"matrix_multiply"}  # the only job run on both sides


def test_prefer_gpu_falls_back_to_cpu_when_no_gpu_worker():
    data = base_config()
    data["local"]["workers"] = [{"name": "cpu", "tier": "CPU", "nthreads": 1, "memory_limit": "1GB"}]
    with connect(data, processes=False, dashboard_port=0) as ai:
        out = ai.run_jobs([{"job_type": "matrix_multiply", "size": 32, "iterations": 1, "prefer_gpu": True}], progress=False)
        assert out["results"][0]["tier"] == "CPU"


def test_suite_report_has_a_row_per_job_and_worker_and_valid_charts(tiers, tmp_path):
    import matplotlib.image as mpimg

    records = tiers.bench("quick", report=str(tmp_path), progress=False)
    assert len(records) == 4 * 3 and all(r["check"]["passed"] for r in records)
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert sorted((r["job_type"], r["worker"]) for r in rows) == sorted(
        (j, w) for j in ("matrix_multiply", "vector_addition", "neural_network", "image_processing") for w in ("pc1", "pc2", "cpu"))
    assert {r["simulated"] for r in rows if r["worker"] != "cpu"} == {"True"}
    md = (tmp_path / "report.md").read_text()
    table_rows = [l for l in md.splitlines() if l.startswith("| ") and "| float32 |" in l]
    assert sum(l.startswith("| pc1 (VRAM12, simulated) | cpu (simulated GPU) |") for l in table_rows) == 4
    assert sum(l.startswith("| cpu (CPU) | cpu (") for l in table_rows) == 4
    assert "## Speedup over the CPU tier" in md and "simulated" in md
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["image_processing.png", "loss_curves.png", "matrix_multiply.png", "neural_network.png", "vector_addition.png"]
    for p in tmp_path.glob("*.png"):
        assert p.read_bytes()[:8] == PNG_MAGIC
        assert mpimg.imread(p).shape[2] in (3, 4)
    # each node keeps its last benchmark: in its heartbeat (status) and in a JSON file
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = {r["name"]: r for r in tiers.status()}
        if all("image_processing" in r["bench"] for r in rows.values()):
            break
        time.sleep(0.2)
    assert rows["cpu"]["bench"]["matrix_multiply"]["unit"] == "GFLOP/s"
    assert "last benchmarks:" in str(tiers.status())
    import os

    node_file = json.loads((open(os.path.join(os.environ["AICLUSTER_BENCH_DIR"], "pc1.json")).read()))
    assert any(k.startswith("matrix_multiply|cpu|float32|iterations=5,size=256") for k in node_file)


def test_chosen_tiers_and_unknown_workers(tiers):
    recs = tiers.bench("quick", tiers=["CPU"], progress=False)
    assert {r["worker"] for r in recs} == {"cpu"}
    with pytest.raises(ValueError, match="no such worker"):
        tiers.bench("quick", workers=["pc9"], progress=False)


@pytest.mark.slow
def test_model_throughput_suite(ai, tmp_path):
    recs = ai.bench("models", workers=["pc1"], report=str(tmp_path), progress=False)
    llm = [r for r in recs if r["job_type"] == "llm_throughput"]
    emb = [r for r in recs if r["job_type"] == "embed_throughput"]
    assert {(r["params"]["batch_size"], r["params"]["context_length"]) for r in llm} == {(1, 32), (2, 32), (1, 256), (2, 256)}
    assert all(r["value"] > 0 and r["unit"] == "tokens/s" for r in llm)
    # prefill and decode timed apart; a check that can fail: every request reached max_tokens
    # (or a stop), and the lone request equals a fresh single-sequence context
    assert all(r["prefill_seconds"] > 0 and r["prefill_tokens_per_second"] > 0 for r in llm)
    assert all(r["check"]["passed"] for r in llm), [r["check"] for r in llm]
    assert any("equals a fresh single-sequence context" in r["check"]["detail"] for r in llm)
    assert {r["params"]["batch_size"] for r in emb} == {16, 64} and all(r["unit"] == "vectors/s" for r in emb)
    assert (tmp_path / "llm_throughput.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_submit_command_writes_lines_and_statistics(ai, tmp_path, env_with_tests):
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([
        {"job_type": "matrix_multiply", "size": 64, "iterations": 2, "prefer_gpu": True},
        {"job_type": "matrix_multiply", "size": 64, "iterations": 2, "prefer_gpu": False},
        {"job_type": "warp_drive", "size": 1},
    ]))
    out = tmp_path / "results.jsonl"
    r = subprocess.run([str(BIN / "aicluster"), "submit", str(jobs), "-o", str(out), "--address", ai.scheduler_address],
                       env=env_with_tests, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1  # one job failed; the others finished
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert sorted(l["status"] for l in lines) == ["completed", "completed", "failed"]
    assert "unknown job_type 'warp_drive'" in r.stderr
    assert "matrix_multiply  VRAM12 (simulated)" in r.stdout and "GPU over CPU speedup, matrix_multiply" in r.stdout
    assert "2 completed, 1 failed" in r.stdout


def test_a_job_that_raises_is_an_error_row_and_the_suite_goes_on(tiers, tmp_path, monkeypatch):
    from cluster import bench_report

    monkeypatch.setitem(bench_report.SUITES, "broken", [("matrix_multiply", {"size": -4, "iterations": 1}),
                                                       ("vector_addition", {"size": 100, "iterations": 1})])
    recs = tiers.bench("broken", workers=["cpu"], report=str(tmp_path), progress=False)
    assert [("error" in r, r["job_type"]) for r in recs] == [(True, "matrix_multiply"), (False, "vector_addition")]
    md = (tmp_path / "report.md").read_text()
    assert "1 jobs raised an error" in md and "| matrix_multiply | cpu (CPU) |" in md
