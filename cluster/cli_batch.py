"""Batch commands that use models: ``aicluster embed`` and ``aicluster generate``."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .jobs import failure

CONFIG_HELP = "config.yaml to use (default: $AICLUSTER_CONFIG, ./config.yaml, the project's)."


def _connect(address, config_path):
    from .cli import quiet_dask
    from .client import connect

    quiet_dask()
    from .config import ConfigError

    try:
        return connect(config_path, address=address) if address else connect(config_path, dashboard_port=0)
    except (ConfigError, ConnectionError) as e:
        raise click.ClickException(str(e)) from None


def _fail(e: Exception):
    raise click.ClickException(f"{type(e).__name__}: {e}") from None


@click.command("embed")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Where to write the vectors (.npy).")
@click.option("--address", default=None, help="Scheduler address (default: start the embedded cluster).")
@click.option("--model", default="minilm", show_default=True, help="An embedding model from config.yaml.")
@click.option("--batch-size", default=64, show_default=True, help="Texts per forward pass.")
@click.option("--chunk-size", default=512, show_default=True, help="Texts per Dask task (progress advances per chunk).")
@click.option("--normalize", is_flag=True, help="L2-normalise the vectors.")
@click.option("--config", "config_path", default=None, help=CONFIG_HELP)
def embed_cmd(file, output, address, model, batch_size, chunk_size, normalize, config_path):
    """Embed FILE (one text per line) into OUTPUT.npy, rows in line order.

    \b
    Example:
      aicluster embed passages.txt -o passages.npy --address tcp://192.168.1.10:8786
    """
    import numpy as np
    from distributed import as_completed
    from tqdm import tqdm

    from .client import _task

    lines = file.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise click.ClickException(f"{file} is empty: nothing to embed")
    for i, line in enumerate(lines):
        if not line.strip():
            raise click.ClickException(f"{file}:{i + 1} is an empty line; remove it (every line is one text)")
    with _connect(address, config_path) as ai:
        try:
            spec, route = ai._model_route(model, ("sentence_transformers",), "embed texts")
            parts = [ai._submit_routed(route, f"embed with {model}", _task("embed"), lines[i:i + chunk_size], model, spec,
                                       dict(batch_size=batch_size, normalize=normalize, truncate=False), offset=i, kind="embed")
                     for i in range(0, len(lines), chunk_size)]
            done = []
            with tqdm(total=len(lines), desc="embedding", unit="text") as bar:
                for f in as_completed(parts):
                    part = f.result()
                    done.append(part)
                    bar.update(part["n"])
        except Exception as e:
            _fail(e)
        done.sort(key=lambda p: p["offset"])
        arr = np.concatenate([p["embeddings"] for p in done])
    np.save(output, arr)
    click.echo(f"wrote {output}: {arr.shape[0]} vectors of {arr.shape[1]} dimensions")


@click.command("generate")
@click.option("--prompts", "prompts_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='JSONL, one object per line: {"prompt": "...", "id": optional, "max_tokens": optional}.')
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL of results; an existing file is resumed (ids already there are skipped).")
@click.option("--address", default=None, help="Scheduler address (default: start the embedded cluster).")
@click.option("--model", default="gemma-270m", show_default=True, help="A generation model from config.yaml.")
@click.option("--max-tokens", default=128, show_default=True, help="Tokens per answer, unless a line sets max_tokens.")
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy.")
@click.option("--in-flight", default=8, show_default=True, type=click.IntRange(min=1),
              help="Prompts submitted at once (bounds cluster memory).")
@click.option("--config", "config_path", default=None, help=CONFIG_HELP)
def generate_cmd(prompts_file, output, address, model, max_tokens, temperature, in_flight, config_path):
    """Generate an answer for every prompt in a JSONL file, writing each as it finishes.

    Interrupted runs resume: ids already in OUTPUT are not generated again.

    \b
    Example:
      aicluster generate --prompts questions.jsonl -o answers.jsonl --max-tokens 64
    """
    from distributed import as_completed
    from tqdm import tqdm

    jobs = []
    for n, line in enumerate(prompts_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise click.ClickException(f"{prompts_file}:{n}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise click.ClickException(f'{prompts_file}:{n}: expected {{"prompt": "<non-empty text>"}}, got {line[:80]}')
        jobs.append({"id": str(obj.get("id", n)), "prompt": obj["prompt"], "max_tokens": int(obj.get("max_tokens", max_tokens))})
    ids = [j["id"] for j in jobs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise click.ClickException(f"{prompts_file}: id {dup!r} appears more than once")
    done_ids = set()
    if output.exists():
        text = output.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):
            # an interrupted run cut its last line: drop it (it is generated again), so
            # the next record does not get glued onto it
            text = text[: text.rfind("\n") + 1]
            output.write_text(text, encoding="utf-8")
        for line in text.splitlines():
            try:
                done_ids.add(str(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # not one of our records
    todo = [j for j in jobs if j["id"] not in done_ids]
    if done_ids:
        click.echo(f"resuming: {len(jobs) - len(todo)} of {len(jobs)} already in {output}")
    if not todo:
        click.echo("nothing left to do")
        return
    failed = 0
    with _connect(address, config_path) as ai, output.open("a", encoding="utf-8") as out, \
            tqdm(total=len(todo), desc="generating", unit="prompt") as bar:
        pending = iter(todo)
        by_key = {}

        def submit_next(ac):
            job = next(pending, None)
            if job is not None:
                f = ai.generate(job["prompt"], model=model, max_tokens=job["max_tokens"], temperature=temperature)
                by_key[f.key] = job
                ac.add(f)

        try:
            ac = as_completed([])
            for _ in range(in_flight):
                submit_next(ac)
            for f in ac:
                job = by_key.pop(f.key)
                err = failure(f)
                if err is not None:
                    failed += 1
                    rec = {"id": job["id"], "error": f"{type(err).__name__}: {err}"}
                else:
                    r = f.result()
                    rec = {"id": job["id"], "prompt": job["prompt"], "text": r["text"], "completion_tokens": r["completion_tokens"],
                           "finish_reason": r["finish_reason"], "worker": r["worker"], "tier": r["tier"], "simulated": r["simulated"]}
                if "error" not in rec:
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
                else:
                    tqdm.write(f"prompt {job['id']}: {rec['error']}", file=sys.stderr)
                bar.update(1)
                submit_next(ac)
        except Exception as e:
            _fail(e)
    click.echo(f"wrote {len(todo) - failed} answers to {output}" + (f"; {failed} failed (see above), run again to retry them" if failed else ""))
    if failed:
        raise SystemExit(1)


@click.command("pipeline")
@click.argument("spec")
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE",
              help="Override a param of the pipeline (repeatable; VALUE is read as YAML, so 3 is a number).")
@click.option("--address", default=None, help="Scheduler address (default: start the embedded cluster).")
@click.option("--json", "as_json", is_flag=True, help="Print every stage's output and placement as JSON.")
@click.option("--config", "config_path", default=None, help=CONFIG_HELP)
def pipeline_cmd(spec, sets, address, as_json, config_path):
    """Run a pipeline: a YAML file, or the name of a shipped one (rag).

    Prints which worker ran each stage, when, and the final output.

    \b
    Examples:
      aicluster pipeline rag --set question="Which file format does llama.cpp use?"
      aicluster pipeline my_pipeline.yaml --address tcp://192.168.1.10:8786 --json
    """
    import importlib

    import yaml

    pipeline = importlib.import_module("workloads.pipeline")
    params = {}
    for item in sets:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="--set")
        params[name] = yaml.safe_load(value) if value else ""
    try:
        spec_dict = pipeline.load_spec(spec)
        from .config import load_config

        pipeline.compile_pipeline(spec_dict, load_config(config_path), params)  # fail before starting anything
    except (FileNotFoundError, pipeline.PipelineError) as e:
        raise click.ClickException(str(e)) from None
    with _connect(address, config_path) as ai:
        try:
            result = ai.run_pipeline(spec_dict, **params)
        except (pipeline.PipelineError, pipeline.StageFailed) as e:
            raise click.ClickException(str(e)) from None
    if as_json:
        def plain(v):
            if hasattr(v, "tolist"):
                return v.tolist()
            return v
        click.echo(json.dumps({"pipeline": result.name, "output_stage": result.output_stage, "stages": {
            k: {**{f: r[f] for f in ("worker", "tier", "simulated", "start", "end")}, "output": plain(r["output"])}
            for k, r in result.stages.items()}}, indent=2, default=str))
        return
    click.echo(str(result))
    out = result.output
    click.echo(f"\n{result.output_stage}: " + (out["text"].strip() if isinstance(out, dict) and "text" in out else str(out)))


@click.command("jobs")
@click.argument("address", required=False)
@click.option("--state", type=click.Choice(["pending", "running", "done", "failed", "cancelled"]), multiple=True,
              help="Only jobs in this state (repeatable).")
@click.option("--limit", type=int, default=50, show_default=True, help="The most recent N jobs.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--config", "config_path", default=None, help=CONFIG_HELP)
def jobs_cmd(address, state, limit, as_json, config_path):
    """List the jobs of the cluster at ADDRESS: what, tier, state, worker, time.

    \b
    Examples:
      aicluster jobs tcp://192.168.1.10:8786
      aicluster jobs tcp://192.168.1.10:8786 --state running --state pending
    """
    from .cli import scheduler_client
    from .config import load_config
    from .jobs import format_jobs, job_rows

    cfg = load_config(config_path)
    address = address or cfg.scheduler.address
    with scheduler_client(address, cfg) as client:
        rows = client.run_on_scheduler(job_rows, states=list(state) or None, limit=limit)
    click.echo(json.dumps(rows, indent=2, default=str) if as_json else format_jobs(rows))


@click.command("cancel")
@click.argument("keys", nargs=-1, required=True)
@click.option("--address", default=None, help="Scheduler address (default: scheduler.address in config).")
@click.option("--config", "config_path", default=None, help=CONFIG_HELP)
def cancel_cmd(keys, address, config_path):
    """Cancel jobs by key (see `aicluster jobs`); a running generation stops within a few tokens.

    \b
    Example:
      aicluster cancel generate-gemma-270m-1a2b3c4d5e6f --address tcp://192.168.1.10:8786
    """
    from .config import load_config

    cfg = load_config(config_path)
    with _connect(address or cfg.scheduler.address, config_path) as ai:
        known = {r["key"] for r in ai.jobs()}
        missing = [k for k in keys if k not in known]
        if missing:
            raise click.ClickException(f"no such job(s): {', '.join(missing)}; see `aicluster jobs`")
        ai.cancel(list(keys))
    click.echo(f"cancelled {len(keys)} job(s)")


@click.command("bench")
@click.option("--suite", type=click.Choice(["quick", "models", "full", "seed"]), default="quick", show_default=True,
              help="quick: the four seed jobs at small sizes; models: LLM and embedding throughput; full: both; "
                   "seed: the seed's sizes (minutes per CPU worker).")
@click.option("--tier", "tiers", multiple=True, help="Only workers of this tier (repeatable).")
@click.option("--worker", "workers", multiple=True, help="Only this worker, by name or address (repeatable).")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder (default: reports/bench-<date>-<time>).")
@click.option("--parallel", is_flag=True, help="All workers at once (for separate PCs; on one machine they slow each other).")
@click.option("--address", default=None, help="Scheduler address (default: start the embedded cluster).")
@click.option("--config", "config_path", default=None, help=CONFIG_HELP)
def bench_cmd(suite, tiers, workers, output, parallel, address, config_path):
    """Benchmark every worker (or chosen tiers / workers) and write a report folder:
    report.md, results.csv and PNG charts.

    \b
    Examples:
      aicluster bench                                  # quick suite, embedded cluster
      aicluster bench --suite full --address tcp://192.168.1.10:8786 -o reports/lab
      aicluster bench --tier VRAM12 --tier CPU --suite seed
    """
    import time as _time

    output = output or Path("reports") / _time.strftime("bench-%Y%m%d-%H%M%S")
    with _connect(address, config_path) as ai:
        try:
            records = ai.bench(suite, tiers=list(tiers) or None, workers=list(workers) or None, report=str(output),
                               parallel=parallel)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
    errors = [r for r in records if "error" in r]
    records = [r for r in records if "error" not in r]
    bad = [r for r in records if not r["check"]["passed"]]
    click.echo(f"{len(records)} results; report: {output / 'report.md'}")
    for e in errors:
        click.echo(f"  {e['worker']:<10} {e['job_type']:<18} ERROR {e['error']}", err=True)
    for r in records:
        sim = " (simulated)" if r["simulated"] else ""
        click.echo(f"  {r['worker']:<10} {r['tier'] or '-':<7}{sim:<12} {r['job_type']:<18} {r['value']:>10.1f} {r['unit']}")
    if bad or errors:
        raise click.ClickException(f"{len(bad)} result(s) failed their own check and {len(errors)} job(s) raised an "
                                   f"error; see {output / 'report.md'}")


@click.command("submit")
@click.argument("jobs_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON lines of results (default: JOBS_FILE with .results.jsonl).")
@click.option("--in-flight", default=4, show_default=True, type=click.IntRange(min=1), help="Jobs submitted at once.")
@click.option("--address", default=None, help="Scheduler address (default: start the embedded cluster).")
@click.option("--config", "config_path", default=None, help=CONFIG_HELP)
def submit_cmd(jobs_file, output, in_flight, address, config_path):
    """Run a JSON list of benchmark jobs in the GPU job-queue seed's format.

    Each job: {"job_type": "matrix_multiply", "size": 1000, "iterations": 10, "prefer_gpu": true}.
    prefer_gpu jobs go to the GPU tiers (best first) with the CPU tier as fallback. Each
    result is written as a JSON line as it finishes; a bad job gets an error line and the
    others go on. Ends with counts and times per job_type x tier, jobs per second and the
    GPU-over-CPU speedup.

    \b
    Example:
      aicluster submit jobs.json -o results.jsonl --address tcp://192.168.1.10:8786
    """
    try:
        jobs = json.loads(jobs_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise click.ClickException(f"{jobs_file}: not JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(jobs, dict) and isinstance(jobs.get("jobs"), list):
        jobs = jobs["jobs"]
    if not isinstance(jobs, list) or not jobs:
        raise click.ClickException(f"{jobs_file}: expected a non-empty JSON list of job objects")
    output = output or jobs_file.with_suffix(".results.jsonl")
    from tqdm import tqdm

    with _connect(address, config_path) as ai, output.open("w", encoding="utf-8") as out:
        def write(o):
            out.write(json.dumps(o, default=str) + "\n")
            out.flush()
            if o["status"] == "failed":
                tqdm.write(f"job {o['job_id']}: {o['error']}", file=sys.stderr)

        res = ai.run_jobs(jobs, on_result=write, in_flight=in_flight)
    import importlib

    format_stats = importlib.import_module("workloads.bench_report").format_stats

    click.echo(format_stats(res["stats"]))
    click.echo(f"results: {output}")
    if res["stats"]["failed"]:
        raise SystemExit(1)
