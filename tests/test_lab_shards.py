"""A split model on a LAN of unequal PCs (tests/lab.py): a scheduler PC, a "fast" PC and a
"slow" one held to a quarter of a CPU (a cgroup CPU quota on all of its processes, its shard
server included), each with a shard server. The slow PC has the most memory free, so a plan
by memory makes it the head and gives it the most layers; the plan by measured speed makes
the fast PC the head (with the output layer) and gives it every layer its memory takes, and
leaves the slow one out of a model the fast one holds alone (again, measured anew, when the
slow PC drops to a tenth of a CPU).
What the plans are worth in tokens/s is measured in ``bench/sharded.py --lab``.
Skipped, with the reason, where namespaces cannot be made (not root).
"""
from __future__ import annotations

import json

import pytest

from conftest import base_config
from lab import Lab, _cgroup_root, can_build

pytestmark = [pytest.mark.skipif(can_build() is not None, reason=str(can_build())), pytest.mark.slow]

PCS = ["sched", "fast", "slow"]
PROMPT = "The three primary colors are"
N = 16
#: the model's layers (18 of 3.8 MB with 8 MB of KV cache each at 4 x 2048 tokens), input and
#: output layers (170 MB each): "fast" takes the input and output layers and 14 layers,
#: "slow" all of it; at 512 tokens of context "fast" holds the whole model
#: (worker.model_budget is the cluster's, 0.2 here: the budget follows each worker's own
#: memory limit, 600 MB and 900 MB)
MEMORY = {"fast": "3GB", "slow": "4.5GB"}


def _cgroups_work() -> str | None:
    try:
        _cgroup_root()
    except (RuntimeError, OSError) as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if _cgroups_work():
        pytest.skip(_cgroups_work())
    folder = tmp_path_factory.mktemp("labshards")

    def edit(pc, data):
        data["worker"]["model_budget"] = 0.2
        split = data["models"]["gemma-270m-split"]
        split["options"]["repack"] = False
        data["models"]["split-by-memory"] = {**split, "shard": {"plan": "memory"}}
        data["models"]["split-small"] = {**split, "options": {**split["options"], "n_ctx": 512, "parallel": 1}}

    with Lab(PCS, rate="1gbit") as lab:
        lab.configure(folder, edit=edit, env=lambda pc: {"AICLUSTER_SPEED_CACHE": str(folder / pc / "speed.json")})
        lab.speed_cache = folder
        lab.limit_cpu("slow", 0.25)
        lab.scheduler()
        for pc in ("fast", "slow"):
            lab.worker(pc, "CPU", "--shard-server", "--memory-limit", MEMORY[pc])
        yield lab


def shard(lab, model: str, *args) -> tuple[dict, str]:
    """``aicluster shard MODEL --json`` on the scheduler's PC: the plan, and what else it printed."""
    r = lab.run("sched", ["aicluster", "shard", model, "--address", lab.addr, "--json", *args], lab.env["sched"],
                timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    end = r.stdout.index("\n}\n") + 3
    return json.loads(r.stdout[:end]), r.stdout[end:]


def layers(plan: dict) -> dict:
    n = plan["n_layer"]
    return {p["name"]: min(p["last"], n - 1) - p["first"] + 1 for p in plan["parts"]}


@pytest.fixture(scope="module")
def reference():
    from cluster.config import load_config
    from workloads.backends import llamacpp

    spec = load_config(base_config()).models["gemma-270m-split"]
    spec = spec.model_copy(update={"shard": False, "options": {**spec.options, "repack": False}})
    m = llamacpp.load(spec, threads=1, name="reference")
    try:
        return m.generate(PROMPT, max_tokens=N)["text"]
    finally:
        m.close()


def test_the_plan_by_speed_puts_the_layers_on_the_fast_pc(lab, reference):
    by_memory, _ = shard(lab, "split-by-memory")
    assert by_memory["by"] == "memory" and by_memory["head_name"] == "slow", json.dumps(by_memory)  # the most memory free
    plan, out = shard(lab, "gemma-270m-split", "--load", "--prompt", PROMPT, "--max-tokens", str(N))
    assert plan["by"] == "speed" and plan["head_name"] == "fast" and plan["output"] == "head", json.dumps(plan)
    got = layers(plan)
    assert got["fast"] == 14 and got["slow"] == 4, got  # all that the fast PC's memory takes
    assert plan["parts"][-1]["name"] == "fast" and plan["parts"][-1]["last"] == plan["n_layer"]  # + output
    # measured: a layer on the slow PC costs more than one on the fast PC (a quarter of a CPU:
    # ideally 4x, but the quota refills while the head computes the output layer, and the
    # fast PC shares two cores with the lab's other processes; CI has measured 2.0x, so the
    # check is for a clear margin, not the ideal)
    per = {p["name"]: p["layer_ms"] for p in plan["parts"]}
    assert per["slow"] > 1.5 * per["fast"], per
    assert all(p["ms"] > 0 for p in plan["parts"])
    assert "loaded gemma-270m-split: head fast" in out and out.rstrip().endswith(reference.rstrip())


def unload(lab, model: str) -> None:
    code = (f"from cluster import connect; ai = connect(address={lab.addr!r}, timeout=60); "
            f"ai.unload({model!r}); ai.close()")
    r = lab.run("sched", ["python", "-c", code], lab.env["sched"], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_pc_that_would_only_slow_the_others_is_left_out(lab):
    unload(lab, "gemma-270m-split")  # (the test before loaded it; its layers would fill the fast PC)
    plan, out = shard(lab, "split-small")
    assert [p["name"] for p in plan["parts"]] == ["fast"], plan
    assert any(n.startswith("slow left out: the others hold the model") for n in plan["notes"]), plan["notes"]
    before = next(n for n in plan["notes"] if n.startswith("slow left out"))
    lab.limit_cpu("slow", 0.10)
    # on a PC the cgroup quota is part of what the figures are for (a new quota: measured
    # again, tests/test_shards.py checks the key); inside the lab's `ip netns exec`, which
    # mounts a /sys of its own, the cgroup files are not visible: the figures are dropped
    # by hand, as the README says to after changing a PC
    (lab.speed_cache / "fast" / "speed.json").unlink()
    plan, _ = shard(lab, "split-small")
    assert [p["name"] for p in plan["parts"]] == ["fast"]
    after = next(n for n in plan["notes"] if n.startswith("slow left out"))

    def cost(note: str) -> float:
        """What the note says one token through the slow PC's server costs: a layer there and
        its link (at a tenth of a CPU the server's lateness shows mostly in the latter)."""
        layer = float(note.split("would take ")[1].split(" ms")[0])
        link = float(note.split(" plus ")[1].split(" ms")[0])
        return layer + link

    assert cost(after) > 1.5 * cost(before), (before, after)
