"""The private Dask and llama.cpp APIs the project uses (all in workloads/compat.py) still
exist in the installed versions, and the pins say which versions those are.

When an upgrade breaks one, the failure says which shim and what to change (see the
module's docstring). Real installed packages; nothing mocked."""
from __future__ import annotations

import re
from pathlib import Path

from workloads import compat

ROOT = Path(__file__).resolve().parents[1]


def test_every_private_api_the_project_uses_is_still_there():
    problems = compat.check()
    assert not problems, "workloads/compat.py no longer matches the installed packages:\n  " + "\n  ".join(problems)


def test_the_pins_are_the_versions_compat_was_checked_against():
    deps = (ROOT / "pyproject.toml").read_text()
    assert f'"distributed=={compat.DISTRIBUTED_VERSION}"' in deps, \
        f"pyproject.toml must pin distributed=={compat.DISTRIBUTED_VERSION} (workloads/compat.py)"
    assert f'"dask[distributed]=={compat.DISTRIBUTED_VERSION}"' in deps, \
        f"pyproject.toml must pin dask[distributed]=={compat.DISTRIBUTED_VERSION} (dask and distributed release together)"
    assert f'"llama-cpp-python=={compat.LLAMA_CPP_VERSION}"' in deps, \
        f"pyproject.toml must pin llama-cpp-python=={compat.LLAMA_CPP_VERSION} (workloads/compat.py)"
    make = (ROOT / "Makefile").read_text()
    built = re.search(r"^LLAMA_VERSION \?= (\S+)$", make, re.M).group(1)
    assert built == compat.LLAMA_CPP_VERSION, f"the Makefile builds llama-cpp-python {built}, compat checked {compat.LLAMA_CPP_VERSION}"


def test_the_check_names_what_to_change_when_a_version_moves(monkeypatch):
    """A release other than the one checked against is reported with the fix (so the first
    test fails loudly on an upgrade, not deep inside a redo or a batch engine)."""
    monkeypatch.setattr(compat, "DISTRIBUTED_VERSION", "0.0.1")
    monkeypatch.setattr(compat, "RPC_PROTO", (99, 0))
    problems = compat.check()
    assert any("distributed" in p and "0.0.1" in p and "pyproject.toml" in p for p in problems), problems
    assert any("ggml RPC" in p and "RPC_PROTO" in p for p in problems), problems
