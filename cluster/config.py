"""Load and validate ``config.yaml``.

The schema is written with pydantic (strict keys, typed fields) so that every error can
name its key path; cross-references (tier names used by models, routing, workers) are
checked after the field types, with the allowed values in the message.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from dask.utils import parse_bytes
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

#: the backends the workloads package ships (their code loads only on a worker that uses them)
from workloads.backends import BUILTIN as BACKENDS

__all__ = ["Config", "ConfigError", "load_config", "find_config", "BACKENDS"]


ENV_VAR = "AICLUSTER_CONFIG"


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and key path."""


def _size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected a size like '12GB', got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value!r}")
        return int(value)
    if isinstance(value, str):
        try:
            n = int(parse_bytes(value.replace(" ", "")))
        except (ValueError, KeyError):
            raise ValueError(f"expected a size like '12GB' or '500MB', got {value!r}") from None
        if n < 0:
            raise ValueError(f"a size cannot be negative, got {value!r}")
        return n
    raise ValueError(f"expected a size like '12GB', got {value!r}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TierConfig(_Strict):
    min_vram: int = 0
    slots: int = Field(default=1, ge=0)

    _v = field_validator("min_vram", mode="before")(lambda cls, v: _size(v))

    @property
    def is_gpu(self) -> bool:
        return self.min_vram > 0


class ShardConfig(_Strict):
    #: worker names or addresses to split over, head first (empty: the planner chooses)
    workers: list[str] = Field(default_factory=list)
    #: where the output layer (and so the logits, a vocabulary-wide row per token) is
    #: computed: "head", on the head worker's own shard server, so that only hidden states
    #: cross the LAN; "last", on the last worker of the split (as before; about 1 MiB per
    #: token crosses the network for Gemma's 262k vocabulary)
    output: Literal["head", "last"] = "head"
    #: how the layers are divided: "speed", by each shard server's measured ms per layer and
    #: link (measured once per model and device, cached), leaving out a PC that would only
    #: slow the others; "memory", in proportion to free memory, best tiers first
    plan: Literal["speed", "memory"] = "speed"


class ModelConfig(_Strict):
    backend: str
    source: str
    tier: str
    footprint: int = 0
    preload: bool = False
    options: dict[str, Any] = Field(default_factory=dict)
    #: split by layers across workers' shard servers (llamacpp only): true, or {workers: [...]}
    shard: Union[bool, ShardConfig] = False

    @property
    def sharded(self) -> bool:
        return bool(self.shard)

    @property
    def shard_workers(self) -> list[str]:
        return list(self.shard.workers) if isinstance(self.shard, ShardConfig) else []

    @property
    def shard_output(self) -> str:
        return self.shard.output if isinstance(self.shard, ShardConfig) else "head"

    @property
    def shard_plan_by(self) -> str:
        return self.shard.plan if isinstance(self.shard, ShardConfig) else "speed"

    _v = field_validator("footprint", mode="before")(lambda cls, v: _size(v))

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        if v not in BACKENDS and ":" not in v:
            raise ValueError(f"{v!r} is not a backend; use one of {', '.join(BACKENDS)} or 'package.module:load'")
        return v


class RoutingConfig(_Strict):
    fallback: dict[str, list[str]] = Field(default_factory=dict)
    prefer_resident: bool = True
    restart_grace: float = Field(default=30.0, ge=0)


class SchedulerConfig(_Strict):
    address: str = "tcp://127.0.0.1:8786"
    host: str = ""
    port: int = Field(default=8786, ge=0, le=65535)
    dashboard_port: int = Field(default=8787, ge=0, le=65535)
    #: the job board's SQLite file ("": ~/.local/share/aicluster/jobs-<port>.sqlite3; "none": memory only)
    jobs_db: str = ""
    jobs_max: int = Field(default=2000, ge=1)
    jobs_max_age: float = Field(default=7 * 86400, gt=0)


class ReconnectConfig(_Strict):
    initial_delay: float = Field(default=1.0, gt=0)
    max_delay: float = Field(default=30.0, gt=0)


class WorkerConfig(_Strict):
    tier: str = "auto"
    host: str = ""
    port: int = Field(default=0, ge=0, le=65535)
    nanny_port: int = Field(default=0, ge=0, le=65535)
    nthreads: int = Field(default=1, ge=1)
    memory_limit: Union[int, Literal["auto"]] = "auto"
    model_budget: float = Field(default=0.8, gt=0, le=1)
    torch_threads: int = Field(default=1, ge=1)
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig)
    #: run a ggml RPC shard server (models split across workers); no auth, no TLS: off by default
    shard_server: bool = False
    shard_port: int = Field(default=50052, ge=0, le=65535)
    #: split models this worker serves layers of at once: one shard server each (a ggml RPC
    #: server serves one head at a time), on shard_port, shard_port + 1, ...
    shard_models: int = Field(default=2, ge=1, le=16)
    #: where model files fetched from other PCs go ("": ~/.cache/aicluster/models/<worker name>)
    model_cache: str = ""
    #: the most that folder holds (least recently used out first); None: no limit
    model_cache_size: Union[int, None] = None

    @field_validator("memory_limit", mode="before")
    @classmethod
    def _mem(cls, v: Any) -> Any:
        return v if v == "auto" else _size(v)

    @field_validator("model_cache_size", mode="before")
    @classmethod
    def _cache_size(cls, v: Any) -> Any:
        return None if v is None else _size(v)


