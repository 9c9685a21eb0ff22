"""Faults: memory pressure, restarted workers, a worker list that cannot lie (issue 12).

Real Dask workers (Nanny processes) with real memory: a test fills a worker's memory with
an array it keeps, so that Dask's own monitor pauses the worker.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager

import pytest

from conftest import base_config


def one_worker(tier: str = "CPU", memory_limit: str = "2GB", grace: float = 300) -> dict:
    data = base_config()
    data["local"]["workers"] = [{"name": "w1", "tier": tier, "nthreads": 1, "memory_limit": memory_limit}]
    data["routing"]["restart_grace"] = grace
    return data


# -- run on the worker --------------------------------------------------------------------------
_BALLAST: list = []


def _fill(nbytes: int) -> int:
    """Keep ``nbytes`` of touched memory in the worker (as data a task left behind would)."""
    import numpy as np

    _BALLAST.append(np.ones(max(int(nbytes), 1), dtype=np.uint8))
    return len(_BALLAST)


def _empty() -> None:
    _BALLAST.clear()
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss(dask_worker=None) -> int:
    """The memory Dask's thresholds compare: the worker process and its models' engine
    processes (ModelHost counts those in, cluster/plugin.py)."""
    return dask_worker.monitor.get_process_memory()


def _evictions(dask_worker=None) -> list:
    from cluster.plugin import PLUGIN_NAME

    return list(dask_worker.plugins[PLUGIN_NAME].evictions)


def _status(dask_worker=None) -> str:
    return dask_worker.status.name


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        out = pred()
        if out:
            return out
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_budget_leaves_room_under_the_pause_threshold():
    from cluster.plugin import ram_budget

    assert ram_budget(0.8, 8 * 10**9, 0.8) == int(0.8 * 8e9 - 0.1 * 8e9)      # 10% of the limit
    assert ram_budget(0.8, 2 * 10**9, 0.8) == int(0.8 * 2e9 - 512 * 2**20)    # at least 512 MiB
    assert ram_budget(0.5, 4 * 10**9, 0.8) == int(0.5 * 4e9)                   # a smaller budget stays
    assert ram_budget(0.8, 4 * 10**9, None) == int(0.8 * 4e9)                  # a worker that never pauses


def test_paused_worker_unloads_idle_models_and_resumes():
    """A worker pushed over Dask's pause threshold while a model is resident: ModelHost
    unloads the model (no task uses it), the worker resumes, and the job waiting for it runs."""
    from cluster import connect

    with connect(one_worker(memory_limit="4GB"), dashboard_port=0) as ai:
        addr = next(iter(ai.live_tiers()["CPU"]))
        ai.generate_now("Hello", model="gemma-270m", tier="CPU", max_tokens=2)
        model_bytes = ai.client.run(lambda dask_worker: dask_worker.plugins["aicluster-modelhost"].used)[addr]
        rss = ai.client.run(_rss)[addr]
        limit = 4 * 10**9
        # over the pause threshold (0.8) with the model, and under it without the model; far
        # from the nanny's 0.95 (it would restart the worker)
        ai.client.run(_fill, int(0.8 * limit - rss + min(model_bytes // 2, 0.1 * limit)))
        try:
            _wait(lambda: "gemma-270m" in ai.client.run(_evictions)[addr], 60, "the model to be evicted")
            assert ai.submit(sum, [1, 2], tier="CPU").result(timeout=120) == 3
            assert ai.client.run(_status)[addr] == "running"
        finally:
            ai.client.run(_empty)


def test_worker_paused_for_good_fails_the_task_naming_it():
    """A worker that stays paused (memory its models do not hold): a task for its tier fails
    after routing.restart_grace with an error naming the worker and its memory, and status
    shows it paused; once the memory is freed the worker takes work again."""
    from cluster import connect
    from cluster.routing import WorkersPaused

    with connect(one_worker(grace=3), dashboard_port=0) as ai:
        addr = next(iter(ai.live_tiers()["CPU"]))
        rss = ai.client.run(_rss)[addr]
        ai.client.run(_fill, int(0.85 * 2 * 10**9 - rss))
        try:
            _wait(lambda: ai.client.run(_status)[addr] == "paused", 30, "the worker to pause")
            with pytest.raises(WorkersPaused, match=r"w1 \(.*of 1\.86 GiB\).*restart_grace"):
                ai.submit(sum, [1, 2], tier="CPU").result(timeout=120)
            text = _wait(lambda: (lambda t: t if "PAUSED" in t else None)(str(ai.status())), 10, "status to say so")
            assert "PAUSED: w1" in text and "(PAUSED)" in text
        finally:
            ai.client.run(_empty)
        _wait(lambda: ai.client.run(_status)[addr] == "running", 30, "the worker to resume")
        assert ai.submit(sum, [1, 2], tier="CPU").result(timeout=60) == 3


def test_task_of_a_crashed_worker_runs_when_it_is_back_not_after_the_grace():
    """The tier's only worker dies mid-generation; its nanny restarts it (a new address). The
    generation, pinned to the old worker by model affinity, runs on the new one as soon as it
    joins, not after routing.restart_grace (300 s here)."""
    from cluster import connect

    with connect(one_worker(tier="VRAM12", memory_limit="3GB", grace=300), dashboard_port=0) as ai:
        ai.generate_now("warm", max_tokens=2)
        time.sleep(1.5)  # the heartbeat says the model is resident: the next task is pinned there
        f = ai.generate("Tell a long story about a lighthouse.", max_tokens=200)
        pid = next(iter(ai.client.run(os.getpid).values()))
        time.sleep(2)
        os.kill(pid, signal.SIGKILL)
        out = f.result(timeout=150)  # a hang guard, far below the 300 s grace
        assert out["completion_tokens"] == 200
        # it ran on the restarted worker (a new process), moved there by the TierGuard
        assert next(iter(ai.client.run(os.getpid).values())) != pid
        assert ai.client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins["aicluster-tier-guard"].rerouted) >= 1


# -- the facade's worker list ----------------------------------------------------------------
def test_routing_never_reports_a_false_no_worker():
    """20,000 routing decisions while two other clients submit work: not one false
    NoWorkerForTier (the client's cached identity used to list no workers now and then)."""
    from distributed import Client

    from cluster import connect
    from conftest import three_tier_config

    with connect(three_tier_config(), processes=False, dashboard_port=0) as ai:
        stop = threading.Event()
        done, busy = [], threading.Semaphore(0)

        def other_client():
            with Client(ai.scheduler_address, timeout=30) as c:
                n = 0
                while not stop.is_set() and n < 20_000:
                    c.gather([c.submit(sum, [i, n], resources={"CPU": 1}, pure=False) for i in range(20)])
                    n += 20
                    if n == 20:
                        busy.release()
                done.append(n)

        threads = [threading.Thread(target=other_client) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            assert busy.acquire(timeout=60) and busy.acquire(timeout=60)  # both are submitting
            tiers = ["CPU", "VRAM6", "VRAM12"]
            routes = [ai.route(tiers[i % 3]).tier for i in range(20_000)]
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert routes.count("CPU") > 6000 and set(routes) == {"CPU", "VRAM6", "VRAM12"}
        assert len(done) == 2 and all(n > 0 for n in done)


def test_worker_view_follows_joins_leaves_and_checks_before_failing():
    from distributed import Worker

    from cluster import connect
    from cluster.routing import NoWorkerForTier
    from conftest import three_tier_config

    data = three_tier_config()
    data["local"]["workers"] = data["local"]["workers"][:1]  # pc1, VRAM12 only
    data["routing"]["fallback"]["VRAM6"] = []
    with connect(data, processes=False, dashboard_port=0) as ai:
        with pytest.raises(NoWorkerForTier, match="VRAM6"):
            ai.route("VRAM6")

        async def start():
            return await Worker(ai.scheduler_address, resources={"VRAM6": 1}, nthreads=1, name="late")

        w = ai.client.sync(start)
        try:
            _wait(lambda: "VRAM6" in ai.live_tiers(), 10, "the join to reach the view")
            assert ai.route("VRAM6").tier == "VRAM6"
        finally:
            ai.client.sync(w.close)
        _wait(lambda: "VRAM6" not in ai.live_tiers(), 10, "the leave to reach the view")
        # it left moments ago (a crash, say: its nanny restarts it): a call waits for it
        assert ai.route("VRAM6").tier == "VRAM6"
        # so does one from a client that connects only now (the scheduler remembers who left)
        late = connect(data, address=ai.scheduler_address)
        try:
            assert late.route("VRAM6").tier == "VRAM6"
        finally:
            late.client.close()
        # a view that lost its events (a scheduler restart) is checked before an error
        ai.core.view._workers.clear()
        assert ai.route("VRAM12").tier == "VRAM12"


# -- poison jobs -----------------------------------------------------------------------------
def test_a_job_no_worker_can_hold_is_refused_before_it_runs(tiers):
    from cluster.bench_report import run_jobs

    jobs = [{"job_type": "matrix_multiply", "size": 25000}, {"job_type": "matrix_multiply", "size": 64, "iterations": 2}]
    outcomes, _ = run_jobs(tiers.core, jobs, progress=False)
    assert outcomes[0]["status"] == "failed"
    assert "matrix_multiply (size=25000, iterations=10, float32) needs about 11.64 GiB" in outcomes[0]["error"]
    assert "the most is" in outcomes[0]["error"] and "Lower its parameters" in outcomes[0]["error"]
    assert outcomes[1]["status"] == "completed"


def test_a_job_goes_only_to_workers_that_can_hold_it():
    """Two CPU workers, one with 6 GB, one with 2 GB: a 2.5 GB job is pinned to the big one."""
    from cluster import connect
    from cluster.routing import ANNOTATION
    from conftest import three_tier_config
    from workloads.bench import job_memory
    from cluster.bench_report import route_for_job, worker_room

    data = three_tier_config()
    data["local"]["workers"] = [{"name": "big", "tier": "CPU", "nthreads": 1, "memory_limit": "6GB"},
                                {"name": "small", "tier": "CPU", "nthreads": 1, "memory_limit": "2GB"}]
    with connect(data, processes=False, dashboard_port=0) as ai:
        job = {"job_type": "vector_addition", "size": 90_000_000, "iterations": 1}
        assert 2e9 < job_memory("vector_addition", {"size": 90_000_000, "iterations": 1}) < 3e9
        room = worker_room(ai.core.workers())
        route = route_for_job(ai.core, job, room)
        assert [room[w][0] for w in route.workers] == ["big"]
        small = {"job_type": "vector_addition", "size": 1000}
        assert route_for_job(ai.core, small, room).workers == []  # any worker
        assert ANNOTATION  # (the job board shows where it ran)


def test_jobs_that_shared_a_killed_worker_run_again_and_complete():
    """The worker dies (SIGKILL) while jobs run and wait on it; with allowed-failures 0 they
    all get KilledWorker. run_jobs runs them again one at a time: all complete, marked retried."""
    import dask

    from cluster import connect
    from cluster.bench_report import run_jobs

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with connect(one_worker(memory_limit="3GB", grace=120), dashboard_port=0) as ai:
            pid = next(iter(ai.client.run(os.getpid).values()))
            jobs = [{"job_type": "matrix_multiply", "size": 1000, "iterations": 20, "job_id": f"j{i}"} for i in range(3)]
            box = {}
            t = threading.Thread(target=lambda: box.update(out=run_jobs(ai.core, jobs, progress=False, in_flight=3)))
            t.start()
            _wait(lambda: ai.jobs(state="running"), 60, "a job to start")
            time.sleep(0.5)
            os.kill(pid, signal.SIGKILL)
            t.join(300)
            outcomes, _ = box["out"]
    assert [o["status"] for o in outcomes] == ["completed"] * 3, outcomes
    assert any(o.get("retried") for o in outcomes)


# -- the scheduler restarts -------------------------------------------------------------------
def _processing(dask_scheduler=None) -> int:
    return sum(ts.state == "processing" for ts in dask_scheduler.tasks.values())


def _processing_of_others(clients: list, dask_scheduler=None) -> int:
    """Generations running for clients other than ``clients``."""
    return sum(ts.state == "processing" and str(ts.key).startswith("generate-")
               and not any(cs.client_key in clients for cs in ts.who_wants or ())
               for ts in dask_scheduler.tasks.values())


def test_scheduler_restart_loses_nothing_that_can_be_redone(tmp_path, env_with_tests):
    """The scheduler PC is killed and started again while `aicluster generate` runs and
    while this process holds facade futures. Everything that can be redone is submitted
    again under the same key and completes: the CLI's answers (reported as retried, each
    written once), generations, an embedding, a `submit` with `retries`, a stream that had
    sent text (it goes on from that text: each piece once), and a result that had already
    finished and been fetched (it is given back as fetched, not generated again: sampled
    text would differ). What cannot be redone says so: a `submit` without `retries` (it may
    have side effects). The job board (SQLite on the scheduler) keeps what ran before; the rows cut off
    by the restart read `lost` until they are submitted again, then count it."""
    import json
    from concurrent.futures import CancelledError

    import numpy as np
    import yaml
    from distributed import Client

    from cluster import connect
    from cluster.jobs import SchedulerLost, failure
    from conftest import free_port
    from procs import proc, read_until, run

    data = base_config()
    data["worker"]["reconnect"] = {"initial_delay": 0.5, "max_delay": 1}
    data["scheduler"]["jobs_db"] = str(tmp_path / "jobs.sqlite3")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(data))
    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    env = {**env_with_tests, "AICLUSTER_CONFIG": str(cfg)}
    sched_args = ["aicluster", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-port", "0"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Story number {i} about a lighthouse:"}) + "\n"
                               for i in range(3)))
    out = tmp_path / "answers.jsonl"
    texts = [f"passage {i} about graphics cards" for i in range(120)]
    with proc(sched_args, env) as sched:
        read_until(sched, "scheduler at")
        with proc(["aicluster", "worker", addr, "--tier", "VRAM12", "--host", "127.0.0.1", "--name", "pc1"], env) as w:
            read_until(w, "Registered to")
            r = run(["generate", "--prompts", str(prompts), "-o", str(tmp_path / "warm.jsonl"), "--address", addr,
                     "--max-tokens", "4"], env)
            assert r.returncode == 0, r.stderr
            ai = connect(str(cfg), address=addr)
            try:
                reference = ai.embed(texts, chunk_size=40).result()
                finished = ai.generate("The capital of France is", max_tokens=8, temperature=1.2)
                fetched = finished.result()
                assert fetched["completion_tokens"] > 0
                plain = ai.submit(sum, [3, 4], tier="VRAM12")  # no retries: not redone
                redoable = ai.submit(sum, [40, 2], tier="VRAM12", retries=1)
                mapped = ai.map(sum, [[1, 2], [3, 4]], tier="VRAM12", retries=1)
                assert plain.result() == 7 and redoable.result() == 42 and ai.client.gather(mapped) == [3, 7]
                seen: list = []
                ai.on_resubmit(seen.extend)
                with proc(["aicluster", "generate", "--prompts", str(prompts), "-o", str(out), "--address", addr,
                           "--max-tokens", "200"], env) as gen:
                    stream = ai.generate("Once upon a time", max_tokens=400, stream=True)
                    pieces = iter(stream)
                    first = next(pieces)  # the stream has sent text: it is not repeated
                    gens = ai.generate([f"Question {i}: why is the sky blue?" for i in range(2)], max_tokens=150)
                    emb = ai.embed(texts, chunk_size=40)
                    spread = ai.generate([f"Fact {i} about lighthouses:" for i in range(2)], max_tokens=120,
                                         spread=True)  # prompts pulled by the workers (cluster/spread.py)
                    with Client(addr, timeout=30) as c:  # until the generations run, the command's three too
                        _wait(lambda: c.run_on_scheduler(_processing) >= 7, 120, "the generations to start")
                        _wait(lambda: c.run_on_scheduler(_processing_of_others, [ai.client.id, c.id]) >= 3, 120,
                              "the command's generations to start")
                    # every slot of the model is busy: this stream waits, and has sent nothing yet
                    queued = ai.generate("The lighthouse keeper said", max_tokens=30, stream=True)
                    time.sleep(1.5)  # (the job board writes its rows every second)
                    assert not spread.done() and not any(f.done() for f in gens)
                    assert queued.stream_id not in ai.core.received and not queued.future.done()
                    sched.kill()
                    sched.wait()
                    with proc(sched_args, env) as sched2:
                        read_until(sched2, "scheduler at")
                        log = read_until(gen, "wrote 3 answers", timeout=240)
                        assert gen.wait(30) == 0, log
                        assert log.count("lost with the scheduler; retried") == 3, log
                        assert "3 retried after the scheduler restarted" in log
                        rows = [json.loads(line) for line in out.read_text().splitlines()]
                        assert sorted(r["id"] for r in rows) == ["p0", "p1", "p2"]  # each once
                        assert all(r["completion_tokens"] == 200 or r["finish_reason"] == "stop" for r in rows)

                        # facade futures held here: submitted again, and their answers reach them
                        for r in ai.client.gather(gens):
                            assert r["completion_tokens"] == 150 or r["finish_reason"] == "stop", r
                        np.testing.assert_allclose(emb.result(timeout=120), reference, rtol=1e-4, atol=1e-5)
                        for r in spread.result(timeout=120):
                            assert r["completion_tokens"] == 120 or r["finish_reason"] == "stop", r
                        assert redoable.result(timeout=60) == 42
                        assert ai.client.gather(mapped) == [3, 7]
                        # the very dict it gave before (a new run would differ at least in its timings)
                        assert finished.result(timeout=60) == fetched
                        with pytest.raises(CancelledError, match="lost the connection"):
                            plain.result(timeout=60)
                        assert isinstance(failure(plain), SchedulerLost)
                        # the stream that had sent nothing is generated again, and streams whole
                        text = "".join(queued)
                        assert text and text == queued.result(timeout=60)["text"]
                        # the stream that had sent text goes on from there: each piece once, and whole
                        got = first + "".join(pieces)
                        r = stream.result(timeout=120)
                        assert got == r["text"]
                        assert r["completion_tokens"] == 400 or r["finish_reason"] == "stop"
                        assert r.get("continued_from", 0) >= 1
                        redone = {x.key for x in seen}
                        assert ({f.key for f in gens + mapped} | {emb.key, redoable.key, finished.key, queued.future.key,
                                                                  stream.future.key} <= redone), seen
                        assert plain.key not in redone
                        board = {j["key"]: j for j in ai.jobs()}
                        for f in gens:
                            assert board[f.key]["state"] == "done" and board[f.key]["resubmitted"] == 1, board[f.key]
                        assert board[emb.key]["parts"] == 3 and board[emb.key]["state"] == "done"
                        assert board[stream.future.key]["state"] == "done" and board[stream.future.key]["resubmitted"]
                        assert sum(j["state"] == "done" and not j["resubmitted"] for j in board.values()) >= 6
            finally:
                ai.close()


