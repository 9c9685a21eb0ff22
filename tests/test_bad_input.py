"""The bad-input table: each bad input ends in one line that names it (a non-zero exit for a
command), never a traceback, and loses nothing. Real clusters and real subprocesses."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import yaml

from cluster.config import ConfigError, load_config
from conftest import base_config
from procs import run


def _no_traceback(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-2000:]


def test_config_that_is_not_utf8_names_file_and_line(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_bytes(yaml.safe_dump(base_config()).encode() + b"# caf\xe9 in Latin-1\n")
    with pytest.raises(ConfigError, match=r"config.yaml:\d+: not UTF-8 text \(byte 0xe9\)"):
        load_config(cfg)


@pytest.mark.parametrize("path, value, says", [
    (("tiers", "VRAM12", "min_vram"), "-10GB", "tiers.VRAM12.min_vram: a size cannot be negative"),
    (("models", "minilm", "footprint"), "-150MB", "models.minilm.footprint: a size cannot be negative"),
    (("models", "minilm", "footprint"), -5, "models.minilm.footprint: a size cannot be negative"),
    (("scheduler", "address"), "http://pc1:8786", "scheduler.address: 'http://pc1:8786' is a web address"),
    (("scheduler", "address"), "tcp://pc1", "scheduler.address: 'tcp://pc1' has no port"),
])
def test_bad_config_values_name_the_key(path, value, says):
    data = base_config()
    node = data
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as e:
        load_config(data)
    assert says in str(e.value)


def test_tls_without_certificates_says_how_to_make_them():
    data = base_config()
    data["security"]["tls"] = True
    data["scheduler"]["address"] = "tls://127.0.0.1:8786"
    with pytest.raises(ConfigError, match="security.ca_file: needed when security.tls is true .*aicluster certs"):
        load_config(data)


def test_one_stop_string_is_one_stop(tiers):
    # "END" is one stop string, not the stop strings "E", "N" and "D"
    whole = tiers.generate_now("Count: one two three four", max_tokens=12)
    cut = whole["text"].split()[1] if len(whole["text"].split()) > 1 else None
    assert cut, whole
    r = tiers.generate_now("Count: one two three four", max_tokens=12, stop=cut)
    assert r["finish_reason"] == "stop" and cut not in r["text"]
    assert r["text"] == whole["text"][: whole["text"].index(cut)]


def test_prompt_over_the_context_is_refused_before_any_model_work(tiers):
    from workloads.backends import ContextTooLong

    jobs_before = len(tiers.jobs())
    long = "word " * 3000
    with pytest.raises(ContextTooLong, match="context of 2048 tokens"):
        tiers.generate(long, max_tokens=8)           # at the caller: nothing was submitted
    with pytest.raises(ContextTooLong, match="prompt 1 is"):
        tiers.generate(["short", long], max_tokens=8)
    assert len(tiers.jobs()) == jobs_before
    # a worker that gets such a prompt anyway (a caller without the model file) refuses it
    # before it loads or waits for the model
    from workloads.llm import generate_task

    def loads(dask_worker):
        return dask_worker.plugins["aicluster-modelhost"].load_counts.get("gemma-270m", 0)

    tiers.unload("gemma-270m")
    before = tiers.client.run(loads)
    spec, route = tiers.core.model_route("gemma-270m", ("llamacpp",), "generate")
    f = tiers.core.submit_routed(route, "raw", generate_task, long, "gemma-270m", spec,
                                 dict(max_tokens=8, temperature=0.0, top_p=1.0, stop=[], seed=None))
    with pytest.raises(ContextTooLong):
        f.result(timeout=60)
    assert tiers.client.run(loads) == before


def test_text_longer_than_the_embedding_model_reads_is_refused_at_the_caller(tiers):
    from workloads.backends import InputError

    jobs_before = len(tiers.jobs())
    with pytest.raises(InputError, match="text 1 is .* tokens; model 'minilm' reads at most 256"):
        tiers.embed(["fine", "graphics " * 400])
    assert len(tiers.jobs()) == jobs_before
    assert tiers.embed_now(["fine", "graphics " * 400], truncate=True).shape == (2, 384)


def test_bad_job_fields_are_error_lines(tiers):
    res = tiers.run_jobs([{"job_type": "matrix_multiply", "size": 64, "iterations": 2, "prefer_gpu": "no"},
                          {"job_type": "matrix_multiply", "size": 64, "iterations": 2, "prefer_gpu": False}],
                         progress=False)
    bad, good = res["results"]
    assert bad["status"] == "failed" and "prefer_gpu must be true or false, got 'no'" in bad["error"]
    assert good["status"] == "completed"


@pytest.mark.slow
def test_cli_bad_numbers_and_encodings(tmp_path, env_with_tests):
    texts = tmp_path / "t.txt"
    texts.write_text("one\ntwo\n")
    r = run(["embed", str(texts), "-o", str(tmp_path / "v.npy"), "--chunk-size", "0"], env_with_tests)
    _no_traceback(r)
    assert "--chunk-size" in r.stderr and "0 is not in the range x>=1" in r.stderr
    r = run(["embed", str(texts), "-o", str(tmp_path / "v.npy"), "--batch-size", "-3"], env_with_tests)
    _no_traceback(r)
    assert "--batch-size" in r.stderr and "-3 is not in the range x>=1" in r.stderr
    latin = tmp_path / "latin.txt"
    latin.write_bytes("first\nsecond caf\xe9\n".encode("latin-1"))
    r = run(["embed", str(latin), "-o", str(tmp_path / "v.npy")], env_with_tests)
    _no_traceback(r)
    assert "latin.txt:2: not UTF-8 text (byte 0xe9" in r.stderr
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    r = run(["generate", "--prompts", str(prompts), "-o", str(tmp_path / "a.jsonl")], env_with_tests)
    _no_traceback(r)
    assert "p.jsonl:2: not UTF-8 text" in r.stderr
    jobs = tmp_path / "jobs.json"
    jobs.write_bytes(b'[{"job_type": "matrix_multiply",\n "size": 10, "note": "\xff"}]')
    r = run(["submit", str(jobs)], env_with_tests)
    _no_traceback(r)
    assert "jobs.json:2: not UTF-8 text" in r.stderr
    assert not (tmp_path / "v.npy").exists() and not (tmp_path / "a.jsonl").exists()


@pytest.mark.slow
def test_up_on_a_busy_port_says_so(env_with_tests):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run(["up", "--scheduler-port", str(port), "--dashboard-port", "0"], env_with_tests, timeout=120)
    _no_traceback(r)
    assert "a port is already in use" in r.stderr and "--scheduler-port 0" in r.stderr


@pytest.mark.slow
def test_connect_at_module_level_of_a_script_says_what_to_do(tmp_path, env_with_tests):
    script = tmp_path / "job.py"
    script.write_text("from cluster import connect\nai = connect(dashboard_port=0)\nprint(ai.status())\nai.close()\n")
    r = subprocess.run([sys.executable, str(script)], env=env_with_tests, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert f"{script}:2: connect() is called at the top level of this script" in r.stderr
    assert 'if __name__ == "__main__":' in r.stderr
    assert "bootstrapping phase" not in r.stderr and r.stderr.count("Traceback") <= 1
    guarded = tmp_path / "guarded.py"
    guarded.write_text("from cluster import connect\n\n\ndef main():\n    with connect(dashboard_port=0) as ai:\n"
                       "        print(ai.submit(sum, [1, 2], tier='CPU').result())\n\n\n"
                       "if __name__ == '__main__':\n    main()\n")
    r = subprocess.run([sys.executable, str(guarded)], env=env_with_tests, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "3"


def test_dask_aicluster_is_a_dask_subcommand(env_with_tests):
    from conftest import BIN

    r = subprocess.run([str(BIN / "dask"), "aicluster", "status", "--help"], env=env_with_tests, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: dask aicluster status")
