"""The house's rules, read from the source (ARCHITECTURE.md, "Layers"):

* ``workloads/`` (what runs on workers) imports nothing of ``cluster/`` (the client,
  scheduler and worker-plugin side), by an import statement or by a string that names a
  module; ``cluster/`` imports ``workloads/`` plainly, never through ``importlib`` strings;
* no import circles;
* no module uses another module's underscore names;
* private Dask and llama.cpp APIs are used in ``workloads/compat.py`` only;
* no module over about 500 lines without a reason written at its top.

Each failure names the file, the line and the rule. No cluster, no model: the test reads
the files with ``ast``.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cluster", "workloads")
COMPAT = "workloads.compat"
#: underscore names of the standard library that are public API
PUBLIC_UNDERSCORE = {"_asdict", "_replace", "_fields", "_make", "_exit", "_field_defaults", "_missing_",
                     "_value_", "_name_", "_repr_html_", "_ipython_display_"}
#: libraries whose private names count as internals to keep in compat
PRIVATE_LIBS = ("distributed", "dask", "llama_cpp")
MODULE_STRING = re.compile(r"^(cluster|workloads)(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*)?$")
LONG = 520  # "about 500"


def _modules(packages=PACKAGES) -> dict[str, Path]:
    out = {}
    for pkg in packages:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def _absolute(mod: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _defined(tree: ast.Module) -> set[str]:
    """Every name a module defines: functions, classes, assignments, attributes set on self."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
    return names


def _imports(mod: str, path: Path, tree: ast.Module):
    """``(line, imported module, names or None, how)`` of every import of ours and every
    string that names a module of ours (``"pkg.mod"`` / ``"pkg.mod:attr"``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, None, "import"
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, _absolute(mod, path, node), [a.name for a in node.names], "from"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.match(node.value):
            yield node.lineno, node.value.partition(":")[0], None, "string"


def _layer(name: str) -> str | None:
    top = name.split(".")[0]
    return top if top in PACKAGES else None


def _logger_names(tree: ast.Module) -> set[int]:
    """Lines of ``logging.getLogger("pkg.mod")``: a logger name, not an import."""
    return {n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "getLogger"}


def test_workloads_never_import_cluster():
    bad = []
    for mod, path in _modules(("workloads",)).items():
        tree = ast.parse(path.read_text())
        loggers = _logger_names(tree)
        for line, target, _, how in _imports(mod, path, tree):
            if _layer(target) == "cluster" and not (how == "string" and line in loggers):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {mod} imports {target} ({how}); workloads/ is the lower "
                           f"layer: move what both need down into workloads/, or the caller up into cluster/")
    assert not bad, "\n".join(bad)


def _graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (anywhere in it, lazily too)."""
    mods = _modules()
    g: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for _, target, names, how in _imports(m, p, ast.parse(p.read_text())):
            if how == "string":
                continue
            subs = [f"{target}.{n}" for n in names or () if f"{target}.{n}" in mods]
            for t in subs if subs and len(subs) == len(names or ()) else [target, *subs]:
                if t in mods and t != m:
                    g[m].add(t)
    return g


def test_no_import_circles():
    """No two modules import each other, directly or round a circle (a package's
    ``__init__`` included): the import order says who stands on whom."""
    g = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not circles, "import circles (move what both need into a module both import):\n" + "\n".join(
        " <-> ".join(c) for c in circles)


def test_no_import_string_stands_in_for_an_import():
    """``importlib.import_module("cluster...")`` or ``("workloads...")`` with a literal: write
    the import. (A child process's ``-m module`` or loader name comes from the module object.)"""
    bad = []
    for mod, path in _modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str) and _layer(node.args[0].value)):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: importlib.import_module({node.args[0].value!r}): "
                           f"import it")
    assert not bad, "\n".join(bad)