class LocalWorkerConfig(_Strict):
    name: str
    tier: str
    nthreads: int = Field(default=1, ge=1)
    memory_limit: Union[int, Literal["auto"]] = "auto"
    shard_server: bool = False
    #: 0: a free port
    shard_port: int = Field(default=0, ge=0, le=65535)

    _v = field_validator("memory_limit", mode="before")(WorkerConfig._mem.__func__)


class LocalConfig(_Strict):
    host: str = "127.0.0.1"
    processes: bool = True
    workers: list[LocalWorkerConfig] = Field(default_factory=list)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys: list[str] = Field(default_factory=list)
    max_body: int = 1_000_000
    request_timeout: float = Field(default=300.0, gt=0)
    max_queue: int = Field(default=64, ge=1)
    default_max_tokens: int = Field(default=256, ge=1)
    generate_model: Union[str, None] = None
    embed_model: Union[str, None] = None

    _v = field_validator("max_body", mode="before")(lambda cls, v: _size(v))

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        for k in v:
            if len(k) < 8:
                raise ValueError("an API key must be at least 8 characters")
        return v


class SecurityConfig(_Strict):
    tls: bool = False
    ca_file: Union[str, None] = None
    cert_file: Union[str, None] = None
    key_file: Union[str, None] = None


class Config(_Strict):
    """A validated cluster configuration (see the comments in config.yaml)."""

    tiers: dict[str, TierConfig]
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    local: LocalConfig = Field(default_factory=LocalConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    #: the file this was read from (None for a dict)
    path: Union[str, None] = None

    @property
    def tier_names(self) -> list[str]:
        return list(self.tiers)

    @property
    def cpu_tier(self) -> str:
        return next(n for n, t in self.tiers.items() if not t.is_gpu)

    def fallback_chain(self, tier: str) -> list[str]:
        """``tier`` followed by its fallbacks, without repeats."""
        chain = [tier]
        for t in self.routing.fallback.get(tier, []):
            if t not in chain:
                chain.append(t)
        return chain

    def model(self, name: str) -> ModelConfig:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(self.models) or "(none)"
            raise ConfigError(
                f"unknown model {name!r}; models in {self.path or 'the config'}: {known}"
            ) from None

    def security_path(self, key: str) -> str | None:
        """``security.<key>`` as a path: ``{hostname}`` replaced by this PC's host name (so one
        config.yaml can name each PC's own certificate), relative to the config file's folder."""
        value = getattr(self.security, key)
        if not value:
            return None
        import socket

        p = Path(os.path.expanduser(value.replace("{hostname}", socket.gethostname())))
        if not p.is_absolute() and self.path:
            p = Path(self.path).resolve().parent / p
        return str(p)

    def security_object(self):
        """A ``distributed.security.Security`` for this config (None when TLS is off).

        Mutual TLS: every process presents this PC's certificate and accepts only peers whose
        certificate the CA signed (Dask does not check host names: the CA is the cluster's own).
        """
        if not self.security.tls:
            return None
        from distributed.security import Security

        ca, cert, key = (self.security_path(k) for k in ("ca_file", "cert_file", "key_file"))
        return Security(
            tls_ca_file=ca,
            tls_client_cert=cert,
            tls_client_key=key,
            tls_scheduler_cert=cert,
            tls_scheduler_key=key,
            tls_worker_cert=cert,
            tls_worker_key=key,
            require_encryption=True,
        )

    def dask_settings(self) -> dict:
        """Dask config keys this config implies: with TLS, the dashboard (and every worker's
        HTTP server, ``/metrics`` included) is served over HTTPS with this PC's certificate
        (server side only: browsers and Prometheus have none). Apply them with
        ``dask.config.set(...)`` as a context around building servers."""
        if not self.security.tls:
            return {}
        return {"distributed.scheduler.dashboard.tls.cert": self.security_path("cert_file"),
                "distributed.scheduler.dashboard.tls.key": self.security_path("key_file"),
                "distributed.scheduler.dashboard.tls.ca-file": None}

    def dashboard_link(self, client) -> str:
        """``client.dashboard_link`` with the scheme this config serves it with (Dask derives
        the scheme from its global config, which these settings only change while a cluster
        or worker is being built)."""
        link = client.dashboard_link
        if self.security.tls and link.startswith("http://"):
            link = "https://" + link.removeprefix("http://")
        return link

    @property
    def scheme(self) -> str:
        return "tls" if self.security.tls else "tcp"


def _check_references(cfg: Config) -> list[str]:
    errors = []
    tiers = cfg.tier_names
    known = ", ".join(tiers)

    def check(path: str, name: str, extra: tuple[str, ...] = ()) -> None:
        if name not in tiers and name not in extra:
            allowed = ", ".join((*extra, *tiers))
            errors.append(f"{path}: {name!r} is not a tier; known: {allowed}")

    if not tiers:
        errors.append("tiers: at least one tier is needed")
    elif not any(not t.is_gpu for t in cfg.tiers.values()):
        errors.append(f"tiers: one tier must have min_vram: 0 (for workers without a GPU); tiers: {known}")
    for name, m in cfg.models.items():
        check(f"models.{name}.tier", m.tier)
        if m.sharded and m.backend != "llamacpp":
            errors.append(f"models.{name}.shard: only llamacpp models can be split across workers, not {m.backend}")
        if "shard_plan" in m.options:
            errors.append(f"models.{name}.options.shard_plan: set by the planner, not in config (use shard:)")
    for tier, chain in cfg.routing.fallback.items():
        check(f"routing.fallback.{tier}", tier)
        for i, t in enumerate(chain):
            check(f"routing.fallback.{tier}[{i}]", t)
    check("worker.tier", cfg.worker.tier, extra=("auto",))
    seen = set()
    for i, w in enumerate(cfg.local.workers):
        check(f"local.workers[{i}].tier", w.tier)
        if w.name in seen:
            errors.append(f"local.workers[{i}].name: {w.name!r} is used twice; names must be unique")
        seen.add(w.name)
    s = cfg.security
    if s.tls:
        for key in ("ca_file", "cert_file", "key_file"):
            value = getattr(s, key)
            if not value:
                errors.append(f"security.{key}: needed when security.tls is true (make them with `aicluster certs`)")
            elif not Path(cfg.security_path(key)).is_file():
                errors.append(f"security.{key}: file {cfg.security_path(key)!r} does not exist")
    for key in ("generate_model", "embed_model"):
        name = getattr(cfg.server, key)
        if name is not None and name not in cfg.models:
            errors.append(f"server.{key}: {name!r} is not a model; models: {', '.join(cfg.models) or '(none)'}")
    from .security import AddressError, check_address

    try:
        check_address(cfg.scheduler.address, s.tls, cfg.path or "the config", resolve=False)
    except AddressError as e:
        errors.append(f"scheduler.address: {e}")
    return errors


def _format_pydantic(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = ""
        for part in e["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        if e["type"] == "extra_forbidden":
            parent = _model_at(Config, e["loc"][:-1])
            allowed = ", ".join(f for f in parent.model_fields if f != "path") if parent else "?"
            out.append(f"{loc}: unknown key; allowed here: {allowed}")
        elif e["type"] == "literal_error":
            out.append(f"{loc}: {e['input']!r} is not allowed; {e['msg'].replace('Input should be', 'use')}")
        elif e["type"] == "missing":
            out.append(f"{loc}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            out.append(f"{loc}: {msg} (got {e['input']!r})" if "got" not in msg else f"{loc}: {msg}")
    return out


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class found at ``loc`` (skipping dict keys and list indices)."""
    import typing

    current: Any = model
    skip = 0
    for part in loc:
        if skip:  # a dict key or list index after a container field
            skip -= 1
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        if part not in current.model_fields:
            return None
        ann = current.model_fields[part].annotation
        while typing.get_origin(ann) in (dict, list):
            ann = typing.get_args(ann)[-1]
            skip += 1
        current = ann
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def find_config(path: str | os.PathLike | None = None) -> Path:
    """The config file to use: ``path``, $AICLUSTER_CONFIG, ./config.yaml, the project's."""
    candidates: list[tuple[str, Path]] = []
    if path is not None:
        candidates.append(("the path given", Path(path)))
    elif os.environ.get(ENV_VAR):
        candidates.append((f"${ENV_VAR}", Path(os.environ[ENV_VAR])))
    else:
        candidates.append(("the current directory", Path.cwd() / "config.yaml"))
        candidates.append(("the project", Path(__file__).resolve().parent.parent / "config.yaml"))
    for _, p in candidates:
        if p.is_file():
            return p
    tried = "; ".join(f"{p} ({why})" for why, p in candidates)
    raise ConfigError(f"no config file found; tried {tried}. Pass --config FILE or set {ENV_VAR}.")


def load_config(source: str | os.PathLike | dict | Config | None = None) -> Config:
    """Read and validate a config.

    Parameters
    ----------
    source
        A path to a YAML file, an already-parsed ``dict``, a ``Config`` (returned as is),
        or None to search ($AICLUSTER_CONFIG, ./config.yaml, the project's config.yaml).

    Raises
    ------
    ConfigError
        With one line per problem, each naming the key path and the allowed values.
    """
    if isinstance(source, Config):
        return source
    where = "config"
    if isinstance(source, dict):
        data = source
    else:
        path = find_config(source)
        where = str(path)
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); save the file as UTF-8") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (tiers, models, ...)")
        data = {**data, "path": str(path)}
    if "path" in data and not isinstance(source, (str, os.PathLike, type(None))):
        data = {k: v for k, v in data.items() if k != "path"}
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        lines = _format_pydantic(e)
        raise ConfigError(f"{where}: {len(lines)} problem(s):\n  " + "\n  ".join(lines)) from None
    errors = _check_references(cfg)
    if errors:
        raise ConfigError(f"{where}: {len(errors)} problem(s):\n  " + "\n  ".join(errors))
    return cfg
