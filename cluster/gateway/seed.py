"""The seed's routes, thin aliases over the same calls: ``POST /inference``, ``POST /embed``,
``POST /embed-batch`` (the seed's clients send what they like: unknown fields are ignored)."""
from __future__ import annotations

from fastapi import APIRouter, Depends

from .deps import AUTHED, gateway
from .schemas import EmbedBatchRequest, EmbedRequest, InferenceRequest
from .service import Gateway

__all__ = ["router"]

router = APIRouter()


@router.post("/inference", dependencies=AUTHED)
async def inference(req: InferenceRequest, gw: Gateway = Depends(gateway)):
    model = req.model or gw.default_model("generate")
    params = gw.sampling(req, req.max_tokens)
    (r,) = await gw.answer("/inference", model, lambda: gw.generate(model, params, 1, prompt=req.prompt),
                           tokens=lambda rs: rs[0]["completion_tokens"])
    return {"text": r["text"], "model": model, "prompt_tokens": r["prompt_tokens"],
            "completion_tokens": r["completion_tokens"], "finish_reason": r["finish_reason"],
            "worker": r["worker"], "tier": r["tier"], "simulated": r["simulated"],
            "tokens_per_second": r["tokens_per_second"]}

@router.post("/embed", dependencies=AUTHED)
async def embed_one(req: EmbedRequest, gw: Gateway = Depends(gateway)):
    model = req.model or gw.default_model("embed")
    (v,) = await gw.answer("/embed", model, lambda: gw.embed(model, [req.text]))
    return {"embedding": v.tolist(), "dimensions": int(v.shape[0]), "model": model}

@router.post("/embed-batch", dependencies=AUTHED)
async def embed_batch(req: EmbedBatchRequest, gw: Gateway = Depends(gateway)):
    model = req.model or gw.default_model("embed")
    vecs = await gw.answer("/embed-batch", model, lambda: gw.embed(model, req.texts))
    return {"embeddings": vecs.tolist(), "count": int(vecs.shape[0]), "dimensions": int(vecs.shape[1]),
            "model": model}
