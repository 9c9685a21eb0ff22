"""The cluster's own routes: ``GET /health`` (no key: for load balancers), ``GET /status``,
``GET /config`` (without secrets), ``GET /models``."""
from __future__ import annotations

import json

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from .deps import AUTHED, gateway
from .openai import list_models
from .service import Gateway

__all__ = ["router", "redacted_config"]

router = APIRouter()


@router.get("/health")
async def health(gw: Gateway = Depends(gateway)):
    tiers = await gw.run(gw.ai.live_tiers)
    n = sum(len(w) for w in tiers.values())
    body = {"status": "ok" if n else "no workers", "workers": n, "tiers": {t: len(w) for t, w in tiers.items()}}
    return JSONResponse(body, status_code=200 if n else 503)

@router.get("/status", dependencies=AUTHED)
async def status(gw: Gateway = Depends(gateway)):
    rows = await gw.run(gw.ai.status)
    return json.loads(json.dumps({"scheduler": gw.ai.scheduler_address, "workers": list(rows),
                                  "requests_in_flight": dict(gw.inflight)}, default=str))

@router.get("/config", dependencies=AUTHED)
async def config(gw: Gateway = Depends(gateway)):
    return redacted_config(gw.cfg)

@router.get("/models", dependencies=AUTHED)
async def models(gw: Gateway = Depends(gateway)):
    listing = await list_models(gw)
    return {"models": [{k: m[k] for k in ("id", "kind", "backend", "tier", "resident_on")} for m in listing["data"]]}


def redacted_config(cfg) -> dict:
    """The config as a dict, without secrets or file paths: API keys, certificate and key
    files, and model sources that are paths become ``"<redacted>"``."""
    data = cfg.model_dump(exclude={"path"})
    data["server"]["api_keys"] = ["<redacted>"] * len(data["server"]["api_keys"])
    for k in ("ca_file", "cert_file", "key_file"):
        if data["security"][k]:
            data["security"][k] = "<redacted>"
    for m in data["models"].values():
        if not str(m["source"]).startswith("package:"):
            m["source"] = "<redacted path>"
    return data