def test_no_module_uses_another_modules_underscore_names():
    modules = _modules()
    trees = {m: ast.parse(p.read_text()) for m, p in modules.items()}
    defined = {m: _defined(t) for m, t in trees.items()}
    ours = set().union(*defined.values())
    bad = []
    for mod, tree in trees.items():
        path = modules[mod].relative_to(ROOT)
        for line, target, names, how in _imports(mod, modules[mod], tree):
            if how == "from" and _layer(target) and target != mod:
                for n in names or ():
                    if n.startswith("_") and not n.startswith("__"):
                        bad.append(f"{path}:{line}: imports {target}.{n}, an underscore name of another module")
        if mod == COMPAT:
            continue
        own = defined[mod]
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            if node.attr in PUBLIC_UNDERSCORE or node.attr in own:
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue  # (an attribute a base class of another package defines: caught below if private)
            where = "another module of ours" if node.attr in ours else "a library's internals"
            bad.append(f"{path}:{node.lineno}: .{node.attr} is {where}: use a public name"
                       + ("" if node.attr in ours else " or a shim in workloads/compat.py"))
    assert not bad, "\n".join(bad)


def test_private_dask_and_llama_cpp_apis_only_in_compat():
    bad = []
    for mod, path in {**_modules(), **_modules(("bench",))}.items():
        if mod == COMPAT:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                parts = n.split(".")
                if parts[0] in PRIVATE_LIBS and any(p.startswith("_") and not p.startswith("__") for p in parts[1:]):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {n}: private; go through "
                               f"workloads/compat.py")
            if isinstance(node, ast.Constant) and node.value == "scheduler-connection-lost":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: distributed's reason string: use "
                           f"workloads.compat.SCHEDULER_LOST")
    assert not bad, "\n".join(bad)


def test_long_modules_say_why_at_their_top():
    bad = []
    for mod, path in _modules().items():
        text = path.read_text()
        n = text.count("\n")
        if n > LONG and "Why this module is long" not in text[:4000]:
            bad.append(f"{path.relative_to(ROOT)}: {n} lines, over {LONG}, with no \"Why this module is long\" in its "
                       f"docstring: split it by where the code runs or what it owns, or say why not")
    assert not bad, "\n".join(bad)


def test_the_rules_catch_what_they_are_for(tmp_path, monkeypatch):
    """The checks above fail on a tree that breaks them (so a green run means something)."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "cluster" / "a.py").write_text("def _hidden():\n    return 1\n")
    (tmp_path / "workloads" / "b.py").write_text(
        "import importlib\nfrom cluster.a import _hidden\nimport cluster.a as a\n"
        "x = a._hidden()\nm = importlib.import_module('cluster.a')\n"
        "from distributed.client import _global_clients\n")
    (tmp_path / "workloads" / "big.py").write_text("x = 1\n" * (LONG + 1))
    (tmp_path / "workloads" / "c.py").write_text("from . import d\n")
    (tmp_path / "workloads" / "d.py").write_text("def f():\n    from . import c\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    for check in (test_workloads_never_import_cluster, test_no_import_string_stands_in_for_an_import,
                  test_no_module_uses_another_modules_underscore_names, test_private_dask_and_llama_cpp_apis_only_in_compat,
                  test_long_modules_say_why_at_their_top, test_no_import_circles):
        try:
            check()
        except AssertionError as e:
            assert "b.py" in str(e) or "big.py" in str(e) or "workloads.c <-> workloads.d" in str(e), str(e)
        else:
            raise AssertionError(f"{check.__name__} passed on a tree that breaks it")


def test_the_split_model_planner_is_pure():
    """cluster/shard_plan.py takes a GGUF layout and budgets and gives a plan: no cluster, no
    sockets, no processes (the client side asks the workers, cluster/shards.py)."""
    path = ROOT / "cluster" / "shard_plan.py"
    tree = ast.parse(path.read_text())
    used = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    used |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
    assert not used & {"distributed", "socket", "subprocess", "threading", "asyncio"}, sorted(used)
