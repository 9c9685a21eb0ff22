"""Batch commands that use models: ``aicluster embed`` and ``aicluster generate``.

Why this module is long: it holds the CLI's batch family (embed, generate, pipeline, jobs,
models, cancel, bench, submit, shard), one self-contained function per command with its own
``--help`` text and examples; the shared plumbing lives in ``cli_common.py`` and the work in
the modules each command calls. A new batch command goes here; another family gets its own
``cli_*.py``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .cli_common import ADDRESS_HELP, CONFIG_HELP, checked_address, connect_ai as _connect, load_cfg, scheduler_client
from .files import (InputFileError, OutputError, ResultLog, atomic_write, check_writable, content_keys, open_locked,
                    read_lines)
from .jobs import failure



def _fail(e: Exception):
    raise click.ClickException(f"{type(e).__name__}: {e}") from None


def _output(path, what: str = "output") -> Path:
    try:
        return check_writable(path, what)
    except OutputError as e:
        raise click.ClickException(str(e)) from None


@click.command("embed")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the vectors (NumPy .npy format, under exactly this name).")
@click.option("--address", default=None, help=ADDRESS_HELP)
@click.option("--model", default="minilm", show_default=True, help="An embedding model from config.yaml.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Texts per forward pass.")
@click.option("--chunk-size", default=512, show_default=True, type=click.IntRange(min=1),
              help="Texts per Dask task (progress advances, and an interrupted run resumes, per chunk).")
@click.option("--normalize", is_flag=True, help="L2-normalise the vectors.")
@click.option("--restart", is_flag=True, help="Ignore the finished chunks of an interrupted run.")
@click.option("--spread", is_flag=True,
              help="Use every worker that can run the model (its tier and fallback tiers), each pulling chunks.")
@click.option("--priority", type=int, default=0, show_default=True, help="Dask priority: higher runs first.")
@click.option("--config", "config_path", default=None, help=CONFIG_HELP)
def embed_cmd(file, output, address, model, batch_size, chunk_size, normalize, restart, spread, priority, config_path):
    """Embed FILE (one UTF-8 text per line) into OUTPUT, rows in line order.

    OUTPUT appears only when every vector is done (written beside it and renamed). Finished
    chunks are kept in OUTPUT.parts/ meanwhile, so an interrupted run resumes where it stopped.

    \b
    Examples:
      aicluster embed passages.txt -o passages.npy --address tcp://192.168.1.10:8786
      aicluster embed passages.txt -o passages.npy --spread     # every capable worker helps
    """
    import hashlib
    import shutil

    import numpy as np
    from distributed import as_completed
    from tqdm import tqdm

    from workloads.backends import precheck
    from workloads.embeddings import embed_task

    output = _output(output)
    if output.exists() and output.samefile(file):
        raise click.ClickException(f"the output {output} is the input file; write the vectors elsewhere")
    try:
        lines = read_lines(file)
    except InputFileError as e:
        raise click.ClickException(str(e)) from None
    if not lines:
        raise click.ClickException(f"{file} is empty: nothing to embed")
    for i, line in enumerate(lines):
        if not line.strip():
            raise click.ClickException(f"{file}:{i + 1} is an empty line; remove it (every line is one text)")
    cfg = load_cfg(config_path)
    try:
        spec = cfg.model(model)
        precheck(spec, lines, model, first_index=0)
    except ValueError as e:
        where = f"{file}:{e.index + 1}: " if hasattr(e, "index") else ""
        raise click.ClickException(where + str(e)) from None

    if address:
        address = checked_address(address, cfg)  # before anything is written
    # Finished chunks of an interrupted run wait in OUTPUT.parts/, valid only for the same
    # input, model and settings (meta.json, which is also the lock of a run on OUTPUT).
    parts = output.with_name(output.name + ".parts")
    meta = {"input_sha256": hashlib.sha256(file.read_bytes()).hexdigest(), "texts": len(lines), "model": model,
            "source": spec.source, "options": spec.options, "normalize": normalize, "chunk_size": chunk_size}
    if parts.exists() and not (parts / "meta.json").is_file():
        raise click.ClickException(f"{parts} exists and is not this command's folder of finished chunks; move it away")
    parts.mkdir(exist_ok=True)
    offsets = range(0, len(lines), chunk_size)
    done: dict[int, np.ndarray] = {}
    try:
        lock = open_locked(parts / "meta.json", what=str(output))
    except OutputError as e:
        raise click.ClickException(str(e)) from None
    with lock:
        lock.seek(0)
        try:
            same = json.loads(lock.read() or b"null") == meta
        except ValueError:
            same = False
        chunks = {int(f.stem): f for f in parts.glob("*.npy") if f.stem.isdigit()}
        if same and not restart:
            for off, f in chunks.items():
                if off in offsets:
                    done[off] = np.load(f)
            if done:
                click.echo(f"resuming: {sum(len(a) for a in done.values())} of {len(lines)} texts already embedded "
                           f"(in {parts})")
        else:
            if chunks:
                click.echo(f"{parts} holds chunks of another input or settings; starting over")
            for f in chunks.values():
                f.unlink()
            lock.truncate(0)
            lock.write(json.dumps(meta).encode())
            lock.flush()
        todo = [i for i in offsets if i not in done]
        if todo:
            params = dict(batch_size=batch_size, normalize=normalize, truncate=False)
            with _connect(address, config_path) as ai, \
                    tqdm(total=len(lines), initial=sum(len(a) for a in done.values()), desc="embedding",
                         unit="text") as bar:

                def keep(part) -> None:
                    with atomic_write(parts / f"{part['offset']}.npy") as out:
                        np.save(out, part["embeddings"])  # kept until the output is whole
                    done[part["offset"]] = part["embeddings"]
                    bar.update(part["n"])

                try:
                    spec, route = ai.core.model_route(model, ("sentence_transformers",), "embed texts")
                    if spread:
                        from .spread import spread_embed

                        spread_embed(ai.core, spec, model, lines, params, chunk_size=chunk_size, skip=set(done),
                                     priority=priority, on_part=lambda off, part, h: keep(part), wait=True)
                    else:
                        def submit(i):
                            return ai.core.submit_routed(route, f"embed with {model}", embed_task,
                                                     lines[i:i + chunk_size], model, spec, params, offset=i,
                                                     kind="embed", priority=priority)

                        offset_of = {}
                        ac = as_completed([], loop=ai.client.loop)
                        for i in todo:
                            f = submit(i)
                            offset_of[f.key] = i
                            ac.add(f)
                        # a chunk lost with a restarting scheduler is submitted again by the facade
                        stop = ai.on_resubmit(lambda items: [tqdm.write(
                            f"chunk at text {offset_of.get(r.key, '?')}: lost with the scheduler; retried",
                            file=sys.stderr) for r in items])
                        try:
                            for f in ac:
                                if f.status in ("lost", "pending"):  # its result went with a worker: computed again
                                    ac.add(f)
                                    continue
                                offset_of.pop(f.key)
                                err = failure(f)
                                if err is not None:
                                    raise err
                                keep(f.result())
                        finally:
                            stop()
                except Exception as e:
                    _fail(e)
        arr = np.concatenate([done[i] for i in sorted(done)])
        with atomic_write(output) as out:
            np.save(out, arr)
    shutil.rmtree(parts, ignore_errors=True)
    click.echo(f"wrote {output}: {arr.shape[0]} vectors of {arr.shape[1]} dimensions")


@click.command("generate")
@click.option("--prompts", "prompts_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='JSONL, one object per line: {"prompt": "...", "id": optional, "max_tokens": optional}.')
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL of results, one line per answer as it finishes; a run on an existing file resumes it.")
@click.option("--address", default=None, help=ADDRESS_HELP)
@click.option("--model", default="gemma-270m", show_default=True, help="A generation model from config.yaml.")
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(min=1),
              help="Tokens per answer, unless a line sets max_tokens.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 = greedy.")
@click.option("--in-flight", default=8, show_default=True, type=click.IntRange(min=1),
              help="Prompts submitted at once (bounds cluster memory; a worker decodes up to its model's parallel).")
@click.option("--spread", is_flag=True,
              help="Use every worker that can run the model (its tier and fallback tiers), each kept busy.")
@click.option("--priority", type=int, default=0, show_default=True, help="Dask priority: higher runs first.")
@click.option("--config", "config_path", default=None, help=CONFIG_HELP)
def generate_cmd(prompts_file, output, address, model, max_tokens, temperature, in_flight, spread, priority,
                 config_path):
    """Generate an answer for every prompt in a JSONL file, writing each as it finishes.

    Every line is checked before anything runs. A line without an "id" is known by a hash
    of its prompt (and its occurrence, so duplicates stay distinct), so editing other lines
    keeps it. A rerun on the same OUTPUT skips the answers already there (an interrupted
    run resumes); while a run writes OUTPUT, a second one on it stops at once.

    \b
    Examples:
      aicluster generate --prompts questions.jsonl -o answers.jsonl --max-tokens 64
      aicluster generate --prompts questions.jsonl -o answers.jsonl --spread --priority 10
    """
    from distributed import as_completed
    from tqdm import tqdm

    from workloads.backends import precheck

    output = _output(output)
    jobs = _read_prompts(prompts_file, max_tokens)
    cfg = load_cfg(config_path)
    try:
        spec = cfg.model(model)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    too_long = []
    for job in jobs:
        try:
            precheck(spec, [job["prompt"]], model, max_tokens=job["max_tokens"])
        except ValueError as e:
            too_long.append(f"{prompts_file}:{job['line']} (id {job['id']}): {e}")
    if too_long:
        raise click.ClickException(f"{len(too_long)} prompt(s) do not fit, nothing was run:\n  " + "\n  ".join(too_long[:20]))
    log = ResultLog(output, key="id", fields=("id", "text"), inputs=(prompts_file,))
    try:
        log.open()
    except OutputError as e:
        raise click.ClickException(str(e)) from None
    failed = retried = 0
    with log:
        done_ids = log.done_keys()
        # an answer made from another prompt or with other settings is not this job's answer
        changed = []
        for j in jobs:
            rec = log.records.get(j["id"])
            if rec is None:
                continue
            now = {"prompt": j["prompt"], "model": model, "max_tokens": j["max_tokens"], "temperature": temperature}
            diff = [k for k, v in now.items() if k in rec and rec[k] != v]
            if diff:
                changed.append(f"{prompts_file}:{j['line']} (id {j['id']}): "
                               + ", ".join(f"{k} {rec[k]!r}, now {now[k]!r}" for k in diff))
        if changed:
            raise click.ClickException(
                f"{output} holds {len(changed)} answer(s) made from another prompt or with other settings; write to "
                "another file, or delete those lines from it:\n  " + "\n  ".join(changed[:10]))
        todo = [j for j in jobs if j["id"] not in done_ids]
        if len(todo) < len(jobs):
            click.echo(f"resuming: {len(jobs) - len(todo)} of {len(jobs)} already in {output}")
        if not todo:
            click.echo("nothing left to do")
            return
        with _connect(address, config_path) as ai, tqdm(total=len(todo), desc="generating", unit="prompt") as bar:

            def record(job, r) -> None:
                log.write({"id": job["id"], "prompt": job["prompt"], "text": r["text"],
                           "completion_tokens": r["completion_tokens"], "finish_reason": r["finish_reason"],
                           "model": model, "max_tokens": job["max_tokens"], "temperature": temperature,
                           "worker": r["worker"], "tier": r["tier"], "simulated": r["simulated"]})
                bar.update(1)

            def failed_one(job, err) -> None:
                nonlocal failed
                failed += 1
                tqdm.write(f"{prompts_file}:{job['line']} (id {job['id']}): {type(err).__name__}: {err}", file=sys.stderr)
                bar.update(1)

            try:
                if spread:
                    from .spread import spread_generate

                    spec = ai.config.model(model)
                    params = [dict(max_tokens=j["max_tokens"], temperature=float(temperature), top_p=1.0, stop=[],
                                   seed=None) for j in todo]
                    spread_generate(ai.core, spec, model, [j["prompt"] for j in todo], params, priority=priority,
                                    on_part=lambda i, r, h: record(todo[i], r),
                                    on_error=lambda i, err: failed_one(todo[i], err), wait=True)
                else:
                    pending = iter(todo)
                    by_key = {}
                    ac = as_completed([], loop=ai.client.loop)

                    def submit(job) -> None:
                        f = ai.generate(job["prompt"], model=model, max_tokens=job["max_tokens"],
                                        temperature=temperature, priority=priority)
                        by_key[f.key] = job
                        ac.add(f)

                    def resubmitted(items) -> None:  # lost with a restarting scheduler: the facade redid them
                        nonlocal retried
                        for r in items:
                            job = by_key.get(r.key)
                            if job is not None:
                                retried += 1
                                tqdm.write(f"{prompts_file}:{job['line']} (id {job['id']}): lost with the scheduler; "
                                           "retried", file=sys.stderr)

                    def submit_next():
                        job = next(pending, None)
                        if job is not None:
                            submit(job)

                    stop = ai.on_resubmit(resubmitted)
                    try:
                        for _ in range(in_flight):
                            submit_next()
                        for f in ac:
                            if f.status in ("lost", "pending"):  # its result went with a worker: computed again
                                ac.add(f)
                                continue
                            job = by_key.pop(f.key)
                            err = failure(f)
                            if err is not None:
                                failed_one(job, err)
                            else:
                                record(job, f.result())
                            submit_next()
                    finally:
                        stop()
            except Exception as e:
                _fail(e)
    click.echo(f"wrote {len(todo) - failed} answers to {output}"
               + (f" ({retried} retried after the scheduler restarted)" if retried else "")
               + (f"; {failed} failed (see above), run again to retry them" if failed else ""))
    if failed:
        raise SystemExit(1)


def _read_prompts(path: Path, max_tokens: int) -> list[dict]:
    """Every line of a prompts JSONL, checked: a list of {id, prompt, max_tokens, line}, or
    one error that names each bad line (file:line and id)."""
    try:
        lines = read_lines(path)
    except InputFileError as e:
        raise click.ClickException(str(e)) from None
    jobs, errors, given = [], [], {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"{where}: not JSON ({e.msg})")
            continue
        if not isinstance(obj, dict):
            errors.append(f'{where}: expected an object {{"prompt": "..."}}, got {line[:60]}')
            continue
        if "id" in obj:
            if isinstance(obj["id"], (dict, list)) or obj["id"] is None or str(obj["id"]).strip() == "":
                errors.append(f"{where}: id must be a non-empty string or number, got {obj['id']!r}")
                continue
            where += f" (id {obj['id']})"
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            errors.append(f'{where}: expected {{"prompt": "<non-empty text>"}}, got {line[:80]}')
            continue
        mt = obj.get("max_tokens", max_tokens)
        if isinstance(mt, bool) or not isinstance(mt, int) or mt <= 0:
            errors.append(f"{where}: max_tokens must be a positive integer, got {mt!r}")
            continue
        if "id" in obj:
            given.setdefault(str(obj["id"]), []).append(n)
        jobs.append({"id": str(obj["id"]) if "id" in obj else None, "prompt": prompt, "max_tokens": mt, "line": n})
    for jid, at in given.items():
        if len(at) > 1:
            errors.append(f"{path}: id {jid!r} is used on lines {', '.join(map(str, at))}; ids must be unique")
    if errors:
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise click.ClickException(f"{len(errors)} bad line(s), nothing was run:\n  " + "\n  ".join(errors[:20]) + more)
    if not jobs:
        raise click.ClickException(f"{path} has no prompts")
    # a line without an id is known by its prompt (and occurrence), not by its line number,
    # which shifts when the file is edited
    unnamed = [j for j in jobs if j["id"] is None]
    for j, k in zip(unnamed, content_keys([j["prompt"] for j in unnamed], str)):
        j["id"] = f"p-{k}"
    return jobs


@click.command("pipeline")
@click.argument("spec")
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE",
              help="Override a param of the pipeline (repeatable; VALUE is read as YAML, so 3 is a number).")
@click.option("--address", default=None, help=ADDRESS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print every stage's output and placement as JSON.")
@click.option("--priority", type=int, default=0, show_default=True,
              help="Dask priority of the run's stages (higher runs first; a stage's own priority: wins).")
@click.option("--config", "config_path", default=None, help=CONFIG_HELP)
def pipeline_cmd(spec, sets, address, as_json, priority, config_path):
    """Run a pipeline: a YAML file, or the name of a shipped one (rag).

    Prints which worker ran each stage, when, and the final output.

    \b
    Examples:
      aicluster pipeline rag --set question="Which file format does llama.cpp use?"
      aicluster pipeline my_pipeline.yaml --address tcp://192.168.1.10:8786 --json
    """
    import yaml

    from . import pipeline
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
            result = pipeline.submit_pipeline(ai.core, spec_dict, params, priority).result()
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
@click.option("--state", type=click.Choice(["pending", "running", "done", "failed", "cancelled", "lost"]), multiple=True,
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
    from .jobs import format_jobs, job_rows

    cfg = load_cfg(config_path)
    with scheduler_client(address, cfg) as client:
        rows = client.run_on_scheduler(job_rows, states=list(state) or None, limit=limit)
    click.echo(json.dumps(rows, indent=2, default=str) if as_json else format_jobs(rows))


@click.command("models")
@click.argument("address", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--config", "config_path", default=None, help=CONFIG_HELP)
def models_cmd(address, as_json, config_path):
    """List what each PC's model cache holds: the files fetched from other PCs of the cluster
    at ADDRESS, their size, SHA-256, source, last use and whether a resident model uses them.

    \b
    Examples:
      aicluster models tcp://192.168.1.10:8786
      aicluster models tcp://192.168.1.10:8786 --json
    """
    from .modelfiles import cache_listing, format_caches

    cfg = load_cfg(config_path)
    with scheduler_client(address, cfg) as client:
        names = {a: str(w.get("name", a)) for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
        listing = {names.get(a, a): c for a, c in client.run(cache_listing, on_error="return").items()
                   if isinstance(c, dict)}
    click.echo(json.dumps(listing, indent=2, default=str) if as_json else format_caches(listing))


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
    cfg = load_cfg(config_path)
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
@click.option("--address", default=None, help=ADDRESS_HELP)
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

    from .files import check_writable_dir

    output = output or Path("reports") / _time.strftime("bench-%Y%m%d-%H%M%S")
    try:
        check_writable_dir(output, "report folder")
    except OutputError as e:
        raise click.ClickException(str(e)) from None
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
              help="JSON lines of results (default: JOBS_FILE with .results.jsonl); a rerun resumes it.")
@click.option("--force", is_flag=True, help="Discard the results already in OUTPUT and run every job again.")
@click.option("--in-flight", default=4, show_default=True, type=click.IntRange(min=1), help="Jobs submitted at once.")
@click.option("--priority", type=int, default=0, show_default=True,
              help='Dask priority of jobs without a "priority" of their own (higher runs first).')
@click.option("--address", default=None, help=ADDRESS_HELP)
@click.option("--config", "config_path", default=None, help=CONFIG_HELP)
def submit_cmd(jobs_file, output, force, in_flight, priority, address, config_path):
    """Run a JSON list of benchmark jobs in the GPU job-queue seed's format.

    Each job: {"job_type": "matrix_multiply", "size": 1000, "iterations": 10, "prefer_gpu": true,
    "priority": 0}. prefer_gpu jobs go to a free GPU worker (best tier first), queue on the
    best GPU tier when all are busy, and fall back to the CPU tier. Each
    result is written as a JSON line as it finishes; a bad job gets an error line and the
    others go on. Ends with counts and times per job_type x tier, jobs per second and the
    GPU-over-CPU speedup, and how many jobs each worker ran.

    A rerun with the same OUTPUT skips the jobs it already completed (each job is known by
    its content) and runs the failed and missing ones; --force starts over.

    \b
    Example:
      aicluster submit jobs.json -o results.jsonl --address tcp://192.168.1.10:8786
    """
    raw = jobs_file.read_bytes()
    try:
        jobs = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise click.ClickException(f"{jobs_file}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); save it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise click.ClickException(f"{jobs_file}:{e.lineno}: not JSON ({e.msg})") from None
    if isinstance(jobs, dict) and isinstance(jobs.get("jobs"), list):
        jobs = jobs["jobs"]
    if not isinstance(jobs, list) or not jobs:
        raise click.ClickException(f"{jobs_file}: expected a non-empty JSON list of job objects")
    output = _output(output or jobs_file.with_suffix(".results.jsonl"))
    keys = content_keys(jobs, lambda j: json.dumps(j, sort_keys=True))
    log = ResultLog(output, key="key", fields=("key", "status"), done=lambda r: r["status"] == "completed",
                    inputs=(jobs_file,))
    try:
        log.open(restart=force)
    except OutputError as e:
        raise click.ClickException(str(e)) from None
    from tqdm import tqdm

    with log:
        done = log.done_keys()
        todo = [i for i, k in enumerate(keys) if k not in done]
        if len(todo) < len(jobs):
            click.echo(f"resuming: {len(jobs) - len(todo)} of {len(jobs)} jobs already completed in {output} "
                       "(--force runs them all again)")
        if not todo:
            click.echo("nothing left to do")
            return
        with _connect(address, config_path) as ai:
            def write(o):
                i = todo[o["index"]]
                o = {"key": keys[i], **o, "index": i}
                log.write(o)
                if o["status"] == "failed":
                    tqdm.write(f"job {o['job_id']}: {o['error']}", file=sys.stderr)

            res = ai.run_jobs([jobs[i] for i in todo], on_result=write, in_flight=in_flight, ids=todo, priority=priority)
    from .bench_report import format_stats

    click.echo(format_stats(res["stats"]))
    click.echo(f"results: {output}")
    if res["stats"]["failed"]:
        raise SystemExit(1)


@click.command("shard")
@click.argument("model")
@click.option("--address", default=None, help=ADDRESS_HELP)
@click.option("--workers", default=None,
              help="Comma-separated worker names or addresses to split over, head first (default: the planner "
                   "chooses the fewest workers of the best tiers that hold it).")
@click.option("--load", is_flag=True, help="Load the model across the planned workers now, with a progress bar.")
@click.option("--prompt", default=None, help="After loading, generate for this prompt (greedy) and print it.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=32, show_default=True, help="Tokens for --prompt.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--config", "config_path", default=None, help=CONFIG_HELP)
def shard_cmd(model, address, workers, load, prompt, max_tokens, as_json, config_path):
    """Show how MODEL splits by layers across the workers' shard servers (and load it).

    Only workers started with --shard-server (worker.shard_server in config.yaml) hold
    layers; see the README, "Models bigger than one GPU".

    \b
    Examples:
      aicluster shard gemma-270m-split --address tcp://192.168.1.10:8786
      aicluster shard gemma-270m-split --address tcp://192.168.1.10:8786 --load
      aicluster shard gemma-270m-split --workers pc1-VRAM12-9000,pc2-VRAM6-9000 --load --prompt "Hello"
    """
    from workloads.shard_protocol import ShardServerError

    from .shard_plan import ShardPlanError

    names = [w.strip() for w in workers.split(",") if w.strip()] if workers else None
    with _connect(address, config_path) as ai:
        try:
            if model not in ai.config.models:
                raise click.ClickException(f"{model!r} is not a model; models: {', '.join(ai.config.models)}")
            spec = ai.config.model(model)
            plan = ai.plan_shards(model, workers=names)
            click.echo(json.dumps(plan.to_dict(), indent=2) if as_json else str(plan))
            if not (load or prompt):
                return
            if not spec.sharded:
                raise click.ClickException(f"model {model!r} has no `shard:` in config.yaml, so it is not loaded split; "
                                           f"add `shard: true` (or shard: {{workers: [...]}}) to models.{model}")
            if names and names != spec.shard_workers:
                from .config import ShardConfig

                shard = (spec.shard.model_copy(update={"workers": names}) if isinstance(spec.shard, ShardConfig)
                         else ShardConfig(workers=names))  # (its output and plan settings kept)
                ai.config.models[model] = spec.model_copy(update={"shard": shard})
            info = ai.load_model(model)
            click.echo(f"loaded {model}: head {info.get('worker')}, {info['load_seconds']:.1f} s")
            if prompt:
                out = ai.generate(prompt, model=model, max_tokens=max_tokens).result()
                click.echo(out["text"])
        except (ShardPlanError, ShardServerError, ValueError, MemoryError) as e:
            raise click.ClickException(str(e)) from None
        except RuntimeError as e:
            _fail(e)
