"""The install's smoke check: every shipped model loads and runs, each in a child process.

``make install`` ends with ``python -m cluster.smoke``: each model of config.yaml whose
source is a package (what the project ships) is loaded in a child process and asked for a
few tokens (llama.cpp) or one embedding (sentence-transformers). A child that dies of a
signal stops the install with one line naming the model, the signal, the native frame
where it is known, and what to do, so that ``make demo`` never starts a cluster on a build
that crashes on this CPU. ``aicluster doctor`` runs the same checks and shows them in its
table.

    python -m cluster.smoke [--config config.yaml] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

__all__ = ["smoke_model", "smoke_all", "FIX"]

#: what to do when a model crashes here (the build flags to try)
FIX = ("rebuild llama.cpp for a plainer CPU, e.g. "
       "make install LLAMA_CPU_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
       "-DGGML_BMI2=ON\" (AVX2 only), then run `aicluster doctor`")

_EMBED_CHILD = """
import sys, json
from workloads.backends.native import install_crash_report
install_crash_report()
from workloads.backends.sentence_transformers import load
from cluster.config import load_config
cfg = load_config(sys.argv[1] or None)
m = load(cfg.model(sys.argv[2]), threads=1, name=sys.argv[2])
v = m.encode(["a smoke test of the embedding model"], batch_size=1, normalize=True)
print(json.dumps({"dims": int(v.shape[-1])}))
"""


def smoke_model(name: str, spec, config_path: str | None = None, timeout: float = 300) -> dict:
    """Load ``name`` in a child process and run it briefly; ``{"model", "ok", "seconds",
    "detail", "signal", "frame"}`` (``ok`` False with what went wrong)."""
    t0 = time.perf_counter()
    out = {"model": name, "backend": spec.backend, "ok": False, "signal": None, "frame": None}
    try:
        if spec.backend == "sentence_transformers":
            out.update(_smoke_embed(name, config_path, timeout))
        elif spec.backend == "transformers":
            out.update(ok=True, detail="not checked here (torch runs it in the worker process; minutes to load)")
        else:  # llamacpp, or a backend of the user's (package.module:load)
            out.update(_smoke_generate(name, spec))
    except Exception as e:  # a crash, or a load that failed: the row says which
        from workloads.backends import ModelCrashed

        if isinstance(e, ModelCrashed):
            out.update(signal=e.signal, frame=e.frame, library=e.library,
                       detail=f"crashed while {e.during}: {e.signal}" + (f" in {e.frame}" if e.frame else "")
                       + (f" ({e.library})" if e.library else ""))
        else:
            out.update(detail=f"{type(e).__name__}: {e}")
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _smoke_generate(name: str, spec) -> dict:
    """Load with the model's backend (llama.cpp: its engine in a child process) and decode."""
    from .plugin import backend_loader

    opts = dict(spec.options)
    if spec.backend == "llamacpp":
        opts.update(n_ctx=256, parallel=1)
    m = backend_loader(spec.backend)(spec.model_copy(update={"options": opts, "shard": False}), threads=1, name=name)
    try:
        r = m.generate("The capital of France is", max_tokens=4)
    finally:
        m.close()
    return {"ok": True, "detail": f"decoded {r['completion_tokens']} tokens: {r['text']!r}"}


def _smoke_embed(name: str, config_path: str | None, timeout: float) -> dict:
    from workloads.backends.native import describe_exit

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    p = subprocess.run([sys.executable, "-c", _EMBED_CHILD, config_path or "", name], capture_output=True, text=True,
                       timeout=timeout, env=env)
    if p.returncode != 0:
        exit_ = describe_exit(p.returncode, p.stderr)
        if exit_["crashed"]:
            return {"signal": exit_["signal"], "frame": exit_["frame"], "library": exit_["library"],
                    "detail": f"crashed while embedding: {exit_['text']}"}
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"detail": f"failed ({exit_['text']}): {tail}"}
    dims = json.loads(p.stdout.strip().splitlines()[-1])["dims"]
    return {"ok": True, "detail": f"embedded a text ({dims} dimensions)"}


def shipped_models(cfg) -> list[str]:
    """The models whose files come with the project (package sources), one per source and
    backend (a split model is the same file as its whole one)."""
    seen, out = set(), []
    for name, m in cfg.models.items():
        key = (m.backend, m.source)
        if m.source.startswith("package:") and key not in seen and not m.sharded:
            seen.add(key)
            out.append(name)
    return out


def smoke_all(cfg, config_path: str | None = None) -> list[dict]:
    return [smoke_model(n, cfg.model(n), config_path) for n in shipped_models(cfg)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.smoke", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, help="config.yaml (default: the project's)")
    ap.add_argument("--json", action="store_true", help="one JSON list of the results")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    logging.basicConfig(level=logging.WARNING)
    from .config import load_config

    cfg = load_config(args.config)
    results = smoke_all(cfg, args.config)
    if args.json:
        print(json.dumps(results, indent=1))
    bad = [r for r in results if not r["ok"]]
    for r in results:
        if not args.json:
            mark = "ok  " if r["ok"] else "FAIL"
            print(f"smoke check {mark} {r['model']:<14} {r['detail']} ({r['seconds']} s)")
    for r in bad:
        if r.get("signal"):
            print(f"smoke check: model {r['model']} crashes on this PC ({r['signal']}"
                  + (f" in {r['frame']}" if r.get("frame") else "") + f"); {FIX}", file=sys.stderr)
        else:
            print(f"smoke check: model {r['model']} does not run: {r['detail']}; run `aicluster doctor`",
                  file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