def test_one_large_embed_is_one_job_with_its_chunks_under_it(tiers):
    texts = [f"sentence number {i}" for i in range(300)]
    f = tiers.embed(texts, chunk_size=100)
    assert f.result().shape == (300, 384)
    rows = [r for r in tiers.jobs() if r["key"] == f.key]
    assert len(rows) == 1, tiers.jobs()
    assert rows[0]["state"] == "done" and rows[0]["parts"] == 3 and rows[0]["parts_done"] == 3
    assert "3/3 parts" in str(tiers.jobs())


@contextmanager
def _lone_scheduler(tmp_path, env_with_tests, grace: float | None = None):
    """An `aicluster scheduler` process with no worker: (process, config path, address)."""
    import yaml

    from conftest import free_port
    from procs import proc, read_until

    cfg = tmp_path / "config.yaml"
    data = base_config()
    data["scheduler"]["jobs_db"] = str(tmp_path / "jobs.sqlite3")
    if grace is not None:
        data["routing"]["restart_grace"] = grace
    cfg.write_text(yaml.safe_dump(data))
    port = free_port()
    env = {**env_with_tests, "AICLUSTER_CONFIG": str(cfg)}
    with proc(["aicluster", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-port", "0"],
              env) as sched:
        read_until(sched, "scheduler at")
        yield sched, cfg, f"tcp://127.0.0.1:{port}"


def test_a_scheduler_that_does_not_come_back_fails_the_held_futures_clearly(tmp_path, env_with_tests):
    """Nothing hangs when the scheduler is gone for good: the client gives up reconnecting
    after its timeout, and the futures that were waiting to be submitted again fail with
    SchedulerLost naming the scheduler's address. (No worker: the task waits in the
    scheduler's queue when it dies.)"""
    from cluster import connect
    from cluster.jobs import SchedulerLost

    with _lone_scheduler(tmp_path, env_with_tests) as (sched, cfg, addr):
        ai = connect(str(cfg), address=addr, timeout=5)
        try:
            f = ai.submit(sum, [1, 2], retries=2)  # no worker yet: it waits on the scheduler
            sched.kill()
            sched.wait()
            with pytest.raises(SchedulerLost, match=f"the scheduler at {addr} did not come back"):
                f.result(timeout=120)
        finally:
            ai.close()


def test_redo_recipes_go_with_the_futures(tiers):
    """What the facade keeps to submit a task again (cluster/redo.py) lives exactly as long
    as the user holds the task's future: nothing accumulates in a long session."""
    import gc

    futures = tiers.map(sum, [[1, 2], [3, 4]], tier="CPU", retries=1)
    futures.append(tiers.submit(sum, [5, 6], tier="CPU", retries=1))
    futures.append(tiers.embed(["a text", "another text"]))
    futures.append(tiers.generate("Hello", max_tokens=2))
    keys = {f.key for f in futures}
    assert tiers.client.gather(futures[:3]) == [3, 7, 11]
    assert futures[3].result().shape == (2, 384) and futures[4].result()["completion_tokens"] > 0
    assert keys <= set(tiers.core.redo._recipes)  # held: it would be redone after a restart
    plain = tiers.submit(sum, [1, 1], tier="CPU")  # no retries: not kept
    assert plain.result() == 2 and plain.key not in tiers.core.redo._recipes
    del futures
    gc.collect()
    _wait(lambda: not keys & set(tiers.core.redo._recipes), 10, "the recipes to go with their futures")


def test_a_just_started_scheduler_waits_for_its_workers(tmp_path, env_with_tests):
    """A script that starts with its scheduler (a restarted one, or all of a lab booting at
    once) finds no worker yet: its work waits for one to join (up to routing.restart_grace)
    instead of failing with "no worker is connected"."""
    from distributed import Worker

    from cluster import connect

    with _lone_scheduler(tmp_path, env_with_tests, grace=120) as (sched, cfg, addr):
        ai = connect(str(cfg), address=addr)
        try:
            assert not ai.live_tiers()
            f = ai.submit(sum, [1, 2], tier="CPU")  # no worker yet: no error, it waits

            async def start():
                return await Worker(addr, resources={"CPU": 1}, nthreads=1, name="late")

            w = ai.client.sync(start)
            try:
                assert f.result(timeout=60) == 3
            finally:
                ai.client.sync(w.close)
        finally:
            ai.close()
