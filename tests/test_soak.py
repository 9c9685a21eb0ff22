"""The soak can fail: a one-minute soak with a fault injected on purpose (worker pc1 drops
the reply of one generation: the scheduler never hears it finished) must report it, and
report nothing else (no kill, no restart: every other request is answered right)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_a_one_minute_soak_reports_a_dropped_reply(env_with_tests):
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "1", "--kill-every", "0",
                        "--no-restarts", "--deadline", "30", "--inject", "drop-reply"],
                       capture_output=True, text=True, timeout=600, env=env_with_tests)
    out = p.stdout
    assert p.returncode == 0, out[-3000:] + p.stderr[-3000:]
    m = re.search(r"RESULT soak lost=(\d+) target=0", out)
    assert m, out[-3000:]
    lost = int(m.group(1))
    assert lost >= 1, out  # the dropped reply is seen
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if len(cells) == 7 and cells[1].isdigit():
            rows[cells[0]] = dict(zip(("sent", "done", "lost", "late", "wrong", "duplicated"), map(int, cells[1:])))
    assert rows, out
    late = sum(r["late"] for r in rows.values())
    assert late >= 1 and late == lost, out  # ... as a request past its deadline, and nothing else failed
    assert all(r["lost"] == r["wrong"] == r["duplicated"] == 0 for r in rows.values()), out
    assert sum(r["done"] for r in rows.values()) > 10, out
